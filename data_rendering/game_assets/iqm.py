"""Inter-Quake Model (IQM version 2) skeletal meshes and animations, posed by linear-blend skinning.

Layout (little endian): the 124-byte header -- magic "INTERQUAKEMODEL\\0", version 2, file size, flags, then the
(count, offset) pairs of text, meshes, vertex arrays (with the vertex count between), triangles (and adjacency),
joints, poses, anims, frames (count, channels per frame, offset, bounds offset), comment and extensions. Offsets
count from the start of the file. A mesh is 6 uint32 (name, material as text offsets; first vertex, vertex count,
first triangle, triangle count). A vertex array is 5 uint32 (type: 0 position, 1 texcoord, 4 blend indices, 5 blend
weights, ...; flags; component format: 0 byte .. 8 double; components; offset). Triangles are 3 uint32. A joint is
name, parent (int32, < 0 a root), translate[3], rotate[4] (quaternion x y z w), scale[3]: local = T * R * S in the
parent's space. A pose is parent, channel mask, channel offset[10], channel scale[10] over the channels Tx Ty Tz Qx Qy
Qz Qw Sx Sy Sz; the frames are one uint16 stream: for each frame, each pose, each channel whose mask bit is set, the
value is offset + uint16 * scale (an unset channel is its offset). An anim is name, first frame, frame count, frame
rate (float), flags. Texture coordinates have v growing down the image (the exporters flip Blender's).

Skinning: the joints give the bind pose; a vertex bound to joints j with weights w (uint8 / 255) moves to
sum_j w_j * P_j * B_j^-1 * v, with P_j the posed and B_j the bind world matrix of joint j (parents composed first).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data_rendering.game_assets.binary import Blob
from data_rendering.gltf_import import trs_matrices
from data_rendering.synthetic import linear_blend_skinning

MAGIC, VERSION = b"INTERQUAKEMODEL\0", 2
POSITION, TEXCOORD, BLENDINDEXES, BLENDWEIGHTS = 0, 1, 4, 5
_FORMATS = {0: np.int8, 1: np.uint8, 2: np.int16, 3: np.uint16, 4: np.int32, 5: np.uint32, 6: np.float16,
            7: np.float32, 8: np.float64}
_HEADER = "16s27I"  # 16 + 27 * 4 = 124 bytes


@dataclass
class IqmMesh:
    name: str
    material: str
    first_vertex: int
    num_vertices: int
    first_triangle: int
    num_triangles: int


@dataclass
class IqmAnim:
    name: str
    first_frame: int
    num_frames: int
    framerate: float


@dataclass
class Iqm:
    meshes: list[IqmMesh]
    positions: np.ndarray | None     # (V, 3) float64, Z up
    uvs: np.ndarray | None           # (V, 2) as stored: v grows down the image
    blend_indices: np.ndarray | None  # (V, 4) joint indices
    blend_weights: np.ndarray | None  # (V, 4) weights in [0, 1]
    triangles: np.ndarray            # (F, 3)
    joint_names: list[str]
    parents: np.ndarray              # (J,) parent index, -1 for a root; parents come first
    bind: np.ndarray                 # (J, 10) bind pose channels: translate, rotate (x y z w), scale
    channels: np.ndarray             # (num_frames, P, 10) decoded pose channels of every frame of the file
    anims: list[IqmAnim]


def _text(blob: Blob, table: bytes, offset: int) -> str:
    if not 0 <= offset < max(len(table), 1):
        raise blob.fail(f"text offset {offset} outside the {len(table)}-byte string table")
    return table[offset:].split(b"\0", 1)[0].decode("latin-1")


def _vertex_arrays(blob: Blob, count: int, offset: int, num_vertices: int) -> dict[int, np.ndarray]:
    arrays = {}
    for k in range(count):
        kind, _, fmt, size, where = blob.unpack("5I", offset + 20 * k, f"vertex array {k}")
        if kind not in (POSITION, TEXCOORD, BLENDINDEXES, BLENDWEIGHTS):
            continue  # normals, tangents, colours, custom data: not needed for positions and texture
        if fmt not in _FORMATS:
            raise blob.fail(f"vertex array {k}: unknown component format {fmt}")
        values = blob.array(_FORMATS[fmt], num_vertices * size, where, f"vertex array {k} (type {kind})")
        arrays[kind] = values.reshape(num_vertices, size)
        if kind == BLENDWEIGHTS and fmt in (1, 3, 5):  # normalised integers: 255 (uint8) means weight 1
            arrays[kind] = arrays[kind] / float(np.iinfo(_FORMATS[fmt]).max)
    return arrays


def _frame_channels(blob: Blob, poses: np.ndarray, masks: np.ndarray, num_frames: int, num_channels: int,
                    offset: int) -> np.ndarray:
    """(num_frames, P, 10) channel values: offset, plus the next uint16 of the stream times scale where masked."""
    stream = blob.array(np.uint16, num_frames * num_channels, offset, "the animation frames").reshape(num_frames, -1)
    bits = (masks[:, None] >> np.arange(10)) & 1 == 1  # (P, 10), stream order: pose by pose, channel by channel
    if bits.sum() != num_channels:
        raise blob.fail(f"the pose masks name {bits.sum()} channels per frame, the header {num_channels}")
    values = np.broadcast_to(poses[:, :10], (num_frames,) + bits.shape).copy()
    values[:, bits] += stream * poses[:, 10:][bits]
    return values


def read_iqm(data: bytes, where: str) -> Iqm:
    blob = Blob(data, where)
    magic, version, _, _, n_text, o_text, n_meshes, o_meshes, n_arrays, n_verts, o_arrays, n_tris, o_tris, _, \
        n_joints, o_joints, n_poses, o_poses, n_anims, o_anims, n_frames, n_channels, o_frames, *_ = \
        blob.unpack(_HEADER, 0, "the header")
    if magic != MAGIC:
        raise blob.fail(f"not an IQM file (magic {magic[:15]!r})")
    if version != VERSION:
        raise blob.fail(f"IQM version {version}, only {VERSION} is read")
    table = blob.bytes(o_text, n_text, "the string table")
    meshes = []
    for k in range(n_meshes):
        name, material, *counts = blob.unpack("6I", o_meshes + 24 * k, f"mesh {k}")
        meshes.append(IqmMesh(_text(blob, table, name), _text(blob, table, material), *counts))
    arrays = _vertex_arrays(blob, n_arrays, o_arrays, n_verts)
    triangles = blob.array(np.uint32, 3 * n_tris, o_tris, "the triangles").reshape(-1, 3).astype(np.int64)
    if len(triangles) and triangles.max() >= n_verts:
        raise blob.fail(f"triangle index {triangles.max()} beyond the {n_verts} vertices")
    for m in meshes:
        if m.first_vertex + m.num_vertices > n_verts or m.first_triangle + m.num_triangles > n_tris:
            raise blob.fail(f"mesh {m.name!r} reaches beyond the {n_verts} vertices or {n_tris} triangles")
    names, parents, bind = [], np.empty(n_joints, np.int64), np.empty((n_joints, 10))
    for j in range(n_joints):
        name, parent, *channels = blob.unpack("Ii10f", o_joints + 48 * j, f"joint {j}")
        names.append(_text(blob, table, name))
        parents[j], bind[j] = parent, channels
    pose_parents, masks, poses = np.empty(n_poses, np.int64), np.empty(n_poses, np.int64), np.empty((n_poses, 20))
    for p in range(n_poses):
        parent, mask, *values = blob.unpack("iI20f", o_poses + 88 * p, f"pose {p}")
        pose_parents[p], masks[p], poses[p] = parent, mask, values
    for what, links in (("joint", parents), ("pose", pose_parents)):
        wrong = [k for k, p in enumerate(links) if p >= k]
        if wrong:
            raise blob.fail(f"{what} {wrong[0]} has parent {links[wrong[0]]}; parents must come before children")
    anims = []
    for k in range(n_anims):
        name, first, count, rate, _ = blob.unpack("3IfI", o_anims + 20 * k, f"anim {k}")
        if first + count > n_frames:
            raise blob.fail(f"anim {_text(blob, table, name)!r} spans frames {first}..{first + count - 1} "
                            f"of {n_frames}")
        anims.append(IqmAnim(_text(blob, table, name), first, count, rate))
    channels = _frame_channels(blob, poses, masks, n_frames, n_channels, o_frames) if n_frames else \
        np.zeros((0, n_poses, 10))
    weights = arrays.get(BLENDWEIGHTS)
    return Iqm(meshes, arrays[POSITION].astype(np.float64) if POSITION in arrays else None,
               arrays[TEXCOORD].astype(np.float64) if TEXCOORD in arrays else None,
               arrays[BLENDINDEXES].astype(np.int64) if BLENDINDEXES in arrays else None,
               None if weights is None else weights.astype(np.float64), triangles, names, parents, bind,
               channels, anims)


def world_matrices(parents: np.ndarray, channels: np.ndarray) -> np.ndarray:
    """(..., J, 4, 4) world matrices from local translate / rotate / scale channels (..., J, 10)."""
    local = trs_matrices(channels[..., 0:3], channels[..., 3:7], channels[..., 7:10])
    world = np.empty_like(local)
    for j, p in enumerate(parents):
        world[..., j, :, :] = local[..., j, :, :] if p < 0 else world[..., p, :, :] @ local[..., j, :, :]
    return world


def skin(model: Iqm, channels: np.ndarray) -> np.ndarray:
    """(T, V, 3) vertices of `model` posed by per-frame joint channels (T, J, 10), linear-blend skinned."""
    if model.blend_indices is None or model.blend_weights is None:
        raise ValueError("the mesh has no blend indices or weights")
    num_joints = len(model.parents)
    if channels.shape[1] != num_joints:
        raise ValueError(f"the animation poses {channels.shape[1]} joints, the mesh has {num_joints}")
    if model.blend_indices.max() >= num_joints:
        raise ValueError(f"blend index {model.blend_indices.max()} beyond the {num_joints} joints")
    skinning = world_matrices(model.parents, channels) @ np.linalg.inv(world_matrices(model.parents, model.bind))
    weights = np.zeros((len(model.positions), num_joints))
    rows = np.repeat(np.arange(len(weights)), model.blend_indices.shape[1])
    np.add.at(weights, (rows, model.blend_indices.ravel()), model.blend_weights.ravel())
    total = weights.sum(1, keepdims=True)
    bound = total[:, 0] > 0
    weights[bound] /= total[bound]  # uint8 weights sum to 1 only up to rounding
    posed = linear_blend_skinning(model.positions, weights, skinning)
    posed[:, ~bound] = model.positions[~bound]  # a vertex bound to no joint stays where the bind pose has it
    return posed
