"""data_rendering/import_animation.py: an analytic moving cube saved as npz, as an OBJ sequence and as glTF, imported
and checked against the known motion, a normalisation computed here, and projections of the known vertices."""
import json
import argparse
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_rendering.import_animation import load_input, main, resample
from datasets import layout
from datasets.vae_dataset import VAEDataset
from test_gltf_import import Builder
from utils import cli
from utils.cameras import load_blender_camera

REPO = Path(__file__).resolve().parents[1]
T, VIEWS, RES = 4, 3, 48
CUBE = np.array([[x, y, z] for x in (-0.5, 0.5) for y in (-0.5, 0.5) for z in (-0.5, 0.5)]) * [0.6, 0.4, 0.3]
QUADS = [[0, 1, 3, 2], [4, 6, 7, 5], [0, 4, 5, 1], [2, 3, 7, 6], [0, 2, 6, 4], [1, 5, 7, 3]]
TRIS = np.array([[q[0], q[k], q[k + 1]] for q in QUADS for k in (1, 2)])  # the fan an OBJ reader must make


def motion(t):
    """Rotation about z by 0.2 t rad, then translation by (0.15, -0.1, 0.05) t: (R (3, 3), d (3,))."""
    a = 0.2 * t
    rot = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    return rot, np.array([0.15, -0.1, 0.05]) * t


def cube_frames(num=T):
    return np.stack([CUBE @ r.T + d for r, d in map(motion, range(num))])  # Z up (the project's world)


def write_obj_sequence(folder: Path, frames, colors=None) -> Path:
    folder.mkdir(parents=True)
    for t, verts in enumerate(frames):
        y_up = np.stack([verts[:, 0], verts[:, 2], -verts[:, 1]], 1)  # OBJ files are Y up
        rgb = [" %.3f %.3f %.3f" % tuple(c) for c in colors] if colors is not None else [""] * len(verts)
        lines = [f"v {x:.9f} {y:.9f} {z:.9f}{c}" for (x, y, z), c in zip(y_up, rgb)]
        lines += ["f " + " ".join(f"{i + 1}//1" for i in q) for q in QUADS]
        (folder / f"frame_{5 * t}.obj").write_text("# frame\n" + "\n".join(lines) + "\n")  # 0, 5, 10, 15: natural order
    return folder


def run(argv, capsys):
    status = cli.run(main, [str(a) for a in argv])
    return status, capsys.readouterr()


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """The same cube imported from an npz and from an OBJ sequence under the same sample name."""
    src = tmp_path_factory.mktemp("src")
    colors = np.tile([[0.9, 0.1, 0.1]], (8, 1))
    np.savez(src / "cube.npz", vertices=cube_frames(), faces=TRIS, colors=colors)
    write_obj_sequence(src / "cube_obj", cube_frames(), colors)
    roots = {}
    for kind, path in (("npz", src / "cube.npz"), ("obj", src / "cube_obj")):
        roots[kind] = tmp_path_factory.mktemp(kind)
        assert cli.run(main, [str(path), "--out", str(roots[kind]), "--frames", str(T), "--views", str(VIEWS),
                              "--res", str(RES), "--name", "cube"]) == 0
    return roots


def expected_points(static, num=T):
    """Where the frame-0 points go under the known motion, in the normalised frame computed here."""
    allv = cube_frames(num).reshape(-1, 3)
    centre, extent = (allv.min(0) + allv.max(0)) / 2, (allv.max(0) - allv.min(0)).max()
    world0 = static * extent + centre
    r0, d0 = motion(0)
    assert np.allclose(r0, np.eye(3)) and not d0.any()
    return np.stack([(world0 @ r.T + d - centre) / extent for r, d in map(motion, range(num))])


def test_layout_and_known_motion(imported):
    root = imported["npz"] / "cube"
    for t in range(T):
        for v in range(VIEWS):
            assert layout.image_path(root, t, v).is_file() and layout.camera_path(root, t, v).is_file()
    assert layout.voxel_features_path(root, 0, "patch").is_file() and layout.render_metadata_path(root).is_file()
    assert layout.read_list_file(imported["npz"] / "all.txt", imported["npz"]) == ["cube"]
    static = torch.load(layout.static_vertices_path(root), weights_only=True).double().numpy()
    deltas = torch.load(layout.frame_deltas_path(root), weights_only=True).double().numpy()
    assert static.shape == (8192, 3) and deltas.shape == (T, 8192, 3)
    np.testing.assert_allclose(static[None] + deltas, expected_points(static), atol=2e-5)
    assert np.abs(static[None] + deltas).max() <= 0.5 + 1e-6  # every frame inside the unit box
    meta = json.loads(layout.render_metadata_path(root).read_text())
    assert meta["frames"] == T and meta["views"] == VIEWS and meta["resolution"] == RES


def test_npz_and_obj_give_the_same_sample(imported):
    a, b = imported["npz"] / "cube", imported["obj"] / "cube"
    for path in (layout.static_vertices_path, layout.frame_deltas_path):
        np.testing.assert_allclose(torch.load(path(a), weights_only=True), torch.load(path(b), weights_only=True),
                                   atol=1e-5)
    for t, v in ((0, 0), (T - 1, VIEWS - 1)):
        ia, ib = (np.asarray(Image.open(layout.image_path(r, t, v)), np.float64) for r in (a, b))
        assert np.mean(np.abs(ia - ib).max(-1) > 8) < 0.01  # the same render, up to edge pixels


def convex_hull_centroid(points):
    """(area, centroid) of the convex hull of 2-D points (monotone chain, then the polygon's area moments)."""
    pts, ring = sorted(map(tuple, points)), []
    for seq in (pts, pts[::-1]):
        part = []
        for p in seq:
            while len(part) >= 2 and ((part[-1][0] - part[-2][0]) * (p[1] - part[-2][1])
                                      - (part[-1][1] - part[-2][1]) * (p[0] - part[-2][0])) <= 0:
                part.pop()
            part.append(p)
        ring += part[:-1]
    x, y = np.array(ring).T
    xn, yn = np.roll(x, -1), np.roll(y, -1)
    cross = x * yn - xn * y
    area = cross.sum() / 2
    return abs(area), np.array([((x + xn) * cross).sum(), ((y + yn) * cross).sum()]) / (6 * area)


def test_renders_show_the_object_where_its_vertices_project(imported):
    """The silhouette of a convex object is the convex hull of its projected vertices: compare area and centroid."""
    root = imported["obj"] / "cube"
    frames = cube_frames()
    allv = frames.reshape(-1, 3)
    centre, extent = (allv.min(0) + allv.max(0)) / 2, (allv.max(0) - allv.min(0)).max()
    for t in range(T):
        for v in range(VIEWS):
            rgba = np.asarray(Image.open(layout.image_path(root, t, v)), np.float64)
            alpha = rgba[..., 3] > 127
            ext, k = (x.double().numpy() for x in load_blender_camera(layout.camera_path(root, t, v), RES, RES))
            cam = ((frames[t] - centre) / extent) @ ext[:3, :3].T + ext[:3, 3]
            area, expected = convex_hull_centroid((cam @ k.T)[:, :2] / cam[:, 2:] * RES)  # pixels
            ys, xs = np.nonzero(alpha)
            assert abs(alpha.sum() - area) < 0.1 * area
            np.testing.assert_allclose([xs.mean() + 0.5, ys.mean() + 0.5], expected, atol=0.6)
            red = rgba[alpha][:, :3]
            assert (red[:, 0] > 2 * red[:, 1]).all()  # the vertex colours reach the render


def test_vae_dataset_loads_the_sample(imported):
    ds = VAEDataset(imported["obj"], ["cube"], num_points=1024, num_timesteps=T, sample_timesteps=2, num_views=VIEWS,
                    extractor="patch")
    item = ds.load(0)
    assert item["static_pc"].shape == (1024, 3) and item["deltas"].shape == (2, 1024, 3)


def test_resampling_follows_the_motion(tmp_path):
    frames = np.stack([CUBE + [0.1 * t, 0, 0] for t in range(4)])  # linear in t: interpolation is exact
    spread, where = resample(frames, 7, None)
    np.testing.assert_allclose(where, np.arange(7) * 0.5)
    np.testing.assert_allclose(spread, np.stack([CUBE + [0.05 * k, 0, 0] for k in range(7)]), atol=1e-12)
    strided, where = resample(frames, 3, 2)
    assert where.tolist() == [0, 2, 3]  # the sequence ended: the last frame is held
    np.testing.assert_allclose(strided, frames[[0, 2, 3]])


def test_gltf_clip(tmp_path, capsys):
    b = Builder()
    gl = np.stack([CUBE[:, 0], CUBE[:, 2], -CUBE[:, 1]], 1)  # Y up
    pos = b.accessor(gl, "VEC3", min=gl.min(0).tolist(), max=gl.max(0).tolist())
    idx = b.accessor(TRIS, "SCALAR", "<u2")
    b.doc["meshes"] = [{"primitives": [{"attributes": {"POSITION": pos}, "indices": idx}]}]
    b.doc["nodes"], b.doc["scenes"] = [{"mesh": 0}], [{"nodes": [0]}]
    b.animation(0, "translation", [0.0, 1.0], [[0, 0, 0], [0, 0, -1.0]])  # glTF -z is the project's +y
    path = b.write_gltf(tmp_path / "walk.gltf")
    for extra, times in (([], [0, 1 / 3, 2 / 3, 1]), (["--fps", "8", "--stride", "2"], [0, 0.25, 0.5, 0.75])):
        out = tmp_path / f"out{len(extra)}"
        status, cap = run([path, "--out", out, "--frames", 4, "--views", 2, "--res", 32, *extra], capsys)
        assert status == 0, cap.err
        root = out / "walk"
        meta = json.loads(layout.render_metadata_path(root).read_text())
        np.testing.assert_allclose(meta["frame_times"], times, atol=1e-6)
        static = torch.load(layout.static_vertices_path(root), weights_only=True).double()
        deltas = torch.load(layout.frame_deltas_path(root), weights_only=True).double()
        extent = 0.4 + times[-1]  # the y extent of all frames: the largest
        expected = torch.zeros_like(deltas)
        expected[..., 1] = torch.tensor(times, dtype=torch.float64)[:, None] / extent
        torch.testing.assert_close(deltas, expected, atol=1e-5, rtol=0)
        assert static[:, 1].min() >= -0.5 - 1e-6 and (static[:, 1].max() + deltas[-1, :, 1]).max() <= 0.5 + 1e-6


def test_obj_texture_from_mtl(tmp_path):
    folder = tmp_path / "tex"
    folder.mkdir()
    Image.fromarray(np.tile(np.array([[[20, 200, 40]]], np.uint8), (4, 4, 1))).save(folder / "skin.png")
    (folder / "skin.mtl").write_text("newmtl skin\nKd 1 1 1\nmap_Kd skin.png\n")
    for t in range(2):
        lines = ["mtllib skin.mtl", "usemtl skin"] + [f"v {x} {y + t} {z}" for x, y, z in CUBE]
        lines += ["vt 0 0", "vt 1 0", "vt 1 1", "vt 0 1"]
        lines += ["f " + " ".join(f"{i + 1}/{j + 1}" for j, i in enumerate(q)) for q in QUADS]
        (folder / f"f{t}.obj").write_text("\n".join(lines) + "\n")
    seq, _ = load_input(folder, argparse.Namespace(up_axis=None, frames=2, stride=None, fps=None))
    corners = len({(i, j) for q in QUADS for j, i in enumerate(q)})  # vertices split along the uv seams
    assert seq.texture.shape == (4, 4, 3) and seq.vertices.shape == (2, corners, 3) and corners > 8
    np.testing.assert_allclose(seq.frame_colors(), np.tile([[20, 200, 40]], (corners, 1)) / 255.0, atol=1e-6)
    moved = seq.vertices[1] - seq.vertices[0]  # OBJ +y is the project's +z; all-frame extent 0.4 + 1
    np.testing.assert_allclose(moved, np.tile([0, 0, 1 / 1.4], (corners, 1)), atol=1e-6)


def test_bad_obj_sequence_is_one_line_and_status_2(tmp_path):
    folder = write_obj_sequence(tmp_path / "bad", cube_frames(3))
    (folder / "frame_5.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    proc = subprocess.run([sys.executable, "-m", "data_rendering.import_animation", str(folder), "--out",
                           str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "frame_5.obj" in lines[0] and "3 vertices" in lines[0], proc.stderr
    assert not (tmp_path / "out" / "bad").exists()


@pytest.mark.parametrize("case,needle", [
    ("nan", "NaN"), ("range", "face indices"), ("one_frame", "at least 2"), ("unknown", "unknown file type"),
    ("keys", "missing array"),
])
def test_bad_inputs_are_refused(tmp_path, capsys, case, needle):
    verts, faces = cube_frames(), TRIS.copy()
    if case == "nan":
        verts[2, 3, 1] = np.nan
    elif case == "range":
        faces[5, 2] = 8
    elif case == "one_frame":
        verts = verts[:1]
    path = tmp_path / ("cube.fbx" if case == "unknown" else "cube.npz")
    if case == "keys":
        np.savez(path, verts=verts)
    elif case != "unknown":
        np.savez(path, vertices=verts, faces=faces)
    else:
        path.write_bytes(b"Kaydara FBX Binary")
    status, cap = run([path, "--out", tmp_path / "out"], capsys)
    assert status == 2 and len(cap.err.strip().splitlines()) == 1
    assert str(path) in cap.err and needle in cap.err, cap.err


def test_batch_goes_on_past_a_bad_input(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    np.savez(src / "good.npz", vertices=cube_frames(2), faces=TRIS)
    write_obj_sequence(src / "broken", cube_frames(2))
    bad = src / "broken" / "frame_5.obj"
    bad.write_text(bad.read_text().replace("f 1//1", "f 9//1", 1))  # a face corner past the 8 vertices
    out = tmp_path / "out"
    out.mkdir()
    (out / "all.txt").write_text("older 7  # kept as it is\n")
    argv = [src, "--out", out, "--frames", 2, "--views", 1, "--res", 16]
    status, cap = run(argv, capsys)
    assert status == 1
    assert layout.static_vertices_path(out / "good").is_file() and not (out / "broken").exists()
    assert "frame_5.obj" in cap.err and "face indices" in cap.err
    assert (out / "all.txt").read_text() == "older 7  # kept as it is\ngood\n"
    # A second run skips the existing sample and lists nothing twice; --overwrite replaces it.
    shutil.rmtree(src / "broken")
    write_obj_sequence(src / "broken", cube_frames(2))
    stamp = layout.static_vertices_path(out / "good").stat().st_mtime_ns
    status, cap = run(argv, capsys)
    assert status == 0 and "skipped" in cap.out
    assert layout.static_vertices_path(out / "good").stat().st_mtime_ns == stamp
    assert (out / "all.txt").read_text() == "older 7  # kept as it is\ngood\nbroken\n"
    status, _ = run(argv + ["--overwrite"], capsys)
    assert status == 0 and layout.static_vertices_path(out / "good").stat().st_mtime_ns != stamp
    assert not list(out.glob(".*"))  # no partial or old folders left behind
