"""Several textured or plain-coloured meshes of one model -> the arrays of one MeshSequence with one texture.

Game models are made of parts (G3D meshes, IQM meshes) that each carry their own image, or only a colour; a
MeshSequence has one texture. The parts' images are packed side by side into one atlas and their texture coordinates
moved into their tile. A part whose coordinates leave [0, 1] (a repeating texture) gets a tile holding as many copies
as it spans, at most MAX_REPEAT per axis (coordinates beyond are clamped: the rare extreme tilings lose their
repeats, not their geometry). A plain part gets a small tile of its colour. Each tile has a border of copied edge
texels so that bilinear sampling at a tile's edge never reads its neighbour.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from utils.cli import InputError

MAX_TILE = 256       # longest side of one part's image in the atlas (the renders are ~128 px)
MAX_REPEAT = 4
BORDER = 2
TEAM_COLOR = np.array([0.75, 0.12, 0.1])  # what a Glest "custom colour" mesh shows through its texture's alpha


@dataclass
class Part:
    frames: np.ndarray                  # (T, V, 3) positions
    faces: np.ndarray                   # (F, 3) into this part's vertices
    uvs: np.ndarray | None = None       # (V, 2) v up (MeshSequence's convention), may leave [0, 1]
    image: np.ndarray | None = None     # (H, W, 3) float in [0, 1]
    color: tuple = (0.7, 0.7, 0.7)      # used when there is no image


def read_image(data: bytes, where: str, behind_alpha=None) -> np.ndarray:
    """(H, W, 3) float in [0, 1], shrunk to at most MAX_TILE on its longest side. Alpha is dropped, or with
    `behind_alpha` (an RGB colour) the image is laid over that colour (how Glest shows the player colour)."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as e:  # PIL raises many types for unreadable images
        raise InputError(f"{where}: cannot read the image ({type(e).__name__}: {e})") from None
    scale = MAX_TILE / max(image.size)
    if scale < 1:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.BILINEAR)
    rgba = np.asarray(image.convert("RGBA"), np.float32) / 255.0
    if behind_alpha is None:
        return rgba[..., :3]
    alpha = rgba[..., 3:]
    return rgba[..., :3] * alpha + np.asarray(behind_alpha, np.float32) * (1 - alpha)


def _tile(part: Part) -> tuple[np.ndarray, np.ndarray]:
    """(tile image, uvs measured in the tile: x right and y down, in the tile's texels)."""
    if part.image is None or part.uvs is None or not np.isfinite(part.uvs).all():  # unusable coordinates: colour
        tile = np.broadcast_to(np.asarray(part.color, np.float32), (4, 4, 3))
        return tile, np.full((len(part.frames[0]), 2), 2.0)
    uv = part.uvs.astype(np.float64)
    lo = np.floor(uv.min(0))
    reps = np.clip(np.ceil(uv.max(0) - lo), 1, MAX_REPEAT).astype(int)
    uv = np.clip(uv - lo, 0, reps)  # now in [0, reps]: copy k of the image covers [k, k + 1)
    h, w = part.image.shape[:2]
    tile = np.tile(part.image, (reps[1], reps[0], 1))
    # v up -> rows down: the tile's top row is at v = reps[1]
    return tile, np.stack([uv[:, 0] * w, (reps[1] - uv[:, 1]) * h], axis=1)


def _pack(sizes: list[tuple[int, int]]) -> tuple[list[tuple[int, int]], int, int]:
    """Shelf packing of (h, w) boxes, tallest first: (top-left (y, x) per box, atlas height, atlas width)."""
    width = max(max(w for _, w in sizes), math.ceil(math.sqrt(sum(h * w for h, w in sizes))))
    where, x, y, shelf = [None] * len(sizes), 0, 0, 0
    for k in sorted(range(len(sizes)), key=lambda k: -sizes[k][0]):
        h, w = sizes[k]
        if x + w > width:
            x, y, shelf = 0, y + shelf, 0
        where[k] = (y, x)
        x, shelf = x + w, max(shelf, h)
    return where, y + shelf, width


def merge_parts(parts: list[Part]) -> tuple[np.ndarray, dict]:
    """(vertices (T, V, 3), MeshSequence fields: faces and either colors or uvs + texture) of the parts together."""
    if not parts:
        raise ValueError("merge_parts: no parts")
    frames = np.concatenate([p.frames for p in parts], axis=1)
    starts = np.cumsum([0] + [p.frames.shape[1] for p in parts])
    faces = np.concatenate([p.faces + s for p, s in zip(parts, starts)])
    if all(p.image is None for p in parts):
        colors = np.concatenate([np.broadcast_to(np.asarray(p.color, np.float32), (p.frames.shape[1], 3))
                                 for p in parts])
        return frames, dict(faces=faces, colors=colors)
    tiles = [_tile(p) for p in parts]
    padded = [np.pad(t, ((BORDER, BORDER), (BORDER, BORDER), (0, 0)), mode="edge") for t, _ in tiles]
    corners, height, width = _pack([t.shape[:2] for t in padded])
    atlas = np.zeros((height, width, 3), np.float32)
    uvs = []
    for tile, (y, x), (_, texel) in zip(padded, corners, tiles):
        atlas[y:y + tile.shape[0], x:x + tile.shape[1]] = tile
        u = (x + BORDER + texel[:, 0]) / width
        v = 1.0 - (y + BORDER + texel[:, 1]) / height
        uvs.append(np.stack([u, v], axis=1))
    return frames, dict(faces=faces, uvs=np.concatenate(uvs).astype(np.float32), texture=atlas)
