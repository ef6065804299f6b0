"""Quake II MD2 vertex-animated models (version 8, as UFO:AI ships them) and UFO:AI's .anm clip tables.

MD2 (little endian): a 17-int header (magic "IDP2", version 8, skin width and height, frame size, the counts of
skins, vertices, texture coordinates, triangles, GL commands and frames, then the offsets of skins, texture
coordinates, triangles, frames, GL commands and the end). Skins are 64-byte names; texture coordinates are int16
(s, t) in skin pixels, t counted down from the image top; a triangle is 3 int16 vertex indices then 3 int16 texture
coordinate indices. A frame is float scale[3], float translate[3], char name[16], then per vertex 3 uint8 packed
coordinates and a uint8 index into the format's fixed table of 162 normals: position = scale * packed + translate.
The GL command list only repeats the triangles as strips and fans and is not read. The normal table itself is not
needed here (the renderer takes face normals); the index is kept and checked to be < 162.

.anm (text): `name first last fps` per line, `//` comments; first and last are inclusive frame numbers.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data_rendering.game_assets.binary import Blob
from utils.cli import InputError

MAGIC, VERSION = b"IDP2", 8
NUM_NORMALS = 162  # entries of the format's fixed normal table
_HEADER = "4s16i"


@dataclass
class Md2:
    skin_size: tuple[int, int]      # (width, height) in pixels, the unit of the texture coordinates
    skins: list[str]
    st: np.ndarray                  # (K, 2) int texture coordinates in skin pixels (t down from the top)
    faces: np.ndarray               # (F, 3) vertex indices
    st_faces: np.ndarray            # (F, 3) texture coordinate indices
    frames: np.ndarray              # (T, V, 3) float64 decoded positions
    normal_index: np.ndarray        # (T, V) uint8 indices into the 162-entry normal table
    frame_names: list[str]

    def uvs(self) -> np.ndarray:
        """(K, 2) texture coordinates as MeshSequence keeps them: fractions of the skin, v up."""
        w, h = self.skin_size
        return np.stack([self.st[:, 0] / w, 1.0 - self.st[:, 1] / h], axis=1)


def read_md2(data: bytes, where: str) -> Md2:
    blob = Blob(data, where)
    magic, version, sw, sh, frame_size, n_skins, n_xyz, n_st, n_tris, _, n_frames, o_skins, o_st, o_tris, o_frames, \
        _, _ = blob.unpack(_HEADER, 0, "the header")
    if magic != MAGIC:
        raise blob.fail(f"not an MD2 file (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise blob.fail(f"MD2 version {version}, only {VERSION} is read")
    counts = dict(skins=n_skins, vertices=n_xyz, texture_coordinates=n_st, triangles=n_tris, frames=n_frames)
    bad = {k: v for k, v in counts.items() if v < 0}
    if bad or sw <= 0 or sh <= 0:
        raise blob.fail(f"negative counts or skin size in the header: {bad or (sw, sh)}")
    if frame_size < 40 + 4 * n_xyz:  # 40 bytes of frame header, then 4 bytes per vertex
        raise blob.fail(f"frame size {frame_size} is too small for {n_xyz} vertices")
    skins = [blob.text(o_skins + 64 * k, 64, f"skin name {k}") for k in range(n_skins)]
    st = blob.array(np.int16, 2 * n_st, o_st, "the texture coordinates").reshape(-1, 2).astype(np.int64)
    # unsigned: the indices of models with more than 32767 vertices only fit as uint16
    tris = blob.array(np.uint16, 6 * n_tris, o_tris, "the triangles").reshape(-1, 6).astype(np.int64)
    faces, st_faces = tris[:, :3], tris[:, 3:]
    if len(faces) and (faces.max() >= n_xyz or st_faces.max() >= n_st):
        raise blob.fail(f"triangle indices beyond the {n_xyz} vertices or {n_st} texture coordinates")
    frames = np.empty((n_frames, n_xyz, 3))
    normals = np.empty((n_frames, n_xyz), np.uint8)
    names = []
    for t in range(n_frames):
        base = o_frames + t * frame_size
        header = blob.unpack("6f", base, f"frame {t}")
        names.append(blob.text(base + 24, 16, f"frame {t} name"))
        packed = blob.array(np.uint8, 4 * n_xyz, base + 40, f"frame {t} vertices").reshape(-1, 4)
        frames[t] = packed[:, :3] * np.asarray(header[:3]) + np.asarray(header[3:])
        normals[t] = packed[:, 3]
    if normals.size and normals.max() >= NUM_NORMALS:
        raise blob.fail(f"normal index {normals.max()} outside the {NUM_NORMALS}-entry table")
    return Md2((sw, sh), skins, st, faces, st_faces, frames, normals, names)


@dataclass
class AnmClip:
    name: str
    first: int   # inclusive frame numbers
    last: int
    fps: float


def read_anm(text: str, where: str, num_frames: int) -> list[AnmClip]:
    clips = []
    for lineno, line in enumerate(text.splitlines(), 1):
        parts = line.split("//", 1)[0].split()
        if not parts:
            continue
        try:
            name, first, last, fps = parts[0], int(parts[1]), int(parts[2]), float(parts[3])
        except (IndexError, ValueError):
            raise InputError(f"{where}, line {lineno}: expected 'name first last fps', got {line.strip()[:60]!r}")
        if not 0 <= first <= last < num_frames:
            raise InputError(f"{where}, line {lineno}: clip {name} spans frames {first}..{last}, "
                             f"the model has {num_frames}")
        clips.append(AnmClip(name, first, last, fps))
    return clips
