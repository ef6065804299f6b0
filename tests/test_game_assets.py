"""data_rendering/game_assets: the MD2, G3D and IQM readers on tiny files written here byte by byte (expected values
computed here in float64 from the bytes written, never with the readers' helpers), the atlas, the licence lookup,
the split by model, one real file per cached Debian package, and the whole command on a .deb built here."""
import json
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_rendering.game_assets import megaglest
from data_rendering.game_assets.__main__ import MANIFEST, main
from data_rendering.game_assets.assemble import BORDER, Part, merge_parts
from data_rendering.game_assets.copyright import licence_of, read_copyright
from data_rendering.game_assets.g3d import read_g3d
from data_rendering.game_assets.iqm import read_iqm, skin
from data_rendering.game_assets.md2 import read_anm, read_md2
from data_rendering.game_assets.packages import RESERVED
from data_rendering.game_assets.split import groups, split
from datasets import layout
from utils import cli
from utils.cli import InputError

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "data" / "game_cache" / "root"
REAL = REPO / "data" / "real"


# ============================================================================================== MD2
MD2_SCALE, MD2_SHIFT = (0.5, 0.25, 2.0), (-1.0, 3.0, 0.5)
MD2_PACKED = np.array([[[0, 0, 0, 7], [10, 0, 0, 161], [0, 20, 0, 0], [0, 0, 30, 42]],
                       [[1, 2, 3, 8], [11, 2, 3, 160], [1, 22, 3, 1], [1, 2, 33, 43]]], np.uint8)
MD2_ST = [(0, 0), (64, 0), (0, 32), (32, 16)]
MD2_TRIS = [(0, 1, 2, 0, 1, 2), (0, 2, 3, 0, 2, 3)]


def md2_bytes(packed=MD2_PACKED, magic=b"IDP2") -> bytes:
    frames, verts = packed.shape[:2]
    frame_size = 40 + 4 * verts
    o_skins = 68
    o_st = o_skins + 64
    o_tris = o_st + 4 * len(MD2_ST)
    o_frames = o_tris + 12 * len(MD2_TRIS)
    o_end = o_frames + frames * frame_size
    out = struct.pack("<4s16i", magic, 8, 64, 32, frame_size, 1, verts, len(MD2_ST), len(MD2_TRIS), 0, frames,
                      o_skins, o_st, o_tris, o_frames, o_end, o_end)
    out += b"models/thing/skin.png".ljust(64, b"\0")
    out += b"".join(struct.pack("<2h", *st) for st in MD2_ST)
    out += b"".join(struct.pack("<6h", *tri) for tri in MD2_TRIS)
    for t in range(frames):
        scale = [s * (1 + t) for s in MD2_SCALE]  # a different scale per frame: each frame decodes with its own
        out += struct.pack("<6f", *scale, *MD2_SHIFT) + f"frame{t}".encode().ljust(16, b"\0") + packed[t].tobytes()
    return out


def test_md2_header_frames_and_decoding():
    model = read_md2(md2_bytes(), "tiny.md2")
    assert model.skin_size == (64, 32) and model.skins == ["models/thing/skin.png"]
    assert model.frames.shape == (2, 4, 3) and model.frame_names == ["frame0", "frame1"]
    for t in range(2):
        expected = np.array([[MD2_SCALE[k] * (1 + t) * float(MD2_PACKED[t, v, k]) + MD2_SHIFT[k] for k in range(3)]
                             for v in range(4)])
        np.testing.assert_allclose(model.frames[t], expected, rtol=0, atol=1e-6)
    assert model.frames[1, 3].tolist() == pytest.approx([-1.0 + 1.0, 3.0 + 1.0, 0.5 + 132.0])  # by hand
    assert model.normal_index.tolist() == [[7, 161, 0, 42], [8, 160, 1, 43]]
    assert model.faces.tolist() == [[0, 1, 2], [0, 2, 3]] and model.st_faces.tolist() == [[0, 1, 2], [0, 2, 3]]
    np.testing.assert_allclose(model.uvs(), [[0, 1], [1, 1], [0, 0], [0.5, 0.5]])  # t counts down, v up


def test_md2_refusals():
    with pytest.raises(InputError, match="not an MD2"):
        read_md2(md2_bytes(magic=b"IDP3"), "x.md2")
    with pytest.raises(InputError, match=r"x\.md2: truncated"):
        read_md2(md2_bytes()[:-3], "x.md2")
    bad = MD2_PACKED.copy()
    bad[0, 0, 3] = 162
    with pytest.raises(InputError, match="normal index 162"):
        read_md2(md2_bytes(bad), "x.md2")


def test_anm_table():
    text = "// name first last fps\n\nwalk\t0\t3\t10 // comment\nstand 4 4 1\n"
    clips = read_anm(text, "x.anm", 5)
    assert [(c.name, c.first, c.last, c.fps) for c in clips] == [("walk", 0, 3, 10.0), ("stand", 4, 4, 1.0)]
    with pytest.raises(InputError, match="x.anm, line 1: clip walk spans frames 0..9"):
        read_anm("walk 0 9 10", "x.anm", 5)


# ============================================================================================== G3D
def g3d_mesh(name, frames, faces, uvs=None, textures=(), diffuse=(0.2, 0.4, 0.6), props=0) -> bytes:
    frames = np.asarray(frames, np.float32)
    bits = (1 << len(textures)) - 1
    out = struct.pack("<64s3I8f2I", name.encode(), frames.shape[0], frames.shape[1], 3 * len(faces), *diffuse,
                      0, 0, 0, 1.0, 1.0, props, bits)
    out += b"".join(t.encode().ljust(64, b"\0") for t in textures)
    out += frames.tobytes() + np.zeros_like(frames).tobytes()  # positions, then normals
    if bits:
        out += np.asarray(uvs, np.float32).tobytes()
    return out + np.asarray(faces, np.uint32).tobytes()


G3D_A = np.array([[[0, 0, 0], [1, 0, 0], [0, 2, 0], [0, 0, 3]],
                  [[0, 0, 1], [1, 0, 1], [0, 2, 1], [0, 0, 4]],
                  [[0, 0, 3], [1, 0, 3], [0, 2, 3], [0, 0, 6]]], np.float64)
G3D_B = np.array([[[5, 0, 0], [6, 0, 0], [5, 1, 0]], [[5, 0, 2], [6, 0, 2], [5, 1, 2]]], np.float64)


def g3d_bytes() -> bytes:
    a = g3d_mesh("body", G3D_A, [[0, 1, 2], [0, 2, 3]], [[0, 0], [1, 0], [0, 1], [0.5, 0.5]], ("skin.png",),
                 props=1)
    b = g3d_mesh("plain", G3D_B, [[0, 1, 2]])
    return b"G3D" + bytes([4]) + struct.pack("<HB", 2, 0) + a + b


def test_g3d_meshes():
    a, b = read_g3d(g3d_bytes(), "tiny.g3d")
    assert (a.name, b.name) == ("body", "plain")
    np.testing.assert_array_equal(a.frames, G3D_A)
    np.testing.assert_array_equal(b.frames, G3D_B)
    assert a.textures == ["skin.png"] and a.has_diffuse_map and b.textures == [] and b.uvs is None
    assert a.faces.tolist() == [[0, 1, 2], [0, 2, 3]] and b.faces.tolist() == [[0, 1, 2]]
    np.testing.assert_allclose(b.diffuse, [0.2, 0.4, 0.6], atol=1e-7)
    assert a.properties == 1 and a.uvs[3].tolist() == [0.5, 0.5]
    with pytest.raises(InputError, match="G3D version 3"):
        read_g3d(b"G3D" + bytes([3]) + g3d_bytes()[4:], "old.g3d")
    with pytest.raises(InputError, match="tiny.g3d: truncated"):
        read_g3d(g3d_bytes()[:-1], "tiny.g3d")


def test_glest_clip_resamples_meshes_and_turns_y_up(tmp_path):
    """Mesh B (2 keyframes) is played over the clip time of mesh A (3): its middle frame is the mean of its two."""
    folder = tmp_path / "usr/share/games/megaglest/techs/t/factions/f/units/u/models"
    folder.mkdir(parents=True)
    (folder / "u_walking.g3d").write_bytes(g3d_bytes())
    Image.fromarray(np.full((4, 4, 4), [200, 100, 0, 255], np.uint8), "RGBA").save(folder / "skin.png")
    clip = megaglest._clip(tmp_path, folder / "u_walking.g3d")
    assert clip.error is None and clip.frames.shape == (3, 7, 3)
    b_middle = (G3D_B[0] + G3D_B[1]) / 2
    y_up = np.concatenate([G3D_A[1], b_middle])
    np.testing.assert_allclose(clip.frames[1], np.stack([y_up[:, 0], -y_up[:, 2], y_up[:, 1]], 1))
    assert clip.fields["faces"].tolist() == [[0, 1, 2], [0, 2, 3], [4, 5, 6]]
    assert clip.files[1].endswith("models/skin.png")


# ============================================================================================== IQM
def quat_matrix(q):
    """Rotation matrix of a unit quaternion (x, y, z, w), written out here independently of the readers."""
    x, y, z, w = np.asarray(q, np.float64) / np.linalg.norm(q)
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
                     [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
                     [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]])


IQM_POS = np.array([[0, 0, 0], [1, 0, 0.5], [0, 0, 1.5], [0, 1, 2], [1, 1, 1]], np.float64)
IQM_IDX = np.array([[0, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0]])
IQM_W = np.array([[255, 0, 0, 0], [255, 0, 0, 0], [255, 0, 0, 0], [255, 0, 0, 0], [153, 102, 0, 0]])
IQM_JOINTS = [(-1, (0, 0, 0), (0, 0, 0, 1)), (0, (0, 0, 1), (0, 0, 0, 1))]  # (parent, translate, rotate)
# frame 1 rotates joint 1 about x: Qx and Qw are animated channels (mask bits 3 and 6); offsets = the bind values
IQM_STREAM = [[0, 0], [30000, 55000]]   # per frame: joint 1's Qx, Qw
IQM_QSCALE = (2e-5, -1.3e-5)            # channel scales of Qx, Qw


def iqm_bytes() -> bytes:
    text = b"\0body\0skin\0root\0child\0walk\0"
    name = {s: text.index(s.encode() + b"\0") for s in ("body", "skin", "root", "child", "walk")}
    nv, nt = len(IQM_POS), 2
    layout_ = {}
    o = 124
    for key, size in (("text", len(text)), ("meshes", 24), ("arrays", 3 * 20), ("pos", 12 * nv), ("idx", 4 * nv),
                      ("w", 4 * nv), ("tris", 12 * nt), ("joints", 48 * 2), ("poses", 88 * 2), ("anims", 20),
                      ("frames", 2 * 2 * 2)):
        layout_[key], o = o, o + size + (-size % 4)
    head = struct.pack("<16s27I", b"INTERQUAKEMODEL\0", 2, o, 0, len(text), layout_["text"], 1, layout_["meshes"],
                       3, nv, layout_["arrays"], nt, layout_["tris"], 0, 2, layout_["joints"], 2, layout_["poses"],
                       1, layout_["anims"], 2, 2, layout_["frames"], 0, 0, 0, 0, 0)
    blob = bytearray(o)
    blob[:124] = head

    def put(key, data):
        blob[layout_[key]:layout_[key] + len(data)] = data

    put("text", text)
    put("meshes", struct.pack("<6I", name["body"], name["skin"], 0, nv, 0, nt))
    put("arrays", struct.pack("<15I", 0, 0, 7, 3, layout_["pos"], 4, 0, 1, 4, layout_["idx"],
                              5, 0, 1, 4, layout_["w"]))
    put("pos", IQM_POS.astype(np.float32).tobytes())
    put("idx", IQM_IDX.astype(np.uint8).tobytes())
    put("w", IQM_W.astype(np.uint8).tobytes())
    put("tris", np.array([[0, 1, 2], [2, 3, 4]], np.uint32).tobytes())
    joints = b""
    for (parent, t, q), nm in zip(IQM_JOINTS, ("root", "child")):
        joints += struct.pack("<Ii10f", name[nm], parent, *t, *q, 1, 1, 1)
    put("joints", joints)
    poses = b""
    for j, (parent, t, q) in enumerate(IQM_JOINTS):
        mask = 0b1001000 if j == 1 else 0
        scale = [0, 0, 0, IQM_QSCALE[0], 0, 0, IQM_QSCALE[1], 0, 0, 0] if j == 1 else [0] * 10
        poses += struct.pack("<iI20f", parent, mask, *t, *q, 1, 1, 1, *scale)
    put("poses", poses)
    put("anims", struct.pack("<3IfI", name["walk"], 0, 2, 24.0, 1))
    put("frames", np.array(IQM_STREAM, np.uint16).tobytes())
    return bytes(blob)


def test_iqm_header_and_channels():
    model = read_iqm(iqm_bytes(), "tiny.iqm")
    assert [(m.name, m.material, m.num_vertices, m.num_triangles) for m in model.meshes] == [("body", "skin", 5, 2)]
    assert model.joint_names == ["root", "child"] and model.parents.tolist() == [-1, 0]
    assert [(a.name, a.num_frames, a.framerate) for a in model.anims] == [("walk", 2, 24.0)]
    np.testing.assert_allclose(model.positions, IQM_POS)
    np.testing.assert_allclose(model.blend_weights, IQM_W / 255.0)
    assert model.channels.shape == (2, 2, 10)
    qx = np.float32(0) + np.float32(30000) * np.float32(IQM_QSCALE[0])
    assert model.channels[1, 1, 3] == pytest.approx(float(qx), rel=1e-6)
    assert model.channels[1, 1, 6] == pytest.approx(1 + 55000 * IQM_QSCALE[1], rel=1e-6)
    np.testing.assert_array_equal(model.channels[0], model.bind)  # frame 0 stores zeros: every channel its offset


def test_iqm_bind_pose_is_reproduced_exactly():
    model = read_iqm(iqm_bytes(), "tiny.iqm")
    posed = skin(model, model.channels[:1])
    np.testing.assert_allclose(posed[0], IQM_POS, rtol=0, atol=1e-12)
    np.testing.assert_allclose(skin(model, np.repeat(model.bind[None], 3, 0)), np.repeat(IQM_POS[None], 3, 0),
                               rtol=0, atol=1e-12)


def test_iqm_rotating_one_joint_moves_its_vertices_by_hand():
    model = read_iqm(iqm_bytes(), "tiny.iqm")
    posed = skin(model, model.channels)[1]
    qx = 0 + 30000 * np.float64(np.float32(IQM_QSCALE[0]))
    qw = 1 + 55000 * np.float64(np.float32(IQM_QSCALE[1]))
    rot = quat_matrix([qx, 0, 0, qw])
    pivot = np.array([0.0, 0, 1])  # joint 1's bind position; it rotates about it, the root stays
    moved = (IQM_POS - pivot) @ rot.T + pivot
    expected = IQM_POS.copy()
    expected[2:4] = moved[2:4]                                      # bound to joint 1 only
    w1 = 102 / (153 + 102)
    expected[4] = (1 - w1) * IQM_POS[4] + w1 * moved[4]             # 60 / 40 blend of the two joints
    np.testing.assert_allclose(posed, expected, rtol=0, atol=2e-6)  # the channels are float32 in the file
    assert not np.allclose(expected[2], IQM_POS[2])                 # the test rotates something


# ============================================================================================== atlas
def test_atlas_keeps_texels_and_colours():
    """A tiled part (u over [0, 2]) and a plain one: the atlas shows at each vertex what its own image showed."""
    image = np.random.default_rng(0).random((8, 6, 3)).astype(np.float32)
    uvs = np.array([[0.25, 0.5], [1.75, 0.5], [1.25, 0.9375], [0.0833, 0.0625]])
    textured = Part(np.zeros((1, 4, 3)), np.array([[0, 1, 2], [0, 2, 3]]), uvs, image)
    plain = Part(np.ones((1, 3, 3)), np.array([[0, 1, 2]]), color=(0.1, 0.2, 0.3))
    vertices, fields = merge_parts([textured, plain])
    atlas, out = fields["texture"], fields["uvs"]
    assert vertices.shape == (1, 7, 3) and fields["faces"].tolist() == [[0, 1, 2], [0, 2, 3], [4, 5, 6]]
    h, w = atlas.shape[:2]
    for k, (u, v) in enumerate(uvs):
        want = image[int((1 - v % 1) * 8), int((u % 1) * 6)]   # the texel under the original coordinate
        got = atlas[int((1 - out[k, 1]) * h), int(out[k, 0] * w)]
        np.testing.assert_allclose(got, want)
    for k in range(4, 7):
        np.testing.assert_allclose(atlas[int((1 - out[k, 1]) * h), int(out[k, 0] * w)], [0.1, 0.2, 0.3])
    assert BORDER >= 1


# ============================================================================================== licences
def test_dep5_last_matching_paragraph_wins(tmp_path):
    path = tmp_path / "copyright"
    path.write_text("Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\n"
                    "Files: *\nCopyright: Everyone\nLicense: GPL-2+\n\n"
                    "Files: base/models/aliens/*\n       base/pics/x.png\nCopyright: 2010, A\n B\n"
                    "License: CC-BY-SA-3.0\n text of the licence\n\n"
                    "License: GPL-2+\n the text\n")
    stanzas = read_copyright(path)
    assert [s.licence for s in stanzas] == ["GPL-2+", "CC-BY-SA-3.0"]
    found = licence_of(stanzas, "usr/share/games/ufoai/base/models/aliens/taman/body.md2")
    assert (found.licence, found.holders) == ("CC-BY-SA-3.0", "2010, A B")
    assert licence_of(stanzas, "usr/share/games/ufoai/base/models/soldiers/body.md2").licence == "GPL-2+"


# ============================================================================================== split
def test_split_keeps_models_and_shared_meshes_on_one_side():
    members = {f"m{m}_c{c}": (f"model{m}", f"mesh{m}") for m in range(60) for c in range(4)}
    members |= {f"copy_c{c}": ("model_copy", "mesh7") for c in range(3)}  # another model with model7's mesh
    train, test = split(members, seed=3, fraction=0.3)
    assert split(members, seed=3, fraction=0.3) == (train, test) and set(train).isdisjoint(test)
    assert sorted(train + test) == sorted(members) and 0 < len(test) < len(train)
    side = {s: "test" for s in test} | {s: "train" for s in train}
    by_model = {}
    for sample, (model, _) in members.items():
        by_model.setdefault(model, set()).add(side[sample])
    assert all(len(sides) == 1 for sides in by_model.values())
    assert by_model["model_copy"] == by_model["model7"]
    assert groups(members)["copy_c0"] == groups(members)["m7_c0"]
    assert split(members, seed=3, fraction=0.0)[1] == []


# ============================================================================================== real files
def cached(package: str) -> Path:
    root = CACHE / package
    if not root.is_dir():
        pytest.skip(f"{package} is not in the cache {CACHE} (run python -m data_rendering.game_assets first)")
    return root


def test_real_md2_frame0():
    import zipfile
    with zipfile.ZipFile(cached("ufoai-data") / "usr/share/games/ufoai/base/0models.pk3") as pk3:
        data = pk3.read("models/soldiers/male/body.md2")
    model = read_md2(data, "body.md2")
    head = struct.unpack_from("<4s16i", data)
    assert head[6:11] == (868, 1149, 1724, head[9], 1007)
    assert model.frames.shape == (1007, 868, 3) and model.faces.shape == (1724, 3)
    base = head[14]
    scale, shift = np.array(struct.unpack_from("<3f", data, base)), np.array(struct.unpack_from("<3f", data, base + 12))
    packed = np.frombuffer(data, np.uint8, 4 * 868, base + 40).reshape(-1, 4)[:, :3].astype(np.float64)
    np.testing.assert_allclose(model.frames[0], packed * scale + shift, rtol=0, atol=1e-9)
    assert float(model.frames[0].sum()) == pytest.approx(-4640.258639663458, abs=1e-6)


def test_real_g3d_frame0():
    path = cached("megaglest-data") / ("usr/share/games/megaglest/techs/megapack/factions/norsemen/units/swordman/"
                                       "models/armored_swordman_walking.g3d")
    data = path.read_bytes()
    (mesh,) = read_g3d(data, path.name)
    frames, verts, indices = struct.unpack_from("<3I", data, 7 + 64)
    assert (frames, verts, indices) == (10, 1253, 3 * 1128) and mesh.frames.shape == (10, 1253, 3)
    first = np.frombuffer(data, np.float32, 3 * verts, 7 + 116 + 64).reshape(-1, 3)  # after one texture name
    np.testing.assert_array_equal(mesh.frames[0], first)
    assert float(mesh.frames[0].sum()) == pytest.approx(1693.0152504854195, abs=1e-6)


def test_real_iqm_bind_and_frame0():
    folder = cached("cube2-data") / "usr/share/games/cube2/packages/models/snoutx10k"
    model = read_iqm((folder / "snoutx10k.iqm").read_bytes(), "snoutx10k.iqm")
    anim = read_iqm((folder / "forward.md5anim.iqm").read_bytes(), "forward.md5anim.iqm")
    counts = (len(model.meshes), len(model.positions), len(model.triangles), len(model.joint_names))
    assert counts == (2, 2451, 3520, 75)
    assert anim.channels.shape == (78, 75, 10) and not anim.joint_names
    np.testing.assert_allclose(skin(model, model.bind[None])[0], model.positions, atol=1e-9)
    assert float(skin(model, anim.channels[:1]).sum()) == pytest.approx(12990.08863618376, abs=1e-4)


# ============================================================================================== the command
def write_textured_unit(units: Path) -> None:
    """Unit "v": five vertices on a 300 x 40 texture (larger than any stored bundle texture), two moving clips."""
    models = units / "v/models"
    models.mkdir(parents=True)
    x, y = np.meshgrid(np.linspace(0, 1, 300), np.linspace(0, 1, 40))  # smooth: a shrunk copy stays close
    image = np.stack([x, y, 1 - x * y, np.ones_like(x)], -1)
    Image.fromarray(np.rint(image * 255).astype(np.uint8), "RGBA").save(models / "skin.png")
    base = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]], np.float64)
    uvs = [[0, 0], [1, 0], [0, 1], [0.5, 0.5], [1, 1]]
    faces = [[0, 1, 2], [0, 2, 3], [1, 2, 3], [1, 4, 2]]
    t = np.linspace(0, 1, 5)[:, None, None]
    for clip, direction in (("walking", [0.3, 0, 0]), ("attacking", [0, 0, 0.25])):
        frames = base[None] + t * np.array(direction) * np.array([0, 0, 1, 1, 1])[None, :, None]
        mesh = g3d_mesh("body", frames, faces, uvs, ("skin.png",))
        (models / f"v_{clip}.g3d").write_bytes(b"G3D" + bytes([4]) + struct.pack("<HB", 1, 0) + mesh)


def write_deb(tmp: Path, cache: Path, corrupt: bool, textured: bool = False) -> None:
    """A megaglest-data .deb holding one unit: a walking clip, a copy of it, a static clip and maybe a bad file; with
    `textured` also write_textured_unit's."""
    pkg = tmp / "pkg"
    models = pkg / "usr/share/games/megaglest/techs/megapack/factions/f/units/u/models"
    models.mkdir(parents=True)
    t = np.linspace(0, 1, 6)[:, None, None]
    walk = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float64)[None] + t * [[0, 0.2, 0]] * \
        np.array([0, 1, 1, 0])[None, :, None]
    g3d = b"G3D" + bytes([4]) + struct.pack("<HB", 1, 0) + g3d_mesh("m", walk, [[0, 1, 2], [0, 2, 3], [1, 2, 3]])
    (models / "u_walking.g3d").write_bytes(g3d)
    (models / "u_walking_copy.g3d").write_bytes(g3d)
    still = b"G3D" + bytes([4]) + struct.pack("<HB", 1, 0) + g3d_mesh("m", walk[:1].repeat(3, 0), [[0, 1, 2]])
    (models / "u_standing.g3d").write_bytes(still)
    if corrupt:
        (models / "u_dying.g3d").write_bytes(g3d[:40])
    if textured:
        write_textured_unit(models.parent.parent)
    doc = pkg / "usr/share/doc/megaglest-data"
    doc.mkdir(parents=True)
    (doc / "copyright").write_text("Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\n"
                                   "Files: *\nCopyright: 2001, The Test Team\nLicense: CC-BY-SA-3.0\n")
    (pkg / "DEBIAN").mkdir()
    (pkg / "DEBIAN/control").write_text("Package: megaglest-data\nVersion: 9.9-test\nArchitecture: all\n"
                                        "Maintainer: t <t@example.org>\nDescription: test\n")
    (cache / "debs").mkdir(parents=True)
    deb = cache / "debs/megaglest-data_9.9-test_all.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(pkg), str(deb)], check=True, capture_output=True)


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb is needed to build the test package")
def test_command_end_to_end(tmp_path, capsys):
    cache, out = tmp_path / "cache", tmp_path / "out"
    write_deb(tmp_path, cache, corrupt=True)
    argv = ["--cache", cache, "--out", out, "--packages", "megaglest-data", "--frames", 4, "--views", 2,
            "--res", 16, "--test-fraction", 0]
    assert cli.run(main, [str(a) for a in argv]) == 1  # the bad file fails, the rest goes on
    err = capsys.readouterr().err
    assert "u_dying.g3d" in err and "truncated" in err
    records = [json.loads(line) for line in (out / MANIFEST).read_text().splitlines()]
    assert [r["clip"] for r in records] == ["u_walking"]  # the copy is a duplicate, the standing clip is static
    r = records[0]
    assert (r["package"], r["version"], r["licence"], r["attribution"]) == \
        ("megaglest-data", "9.9-test", "CC-BY-SA-3.0", "2001, The Test Team")
    sample = out / r["sample"]
    assert layout.static_vertices_path(sample).is_file() and layout.image_path(sample, 3, 1).is_file()
    assert layout.read_list_file(out / "train.txt", out) == [r["sample"]] and not (out / "test.txt").exists()
    assert (cache / "root/megaglest-data/usr/share/doc/megaglest-data/copyright").is_file()
    stamp = layout.static_vertices_path(sample).stat().st_mtime_ns
    assert cli.run(main, [str(a) for a in argv]) == 1  # again: the sample exists and is kept as it is
    assert layout.static_vertices_path(sample).stat().st_mtime_ns == stamp and "exists" in capsys.readouterr().out


def test_reserved_packages_are_refused_before_any_download(tmp_path, capsys):
    for package in RESERVED:
        status = cli.run(main, ["--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o"), "--packages", package])
        assert status == cli.EXIT_BAD_INPUT and "reserved for evaluation" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_prepared_set_reads_no_reserved_package():
    """The manifest and the clip listing of the prepared set name no reserved package anywhere, and the cache holds
    none of them."""
    manifest = REAL / MANIFEST
    if not manifest.is_file():
        pytest.skip(f"no prepared set at {REAL}")
    texts = [manifest.read_text(), (REAL / "game_assets_clips.csv").read_text()]
    for text in texts:
        for name in RESERVED + ("irrlicht", "testmodels"):
            assert name not in text.lower()
    if CACHE.parent.is_dir():
        held = [p.name for p in (CACHE.parent / "debs").iterdir()] + [p.name for p in CACHE.iterdir()]
        assert not [h for h in held if any(r in h for r in RESERVED)]
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert records and all(r["licence"] and "UNKNOWN" not in r["licence"] for r in records)


def test_prepared_split_has_no_model_on_both_sides():
    if not (REAL / MANIFEST).is_file():
        pytest.skip(f"no prepared set at {REAL}")
    records = [json.loads(line) for line in (REAL / MANIFEST).read_text().splitlines()]
    lists = {k: set(layout.read_list_file(REAL / f"{k}.txt", REAL)) if (REAL / f"{k}.txt").exists() else set()
             for k in ("train", "test")}
    assert lists["train"].isdisjoint(lists["test"])
    sides = {}
    for r in records:
        side = "test" if r["sample"] in lists["test"] else "train" if r["sample"] in lists["train"] else None
        assert side == r["split"]
        for key in (r["model"], r["fingerprint"]):
            sides.setdefault(key, set()).add(side)
    assert all(len(s) == 1 for s in sides.values())


def test_missing_apt_is_one_line(tmp_path, capsys, monkeypatch):
    from data_rendering.game_assets import packages
    monkeypatch.setattr(packages.shutil, "which", lambda name: None)
    status = cli.run(main, ["--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o"), "--packages", "cube2-data"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == cli.EXIT_BAD_INPUT and len(err) == 1
    assert ": error: apt-get not found" in err[0] and "debs/" in err[0]
    assert not (tmp_path / "c").exists() and not (tmp_path / "o").exists()  # refused before creating anything
