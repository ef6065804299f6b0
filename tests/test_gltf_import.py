"""glTF animation import: the Khronos sample files against an independent evaluation written here, and tiny hand-built
files against hand-computed answers. Nothing here calls the importer's private helpers."""
import base64
import io
import json
import math
import os
import shutil
import struct
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_rendering.gltf_import import load_animated_gltf

# ----------------------------------------------------------------------------------------------------------------------
# The Khronos sample files (Debian package assimp-testmodels)
# ----------------------------------------------------------------------------------------------------------------------

_KNOWN = {
    "AnimatedMorphCube":
        "/usr/share/assimp/models/glTF2/glTF-Sample-Models/AnimatedMorphCube-glTF/AnimatedMorphCube.gltf",
    "simple_skin": "/usr/share/assimp/models/glTF2/simple_skin/simple_skin.gltf",
}


def _locate(stem: str) -> Path | None:
    if Path(_KNOWN[stem]).is_file():
        return Path(_KNOWN[stem])
    for suffix in (".gltf", ".glb"):
        for root, _, files in os.walk("/usr/share"):
            if stem + suffix in files:
                return Path(root) / (stem + suffix)
    return None


@pytest.fixture(scope="session")
def khronos():
    found = {stem: _locate(stem) for stem in _KNOWN}
    if None in found.values() and shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0:
        # One attempt per session; the package only ships data files. A fresh machine may need its package lists first.
        install = ["apt-get", "install", "-y", "-q", "assimp-testmodels"]
        if subprocess.run(install, capture_output=True, timeout=600).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, timeout=600)
            subprocess.run(install, capture_output=True, timeout=600)
        found = {stem: _locate(stem) for stem in _KNOWN}
    missing = [stem for stem, p in found.items() if p is None]
    if missing:
        pytest.skip(f"Khronos sample files {missing} not found under /usr/share; install the Debian package "
                    "assimp-testmodels (apt-get install assimp-testmodels) to run this test")
    return found


def _raw_file(path: Path):
    """(json dict, list of buffer bytes), parsed directly from the file."""
    data = path.read_bytes()
    glb_bin = b""
    if data[:4] == b"glTF":
        json_len = struct.unpack_from("<I", data, 12)[0]
        doc = json.loads(data[20:20 + json_len])
        at = 20 + json_len
        if at + 8 <= len(data):
            glb_bin = data[at + 8:at + 8 + struct.unpack_from("<I", data, at)[0]]
    else:
        doc = json.loads(data)
    buffers = []
    for b in doc["buffers"]:
        uri = b.get("uri")
        if uri is None:
            buffers.append(glb_bin)
        elif uri.startswith("data:"):
            buffers.append(base64.b64decode(uri.split(",", 1)[1]))
        else:
            buffers.append((path.parent / uri).read_bytes())
    return doc, buffers


def _raw_accessor(doc, buffers, index) -> np.ndarray:
    """(count, components) float64 of a dense accessor, element by element (the two sample files need no more)."""
    acc = doc["accessors"][index]
    view = doc["bufferViews"][acc["bufferView"]]
    dtype = np.dtype({5123: "<u2", 5125: "<u4", 5126: "<f4"}[acc["componentType"]])
    n = {"SCALAR": 1, "VEC3": 3, "VEC4": 4, "MAT4": 16}[acc["type"]]
    size = dtype.itemsize * n
    stride = view.get("byteStride", size)
    start = view.get("byteOffset", 0) + acc.get("byteOffset", 0)
    buf = buffers[view["buffer"]]
    rows = [np.frombuffer(buf[start + k * stride:start + k * stride + size], dtype) for k in range(acc["count"])]
    return np.array(rows, dtype=np.float64)


def _rotate(q, v):
    """Rotate vector v by unit quaternion q = (x, y, z, w): v + 2w (u x v) + 2 u x (u x v)."""
    u, w = np.asarray(q[:3], float), float(q[3])
    return v + 2 * w * np.cross(u, v) + 2 * np.cross(u, np.cross(u, v))


def _rotation_matrix(q):
    q = np.asarray(q, float) / np.linalg.norm(q)
    return np.stack([_rotate(q, e) for e in np.eye(3)], axis=1)  # columns are the rotated basis vectors


def _lerp_keys(keys, values, t):
    """Linear interpolation between keyframes, held at the ends; returns (value_a, value_b, fraction)."""
    if t <= keys[0]:
        return values[0], values[0], 0.0
    if t >= keys[-1]:
        return values[-1], values[-1], 0.0
    for k in range(len(keys) - 1):
        if keys[k] <= t < keys[k + 1]:
            return values[k], values[k + 1], (t - keys[k]) / (keys[k + 1] - keys[k])
    raise AssertionError("unreachable")


def _slerp(a, b, s):
    a, b = np.asarray(a, float), np.asarray(b, float)
    a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
    d = float(a @ b)
    if d < 0:
        b, d = -b, -d
    if d > 1 - 1e-12:
        return a
    theta = math.acos(min(d, 1.0))
    out = (math.sin((1 - s) * theta) * a + math.sin(s * theta) * b) / math.sin(theta)
    return out / np.linalg.norm(out)


def _z_up(v):
    return np.stack([v[..., 0], -v[..., 2], v[..., 1]], axis=-1)


def test_animated_morph_cube_matches_independent_evaluation(khronos):
    path = khronos["AnimatedMorphCube"]
    doc, buffers = _raw_file(path)
    prim = doc["meshes"][0]["primitives"][0]
    base = _raw_accessor(doc, buffers, prim["attributes"]["POSITION"])
    deltas = [_raw_accessor(doc, buffers, t["POSITION"]) for t in prim["targets"]]
    indices = _raw_accessor(doc, buffers, prim["indices"]).astype(int).reshape(-1, 3)
    sampler = doc["animations"][0]["samplers"][0]
    assert doc["animations"][0]["channels"][0]["target"] == {"node": 0, "path": "weights"}
    assert sampler["interpolation"] == "LINEAR"
    keys = _raw_accessor(doc, buffers, sampler["input"]).ravel()
    weights = _raw_accessor(doc, buffers, sampler["output"]).reshape(len(keys), len(deltas))
    node = doc["nodes"][0]
    rot, scale = _rotation_matrix(node["rotation"]), np.asarray(node["scale"], float)

    # Between keyframes (no time is a key), at both ends, and past the end (held at the last key).
    times = [0.0, 0.41, 1.234, 2.0, 2.555, 3.333, 4.1, 4.19999, 6.0]
    expected = []
    for t in times:
        wa, wb, s = _lerp_keys(keys, weights, t)
        w = (1 - s) * wa + s * wb
        local = base + sum(w[k] * deltas[k] for k in range(len(deltas)))
        expected.append((local * scale) @ rot.T)  # world = R * S * p (the node has no translation)
    expected = np.array(expected)
    assert np.abs(expected - expected[0]).max() > 0.5  # the cube really changes shape over these times

    mesh, meta = load_animated_gltf(path, times=times, up_axis="y")
    assert mesh.vertices.shape == (len(times), len(base), 3)
    np.testing.assert_array_equal(mesh.faces, indices)
    np.testing.assert_allclose(mesh.vertices, expected, atol=1e-5, rtol=0)
    assert meta["animation_names"] == ["Square"] and meta["num_morph_targets"] == 2 and not meta["skinned"]
    assert meta["time_range"][0] == 0.0 and abs(meta["time_range"][1] - keys[-1]) < 1e-9
    # The default Z-up world is Blender's axis conversion of the same positions.
    mesh_z, _ = load_animated_gltf(path, times=times)
    np.testing.assert_allclose(mesh_z.vertices, _z_up(expected), atol=1e-5, rtol=0)
    # Material colour: baseColorFactor (linear) encoded to sRGB.
    f = doc["materials"][0]["pbrMetallicRoughness"]["baseColorFactor"][0]
    np.testing.assert_allclose(mesh.colors, 1.055 * f ** (1 / 2.4) - 0.055, atol=1e-6)


def test_simple_skin_matches_independent_evaluation(khronos):
    path = khronos["simple_skin"]
    doc, buffers = _raw_file(path)
    node0, node1, node2 = doc["nodes"][:3]
    # The file's structure, on which the hand evaluation below relies.
    assert node0["skin"] == 0 and node0["children"] == [1]
    assert not {"translation", "rotation", "scale", "matrix"} & set(node0)
    assert doc["skins"][0]["joints"] == [1, 2] and node1["children"] == [2]
    prim = doc["meshes"][0]["primitives"][0]
    positions = _raw_accessor(doc, buffers, prim["attributes"]["POSITION"])
    joints = _raw_accessor(doc, buffers, prim["attributes"]["JOINTS_0"]).astype(int)
    weights = _raw_accessor(doc, buffers, prim["attributes"]["WEIGHTS_0"])
    ibm = [m.reshape(4, 4).T for m in _raw_accessor(doc, buffers, doc["skins"][0]["inverseBindMatrices"])]
    channel = doc["animations"][0]["channels"][0]
    assert channel["target"] == {"node": 2, "path": "rotation"}
    sampler = doc["animations"][0]["samplers"][channel["sampler"]]
    keys = _raw_accessor(doc, buffers, sampler["input"]).ravel()
    quats = _raw_accessor(doc, buffers, sampler["output"])

    def translation(t):
        m = np.eye(4)
        m[:3, 3] = t
        return m

    def rotation(q):
        m = np.eye(4)
        m[:3, :3] = _rotation_matrix(q)
        return m

    times = [0.0, 0.3, 1.7, 2.25, 3.9, 4.6, 5.2, 7.0]
    expected = []
    for t in times:
        qa, qb, s = _lerp_keys(keys, quats, t)
        joint1 = translation(node1["translation"])  # node 0 (its parent) is the identity
        joint2 = joint1 @ rotation(_slerp(qa, qb, s))
        skin = [joint1 @ ibm[0], joint2 @ ibm[1]]
        frame = []
        for v in range(len(positions)):
            p = np.append(positions[v], 1.0)
            frame.append(sum(weights[v, i] * (skin[joints[v, i]] @ p) for i in range(4))[:3])
        expected.append(frame)
    expected = np.array(expected)
    assert np.abs(expected - expected[0]).max() > 0.3  # the joint really bends

    mesh, meta = load_animated_gltf(path, times=times, up_axis="y")
    np.testing.assert_allclose(mesh.vertices, expected, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(mesh.faces, _raw_accessor(doc, buffers, prim["indices"]).astype(int).reshape(-1, 3))
    assert meta["skinned"] and meta["num_nodes"] == 3 and meta["color_source"] == "none" and mesh.colors is None
    mesh_z, _ = load_animated_gltf(path, times=times)
    np.testing.assert_allclose(mesh_z.vertices, _z_up(expected), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------------------------
# Tiny hand-built files
# ----------------------------------------------------------------------------------------------------------------------

_CTYPE = {("f", 4): 5126, ("u", 1): 5121, ("i", 1): 5120, ("u", 2): 5123, ("i", 2): 5122, ("u", 4): 5125}
_NCOMP = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4, "MAT4": 16}


class Builder:
    """A glTF document with one buffer; each array gets its own 4-byte aligned bufferView."""

    def __init__(self):
        self.blob = bytearray()
        self.doc = {"asset": {"version": "2.0"}, "bufferViews": [], "accessors": []}

    def view(self, data: bytes) -> int:
        self.blob += b"\0" * (-len(self.blob) % 4)
        self.doc["bufferViews"].append({"buffer": 0, "byteOffset": len(self.blob), "byteLength": len(data)})
        self.blob += data
        return len(self.doc["bufferViews"]) - 1

    def accessor(self, values, type_: str, dtype="<f4", **extra) -> int:
        arr = np.asarray(values, dtype=dtype)
        acc = {"componentType": _CTYPE[(arr.dtype.kind, arr.dtype.itemsize)], "count": arr.size // _NCOMP[type_],
               "type": type_, **extra}
        if "bufferView" not in extra and arr.size:
            acc["bufferView"] = self.view(arr.tobytes())
        self.doc["accessors"].append(acc)
        return len(self.doc["accessors"]) - 1

    def animation(self, node, path, keys, values, interpolation="LINEAR", out_dtype="<f4", **out_extra):
        width = {"translation": "VEC3", "scale": "VEC3", "rotation": "VEC4", "weights": "SCALAR"}[path]
        sampler = {"input": self.accessor(keys, "SCALAR", min=[min(keys)], max=[max(keys)]),
                   "output": self.accessor(values, width, out_dtype, **out_extra), "interpolation": interpolation}
        channel = {"sampler": 0, "target": {"node": node, "path": path}}
        self.doc.setdefault("animations", []).append(
            {"name": f"{path}_anim", "samplers": [sampler], "channels": [channel]})

    def write_gltf(self, path: Path, external: bool = False) -> Path:
        doc = json.loads(json.dumps(self.doc))
        if external:
            path.with_suffix(".bin").write_bytes(bytes(self.blob))
            doc["buffers"] = [{"byteLength": len(self.blob), "uri": path.with_suffix(".bin").name}]
        else:
            uri = "data:application/octet-stream;base64," + base64.b64encode(bytes(self.blob)).decode()
            doc["buffers"] = [{"byteLength": len(self.blob), "uri": uri}]
        path.write_text(json.dumps(doc))
        return path

    def write_glb(self, path: Path) -> Path:
        """Binary glTF: 12-byte header, a JSON chunk padded with spaces, a BIN chunk padded with zeros."""
        doc = json.loads(json.dumps(self.doc))
        blob = bytes(self.blob) + b"\0" * (-len(self.blob) % 4)
        doc["buffers"] = [{"byteLength": len(blob)}]
        text = json.dumps(doc).encode()
        text += b" " * (-len(text) % 4)
        body = struct.pack("<II", len(text), 0x4E4F534A) + text + struct.pack("<II", len(blob), 0x004E4942) + blob
        path.write_bytes(b"glTF" + struct.pack("<II", 2, 12 + len(body)) + body)
        return path


def _triangle(builder: Builder, **node) -> Builder:
    pos = builder.accessor([[0, 0, 0], [1, 0, 0], [0, 1, 0]], "VEC3")
    idx = builder.accessor([0, 1, 2], "SCALAR", "<u2")
    builder.doc["meshes"] = [{"primitives": [{"attributes": {"POSITION": pos}, "indices": idx}]}]
    builder.doc["nodes"] = [{"mesh": 0, **node}]
    builder.doc["scenes"] = [{"nodes": [0]}]
    return builder


TRIANGLE = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], float)


@pytest.mark.parametrize("interpolation,offsets", [
    ("STEP", [0, 0, 0, 1, 1, 2, 2]),
    ("LINEAR", [0, 0, 0.5, 1, 1.99, 2, 2]),
])
def test_translation_through_hierarchy(tmp_path, interpolation, offsets):
    b = _triangle(Builder(), rotation=[0, 0, math.sqrt(0.5), math.sqrt(0.5)])  # static 90 degrees about z
    # Parent: a column-major matrix, scale 2 then translate by (0, 0, 5).
    b.doc["nodes"].append({"children": [0], "matrix": [2, 0, 0, 0, 0, 2, 0, 0, 0, 0, 2, 0, 0, 0, 5, 1]})
    b.doc["scenes"] = [{"nodes": [1]}]
    b.animation(0, "translation", [0.0, 1.0, 2.0], [[0, 0, 0], [1, 0, 0], [2, 0, 0]], interpolation)
    path = b.write_gltf(tmp_path / "tri.gltf")
    times = [-1.0, 0.0, 0.5, 1.0, 1.99, 2.0, 3.0]
    mesh, meta = load_animated_gltf(path, times=times, up_axis="y")
    rotated = TRIANGLE @ np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]], float).T  # (x, y) -> (-y, x)
    for f, dx in enumerate(offsets):
        expected = 2 * (rotated + [dx, 0, 0]) + [0, 0, 5]
        np.testing.assert_allclose(mesh.vertices[f], expected, atol=1e-6)
    assert mesh.faces.tolist() == [[0, 1, 2]] and meta["time_range"] == (0.0, 2.0)


def test_default_times_fps_start_and_step(tmp_path):
    b = _triangle(Builder())
    b.animation(0, "translation", [0.5, 2.5], [[0, 0, 0], [4, 0, 0]])
    path = b.write_gltf(tmp_path / "tri.gltf")
    _, meta = load_animated_gltf(path, num_frames=5)
    np.testing.assert_allclose(meta["times"], [0.5, 1.0, 1.5, 2.0, 2.5])  # spans the key range
    mesh, meta = load_animated_gltf(path, num_frames=4, fps=2, up_axis="y")  # consecutive frames from the first key
    np.testing.assert_allclose(meta["times"], [0.5, 1.0, 1.5, 2.0])
    np.testing.assert_allclose(mesh.vertices[:, 1, 0], [1, 2, 3, 4], atol=1e-6)
    mesh, meta = load_animated_gltf(path, num_frames=3, start=2.0, step=0.5, up_axis="y")  # runs past the end: held
    np.testing.assert_allclose(meta["times"], [2.0, 2.5, 3.0])
    np.testing.assert_allclose(mesh.vertices[:, 1, 0], [4, 5, 5], atol=1e-6)
    mesh, _ = load_animated_gltf(path, num_frames=3, up_axis="z")
    np.testing.assert_allclose(mesh.vertices[:, 2], [[0, 0, 1], [2, 0, 1], [4, 0, 1]], atol=1e-6)  # glTF +y is +z


def test_cubicspline_scalar_morph_weight(tmp_path):
    b = _triangle(Builder())
    b.doc["meshes"][0]["primitives"][0]["targets"] = [{"POSITION": b.accessor([[0, 0, 1]] * 3, "VEC3")}]
    b.doc["meshes"][0]["weights"] = [0.0]
    # Keys at 0 s and 2 s; per key (in-tangent, value, out-tangent): (-, 0, 1) and (-0.5, 1, -).
    b.animation(0, "weights", [0.0, 2.0], [9.0, 0.0, 1.0, -0.5, 1.0, 9.0], "CUBICSPLINE")
    path = b.write_gltf(tmp_path / "cubic.gltf")
    mesh, _ = load_animated_gltf(path, times=[-1.0, 0.0, 0.5, 1.0, 2.0, 3.0], up_axis="y")
    # p(s) = h00 v0 + h10 dt b0 + h01 v1 + h11 dt a1 with dt = 2:
    # s = 1/4: 0 + 0.140625*2*1 + 0.15625*1 + (-0.046875)*2*(-0.5) = 0.484375
    # s = 1/2: 0 + 0.125*2*1 + 0.5*1 + (-0.125)*2*(-0.5) = 0.875
    expected = [0.0, 0.0, 0.484375, 0.875, 1.0, 1.0]
    np.testing.assert_allclose(mesh.vertices[:, :, 2], np.repeat(np.array(expected)[:, None], 3, 1), atol=1e-6)


def test_sparse_accessors_and_node_weights(tmp_path):
    b = Builder()
    # POSITION: a dense base whose vertex 2 is replaced through sparse storage (uint8 indices).
    sparse_pos = {"count": 1, "indices": {"bufferView": b.view(np.array([2], "<u1").tobytes() + b"\0\0\0"),
                                          "componentType": 5121},
                  "values": {"bufferView": b.view(np.array([0, 2, 0], "<f4").tobytes())}}
    pos = b.accessor([[0, 0, 0], [1, 0, 0], [0, 1, 0]], "VEC3", sparse=sparse_pos)
    # Morph target: no bufferView at all (zeros) except vertex 1 (uint16 indices).
    sparse_delta = {"count": 1, "indices": {"bufferView": b.view(np.array([1, 0], "<u2").tobytes()),
                                            "componentType": 5123},
                    "values": {"bufferView": b.view(np.array([0, 0, 4], "<f4").tobytes())}}
    delta = b.accessor(np.zeros(0), "VEC3", count=3, sparse=sparse_delta)
    b.doc["meshes"] = [{"primitives": [{"attributes": {"POSITION": pos}, "targets": [{"POSITION": delta}]}],
                        "weights": [1.0]}]
    b.doc["nodes"] = [{"mesh": 0, "weights": [0.5]}]  # the node's weights win over the mesh's
    b.doc["scenes"] = [{"nodes": [0]}]
    path = b.write_gltf(tmp_path / "sparse.gltf")
    with pytest.raises(ValueError, match="no animations") as err:
        load_animated_gltf(path)
    assert str(path) in str(err.value)
    mesh, meta = load_animated_gltf(path, num_frames=2, require_animation=False, up_axis="y")
    expected = [[0, 0, 0], [1, 0, 2], [0, 2, 0]]
    np.testing.assert_allclose(mesh.vertices, [expected, expected], atol=1e-6)
    assert meta["animation"] is None and mesh.faces.tolist() == [[0, 1, 2]]  # no indices: vertices in order


def test_normalized_int16_rotation_is_slerped(tmp_path):
    b = _triangle(Builder())
    h = round(math.sqrt(0.5) * 32767)
    b.animation(0, "rotation", [0.0, 1.0], [[0, 0, 0, 32767], [0, 0, h, h]], out_dtype="<i2", normalized=True)
    path = b.write_gltf(tmp_path / "rot.gltf")
    mesh, _ = load_animated_gltf(path, times=[0.0, 0.5, 1.0], up_axis="y")
    c = math.sqrt(0.5)
    np.testing.assert_allclose(mesh.vertices[:, 1], [[1, 0, 0], [c, c, 0], [0, 1, 0]], atol=1e-6)  # 0, 45, 90 deg


def test_skinning_ignores_the_mesh_node_and_applies_morphs_first(tmp_path):
    b = Builder()
    pos = b.accessor([[0, 0, 0], [2, 0, 0], [1, 1, 0]], "VEC3")
    delta = b.accessor([[0, 0, 0], [0, 0, 0], [0, 0, 1]], "VEC3")
    # Vertex 0 follows joint 0, vertex 1 joint 1 through the second influence set, vertex 2 both halves.
    joints0 = b.accessor([[0, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0]], "VEC4", "<u1")
    weights0 = b.accessor([[1, 0, 0, 0], [0, 0, 0, 0], [0.5, 0.5, 0, 0]], "VEC4")
    joints1 = b.accessor([[0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]], "VEC4", "<u1")
    weights1 = b.accessor([[0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]], "VEC4")
    inverse_bind = np.eye(4)[None].repeat(2, 0)
    inverse_bind[1, :3, 3] = [-1, 0, 0]  # joint 1 sits at x = 1 in the bind pose
    ibm = b.accessor(inverse_bind.transpose(0, 2, 1).reshape(2, 16), "MAT4")  # column-major
    b.doc["meshes"] = [{"primitives": [{"attributes": {"POSITION": pos, "JOINTS_0": joints0, "WEIGHTS_0": weights0,
                                                       "JOINTS_1": joints1, "WEIGHTS_1": weights1},
                                        "targets": [{"POSITION": delta}]}], "weights": [1.0]}]
    b.doc["skins"] = [{"joints": [1, 2], "inverseBindMatrices": ibm}]
    b.doc["nodes"] = [{"mesh": 0, "skin": 0, "translation": [100, 0, 0]},  # ignored: the skin places the mesh
                      {"children": [2]}, {"translation": [1, 0, 0]}]
    b.doc["scenes"] = [{"nodes": [0, 1]}]
    b.animation(2, "rotation", [0.0, 1.0], [[0, 0, 0, 1], [0, 0, math.sqrt(0.5), math.sqrt(0.5)]])
    mesh, meta = load_animated_gltf(b.write_gltf(tmp_path / "skin.gltf"), times=[0.0, 0.5, 1.0], up_axis="y")
    c = math.sqrt(0.5)
    # Joint 1 turns 0, 45, 90 degrees about z around (1, 0, 0); vertex 2 is morphed to (1, 1, 1) before skinning.
    expected = [
        [[0, 0, 0], [2, 0, 0], [1, 1, 1]],
        [[0, 0, 0], [1 + c, c, 0], [(1 + 1 - c) / 2, (1 + c) / 2, 1]],
        [[0, 0, 0], [1, 1, 0], [0.5, 0.5, 1]],
    ]
    np.testing.assert_allclose(mesh.vertices, expected, atol=1e-6)
    assert meta["skinned"] and meta["num_morph_targets"] == 1


def test_strip_and_fan_are_triangulated_and_points_skipped(tmp_path):
    b = Builder()
    square = b.accessor([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0]], "VEC3")
    fan = b.accessor([[0, 0, 1], [1, 0, 1], [1, 1, 1], [0, 1, 1]], "VEC3")
    strip_idx = b.accessor([0, 1, 2, 3], "SCALAR", "<u2")
    b.doc["meshes"] = [{"primitives": [
        {"attributes": {"POSITION": square}, "indices": strip_idx, "mode": 5},
        {"attributes": {"POSITION": square}, "mode": 0},
        {"attributes": {"POSITION": fan}, "mode": 6},
    ]}]
    b.doc["nodes"] = [{"mesh": 0}]
    path = b.write_gltf(tmp_path / "modes.gltf")  # no scenes: every root node is drawn
    with pytest.warns(UserWarning, match="POINTS"):
        mesh, meta = load_animated_gltf(path, num_frames=1, require_animation=False, up_axis="y")
    # Strip (spec: p_i = v_i, v_{i+1+i%2}, v_{i+2-i%2}): (0,1,2), then (1,3,2), the same winding as (2,1,3);
    # fan (p_i = v_{i+1}, v_{i+2}, v_0): (1,2,0), (2,3,0), after the strip's 4 vertices.
    assert mesh.faces.tolist() == [[0, 1, 2], [1, 3, 2], [5, 6, 4], [6, 7, 4]]
    assert meta["num_primitives"] == 2 and meta["skipped_primitives"] == 1
    assert any("POINTS" in w for w in meta["warnings"])
    assert mesh.vertices.shape == (1, 8, 3)


def _png(pixels) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.asarray(pixels, np.uint8)).save(out, format="PNG")
    return out.getvalue()


def _srgb(linear):
    linear = np.asarray(linear, float)
    return np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)


def test_texture_external_files_and_glb_round_trip(tmp_path):
    pixels = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]],
                       [[0, 255, 255], [255, 0, 255], [40, 80, 120], [200, 100, 50]]], np.uint8)
    (tmp_path / "tex.png").write_bytes(_png(pixels))
    b = _triangle(Builder())
    image_view = b.view(_png(pixels))  # only the hand-written GLB below refers to it
    uv = b.accessor([[0.125, 0.25], [0.625, 0.75], [0.875, 0.25]], "VEC2")
    b.doc["meshes"][0]["primitives"][0]["attributes"]["TEXCOORD_0"] = uv
    b.doc["meshes"][0]["primitives"][0]["material"] = 0
    b.doc["materials"] = [{"pbrMetallicRoughness": {"baseColorTexture": {"index": 0}}}]
    b.doc["textures"] = [{"source": 0}]
    b.doc["images"] = [{"uri": "tex.png"}]
    b.animation(0, "scale", [0.0, 1.0], [[1, 1, 1], [3, 3, 3]])
    gltf = b.write_gltf(tmp_path / "tex.gltf", external=True)
    mesh, meta = load_animated_gltf(gltf, times=[0.0, 0.5, 1.0], up_axis="y")
    assert meta["color_source"] == "texture" and meta["format"] == "gltf" and mesh.colors is None
    np.testing.assert_allclose(mesh.texture, pixels / 255.0, atol=1e-5)
    np.testing.assert_allclose(mesh.uvs, [[0.125, 0.75], [0.625, 0.25], [0.875, 0.75]], atol=1e-7)  # v flipped
    np.testing.assert_allclose(mesh.vertices, [TRIANGLE, 2 * TRIANGLE, 3 * TRIANGLE], atol=1e-6)

    # The same asset as GLB: written by pygltflib (buffer in the BIN chunk, image as a data URI), and written here with
    # the image in a bufferView of the BIN chunk, as most GLB exporters do.
    pygltflib = pytest.importorskip("pygltflib")
    g = pygltflib.GLTF2().load(str(gltf))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pygltflib notes that tex.bin is left behind
        g.convert_images(pygltflib.ImageFormat.DATAURI)
        g.convert_buffers(pygltflib.BufferFormat.BINARYBLOB)
    (tmp_path / "copy").mkdir()
    by_pygltflib = tmp_path / "copy" / "tex.glb"
    g.save_binary(str(by_pygltflib))
    b.doc["images"] = [{"bufferView": image_view, "mimeType": "image/png"}]
    by_hand = b.write_glb(tmp_path / "copy" / "asset.bin")  # a GLB is recognised by its magic, not its name
    for glb in (by_pygltflib, by_hand):
        assert glb.read_bytes()[:4] == b"glTF"
        mesh2, meta2 = load_animated_gltf(glb, times=[0.0, 0.5, 1.0], up_axis="y")
        assert meta2["format"] == "glb" and meta2["color_source"] == "texture"
        for name in ("vertices", "faces", "uvs", "texture"):
            np.testing.assert_array_equal(getattr(mesh2, name), getattr(mesh, name))


def test_baked_colors_from_texture_color0_and_factor(tmp_path):
    b = Builder()
    pos = b.accessor(TRIANGLE, "VEC3")
    uv = b.accessor([[0.25, 0.25], [0.75, 0.25], [0.75, 0.75]], "VEC2")  # pixel centres of a 2x2 image
    color0 = b.accessor([[255, 255, 255, 255], [0, 255, 0, 255], [0, 0, 255, 255]], "VEC4", "<u1", normalized=True)
    b.doc["meshes"] = [{"primitives": [
        {"attributes": {"POSITION": pos, "TEXCOORD_0": uv}, "material": 0},
        {"attributes": {"POSITION": pos, "COLOR_0": color0}, "material": 1},
    ]}]
    b.doc["materials"] = [{"pbrMetallicRoughness": {"baseColorTexture": {"index": 0}}},
                          {"pbrMetallicRoughness": {"baseColorFactor": [0.5, 1.0, 1.0, 1.0]}}]
    b.doc["textures"] = [{"source": 0}]
    pixels = np.array([[[10, 20, 30], [40, 50, 60]], [[70, 80, 90], [100, 110, 120]]], np.uint8)
    b.doc["images"] = [{"bufferView": b.view(_png(pixels)), "mimeType": "image/png"}]
    b.doc["nodes"] = [{"mesh": 0}]
    b.doc["scenes"] = [{"nodes": [0]}]
    path = b.write_gltf(tmp_path / "baked.gltf")
    mesh, meta = load_animated_gltf(path, num_frames=1, require_animation=False)
    assert meta["color_source"] == "baked_texture" and mesh.uvs is None
    expected = np.concatenate([
        np.array([pixels[0, 0], pixels[0, 1], pixels[1, 1]]) / 255.0,  # texture at the vertex uvs (v down the image)
        _srgb([[0.5, 1, 1], [0, 1, 0], [0, 0, 1]]),  # factor * COLOR_0 in linear space, then sRGB
    ])
    np.testing.assert_allclose(mesh.colors, expected, atol=1e-5)


def test_malformed_and_unsupported_files_name_the_path(tmp_path):
    bad = tmp_path / "broken.gltf"
    bad.write_text("{ not json")
    with pytest.raises(ValueError, match="broken.gltf"):
        load_animated_gltf(bad)

    truncated = tmp_path / "truncated.glb"
    truncated.write_bytes(b"glTF" + struct.pack("<II", 2, 1000) + b"\0" * 10)
    with pytest.raises(ValueError, match="truncated.glb"):
        load_animated_gltf(truncated)

    empty = Builder()
    empty.doc["nodes"] = [{"name": "lonely"}]
    empty.doc["scenes"] = [{"nodes": [0]}]
    empty.accessor([0.0], "SCALAR")
    path = empty.write_gltf(tmp_path / "nomesh.gltf")
    with pytest.raises(ValueError, match=r"nomesh\.gltf.*no triangle meshes"):
        load_animated_gltf(path, require_animation=False)

    b = _triangle(Builder())
    b.animation(0, "translation", [0.0, 1.0], [[0, 0, 0], [1, 0, 0]])
    b.doc["accessors"][0]["count"] = 100  # POSITION reads past its bufferView
    path = b.write_gltf(tmp_path / "overrun.gltf")
    with pytest.raises(ValueError, match=r"overrun\.gltf.*accessor 0"):
        load_animated_gltf(path)

    b = _triangle(Builder())
    b.animation(0, "translation", [0.0, 1.0], [[0, 0, 0], [1, 0, 0]])
    path = b.write_gltf(tmp_path / "anim.gltf")
    with pytest.raises(ValueError, match=r"anim\.gltf.*no animation named 'walk'"):
        load_animated_gltf(path, animation="walk")
    with pytest.raises(ValueError, match=r"anim\.gltf.*out of range"):
        load_animated_gltf(path, animation=3)
    _, meta = load_animated_gltf(path, animation="translation_anim", num_frames=2)
    assert meta["animation_name"] == "translation_anim"

    b = _triangle(Builder())
    b.doc["meshes"][0]["primitives"][0]["indices"] = b.accessor([0, 1, 7], "SCALAR", "<u2")
    path = b.write_gltf(tmp_path / "badindex.gltf")
    with pytest.raises(ValueError, match=r"badindex\.gltf.*index 7"):
        load_animated_gltf(path, require_animation=False)

    b = _triangle(Builder())
    b.doc["meshes"][0]["primitives"] = {"not": "an array"}
    path = b.write_gltf(tmp_path / "wrongtype.gltf")
    with pytest.raises(ValueError, match=r"wrongtype\.gltf.*malformed glTF"):
        load_animated_gltf(path, require_animation=False)

    b = _triangle(Builder())
    b.doc["extensionsRequired"] = ["KHR_draco_mesh_compression"]
    path = b.write_gltf(tmp_path / "draco.gltf")
    with pytest.raises(ValueError, match=r"draco\.gltf.*compressed geometry"):
        load_animated_gltf(path, require_animation=False)

    b = _triangle(Builder())
    path = b.write_gltf(tmp_path / "external.gltf", external=True)
    path.with_suffix(".bin").unlink()
    with pytest.raises(ValueError, match=r"external\.gltf.*missing file"):
        load_animated_gltf(path, require_animation=False)
