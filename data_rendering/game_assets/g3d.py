"""Glest / MegaGlest G3D version 4 keyframed vertex animation.

Layout (little endian): "G3D" and a uint8 version (4); a model header uint16 mesh count, uint8 type (0: morph mesh);
then per mesh a header -- char name[64], uint32 frame count, vertex count, index count, float32 diffuse[3],
specular[3], specular power, opacity, uint32 property flags (1: custom colour, i.e. the texture's alpha shows the
player colour; 2: two-sided), uint32 texture flags -- one char[64] file name per set texture flag bit (bit 0 the
diffuse map), then the data: positions (frames x vertices x 3 float32), normals (the same size), texture coordinates
(vertices x 2 float32, once, only when some texture flag is set) and uint32 triangle indices. Each mesh keeps its own
frame count; the game plays every mesh over the same clip time. Glest models are Y up.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data_rendering.game_assets.binary import Blob

MAGIC, VERSION = b"G3D", 4
CUSTOM_COLOR, TWO_SIDED = 1, 2
_MESH_HEADER = "64s3I8f2I"  # 64 + 3*4 + 8*4 + 2*4 = 116 bytes


@dataclass
class G3dMesh:
    name: str
    frames: np.ndarray           # (T, V, 3) float64 positions, Y up
    faces: np.ndarray            # (F, 3)
    uvs: np.ndarray | None       # (V, 2) float64 texture coordinates (OpenGL convention, v up), or None
    diffuse: np.ndarray          # (3,) colour in [0, 1]
    opacity: float
    properties: int
    textures: list[str]          # file names, diffuse map first when the diffuse bit is set
    has_diffuse_map: bool


def read_g3d(data: bytes, where: str) -> list[G3dMesh]:
    blob = Blob(data, where)
    magic, version = blob.unpack("3sB", 0, "the file header")
    if magic != MAGIC:
        raise blob.fail(f"not a G3D file (magic {magic!r})")
    if version != VERSION:
        raise blob.fail(f"G3D version {version}, only {VERSION} is read")
    count, kind = blob.unpack("HB", 4, "the model header")
    if kind != 0:
        raise blob.fail(f"model type {kind}, only 0 (morph meshes) exists in version 4")
    meshes, offset = [], 7
    for m in range(count):
        fields = blob.unpack(_MESH_HEADER, offset, f"mesh {m} header")
        name = fields[0].split(b"\0", 1)[0].decode("latin-1")
        n_frames, n_verts, n_index = fields[1:4]
        diffuse, opacity, properties, texture_bits = np.asarray(fields[4:7]), fields[11], fields[12], fields[13]
        offset += 116
        if n_index % 3:
            raise blob.fail(f"mesh {m} ({name}): {n_index} indices is not a whole number of triangles")
        textures = []
        for bit in range(32):
            if texture_bits >> bit & 1:
                textures.append(blob.text(offset, 64, f"mesh {m} texture name"))
                offset += 64
        size = n_frames * n_verts * 3
        frames = blob.array(np.float32, size, offset, f"mesh {m} positions").reshape(n_frames, n_verts, 3)
        offset += 8 * size  # positions, then normals of the same size (not needed: the renderer shades faces)
        uvs = None
        if texture_bits:
            uvs = blob.array(np.float32, 2 * n_verts, offset, f"mesh {m} texture coordinates").reshape(-1, 2)
            offset += 8 * n_verts
        faces = blob.array(np.uint32, n_index, offset, f"mesh {m} indices").reshape(-1, 3).astype(np.int64)
        offset += 4 * n_index
        if len(faces) and faces.max() >= n_verts:
            raise blob.fail(f"mesh {m} ({name}): index {faces.max()} beyond its {n_verts} vertices")
        meshes.append(G3dMesh(name, frames.astype(np.float64), faces, None if uvs is None else uvs.astype(np.float64),
                              np.clip(diffuse, 0, 1), float(opacity), properties, textures, bool(texture_bits & 1)))
    return meshes
