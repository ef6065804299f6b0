"""A mesh as the canonical (issue 21 item 2): surface Gaussians from a mesh, the Gaussians' motion carried back to the
vertices, and animated.glb. Every expected value is computed here, independently of pipeline/: texture colours by a
bilinear lookup written below, node transforms from their TRS, GLB contents parsed with pygltflib."""
import json
import math
import subprocess
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from data_rendering.gltf_import import load_animated_gltf
from data_rendering.mesh import MeshSequence
from data_rendering.synthetic import make_object
from datasets import layout
from pipeline.alignment import rotate_z
from pipeline.glb import write_animated_glb
from pipeline.ground_truth import oracle_delta_xyz
from pipeline.mesh_canonical import mesh_canonical
from pipeline.mesh_input import is_mesh_file, read_mesh
from pipeline.vertex_motion import mesh_displacement
from test_gltf_import import Builder, _png, _raw_file, _rotation_matrix, _srgb
from test_inference import _run, world  # noqa: F401  (the tiny pack and data world, shared)
from utils.cli import InputError
from utils.gaussians import Gaussians, write_ply
from utils.pointcloud import interpolate_displacements
from utils.video import write_video

pygltflib = pytest.importorskip("pygltflib")
Z_UP = np.array([[1.0, 0, 0], [0, 0, -1], [0, 1, 0]])  # glTF (x, y, z) -> project (x, -z, y)
REPO = Path(__file__).resolve().parents[1]
RENDER_PYTHON = REPO / ".venv-render" / "bin" / "python"


# ----------------------------------------------------------------------------------------------- helpers
def _bilinear(image, u, v_down):
    """Bilinear lookup with repeat wrap: pixel (i, j) centred at ((j + 0.5) / w, (i + 0.5) / h), v from the top."""
    h, w = image.shape[:2]
    x, y = u * w - 0.5, v_down * h - 0.5
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    at = lambda i, j: image[i % h, j % w]  # noqa: E731
    return (at(y0, x0) * (1 - fx) * (1 - fy) + at(y0, x0 + 1) * fx * (1 - fy)
            + at(y0 + 1, x0) * (1 - fx) * fy + at(y0 + 1, x0 + 1) * fx * fy)


def _quat_matrix(q):
    """(N, 4) w-first unit quaternions -> (N, 3, 3)."""
    w, x, y, z = q.T
    return np.stack([np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
                     np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
                     np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1)], 1)


def _trs(node):
    m = np.eye(4)
    m[:3, :3] = _rotation_matrix(node.get("rotation", [0, 0, 0, 1])) * np.asarray(node.get("scale", [1, 1, 1]))
    m[:3, 3] = node.get("translation", [0, 0, 0])
    return m


def _rows(acc, view, blob):
    """An accessor's data (count, width) from pygltflib objects and the GLB's binary blob."""
    dtype = np.dtype({5121: "<u1", 5123: "<u2", 5125: "<u4", 5126: "<f4"}[acc.componentType])
    width = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4}[acc.type]
    stride = view.byteStride or dtype.itemsize * width
    start = (view.byteOffset or 0) + (acc.byteOffset or 0)
    return np.stack([np.frombuffer(blob, dtype, width, start + k * stride) for k in range(acc.count)])


class Glb:
    """animated.glb as pygltflib reads it."""

    def __init__(self, path):
        self.g = pygltflib.GLTF2().load(str(path))
        self.blob = self.g.binary_blob()
        raw = Path(path).read_bytes()                      # the JSON chunk as written, for exact comparisons
        self.json = json.loads(raw[20:20 + int.from_bytes(raw[12:16], "little")])

    def data(self, index):
        acc = self.g.accessors[index]
        return _rows(acc, self.g.bufferViews[acc.bufferView], self.blob).astype(np.float64)

    def check_animation(self, frames, fps, nodes, old_weights=()):
        """One animation, one weights channel per node, T keys at t / fps, target t on at key t."""
        assert len(self.g.animations) == 1
        anim = self.g.animations[0]
        assert sorted(c.target.node for c in anim.channels) == sorted(nodes)
        for channel in anim.channels:
            sampler = anim.samplers[channel.sampler]
            assert channel.target.path == "weights" and sampler.interpolation == "LINEAR"
            np.testing.assert_allclose(self.data(sampler.input)[:, 0], np.arange(frames) / fps, rtol=1e-6)
            keys = self.data(sampler.output).reshape(frames, len(old_weights) + frames)
            np.testing.assert_allclose(keys[:, :len(old_weights)], np.tile(old_weights, (frames, 1)))
            np.testing.assert_array_equal(keys[:, len(old_weights):], np.eye(frames))


def _field(points, frames):
    """A smooth displacement field (T, V, 3) of positions, zero at frame 0."""
    p = np.asarray(points, np.float64)
    base = np.stack([np.sin(3 * p[:, 0]), np.cos(2 * p[:, 1]), p[:, 0] * p[:, 2]], 1)
    return 0.05 * np.arange(frames)[:, None, None] * base[None]


# ----------------------------------------------------------------------------------------------- the sampler
def test_sampled_colours_are_the_texture_at_their_uvs(tmp_path):
    rng = np.random.default_rng(0)
    texture = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    vertices = np.array([[0, 0, 0], [2, 0, 0], [2, 1, 0], [0, 1, 0]], float)   # glTF axes, x-y plane
    material = trimesh.visual.material.PBRMaterial(baseColorTexture=Image.fromarray(texture),
                                                   baseColorFactor=[255, 255, 255, 255])
    visual = trimesh.visual.TextureVisuals(uv=vertices[:, :2] / [2, 1], material=material)  # trimesh: v up
    trimesh.Trimesh(vertices, [[0, 1, 2], [0, 2, 3]], visual=visual, process=False).export(tmp_path / "plane.glb")

    mesh = read_mesh(tmp_path / "plane.glb")
    c = mesh_canonical(mesh.surface, 3000, seed=1)
    world_xyz = c.gaussians.xyz.double().numpy() * c.extent + c.centre     # project axes: glTF (x, y) -> (x, z)
    x, y = world_xyz[:, 0], world_xyz[:, 2]
    expected = _bilinear(texture / 255.0, x / 2, 1 - y)                      # glTF's v runs down the image
    np.testing.assert_allclose(c.gaussians.rgb.double().numpy(), expected, atol=2e-5)
    assert np.abs(_bilinear(texture / 255.0, x / 2, y) - expected).mean() > 0.05   # the flip is seen
    assert np.abs(world_xyz[:, 1]).max() < 1e-6


def test_vertex_colours_and_the_material_colour(tmp_path):
    tri = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], float)
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
    trimesh.Trimesh(tri, [[0, 1, 2]], vertex_colors=colours, process=False).export(tmp_path / "tri.ply")
    assert is_mesh_file(tmp_path / "tri.ply")
    c = mesh_canonical(read_mesh(tmp_path / "tri.ply").surface, 500)
    p = c.gaussians.xyz.double().numpy() * c.extent + c.centre                 # PLY: the project's own axes
    bary = np.stack([1 - p[:, 0] - p[:, 1], p[:, 0], p[:, 1]], 1)
    np.testing.assert_allclose(c.gaussians.rgb.double().numpy(), bary, atol=1e-5)

    b = Builder()  # no texture, no COLOR_0: the material's base colour factor (linear) everywhere
    b.doc["meshes"] = [{"primitives": [{"attributes": {"POSITION": b.accessor(tri, "VEC3")}, "material": 0}]}]
    b.doc["materials"] = [{"pbrMetallicRoughness": {"baseColorFactor": [0.2, 0.5, 0.8, 1.0]}}]
    b.doc.update(nodes=[{"mesh": 0}], scenes=[{"nodes": [0]}])
    c = mesh_canonical(read_mesh(b.write_glb(tmp_path / "flat.glb")).surface, 200)
    np.testing.assert_allclose(c.gaussians.rgb.numpy(), np.tile(_srgb([0.2, 0.5, 0.8]), (200, 1)), atol=1e-5)


def test_scales_normals_and_counts_on_a_known_plane():
    rng = np.random.default_rng(3)
    flat = np.array([[0, 0, 0], [1, 0, 0], [0, 2, 0], [2, 0, 0], [5, 0, 0], [2, 2, 0]], float)   # areas 1 and 3
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    turn = q * np.sign(np.linalg.det(q))
    points = flat @ turn.T + [3.0, -1.0, 2.0]
    seq = MeshSequence(points[None], [[0, 1, 2], [3, 4, 5]], colors=np.full((6, 3), 0.3))
    n = 1000
    c = mesh_canonical(seq, n, seed=5)
    lo, hi = points.min(0), points.max(0)
    np.testing.assert_allclose(c.centre, (lo + hi) / 2, atol=1e-9)
    assert c.extent == pytest.approx((hi - lo).max())
    g = c.gaussians
    normal = turn[:, 2]
    xyz = g.xyz.double().numpy() * c.extent + c.centre
    assert np.abs((xyz - points[0]) @ normal).max() < 1e-5                    # on the plane
    first = int((((xyz - points[0]) @ turn)[:, 0] < 1.5).sum())               # in-plane x: [0, 1] or [2, 5]
    assert abs(first - n / 4) <= 1                                             # areas 1 : 3
    cov = _quat_matrix(g.rotation.double().numpy()) * g.scale.double().numpy()[:, None, :] ** 2
    cov = cov @ _quat_matrix(g.rotation.double().numpy()).transpose(0, 2, 1)
    values, vectors = np.linalg.eigh(cov)
    assert np.abs(vectors[:, :, 0] @ normal).min() > 1 - 1e-6                 # the thin axis is the normal
    sigma = 1.5 * math.sqrt(4.0 / c.extent ** 2 / n / math.pi)                 # area 4, models' units
    np.testing.assert_allclose(np.sqrt(values[:, 1:]), sigma, rtol=1e-4)
    np.testing.assert_allclose(np.sqrt(values[:, 0]), 0.1 * sigma, rtol=1e-3)
    np.testing.assert_allclose(g.opacity.numpy(), 0.95, rtol=1e-6)
    np.testing.assert_allclose(g.rgb.numpy(), 0.3, atol=1e-6)
    again = mesh_canonical(seq, n, seed=5).gaussians.xyz
    assert torch.equal(again, g.xyz) and not torch.equal(mesh_canonical(seq, n, seed=6).gaussians.xyz, g.xyz)


# ----------------------------------------------------------------------------------------------- the transfer
@pytest.mark.parametrize("shape,motion", [("flag", "articulated"), ("creature", "wave"), ("windmill", "spin"),
                                          ("blob", "bend_twist")])
def test_oracle_motion_carried_back_reproduces_the_vertex_motion(shape, motion):
    """The true vertex motion, interpolated at the Gaussians as the oracle is (mesh points -> Gaussians), carried
    back to the vertices, matches the true motion within 2% of the object's size (mean); the mesh is in its own
    units and position and the Gaussians turned by the alignment, as for a video."""
    seq, _ = make_object(11, 12, shape=shape, motion=motion)
    verts = seq.vertices.astype(np.float64) * 37.0 + [5.0, -2.0, 11.0]
    c = mesh_canonical(MeshSequence(verts[:1], seq.faces, colors=seq.colors, uvs=seq.uvs, texture=seq.texture), 8192)
    # Mesh points with correspondence, as the training data has them: fixed surface positions moved with the faces
    # (4096 of them here, half the published count, to keep the KNN quick on a CPU).
    rng = np.random.default_rng(2)
    face = rng.integers(0, len(seq.faces), 4096)
    bary = rng.dirichlet(np.ones(3), 4096)
    points = c.to_model(np.einsum("nk,tnkc->tnc", bary, verts[:, seq.faces[face]]).reshape(-1, 3))
    points = torch.from_numpy(points.reshape(len(verts), 4096, 3)).float()
    azimuth = 70.0
    a = math.radians(azimuth)
    turn = torch.tensor([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    turned = rotate_z(c.gaussians, azimuth)
    vae = types.SimpleNamespace(knn_k=8, beta=7.0)
    oracle = oracle_delta_xyz(turned.xyz, points[0] @ turn.T, (points - points[:1]) @ turn.T, vae)
    true = verts - verts[:1]
    size = (verts[0].max(0) - verts[0].min(0)).max()
    error = lambda d: np.linalg.norm(d - true, axis=-1).mean() / size  # noqa: E731
    carried = mesh_displacement(c, azimuth, turned.xyz, oracle, verts[0])
    assert error(carried) < 0.02, error(carried)
    assert np.linalg.norm(true, axis=-1).mean() / size > 0.02                   # there is motion to get right
    if shape == "flag":  # the turn back and the units matter: without either, the error is far above 2%
        assert error(mesh_displacement(c, -azimuth, turned.xyz, oracle, verts[0])) > 0.04
        assert error(carried / 37.0) > 0.04


# ----------------------------------------------------------------------------------------------- animated.glb
KHRONOS = Path("/usr/share/assimp/models/glTF2")   # Debian's assimp-testmodels (tests/test_gltf_import.py)


@pytest.mark.parametrize("name", ["simple_skin/simple_skin.gltf",
                                  "glTF-Sample-Models/AnimatedMorphCube-glTF/AnimatedMorphCube.gltf"])
def test_khronos_skin_and_morph_files_play_the_motion(tmp_path, name):
    """A skinned mesh (targets live before the skin: the blended joint matrices are undone) and a mesh with morph
    targets of its own, each with an animation that the output replaces."""
    if not (KHRONOS / name).is_file():
        pytest.skip(f"{KHRONOS / name} not found: apt-get install assimp-testmodels")
    mesh = read_mesh(KHRONOS / name)
    surface = mesh.surface.vertices[0].astype(np.float64)
    size = np.ptp(surface, axis=0).max()
    disp = _field(surface / size, 5) * size
    write_animated_glb(tmp_path / "out.glb", mesh, disp, 12.0)
    seq, meta = load_animated_gltf(tmp_path / "out.glb", times=np.arange(5) / 12.0)
    assert meta["animation_names"] == ["video"] and meta["skinned"] == mesh.info["skinned"]
    np.testing.assert_allclose(seq.vertices, surface + disp, atol=1e-5 * size)


def test_a_skin_posed_away_from_its_bind_pose(tmp_path):
    """Targets live in mesh space, before the skin: each vertex's displacement goes through the inverse of its blended
    joint matrix (joints turned and scaled at rest, vertices split between them)."""
    b = Builder()
    pos = b.accessor([[0, 0, 0], [2, 0, 0], [1, 1, 0], [1, 0, 1]], "VEC3", min=[0, 0, 0], max=[2, 1, 1])
    joints = b.accessor([[0, 1, 0, 0]] * 4, "VEC4", "<u1")
    weights = b.accessor([[1, 0, 0, 0], [0, 1, 0, 0], [0.5, 0.5, 0, 0], [0.3, 0.7, 0, 0]], "VEC4")
    b.doc["meshes"] = [{"primitives": [{"attributes": {"POSITION": pos, "JOINTS_0": joints, "WEIGHTS_0": weights},
                                        "indices": b.accessor([0, 1, 2, 0, 2, 3, 1, 3, 2], "SCALAR", "<u2")}]}]
    b.doc["skins"] = [{"joints": [1, 2]}]   # no inverse bind matrices: identity
    b.doc["nodes"] = [{"mesh": 0, "skin": 0},
                      {"children": [2], "rotation": [0, 0, 0.258819, 0.9659258], "translation": [0.5, 0, 0]},
                      {"rotation": [0.3826834, 0, 0, 0.9238795], "scale": [1.5, 0.8, 1.2]}]
    b.doc["scenes"] = [{"nodes": [0, 1]}]
    mesh = read_mesh(b.write_glb(tmp_path / "skin.glb"))
    surface = mesh.surface.vertices[0].astype(np.float64)
    disp = _field(surface, 4)
    write_animated_glb(tmp_path / "out.glb", mesh, disp, 12.0)
    seq, meta = load_animated_gltf(tmp_path / "out.glb", times=np.arange(4) / 12.0)
    assert meta["skinned"]
    np.testing.assert_allclose(seq.vertices, surface + disp, atol=1e-5)


def _gltf_input(tmp_path):
    """A glTF with external buffer and texture files: two primitives sharing one POSITION accessor (one textured, one
    of a colour factor), an old morph target at weight 0.5, one mesh shown by two nodes under a transformed parent,
    and an animation of the parent that the output must drop."""
    pixels = np.random.default_rng(4).integers(0, 256, (3, 4, 3), dtype=np.uint8)
    (tmp_path / "tex.png").write_bytes(_png(pixels))
    b = Builder()
    pos = b.accessor([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0], [0.5, 0.5, 0.4]], "VEC3",
                     min=[0, 0, 0], max=[1, 1, 0.4])
    uv = b.accessor([[0.1, 0.9], [0.9, 0.9], [0.9, 0.1], [0.1, 0.1], [0.5, 0.5]], "VEC2")
    old = b.accessor([[0, 0, 0], [0, 0, 0], [0, 0, 0.2], [0, 0, 0], [0, 0.1, 0]], "VEC3", min=[0, 0, 0],
                     max=[0, 0.1, 0.2])
    b.doc["meshes"] = [{"weights": [0.5], "primitives": [
        {"attributes": {"POSITION": pos, "TEXCOORD_0": uv}, "indices": b.accessor([0, 1, 2, 0, 2, 3], "SCALAR", "<u2"),
         "material": 0, "targets": [{"POSITION": old}]},
        {"attributes": {"POSITION": pos}, "indices": b.accessor([0, 1, 4], "SCALAR", "<u2"), "material": 1,
         "targets": [{"POSITION": old}]}]}]
    b.doc["materials"] = [{"name": "textured", "pbrMetallicRoughness": {"baseColorTexture": {"index": 0}}},
                          {"name": "plain", "pbrMetallicRoughness": {"baseColorFactor": [0.7, 0.2, 0.1, 1.0]}}]
    b.doc["textures"] = [{"source": 0, "sampler": 0}]
    b.doc["samplers"] = [{"wrapS": 33071, "wrapT": 33071}]
    b.doc["images"] = [{"uri": "tex.png"}]
    b.doc["nodes"] = [
        {"children": [1, 2], "translation": [0.5, -1.0, 2.0], "rotation": [0.3826834, 0, 0, 0.9238795],
         "scale": [2.0, 2.0, 2.0]},
        {"mesh": 0, "translation": [3.0, 0, 0]},
        {"mesh": 0, "rotation": [0, 0.5, 0, 0.8660254], "scale": [0.5, 1.5, 1.0]}]
    b.doc["scenes"] = [{"nodes": [0]}]
    b.animation(0, "translation", [0.0, 1.0], [[0, 0, 0], [5, 5, 5]])
    return b.write_gltf(tmp_path / "in.gltf", external=True), pixels


def test_animated_glb_keeps_the_mesh_and_plays_the_motion(tmp_path):
    path, _ = _gltf_input(tmp_path)
    mesh = read_mesh(path)
    surface = mesh.surface.vertices[0].astype(np.float64)
    assert surface.shape == (14, 3)   # 2 nodes x (4 + 3 used vertices)
    frames, fps = 6, 7.5
    disp = _field(surface, frames)
    out = tmp_path / "animated.glb"
    info = write_animated_glb(out, mesh, disp, fps)
    assert info["morph_targets"] == frames and out.read_bytes()[:4] == b"glTF"

    # Played by the glTF importer: at key t the vertices are surface + displacement t; halfway, the mean of two.
    seq, meta = load_animated_gltf(out, times=np.arange(frames) / fps)
    assert meta["animation_names"] == ["video"] and meta["num_morph_targets"] == 1 + frames
    np.testing.assert_allclose(seq.vertices, surface + disp, atol=1e-5)
    half, _ = load_animated_gltf(out, times=[2.5 / fps])
    np.testing.assert_allclose(half.vertices[0], surface + (disp[2] + disp[3]) / 2, atol=1e-5)

    # The file itself: base positions, uvs, materials and texture as the input's; base + target t, through each node's
    # transform (TRS computed here) and the axis change, is the displacement.
    doc, buffers = _raw_file(path)
    glb = Glb(out)
    g = glb.g
    meshes = [g.nodes[1].mesh, g.nodes[2].mesh]
    assert meshes[0] != meshes[1]                                # one mesh per instance: each moves on its own
    glb.check_animation(frames, fps, nodes=[1, 2], old_weights=[0.5])
    acc = lambda i: doc["accessors"][i]  # noqa: E731
    view = lambda i: types.SimpleNamespace(byteOffset=doc["bufferViews"][i].get("byteOffset", 0),  # noqa: E731
                                           byteStride=None)
    raw = lambda i: _rows(types.SimpleNamespace(byteOffset=0, **{k: acc(i)[k] for k in  # noqa: E731
                                                                 ("componentType", "type", "count")}),
                          view(acc(i)["bufferView"]), buffers[0]).astype(np.float64)
    base_in = raw(doc["meshes"][0]["primitives"][0]["attributes"]["POSITION"])
    uv_in = raw(doc["meshes"][0]["primitives"][0]["attributes"]["TEXCOORD_0"])
    parent = _trs(doc["nodes"][0])
    start = 0
    for node, m in zip((1, 2), meshes):
        linear = Z_UP @ (parent @ _trs(doc["nodes"][node]))[:3, :3]
        assert g.meshes[m].extras["targetNames"] == ["target_0"] + [f"frame_{t:04d}" for t in range(frames)]
        for p, used in enumerate(([0, 1, 2, 3], [0, 1, 4])):
            prim = g.meshes[m].primitives[p]
            np.testing.assert_array_equal(glb.data(prim.attributes.POSITION), base_in)
            if p == 0:
                np.testing.assert_allclose(glb.data(prim.attributes.TEXCOORD_0), uv_in, atol=0)
            assert prim.material == p and len(prim.targets) == 1 + frames
            for t in range(frames):
                moved = base_in[used] + glb.data(prim.targets[1 + t]["POSITION"])[used]
                np.testing.assert_allclose((moved - base_in[used]) @ linear.T, disp[t, start:start + len(used)],
                                           atol=1e-5)
            start += len(used)
    for key in ("materials", "textures", "samplers"):
        assert glb.json[key] == doc[key], key
    image = g.images[0]
    assert image.uri is None and image.mimeType == "image/png"
    bv = g.bufferViews[image.bufferView]
    assert glb.blob[bv.byteOffset:bv.byteOffset + bv.byteLength] == (tmp_path / "tex.png").read_bytes()


def test_obj_input_keeps_its_materials_uvs_and_positions(tmp_path):
    pixels = np.random.default_rng(5).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    (tmp_path / "wood.png").write_bytes(_png(pixels))
    (tmp_path / "m.mtl").write_text("newmtl wood\nKd 0.5 0.5 0.5\nmap_Kd wood.png\nnewmtl paint\nKd 0.5 0.2 0.1\n")
    v = [[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0], [0.5, 0.5, 1.0]]
    vt = [[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.25, 0.75]]
    corners = [[(1, 1), (2, 2), (3, 3)], [(1, 1), (3, 3), (4, 4)], [(1, 5), (2, 5), (5, 5)]]
    lines = ["mtllib m.mtl"] + [f"v {x} {y} {z}" for x, y, z in v] + [f"vt {a} {b}" for a, b in vt]
    lines += ["usemtl wood"] + ["f " + " ".join(f"{i}/{j}" for i, j in f) for f in corners[:2]]
    lines += ["usemtl paint", "f " + " ".join(f"{i}/{j}" for i, j in corners[2])]
    (tmp_path / "box.obj").write_text("\n".join(lines) + "\n")

    mesh = read_mesh(tmp_path / "box.obj")
    surface = mesh.surface.vertices[0].astype(np.float64)
    frames = 4
    disp = _field(surface, frames)
    out = tmp_path / "box_animated.glb"
    write_animated_glb(out, mesh, disp, 10.0)
    glb = Glb(out)
    g = glb.g
    glb.check_animation(frames, 10.0, nodes=[0])
    prims = g.meshes[0].primitives
    assert len(prims) == 2 and [g.materials[p.material].name for p in prims] == ["wood", "paint"]
    base = glb.data(prims[0].attributes.POSITION)
    uv = glb.data(prims[0].attributes.TEXCOORD_0)
    # Every OBJ face corner (position v, texture coordinate vt) is a row of the GLB with that position and uv
    # (glTF's v runs down: 1 - vt's v).
    for p, faces in ((0, corners[:2]), (1, corners[2:])):
        index = glb.data(prims[p].indices).astype(int).reshape(-1, 3)
        for f, face in enumerate(faces):
            for k, (i, j) in enumerate(face):
                row = index[f, k]
                np.testing.assert_allclose(base[row], v[i - 1], atol=1e-7)
                np.testing.assert_allclose(uv[row], [vt[j - 1][0], 1 - vt[j - 1][1]], atol=1e-7)
    wood, paint = (g.materials[p.material].pbrMetallicRoughness for p in prims)
    assert wood.baseColorFactor == [1.0, 1.0, 1.0, 1.0]    # map_Kd replaces Kd
    np.testing.assert_allclose(paint.baseColorFactor[:3], [((c + 0.055) / 1.055) ** 2.4 for c in (0.5, 0.2, 0.1)],
                               rtol=1e-6)                   # Kd is display-encoded, the factor linear
    bv = g.bufferViews[g.images[g.textures[wood.baseColorTexture.index].source].bufferView]
    assert glb.blob[bv.byteOffset:bv.byteOffset + bv.byteLength] == (tmp_path / "wood.png").read_bytes()
    # The surface is the OBJ in the project's axes, and base + target t is its displacement back in the OBJ's.
    np.testing.assert_allclose(base @ Z_UP.T, surface, atol=1e-6)
    for t in range(frames):
        assert prims[0].targets[t] == prims[1].targets[t]      # the primitives share their vertices and targets
        np.testing.assert_allclose(glb.data(prims[0].targets[t]["POSITION"]) @ Z_UP.T, disp[t], atol=1e-6)


def test_ply_mesh_becomes_a_y_up_glb_with_its_colours(tmp_path):
    rng = np.random.default_rng(6)
    box = trimesh.creation.box(extents=[1.0, 2.0, 3.0])
    colours = rng.integers(0, 256, (len(box.vertices), 3), dtype=np.uint8)
    trimesh.Trimesh(box.vertices, box.faces, vertex_colors=colours, process=False).export(tmp_path / "box.ply")
    mesh = read_mesh(tmp_path / "box.ply")
    frames = 3
    disp = _field(box.vertices, frames)
    write_animated_glb(tmp_path / "box.glb", mesh, disp, 24.0)
    glb = Glb(tmp_path / "box.glb")
    prim = glb.g.meshes[0].primitives[0]
    x, y, z = np.asarray(box.vertices, float).T
    np.testing.assert_allclose(glb.data(prim.attributes.POSITION), np.stack([x, z, -y], 1), atol=1e-6)
    seq, _ = load_animated_gltf(tmp_path / "box.glb", times=np.arange(frames) / 24.0)
    np.testing.assert_allclose(seq.vertices, box.vertices + disp, atol=1e-5)      # back in the PLY's own axes
    np.testing.assert_allclose(seq.colors, colours / 255.0, atol=1e-5)


def test_bad_meshes_are_refused_naming_the_file(tmp_path):
    (tmp_path / "points.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\n")
    (tmp_path / "noise.glb").write_bytes(b"glTF\x02\x00\x00\x00garbage")
    (tmp_path / "flat.obj").write_text("v 0 0 0\nv 1 0 0\nv 2 0 0\nf 1 2 3\n")
    b = Builder()
    b.doc["meshes"] = [{"primitives": [{"attributes": {"POSITION": b.accessor([[0, 0, 0], [1, 0, 0]], "VEC3")},
                                        "mode": 0}]}]
    b.doc.update(nodes=[{"mesh": 0}], scenes=[{"nodes": [0]}])
    b.write_glb(tmp_path / "dots.glb")
    for name, needle in (("points.obj", "no faces"), ("noise.glb", "truncated"), ("flat.obj", "zero area"),
                         ("dots.glb", "no triangle meshes"), ("missing.gltf", "no such")):
        with pytest.raises(InputError) as e:
            read_mesh(tmp_path / name)
        assert str(tmp_path / name) in str(e.value) and needle in str(e.value), str(e.value)
    n = 3
    gaussians = Gaussians.from_activated(torch.rand(n, 3), torch.zeros(n, 3), torch.full((n, 1), 0.5),
                                         torch.full((n, 3), 0.01), torch.tensor([1.0, 0, 0, 0]).expand(n, 4))
    write_ply(gaussians, tmp_path / "splats.ply")
    assert not is_mesh_file(tmp_path / "splats.ply") and is_mesh_file(tmp_path / "x.glb")


# ----------------------------------------------------------------------------------------------- end to end
def test_cli_with_a_mesh_canonical_writes_animated_glb(world, tmp_path, capsys):  # noqa: F811
    root, data, pack = world
    area = lambda n: (np.asarray(Image.open(layout.image_path(data / n, 0, 0)))[..., 3] > 127).sum()  # noqa: E731
    name = max(layout.list_samples(data), key=area)
    meta = json.loads(layout.render_metadata_path(data / name).read_text())
    seq, _ = make_object(meta["seed"], meta["num_frames"], detail=meta["detail"])   # the sample's own mesh
    videos, canon = tmp_path / "videos", tmp_path / "canonicals"
    videos.mkdir(), canon.mkdir()
    frames = []
    for t in range(6):
        rgba = np.asarray(Image.open(layout.image_path(data / name, t, 0)), dtype=np.float32) / 255
        frames.append(rgba[..., :3] * rgba[..., 3:] + (1 - rgba[..., 3:]))
    write_video(videos / "clip.mp4", np.stack(frames), fps=8, overwrite=True)
    # The user's mesh: ten times larger, elsewhere, Y up (trimesh writes glTF as given), turned by 90 degrees about
    # the up axis: the alignment turns the Gaussians back, animated.glb keeps the mesh where the user had it.
    z_up = seq.vertices[0].astype(np.float64)
    a = math.radians(90.0)
    turned = z_up @ np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]]).T
    user = 10.0 * (turned @ Z_UP) + [1.0, 2.0, 3.0]                             # glTF axes
    colours = (seq.frame_colors() * 255).astype(np.uint8)
    trimesh.Trimesh(user, seq.faces, vertex_colors=colours, process=False).export(canon / "clip.glb")
    given = Glb(canon / "clip.glb")
    user = given.data(given.g.meshes[0].primitives[0].attributes.POSITION)     # as stored: float32

    out = tmp_path / "out"
    assert _run("--pack", pack, "--input", videos / "clip.mp4", "--canonical", canon, "--out", out,
                "--mesh-gaussians", 4096) == 0
    d = out / "clip"
    summary = json.loads((d / "summary.json").read_text())
    assert "animated.glb (6 morph targets)" in capsys.readouterr().out
    norm = summary["canonical_mesh"]["normalisation"]
    assert summary["animated_glb"]["morph_targets"] == 6 and summary["animated_glb"]["fps"] == 8.0
    assert summary["canonical_mesh"]["gaussians"] == 4096 and summary["gaussians"] == 4096
    # The alignment undoes the 90 degree turn to within its coarse silhouette match at 64 pixels; what matters here
    # is that animated.glb turns the motion back by whatever it found (below).
    assert abs((norm["azimuth_deg"] - 270.0 + 180) % 360 - 180) <= 30, norm
    assert norm["extent"] == pytest.approx(10.0 * np.ptp(turned, axis=0).max(), rel=1e-6)

    glb = Glb(d / "animated.glb")
    glb.check_animation(6, 8.0, nodes=[n for n, node in enumerate(glb.g.nodes) if node.mesh is not None])
    prim = glb.g.meshes[0].primitives[0]
    base = glb.data(prim.attributes.POSITION)
    np.testing.assert_array_equal(base, user)                                  # the input's own positions
    assert len(prim.targets) == 6
    # The expected motion, rebuilt from animation.npz and the summary's transform with the training's interpolation.
    npz = np.load(d / "animation.npz")
    az = math.radians(norm["azimuth_deg"])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    vertices = ((user @ Z_UP.T - norm["centre"]) / norm["extent"]) @ rz.T    # the Gaussians' frame
    xyz = torch.from_numpy(npz["xyz"]).double()
    moved = xyz + torch.from_numpy(npz["delta"][..., :3]).double()
    expected = interpolate_displacements(torch.from_numpy(vertices)[None], xyz[None], moved[None], k=8, beta=7.0)[0]
    expected = norm["extent"] * (expected.numpy() @ rz) @ Z_UP                  # back to the mesh's units, glTF axes
    for t in range(6):
        np.testing.assert_allclose(glb.data(prim.targets[t]["POSITION"]), expected[t], atol=1e-5 * 10)
    assert np.abs(expected).max() > 1e-3                                       # the random tiny models do move it

    # Splat-only canonicals keep their outputs; two canonicals of one name are refused.
    assert not (out / "clip_splat").exists()
    write_ply(Gaussians.load_ply(d / "ply" / "frame_0000.ply"), canon / "clip.ply")
    assert _run("--pack", pack, "--input", videos / "clip.mp4", "--canonical", canon, "--out", out,
                "--overwrite", "--mesh-gaussians", 4096) == 2
    assert "clip.ply and clip.glb are both canonicals of clip" in capsys.readouterr().err
    (tmp_path / "broken.glb").write_bytes(b"not a mesh")
    assert _run("--pack", pack, "--input", videos / "clip.mp4", "--canonical", tmp_path / "broken.glb",
                "--out", tmp_path / "out2") == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "broken.glb") in err and len([x for x in err.splitlines() if "failed" in x]) == 1


# ----------------------------------------------------------------------------------------------- Blender
BLENDER_CHECK = """
import json, sys, bpy
bpy.ops.wm.read_factory_settings(use_empty=True)
bpy.ops.import_scene.gltf(filepath=sys.argv[1])
meshes = [o for o in bpy.data.objects if o.type == "MESH"]
keys = meshes[0].data.shape_keys
action = keys.animation_data.action if keys and keys.animation_data else None
frames = sorted({int(round(k.co[0])) for fc in action.fcurves for k in fc.keyframe_points}) if action else []
posed = []
for f in frames:  # the evaluated mesh (shape keys applied) in world space at each key
    bpy.context.scene.frame_set(f)
    o = meshes[0].evaluated_get(bpy.context.evaluated_depsgraph_get())
    posed.append([list(o.matrix_world @ v.co) for v in o.to_mesh().vertices])
print("RESULT", json.dumps({"meshes": len(meshes), "keys": [k.name for k in keys.key_blocks] if keys else [],
                            "frames": frames, "posed": posed}))
"""


def test_blender_imports_shape_keys_and_an_action(tmp_path):
    if not RENDER_PYTHON.is_file():
        pytest.skip(f"no Blender venv ({RENDER_PYTHON}; ./setup.sh --render makes it)")
    if subprocess.run([str(RENDER_PYTHON), "-c", "import bpy"], capture_output=True).returncode != 0:
        pytest.skip(f"{RENDER_PYTHON} has no bpy")
    box = trimesh.creation.box(extents=[1.0, 2.0, 3.0])
    trimesh.Trimesh(box.vertices, box.faces, process=False).export(tmp_path / "box.ply")
    frames = 5
    disp = _field(box.vertices, frames)
    write_animated_glb(tmp_path / "box.glb", read_mesh(tmp_path / "box.ply"), disp, 12.0)
    (tmp_path / "check.py").write_text(BLENDER_CHECK)
    run = subprocess.run([str(RENDER_PYTHON), str(tmp_path / "check.py"), str(tmp_path / "box.glb")],
                         capture_output=True, text=True, timeout=300)
    line = next((x for x in run.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, run.stdout[-2000:] + run.stderr[-2000:]
    seen = json.loads(line[len("RESULT "):])
    assert seen["meshes"] == 1 and seen["keys"] == ["Basis"] + [f"frame_{t:04d}" for t in range(frames)]
    # Blender plays the animation at its scene rate (24 fps): key t of a 12 fps video at frame 2 t.
    assert seen["frames"] == [2 * t for t in range(frames)]
    # Blender's Z-up world is the project's: at key t the box is the PLY's vertices + displacement t.
    for t in range(frames):
        posed = np.asarray(seen["posed"][t])
        expected = box.vertices + disp[t]
        assert posed.shape == expected.shape
        assert np.linalg.norm(expected[:, None] - posed[None], axis=-1).min(1).max() < 1e-5, t
