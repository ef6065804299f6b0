"""glTF 2.0 / GLB animation import: evaluate an animated glTF file at chosen times into a `MeshSequence`.

`load_animated_gltf(path, ...)` returns per-frame world-space vertices with one fixed topology: every triangle
primitive of every mesh instance in the default scene, concatenated in scene-traversal order (depth first, children in
file order).

Supported
- Containers: `.gltf` JSON with embedded (data URI) or external `.bin` / image files, and binary `.glb` (detected by its
  magic bytes, not by the file name).
- Accessors: every component type, strides, matrix column padding, normalized integers, sparse accessors (with or
  without a base buffer view), quantized (KHR_mesh_quantization) positions and texture coordinates.
- Node hierarchy with TRS or matrix transforms; the `scene` property, else scene 0, else (no scenes) every root node.
- Animation channels on translation / rotation / scale / weights with STEP, LINEAR (slerp for rotations) and CUBICSPLINE
  interpolation; outside the keyframe range values are held (clamped) at the first / last key, as Blender does.
- Morph targets: POSITION deltas weighted by the animated weights, else the node's `weights`, else the mesh's `weights`.
- Skinning: JOINTS_n / WEIGHTS_n (all sets), inverse bind matrices and joint world matrices,
  v' = sum_i w_i * jointWorld_i * inverseBind_i * v. The skinned mesh node's own transform is ignored, as the spec says.
- Primitive modes TRIANGLES, TRIANGLE_STRIP and TRIANGLE_FAN; POINTS and LINES* primitives are skipped with a warning.
  Unreferenced vertices of a primitive are dropped (several primitives often index one shared vertex accessor).

Times (seconds). `times` given: used as they are. Otherwise, with `fps` or `step`: `num_frames` consecutive frames
`start + k * step` (step = 1 / fps) from the animation's first key (or `start`), held at the last key once the animation
ends -- this is what the published Blender renderer does (consecutive native frames from the start, clamped to the last
keyframe; Blender imports glTF at its scene rate, 24 fps by default, so `fps=24` reproduces it). With neither, the
default spreads `num_frames` times evenly over the animation's whole time range [first key, last key], so that every
import sees the full motion whatever the clip's length.

Colours (MeshSequence holds display, i.e. sRGB-encoded, values in [0, 1], the same space as texture pixels). glTF's
base colour is baseColorFactor * COLOR_0 * texture(TEXCOORD_n), the first two linear, the texture sRGB-encoded; the
product is formed in linear space and encoded back to sRGB.
- Every primitive uses the same base-colour image through texture coordinates, with one factor and no COLOR_0: the
  result keeps `uvs` + `texture` (the factor folded into the texture; uv v flipped to the MeshSequence convention; wrap
  modes other than repeat and KHR_texture_transform are not represented).
- Otherwise each primitive's colour is baked per vertex into `colors` (textures sampled bilinearly at the vertex uvs
  with the sampler's wrap modes).
- No primitive has a material or COLOR_0: `colors` is None (consumers use their default).
KHR_materials_pbrSpecularGlossiness materials (common in Objaverse) use their diffuse factor / texture instead.

Axes: glTF is Y up; the project's world is Z up (see mesh.py, the Blender renderer). With `up_axis="z"` (the default)
the positions are mapped (x, y, z) -> (x, -z, y), Blender's own glTF axis conversion; `up_axis="y"` keeps glTF's axes.

Not supported (ValueError): Draco / meshopt compressed geometry, glTF 1.0. Ignored with a warning:
KHR_texture_transform, undecodable images (e.g. KTX2), other required extensions.

The JSON is read as plain dictionaries rather than through pygltflib's dataclasses, because those drop fields the
evaluation needs (pygltflib 1.16 has no `Node.weights`, so static node morph weights would silently vanish).
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import io
import json
import struct
import warnings
from pathlib import Path
from typing import Sequence
from urllib.parse import unquote, unquote_to_bytes

import numpy as np
from PIL import Image

from .mesh import MeshSequence, y_up_to_z_up

__all__ = ["load_animated_gltf", "read_document", "sample_texture", "srgb_to_linear", "linear_to_srgb"]

# glTF componentType -> little-endian numpy dtype.
_COMPONENT_DTYPES = {
    5120: np.dtype("<i1"), 5121: np.dtype("<u1"), 5122: np.dtype("<i2"),
    5123: np.dtype("<u2"), 5125: np.dtype("<u4"), 5126: np.dtype("<f4"),
}
# accessor type -> (columns, rows); vectors are one column.
_TYPE_SHAPES = {"SCALAR": (1, 1), "VEC2": (1, 2), "VEC3": (1, 3), "VEC4": (1, 4),
                "MAT2": (2, 2), "MAT3": (3, 3), "MAT4": (4, 4)}
_TRIANGLES, _TRIANGLE_STRIP, _TRIANGLE_FAN = 4, 5, 6
_MODE_NAMES = {0: "POINTS", 1: "LINES", 2: "LINE_LOOP", 3: "LINE_STRIP"}
_CLAMP_TO_EDGE, _MIRRORED_REPEAT, _REPEAT = 33071, 33648, 10497
# Extensions that replace the geometry buffers: without a decoder the positions would be garbage or zeros.
_GEOMETRY_COMPRESSION = {"KHR_draco_mesh_compression", "EXT_meshopt_compression", "KHR_meshopt_compression"}
_HANDLED_EXTENSIONS = {"KHR_mesh_quantization", "KHR_materials_pbrSpecularGlossiness", "KHR_materials_unlit",
                       "EXT_texture_webp"}
_GLB_MAGIC, _GLB_JSON, _GLB_BIN = b"glTF", 0x4E4F534A, 0x004E4942


# ----------------------------------------------------------------------------------------------------------------------
# The file: JSON, buffers, accessors, images
# ----------------------------------------------------------------------------------------------------------------------

class _GltfFile:
    """A parsed glTF document with lazily loaded buffers and images; every error names the file."""

    def __init__(self, path: Path):
        self.path = path
        self.warnings: list[str] = []
        raw = path.read_bytes()
        self.glb_bin: bytes | None = None
        if raw[:4] == _GLB_MAGIC:
            text, self.glb_bin = self._split_glb(raw)
            self.format = "glb"
        else:
            text, self.format = raw, "gltf"
        try:
            self.json = json.loads(text.decode("utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self.error(f"not a glTF file (the JSON does not parse: {e})") from None
        if not isinstance(self.json, dict) or not isinstance(self.json.get("asset"), dict):
            raise self.error("not a glTF file (no 'asset' object)")
        version = str(self.json["asset"].get("version", ""))
        if not version.startswith("2"):
            raise self.error(f"glTF version {version!r} is not supported (only 2.x)")
        required = set(self.json.get("extensionsRequired", []))
        if required & _GEOMETRY_COMPRESSION:
            raise self.error(f"compressed geometry ({', '.join(sorted(required & _GEOMETRY_COMPRESSION))}) is not "
                             "supported; re-export the asset without mesh compression")
        for name in sorted(required - _HANDLED_EXTENSIONS):
            self.warn(f"required extension {name} is not supported and is ignored")
        self._buffers: dict[int, bytes] = {}
        self._images: dict[int, np.ndarray | None] = {}

    def error(self, message: str) -> ValueError:
        return ValueError(f"{self.path}: {message}")

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)
            warnings.warn(f"{self.path}: {message}", stacklevel=3)

    def _split_glb(self, raw: bytes) -> tuple[bytes, bytes | None]:
        if len(raw) < 20:
            raise self.error("truncated GLB header")
        _, version, length = struct.unpack_from("<4sII", raw, 0)
        if version != 2:
            raise self.error(f"GLB container version {version} is not supported (only 2)")
        if length > len(raw):
            raise self.error(f"truncated GLB: header says {length} bytes, the file has {len(raw)}")
        chunks, offset = [], 12
        while offset + 8 <= length:
            size, kind = struct.unpack_from("<II", raw, offset)
            if offset + 8 + size > length:
                raise self.error(f"GLB chunk at byte {offset} runs past the end of the file")
            chunks.append((kind, raw[offset + 8:offset + 8 + size]))
            offset += 8 + size
        if not chunks or chunks[0][0] != _GLB_JSON:
            raise self.error("GLB does not start with a JSON chunk")
        binary = next((data for kind, data in chunks[1:] if kind == _GLB_BIN), None)
        return chunks[0][1], binary

    # -- plain JSON access with range checks --------------------------------------------------------------------------

    def items(self, key: str) -> list:
        value = self.json.get(key, [])
        if not isinstance(value, list):
            raise self.error(f"'{key}' is not an array")
        return value

    def item(self, key: str, index, what: str) -> dict:
        items = self.items(key)
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(items):
            raise self.error(f"{what} refers to {key}[{index}], but the file has {len(items)} {key}")
        if not isinstance(items[index], dict):
            raise self.error(f"{key}[{index}] is not an object")
        return items[index]

    # -- bytes ---------------------------------------------------------------------------------------------------------

    def _uri_bytes(self, uri: str, what: str) -> bytes:
        if uri.startswith("data:"):
            header, comma, payload = uri.partition(",")
            if not comma:
                raise self.error(f"{what}: malformed data URI")
            try:
                return base64.b64decode(payload) if header.endswith(";base64") else unquote_to_bytes(payload)
            except (binascii.Error, ValueError) as e:
                raise self.error(f"{what}: malformed base64 data URI ({e})") from None
        file = self.path.parent / unquote(uri)
        if not file.is_file():
            raise self.error(f"{what} refers to the missing file {file}")
        return file.read_bytes()

    def buffer(self, index: int, what: str) -> bytes:
        if index not in self._buffers:
            info = self.item("buffers", index, what)
            if info.get("uri") is None:
                # Only the first buffer of a GLB may leave out its uri: it is the BIN chunk.
                if self.glb_bin is None or index != 0:
                    raise self.error(f"buffer {index} has no uri and there is no GLB binary chunk for it")
                data = self.glb_bin
            else:
                data = self._uri_bytes(info["uri"], f"buffer {index}")
            if len(data) < int(info.get("byteLength", 0)):
                raise self.error(f"buffer {index} holds {len(data)} bytes, its byteLength says {info['byteLength']}")
            self._buffers[index] = data
        return self._buffers[index]

    def view_bytes(self, index: int, what: str) -> tuple[bytes, int, int, int | None]:
        """(buffer, start, length, byteStride) of a bufferView, checked to lie inside its buffer."""
        view = self.item("bufferViews", index, what)
        data = self.buffer(view.get("buffer"), f"bufferView {index}")
        start, length = int(view.get("byteOffset", 0)), int(view.get("byteLength", -1))
        if start < 0 or length < 0 or start + length > len(data):
            raise self.error(f"bufferView {index} (bytes {start}..{start + length}) lies outside its buffer "
                             f"of {len(data)} bytes")
        return data, start, length, view.get("byteStride")

    def _elements(self, view_index: int, offset: int, count: int, dtype: np.dtype, columns: int, rows: int,
                  what: str) -> np.ndarray:
        """`count` elements of columns x rows components from a bufferView, as (count, columns * rows), column-major
        as glTF stores matrices."""
        data, start, length, stride = self.view_bytes(view_index, what)
        size = dtype.itemsize
        # Matrix columns start on 4-byte boundaries (MAT2 of bytes, MAT3 of bytes / shorts are padded).
        column_stride = rows * size if columns == 1 else -(-rows * size // 4) * 4
        element = column_stride * (columns - 1) + rows * size
        stride = int(stride) if stride else (column_stride * columns if columns > 1 else element)
        if count == 0:
            return np.zeros((0, columns * rows), dtype)
        end = offset + stride * (count - 1) + element
        if offset < 0 or stride < element or end > length:
            raise self.error(f"{what} reads bytes {offset}..{end} of bufferView {view_index}, which holds {length}")
        view = np.ndarray((count, columns, rows), dtype=dtype, buffer=data, offset=start + offset,
                          strides=(stride, column_stride, size))
        return np.array(view).reshape(count, columns * rows)

    def _accessor(self, index, what: str) -> tuple[np.ndarray, dict]:
        """The raw (count, components) array of an accessor (sparse substitution applied) and its JSON."""
        what = f"accessor {index} ({what})"
        acc = self.item("accessors", index, what)
        dtype = _COMPONENT_DTYPES.get(acc.get("componentType"))
        shape = _TYPE_SHAPES.get(acc.get("type"))
        count = acc.get("count")
        if dtype is None or shape is None or not isinstance(count, int) or count < 0:
            raise self.error(f"{what}: unsupported componentType {acc.get('componentType')} / type "
                             f"{acc.get('type')!r} / count {count!r}")
        columns, rows = shape
        if "bufferView" in acc:
            values = self._elements(acc["bufferView"], int(acc.get("byteOffset", 0)), count, dtype, columns, rows,
                                    what)
        else:
            values = np.zeros((count, columns * rows), dtype)  # the spec: no bufferView means zeros (then sparse)
        sparse = acc.get("sparse")
        if sparse:
            n, ind, val = sparse.get("count", 0), sparse.get("indices", {}), sparse.get("values", {})
            index_dtype = _COMPONENT_DTYPES.get(ind.get("componentType"))
            if index_dtype is None or index_dtype.kind != "u":
                raise self.error(f"{what}: sparse indices must be unsigned integers")
            positions = self._elements(ind.get("bufferView"), int(ind.get("byteOffset", 0)), n, index_dtype, 1, 1,
                                       f"{what} sparse indices").ravel()
            replacements = self._elements(val.get("bufferView"), int(val.get("byteOffset", 0)), n, dtype, columns,
                                          rows, f"{what} sparse values")
            if n and int(positions.max()) >= count:
                raise self.error(f"{what}: sparse index {int(positions.max())} is out of range (count {count})")
            values[positions.astype(np.int64)] = replacements
        return values, acc

    def floats(self, index, what: str, normalized: bool = False) -> np.ndarray:
        """(count, components) float64. Integer data is mapped to [0, 1] / [-1, 1] when the accessor says normalized,
        or when `normalized` forces it (colours, skin weights, rotations must be normalized by the spec)."""
        values, acc = self._accessor(index, what)
        if values.dtype.kind == "f":
            return values.astype(np.float64)
        if acc.get("normalized", False) or normalized:
            top = float(np.iinfo(values.dtype).max)
            return np.maximum(values.astype(np.float64) / top, -1.0)
        return values.astype(np.float64)  # quantized but not normalized (KHR_mesh_quantization)

    def integers(self, index, what: str) -> np.ndarray:
        values, _ = self._accessor(index, what)
        if values.dtype.kind == "f":
            raise self.error(f"accessor {index} ({what}) must hold integers, it holds floats")
        return values.astype(np.int64)

    def image(self, index: int) -> np.ndarray | None:
        """(H, W, 3) float32 sRGB in [0, 1] (row 0 at the image top), or None with a warning when undecodable."""
        if index not in self._images:
            info = self.item("images", index, "texture")
            try:
                if "bufferView" in info:
                    data, start, length, _ = self.view_bytes(info["bufferView"], f"image {index}")
                    data = data[start:start + length]
                else:
                    data = self._uri_bytes(str(info.get("uri", "")), f"image {index}")
                with Image.open(io.BytesIO(data)) as img:
                    self._images[index] = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
            except (OSError, ValueError) as e:
                self.warn(f"image {index} could not be decoded ({e}); its material falls back to the colour factor")
                self._images[index] = None
        return self._images[index]


# ----------------------------------------------------------------------------------------------------------------------
# Rotations and keyframe interpolation
# ----------------------------------------------------------------------------------------------------------------------

def _normalize_quaternions(q: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(q, axis=-1, keepdims=True)
    return np.where(norm > 0, q / np.where(norm > 0, norm, 1.0), np.array([0.0, 0.0, 0.0, 1.0]))


def trs_matrices(t: np.ndarray, q: np.ndarray, s: np.ndarray) -> np.ndarray:
    """(..., 4, 4) = T * R * S from translations (..., 3), quaternions (..., 4) as x, y, z, w, and scales (..., 3)."""
    x, y, z, w = np.moveaxis(_normalize_quaternions(q), -1, 0)
    rot = np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
    ], -2)
    out = np.zeros(rot.shape[:-2] + (4, 4))
    out[..., :3, :3] = rot * s[..., None, :]  # scaling the columns = R @ diag(s)
    out[..., :3, 3] = t
    out[..., 3, 3] = 1.0
    return out


def _slerp(q0: np.ndarray, q1: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Row-wise spherical interpolation of unit quaternions (N, 4) at fractions s (N,), along the shorter arc."""
    q0, q1 = _normalize_quaternions(q0), _normalize_quaternions(q1)
    dot = np.sum(q0 * q1, axis=-1)
    q1 = np.where(dot[:, None] < 0, -q1, q1)  # q and -q are the same rotation; take the short way round
    dot = np.clip(np.abs(dot), 0.0, 1.0)
    angle = np.arccos(dot)
    sin = np.sin(angle)
    near = sin < 1e-8  # (almost) identical: the slerp weights tend to the linear ones
    safe = np.where(near, 1.0, sin)
    a = np.where(near, 1.0 - s, np.sin((1.0 - s) * angle) / safe)
    b = np.where(near, s, np.sin(s * angle) / safe)
    return _normalize_quaternions(a[:, None] * q0 + b[:, None] * q1)


def _interpolate(times: np.ndarray, keys: np.ndarray, values: np.ndarray, interpolation: str,
                 rotation: bool) -> np.ndarray:
    """Evaluate one sampler at `times` (T,): keys (K,), values (K, n) or, for CUBICSPLINE, (K, 3, n) as
    (in-tangent, value, out-tangent). Returns (T, n); times outside [keys[0], keys[-1]] are held at the end values."""
    points = values[:, 1] if interpolation == "CUBICSPLINE" else values
    if len(keys) == 1:
        return np.repeat(points[:1], len(times), axis=0)
    if interpolation == "STEP":
        k = np.clip(np.searchsorted(keys, times, side="right") - 1, 0, len(keys) - 1)
        return points[k]
    k = np.clip(np.searchsorted(keys, times, side="right") - 1, 0, len(keys) - 2)
    dt = keys[k + 1] - keys[k]
    # Fraction inside the interval, clipped so that times outside the key range hold the end values.
    s = np.clip(np.where(dt > 0, (times - keys[k]) / np.where(dt > 0, dt, 1.0), 1.0), 0.0, 1.0)
    if interpolation == "LINEAR":
        if rotation:
            return _slerp(points[k], points[k + 1], s)
        return points[k] + s[:, None] * (points[k + 1] - points[k])
    # CUBICSPLINE: cubic Hermite spline between the two values, tangents scaled by the interval length.
    s2, s3 = s * s, s * s * s
    h00, h10, h01, h11 = 2 * s3 - 3 * s2 + 1, s3 - 2 * s2 + s, -2 * s3 + 3 * s2, s3 - s2
    out = (h00[:, None] * values[k, 1] + (h10 * dt)[:, None] * values[k, 2]
           + h01[:, None] * values[k + 1, 1] + (h11 * dt)[:, None] * values[k + 1, 0])
    return _normalize_quaternions(out) if rotation else out


_PATH_WIDTHS = {"translation": 3, "rotation": 4, "scale": 3}


def _evaluate_animation(doc: _GltfFile, index: int, times: np.ndarray) -> dict[tuple[int, str], np.ndarray]:
    """{(node, path): (T, n) values} for every usable channel of animation `index`."""
    anim = doc.item("animations", index, "animation")
    samplers, nodes = anim.get("samplers", []), doc.items("nodes")
    out: dict[tuple[int, str], np.ndarray] = {}
    for c, channel in enumerate(anim.get("channels", [])):
        target = channel.get("target", {})
        node, path = target.get("node"), target.get("path")
        if node is None:
            continue  # the spec: a channel without a node (extension-targeted) is ignored
        if path not in ("translation", "rotation", "scale", "weights"):
            doc.warn(f"animation {index} channel {c} targets {path!r}, which is not supported")
            continue
        if not isinstance(node, int) or not 0 <= node < len(nodes):
            raise doc.error(f"animation {index} channel {c} targets node {node}, the file has {len(nodes)} nodes")
        if not isinstance(channel.get("sampler"), int) or not 0 <= channel["sampler"] < len(samplers):
            raise doc.error(f"animation {index} channel {c} refers to a missing sampler {channel.get('sampler')}")
        sampler = samplers[channel["sampler"]]
        interpolation = sampler.get("interpolation", "LINEAR")
        if interpolation not in ("LINEAR", "STEP", "CUBICSPLINE"):
            raise doc.error(f"animation {index} sampler {channel['sampler']}: unknown interpolation {interpolation!r}")
        what = f"animation {index} sampler {channel['sampler']}"
        keys = doc.floats(sampler.get("input"), f"{what} input").ravel()
        if len(keys) == 0 or np.any(np.diff(keys) < 0):
            raise doc.error(f"{what}: keyframe times must be present and non-decreasing")
        values = doc.floats(sampler.get("output"), f"{what} output",
                            normalized=path in ("rotation", "weights")).ravel()
        per_key = 3 if interpolation == "CUBICSPLINE" else 1
        width = _PATH_WIDTHS.get(path) or (len(values) // max(len(keys) * per_key, 1))
        if width == 0 or len(values) != len(keys) * per_key * width:
            raise doc.error(f"{what}: {len(values)} output values do not fit {len(keys)} keys of {path} "
                            f"({interpolation})")
        values = values.reshape(len(keys), per_key, width) if per_key == 3 else values.reshape(len(keys), width)
        out[(node, path)] = _interpolate(times, keys, values, interpolation, rotation=path == "rotation")
    return out


def _animation_time_range(doc: _GltfFile, index: int) -> tuple[float, float]:
    anim = doc.item("animations", index, "animation")
    lo, hi = np.inf, -np.inf
    for s, sampler in enumerate(anim.get("samplers", [])):
        keys = doc.floats(sampler.get("input"), f"animation {index} sampler {s} input").ravel()
        if len(keys):
            lo, hi = min(lo, float(keys.min())), max(hi, float(keys.max()))
    return (lo, hi) if lo <= hi else (0.0, 0.0)


# ----------------------------------------------------------------------------------------------------------------------
# Node hierarchy
# ----------------------------------------------------------------------------------------------------------------------

def _node_order(doc: _GltfFile) -> tuple[list[int], dict[int, int]]:
    """Every node, parents before children (depth first from the root nodes), and the parent of each child."""
    nodes = doc.items("nodes")
    parent: dict[int, int] = {}
    for n, node in enumerate(nodes):
        for child in node.get("children", []):
            if not isinstance(child, int) or not 0 <= child < len(nodes):
                raise doc.error(f"node {n} has the missing child {child}")
            if child in parent:
                raise doc.error(f"node {child} has two parents ({parent[child]} and {n}); nodes must form trees")
            parent[child] = n
    order, stack = [], [n for n in reversed(range(len(nodes))) if n not in parent]
    while stack:
        n = stack.pop()
        order.append(n)
        stack.extend(reversed(nodes[n].get("children", [])))
    if len(order) != len(nodes):
        raise doc.error("the node hierarchy contains a cycle")
    return order, parent


def _scene_nodes(doc: _GltfFile) -> tuple[list[int], int | None]:
    """The nodes of the default scene in traversal order, and that scene's index (None: no scenes, all roots)."""
    nodes, scenes = doc.items("nodes"), doc.items("scenes")
    if scenes:
        scene = doc.json.get("scene", 0)
        roots = doc.item("scenes", scene, "the default scene").get("nodes", [])
    else:
        scene, roots = None, None
    order, parent = _node_order(doc)
    if roots is None:
        return order, None
    for r in roots:
        if not isinstance(r, int) or not 0 <= r < len(nodes):
            raise doc.error(f"scene {scene} refers to the missing node {r}")
    result, stack = [], list(reversed(roots))
    while stack:
        n = stack.pop()
        result.append(n)
        stack.extend(reversed(nodes[n].get("children", [])))
    return result, scene


def _world_matrices(doc: _GltfFile, animated: dict[tuple[int, str], np.ndarray], num_times: int) -> np.ndarray:
    """(T, N, 4, 4) world matrix of every node at every time."""
    nodes = doc.items("nodes")
    order, parent = _node_order(doc)
    world = np.zeros((num_times, len(nodes), 4, 4))
    for n in order:
        node = nodes[n]
        if "matrix" in node:
            # The spec forbids animating a node that has a matrix; such channels are dropped.
            if any((n, p) in animated for p in _PATH_WIDTHS):
                doc.warn(f"node {n} has a matrix and is also animated; its TRS channels are ignored")
            local = np.asarray(node["matrix"], dtype=np.float64).reshape(4, 4).T  # stored column-major
            local = np.broadcast_to(local, (num_times, 4, 4))
        else:
            t = animated.get((n, "translation"), np.asarray(node.get("translation", [0.0, 0.0, 0.0]), float))
            r = animated.get((n, "rotation"), np.asarray(node.get("rotation", [0.0, 0.0, 0.0, 1.0]), float))
            s = animated.get((n, "scale"), np.asarray(node.get("scale", [1.0, 1.0, 1.0]), float))
            t, r, s = (np.broadcast_to(a, (num_times, a.shape[-1])) for a in (t, r, s))
            local = trs_matrices(t, r, s)
        world[:, n] = world[:, parent[n]] @ local if n in parent else local
    return world


# ----------------------------------------------------------------------------------------------------------------------
# Primitives
# ----------------------------------------------------------------------------------------------------------------------

def _triangles(indices: np.ndarray, mode: int) -> np.ndarray:
    """(F, 3) triangles of an index list in TRIANGLES / TRIANGLE_STRIP / TRIANGLE_FAN order."""
    if mode == _TRIANGLES:
        return indices[: len(indices) // 3 * 3].reshape(-1, 3)
    i = np.arange(max(len(indices) - 2, 0))
    if mode == _TRIANGLE_STRIP:
        # Odd triangles swap their last two corners so that all of them keep the strip's winding.
        tris = np.stack([indices[i], indices[i + 1 + i % 2], indices[i + 2 - i % 2]], axis=1)
    else:
        tris = np.stack([indices[i + 1], indices[i + 2], np.full_like(i, indices[0])], axis=1)
    # Strips are joined with repeated indices; those zero-area triangles are not part of the surface.
    keep = (tris[:, 0] != tris[:, 1]) & (tris[:, 1] != tris[:, 2]) & (tris[:, 0] != tris[:, 2])
    return tris[keep]


class _Piece:
    """One triangle primitive of one mesh instance, reduced to the vertices its triangles use."""

    def __init__(self, node: int, positions, faces, deltas, joints, weights, color, mesh: int, primitive: int,
                 used: np.ndarray):
        self.node, self.mesh, self.primitive = node, mesh, primitive
        self.used = used                # (V,) the primitive's own vertex (accessor row) of each kept vertex
        self.positions = positions      # (V, 3) rest positions, mesh space
        self.faces = faces              # (F, 3) local vertex indices
        self.deltas = deltas            # (K, V, 3) morph target POSITION deltas (K may be 0)
        self.joints = joints            # (V, J) skin joint slots, or None when rigid
        self.weights = weights          # (V, J) skin weights (rows sum to 1 or 0)
        self.color = color              # dict: factor (4,), color0 (V, 3) | None, image | None, uv (V, 2) | None, ...


def _base_color_source(doc: _GltfFile, material_index) -> tuple[np.ndarray, dict | None, bool]:
    """(linear RGBA factor, texture info or None, has_material) of a primitive's material."""
    if material_index is None:
        return np.ones(4), None, False
    material = doc.item("materials", material_index, "primitive material")
    # Specular-glossiness materials usually carry a metallic-roughness fallback; the diffuse colour is the intended one.
    spec_gloss = material.get("extensions", {}).get("KHR_materials_pbrSpecularGlossiness")
    if spec_gloss is not None:
        return (np.asarray(spec_gloss.get("diffuseFactor", [1, 1, 1, 1]), float), spec_gloss.get("diffuseTexture"),
                True)
    pbr = material.get("pbrMetallicRoughness", {})
    return np.asarray(pbr.get("baseColorFactor", [1, 1, 1, 1]), float), pbr.get("baseColorTexture"), True


def _texture_image(doc: _GltfFile, texture_index) -> tuple[int | None, tuple[int, int]]:
    """(image index, (wrapS, wrapT)) of a texture; the image may sit in an extension (EXT_texture_webp, ...)."""
    texture = doc.item("textures", texture_index, "material texture")
    source = texture.get("source")
    if source is None:
        source = next((ext["source"] for ext in texture.get("extensions", {}).values()
                       if isinstance(ext, dict) and "source" in ext), None)
    wrap = (_REPEAT, _REPEAT)
    if texture.get("sampler") is not None:
        sampler = doc.item("samplers", texture["sampler"], f"texture {texture_index}")
        wrap = (sampler.get("wrapS", _REPEAT), sampler.get("wrapT", _REPEAT))
    return source, wrap


def _read_piece(doc: _GltfFile, node_index: int, mesh_index: int, p: int, prim: dict,
                num_joints: int | None) -> _Piece | None:
    what = f"mesh {mesh_index} primitive {p}"
    mode = prim.get("mode", _TRIANGLES)
    if mode not in (_TRIANGLES, _TRIANGLE_STRIP, _TRIANGLE_FAN):
        doc.warn(f"{what} is {_MODE_NAMES.get(mode, f'mode {mode}')}, not triangles; skipped")
        return None
    attributes = prim.get("attributes", {})
    if "POSITION" not in attributes:
        doc.warn(f"{what} has no POSITION; skipped")
        return None
    if "KHR_draco_mesh_compression" in prim.get("extensions", {}):
        raise doc.error(f"{what} is Draco-compressed, which is not supported; re-export it without mesh compression")
    positions = doc.floats(attributes["POSITION"], f"{what} POSITION")
    if positions.shape[1] != 3:
        raise doc.error(f"{what}: POSITION must be VEC3")
    count = len(positions)
    if "indices" in prim:
        indices = doc.integers(prim["indices"], f"{what} indices").ravel()
        if len(indices) and (indices.min() < 0 or indices.max() >= count):
            raise doc.error(f"{what}: index {int(indices.max())} is out of range ({count} vertices)")
    else:
        indices = np.arange(count)
    tris = _triangles(indices, mode)
    if len(tris) == 0:
        doc.warn(f"{what} has no triangles; skipped")
        return None
    used, faces = np.unique(tris, return_inverse=True)
    faces = faces.reshape(-1, 3)

    deltas = []
    for k, target in enumerate(prim.get("targets", [])):
        if "POSITION" in target:
            d = doc.floats(target["POSITION"], f"{what} morph target {k} POSITION")
            if d.shape != positions.shape:
                raise doc.error(f"{what}: morph target {k} has {len(d)} positions, the primitive has {count}")
            deltas.append(d[used])
        else:
            deltas.append(np.zeros((len(used), 3)))
    deltas = np.stack(deltas) if deltas else np.zeros((0, len(used), 3))

    joints = weights = None
    if num_joints is not None:
        sets = []
        while f"JOINTS_{len(sets)}" in attributes and f"WEIGHTS_{len(sets)}" in attributes:
            j = len(sets)
            sets.append((doc.integers(attributes[f"JOINTS_{j}"], f"{what} JOINTS_{j}"),
                         doc.floats(attributes[f"WEIGHTS_{j}"], f"{what} WEIGHTS_{j}", normalized=True)))
        if not sets:
            doc.warn(f"{what} belongs to a skinned node but has no JOINTS_0/WEIGHTS_0; it follows its node")
        else:
            joints = np.concatenate([j for j, _ in sets], axis=1)[used]
            weights = np.concatenate([w for _, w in sets], axis=1)[used]
            if joints.shape != weights.shape:
                raise doc.error(f"{what}: JOINTS and WEIGHTS have different shapes")
            if joints.size and (joints.min() < 0 or joints.max() >= num_joints):
                raise doc.error(f"{what}: joint index {int(joints.max())} is out of range ({num_joints} joints)")
            # Exporters often leave weight sums slightly off 1; a skinned position is only meaningful for sums of 1.
            total = weights.sum(axis=1, keepdims=True)
            weights = np.where(total > 0, weights / np.where(total > 0, total, 1.0), 0.0)

    factor, texture_info, has_material = _base_color_source(doc, prim.get("material"))
    color = {"factor": factor, "has_material": has_material, "color0": None, "image": None, "uv": None,
             "wrap": (_REPEAT, _REPEAT)}
    if "COLOR_0" in attributes:
        color["color0"] = doc.floats(attributes["COLOR_0"], f"{what} COLOR_0", normalized=True)[used, :3]
    if texture_info is not None and "index" in texture_info:
        if "KHR_texture_transform" in texture_info.get("extensions", {}):
            doc.warn("KHR_texture_transform is not supported; texture coordinates are used untransformed")
        uv_name = f"TEXCOORD_{texture_info.get('texCoord', 0)}"
        image_index, wrap = _texture_image(doc, texture_info["index"])
        if uv_name not in attributes:
            doc.warn(f"{what}: its base colour texture uses {uv_name}, which the primitive lacks; texture ignored")
        elif image_index is not None:
            color.update(image=image_index, wrap=wrap, uv=doc.floats(attributes[uv_name], f"{what} {uv_name}")[used])
    return _Piece(node_index, positions[used], faces, deltas, joints, weights, color, mesh_index, p, used)


# ----------------------------------------------------------------------------------------------------------------------
# Colours
# ----------------------------------------------------------------------------------------------------------------------

def srgb_to_linear(c: np.ndarray) -> np.ndarray:
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(c: np.ndarray) -> np.ndarray:
    c = np.clip(c, 0.0, 1.0)
    return np.where(c <= 0.0031308, c * 12.92, 1.055 * c ** (1 / 2.4) - 0.055)


def _wrap(i: np.ndarray, n: int, mode: int) -> np.ndarray:
    if mode == _CLAMP_TO_EDGE:
        return np.clip(i, 0, n - 1)
    if mode == _MIRRORED_REPEAT:
        m = np.mod(i, 2 * n)
        return np.where(m >= n, 2 * n - 1 - m, m)
    return np.mod(i, n)


def sample_texture(image: np.ndarray, uv: np.ndarray, wrap: tuple[int, int] = (_REPEAT, _REPEAT)) -> np.ndarray:
    """Bilinear samples (V, 3) of an image at glTF texture coordinates (origin at the image's top-left corner)."""
    h, w = image.shape[:2]
    x, y = uv[:, 0] * w - 0.5, uv[:, 1] * h - 0.5  # pixel centres sit at half-integers
    x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    xa, xb = _wrap(x0, w, wrap[0]), _wrap(x0 + 1, w, wrap[0])
    ya, yb = _wrap(y0, h, wrap[1]), _wrap(y0 + 1, h, wrap[1])
    top = image[ya, xa] * (1 - fx) + image[ya, xb] * fx
    bottom = image[yb, xa] * (1 - fx) + image[yb, xb] * fx
    return top * (1 - fy) + bottom * fy


def _colors(doc: _GltfFile, pieces: list[_Piece]) -> tuple[dict, str]:
    """MeshSequence colour fields ({colors} or {uvs, texture} or nothing) and a short description of the source."""
    infos = [piece.color for piece in pieces]
    if not any(c["has_material"] or c["color0"] is not None for c in infos):
        return {}, "none"
    images = {c["image"] for c in infos}
    if len(images) == 1 and None not in images and all(c["color0"] is None for c in infos) \
            and all(np.allclose(c["factor"][:3], infos[0]["factor"][:3]) for c in infos):
        image = doc.image(images.pop())
        if image is not None:
            texture = linear_to_srgb(srgb_to_linear(image) * infos[0]["factor"][:3])
            uv = np.concatenate([c["uv"] for c in infos])
            uvs = np.stack([uv[:, 0], 1.0 - uv[:, 1]], axis=1)  # glTF v runs down the image, MeshSequence v up
            return {"uvs": uvs.astype(np.float32), "texture": texture.astype(np.float32)}, "texture"
    baked, used_texture = [], False
    for piece, c in zip(pieces, infos):
        linear = np.broadcast_to(c["factor"][:3], (len(piece.positions), 3))
        if c["color0"] is not None:
            linear = linear * c["color0"]
        image = doc.image(c["image"]) if c["image"] is not None else None
        if image is not None:
            linear = linear * srgb_to_linear(sample_texture(image, c["uv"], c["wrap"]))
            used_texture = True
        baked.append(linear_to_srgb(linear))
    return {"colors": np.concatenate(baked).astype(np.float32)}, "baked_texture" if used_texture else "vertex"


# ----------------------------------------------------------------------------------------------------------------------
# The entry point
# ----------------------------------------------------------------------------------------------------------------------

def _choose_animation(doc: _GltfFile, animation: int | str | None, require_animation: bool) -> int | None:
    anims = doc.items("animations")
    if animation is None:  # the rest pose: the nodes' own transforms, no animation played
        if require_animation:
            raise doc.error("animation=None imports the rest pose; pass require_animation=False with it")
        return None
    names = [a.get("name") or f"animation_{i}" for i, a in enumerate(anims)]
    if not anims:
        if require_animation:
            raise doc.error("the file has no animations (pass require_animation=False to import it as static)")
        return None
    if isinstance(animation, str):
        if animation not in names:
            raise doc.error(f"no animation named {animation!r}; the file has {names}")
        return names.index(animation)
    if not isinstance(animation, (int, np.integer)) or not 0 <= int(animation) < len(anims):
        raise doc.error(f"animation index {animation!r} is out of range; the file has {len(anims)}: {names}")
    return int(animation)


def _frame_times(doc: _GltfFile, times, num_frames: int, fps: float | None, start: float | None,
                 step: float | None, time_range: tuple[float, float]) -> np.ndarray:
    if times is not None:
        try:
            out = np.asarray(times, dtype=np.float64).ravel()
        except (TypeError, ValueError):
            raise doc.error(f"times must be a list of seconds, got {times!r}") from None
        if out.size == 0 or not np.isfinite(out).all():
            raise doc.error(f"times must be a non-empty list of finite seconds, got {times!r}")
        return out
    if int(num_frames) < 1:
        raise doc.error(f"num_frames must be at least 1, got {num_frames}")
    if fps is not None and step is not None:
        raise doc.error("give fps or step, not both")
    if fps is not None:
        if not fps > 0:
            raise doc.error(f"fps must be positive, got {fps}")
        step = 1.0 / fps
    first = time_range[0] if start is None else float(start)
    if step is not None:
        return first + float(step) * np.arange(int(num_frames))
    return np.linspace(first, time_range[1], int(num_frames))


def load_animated_gltf(path: str | Path, times: Sequence[float] | None = None, num_frames: int = 24,
                       fps: float | None = None, animation: int | str | None = 0, *, start: float | None = None,
                       step: float | None = None, up_axis: str = "z", require_animation: bool = True,
                       provenance: bool = False) -> tuple[MeshSequence, dict]:
    """Evaluate an animated glTF 2.0 / GLB file into a MeshSequence.

    path: a `.gltf` (external or embedded buffers) or `.glb` file.
    times: seconds to evaluate at; if None, `num_frames` times: `start + k * step` when `fps` (step = 1 / fps) or
        `step` is given (consecutive frames, as the published renderer takes them), otherwise spread evenly over the
        animation's range [start or first key, last key]. Times outside the key range hold the end values.
    animation: index or name of the animation to play; the others stay at rest. None plays none: every frame is the
        rest pose (the nodes' own transforms; needs require_animation=False).
    up_axis: "z" maps glTF's Y-up positions to the project's Z-up world as Blender does ((x, y, z) -> (x, -z, y));
        "y" keeps glTF's axes.
    require_animation: if False, a file without animations imports as `num_frames` (or len(times)) identical frames.
    provenance: also return metadata["provenance"], where each output vertex comes from, for writers that edit the
        file itself (pipeline/glb.py adds morph targets): "pieces", one per imported primitive instance in output order,
        {node, mesh, primitive, start, vertices (its accessor rows, (n,) int64)}, and "linear" (V, 3, 3), the linear
        part of the map from each vertex's mesh space (where morph targets live) to the output space at the first
        time (node world matrix, or the blended skin matrix, then the up-axis change).

    Returns (MeshSequence with vertices (T, V, 3) in world space, faces (F, 3), colours as the module docstring says;
    metadata dict: source, format, generator, animation_names, animation (index or None), animation_name,
    time_range (first, last key in s), duration, times, num_nodes, num_scene_nodes, num_meshes, num_mesh_instances,
    num_primitives, skipped_primitives, num_vertices, num_faces, num_morph_targets, skinned, color_source
    ("texture" | "baked_texture" | "vertex" | "none"), up_axis, warnings).

    Raises ValueError naming the file for malformed or unsupported input: not glTF 2.0, no triangle meshes in the
    scene, no animation when one is required, accessors / indices out of range, compressed geometry.
    """
    path = Path(path)
    if up_axis not in ("y", "z"):
        raise ValueError(f"{path}: up_axis must be 'y' or 'z', got {up_axis!r}")
    with _named_errors(path):
        doc = _GltfFile(path)
        return _import(doc, times, num_frames, fps, animation, start, step, up_axis, require_animation, provenance)


def read_document(path: str | Path) -> tuple[dict, list[bytes], dict[int, bytes]]:
    """A glTF / GLB file as a writer copies it (pipeline/glb.py): its JSON, the bytes of every buffer (a GLB's BIN
    chunk for the buffer without uri), and the encoded bytes of every image stored by uri (an external file or a data
    URI; images in buffer views are in the buffers already). ValueError naming the file when it cannot be read."""
    path = Path(path)
    with _named_errors(path):
        doc = _GltfFile(path)
        buffers = [doc.buffer(i, "the document") for i in range(len(doc.items("buffers")))]
        images = {i: doc._uri_bytes(str(image["uri"]), f"image {i}") for i, image in enumerate(doc.items("images"))
                  if isinstance(image, dict) and "uri" in image}
        return doc.json, buffers, images


@contextlib.contextmanager
def _named_errors(path: Path):
    """Every failure to read `path` as a ValueError that names it."""
    try:
        yield
    except ValueError as e:
        if str(path) in str(e):
            raise
        raise ValueError(f"{path}: malformed glTF ({e})") from e
    except (AttributeError, TypeError, KeyError, IndexError) as e:
        # JSON of the wrong shape (an object where an array belongs, a missing required property, ...).
        raise ValueError(f"{path}: malformed glTF ({type(e).__name__}: {e})") from e


def _import(doc: _GltfFile, times, num_frames, fps, animation, start, step, up_axis,
            require_animation, provenance) -> tuple[MeshSequence, dict]:
    path = doc.path
    anim_index = _choose_animation(doc, animation, require_animation)
    time_range = _animation_time_range(doc, anim_index) if anim_index is not None else (0.0, 0.0)
    frame_times = _frame_times(doc, times, num_frames, fps, start, step, time_range)
    num_t = len(frame_times)

    animated = _evaluate_animation(doc, anim_index, frame_times) if anim_index is not None else {}
    world = _world_matrices(doc, animated, num_t)
    scene_nodes, _ = _scene_nodes(doc)

    nodes = doc.items("nodes")
    pieces: list[_Piece] = []
    morph_weights: list[np.ndarray] = []       # (T, K) per piece
    joint_matrices: list[np.ndarray | None] = []  # (T, J, 4, 4) per piece, skinned pieces only
    skipped = instances = max_targets = 0
    skinned = False
    for n in scene_nodes:
        node = nodes[n]
        if node.get("mesh") is None:
            continue
        mesh = doc.item("meshes", node["mesh"], f"node {n}")
        instances += 1
        skin_matrices = None
        if node.get("skin") is not None:
            skin = doc.item("skins", node["skin"], f"node {n}")
            joint_nodes = skin.get("joints", [])
            if any(not isinstance(j, int) or not 0 <= j < len(nodes) for j in joint_nodes) or not joint_nodes:
                raise doc.error(f"skin {node['skin']} has missing or no joint nodes: {joint_nodes}")
            if skin.get("inverseBindMatrices") is not None:
                ibm = doc.floats(skin["inverseBindMatrices"], f"skin {node['skin']} inverseBindMatrices")
                if ibm.shape[1] != 16 or len(ibm) < len(joint_nodes):
                    raise doc.error(f"skin {node['skin']}: {len(ibm)} inverse bind matrices for "
                                    f"{len(joint_nodes)} joints")
                ibm = ibm[: len(joint_nodes)].reshape(-1, 4, 4).transpose(0, 2, 1)  # column-major storage
            else:
                ibm = np.eye(4)
            skin_matrices = world[:, joint_nodes] @ ibm
        num_targets = max((len(prim.get("targets", [])) for prim in mesh.get("primitives", [])), default=0)
        max_targets = max(max_targets, num_targets)
        # Morph weights: the animation, else the node's weights, else the mesh's, else zeros.
        base_weights = np.zeros(num_targets)
        given = node.get("weights", mesh.get("weights")) or []
        base_weights[: min(len(given), num_targets)] = given[:num_targets]
        weights = animated.get((n, "weights"))
        if weights is None:
            weights = np.broadcast_to(base_weights, (num_t, num_targets))
        elif weights.shape[1] != num_targets:
            raise doc.error(f"node {n}: the animation drives {weights.shape[1]} morph weights, mesh {node['mesh']} "
                            f"has {num_targets} targets")
        for p, prim in enumerate(mesh.get("primitives", [])):
            piece = _read_piece(doc, n, node["mesh"], p, prim,
                                None if skin_matrices is None else skin_matrices.shape[1])
            if piece is None:
                skipped += 1
                continue
            pieces.append(piece)
            morph_weights.append(weights[:, : len(piece.deltas)])
            joint_matrices.append(skin_matrices if piece.joints is not None else None)
            skinned |= piece.joints is not None
    if not pieces:
        raise doc.error("no triangle meshes in the default scene")

    total = sum(len(piece.positions) for piece in pieces)
    vertices = np.empty((num_t, total, 3), dtype=np.float32)
    linear = np.empty((total, 3, 3))  # mesh space -> world, linear part, at the first time (provenance)
    faces, offset = [], 0
    for piece, w, skin_matrices in zip(pieces, morph_weights, joint_matrices):
        v = len(piece.positions)
        faces.append(piece.faces + offset)
        for t in range(num_t):
            morphed = piece.positions + np.tensordot(w[t], piece.deltas, axes=1) if len(piece.deltas) else \
                piece.positions
            if skin_matrices is None:
                m = world[t, piece.node]
                posed = morphed @ m[:3, :3].T + m[:3, 3]
                if t == 0:
                    linear[offset:offset + v] = m[:3, :3]
            else:
                # Blend the joints' (3, 4) affine matrices per vertex, then apply once.
                blend = np.zeros((v, 3, 4))
                for k in range(piece.joints.shape[1]):
                    blend += piece.weights[:, k, None, None] * skin_matrices[t, piece.joints[:, k], :3, :]
                unweighted = piece.weights.sum(axis=1) == 0
                blend[unweighted] = world[t, piece.node, :3, :]  # no influences: follow the node
                posed = np.einsum("vij,vj->vi", blend[:, :, :3], morphed) + blend[:, :, 3]
                if t == 0:
                    linear[offset:offset + v] = blend[:, :, :3]
            vertices[t, offset:offset + v] = posed
        offset += v
    if up_axis == "z":
        vertices = y_up_to_z_up(vertices)
        linear = y_up_to_z_up(linear.swapaxes(1, 2)).swapaxes(1, 2)  # the same change of the rows
    if not np.isfinite(vertices).all():
        raise doc.error("the evaluated vertex positions are not finite")

    color_fields, color_source = _colors(doc, pieces)
    sequence = MeshSequence(vertices=vertices, faces=np.concatenate(faces), **color_fields)
    anims = doc.items("animations")
    names = [a.get("name") or f"animation_{i}" for i, a in enumerate(anims)]
    metadata = {
        "source": str(path),
        "format": doc.format,
        "generator": doc.json["asset"].get("generator"),
        "animation_names": names,
        "animation": anim_index,
        "animation_name": names[anim_index] if anim_index is not None else None,
        "time_range": time_range,
        "duration": time_range[1] - time_range[0],
        "times": [float(t) for t in frame_times],
        "num_nodes": len(nodes),
        "num_scene_nodes": len(scene_nodes),
        "num_meshes": len(doc.items("meshes")),
        "num_mesh_instances": instances,
        "num_primitives": len(pieces),
        "skipped_primitives": skipped,
        "num_vertices": int(total),
        "num_faces": int(len(sequence.faces)),
        "num_morph_targets": max_targets,
        "skinned": skinned,
        "color_source": color_source,
        "up_axis": up_axis,
        "warnings": list(doc.warnings),
    }
    if provenance:
        starts = np.cumsum([0] + [len(piece.used) for piece in pieces])
        metadata["provenance"] = {"linear": linear, "pieces": [
            {"node": piece.node, "mesh": piece.mesh, "primitive": piece.primitive, "start": int(start),
             "vertices": piece.used.astype(np.int64)} for piece, start in zip(pieces, starts)]}
    return sequence, metadata
