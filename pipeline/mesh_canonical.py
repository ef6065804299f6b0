"""Canonical Gaussians from a mesh surface (a user's mesh given as `canonical`, pipeline/mesh_input.py).

    c = mesh_canonical(mesh.surface, count=16384, seed=0)
    c.gaussians              # N Gaussians in the models' frame: (p - c.centre) / c.extent
    c.face, c.bary           # the face and barycentric coordinates each Gaussian was drawn at

The models were trained on objects normalised as the published renderer does (frame 0's bounding box centred at the
origin, largest side 1: MeshSequence.normalized), so the mesh is moved and scaled the same way; `centre` and `extent`
map the motion back to the mesh's own units.

Samples: `count` points spread over the surface in proportion to area, by systematic sampling along the faces'
cumulative area (one random offset: each face gets its expected share of points to within one) and uniform
barycentric coordinates inside each face, all from `seed`. Each becomes one Gaussian:
- colour: the texture sampled bilinearly at the interpolated texture coordinate, else the interpolated vertex colour,
  else mid grey (MeshSequence.frame_colors' default); display-encoded values, as rendered images are;
- scale: every sample stands for a = area / count of the surface (the local spacing is sqrt(a) everywhere, the
  sampling being even in area); the two in-plane axes get sigma = COVER * sqrt(a / pi), so the 1-sigma discs cover
  the surface COVER² = 2.25 times over (at COVER = 1, one disc of the sample's own area each, the gaps that random
  positions leave show as holes in renders), and the normal axis THIN times that: a flat disc lying in the face;
- rotation: the face frame (first edge, in-plane perpendicular, normal) as a quaternion, so the thin axis is the
  face normal;
- opacity OPACITY: an opaque surface.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from data_rendering.gltf_import import sample_texture
from data_rendering.mesh import MeshSequence
from utils.gaussians import SH_C0, Gaussians

DEFAULT_COUNT = 16384   # of the order of the static VAE's Gaussians per object (8 per occupied voxel of 64³)
OPACITY = 0.95
COVER = 1.5
THIN = 0.1
GREY = 0.7


@dataclass
class MeshCanonical:
    gaussians: Gaussians        # N, models' frame
    face: np.ndarray            # (N,) the face each Gaussian was drawn on
    bary: np.ndarray            # (N, 3) its barycentric coordinates there
    centre: np.ndarray          # (3,) models' frame = (mesh - centre) / extent
    extent: float

    def to_model(self, points: np.ndarray) -> np.ndarray:
        return (np.asarray(points, np.float64) - self.centre) / self.extent


def sample_surface(vertices: np.ndarray, faces: np.ndarray, count: int,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Area-proportional surface samples (module docstring): (face (N,), barycentric coordinates (N, 3))."""
    v = np.asarray(vertices, np.float64)
    a, b, c = (v[faces[:, k]] for k in range(3))
    area = 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1)
    cumulative = np.cumsum(area)
    rng = np.random.default_rng(seed)
    where = (np.arange(count) + rng.random()) * (cumulative[-1] / count)
    face = np.minimum(np.searchsorted(cumulative, where, side="right"), len(faces) - 1)
    # Uniform in a triangle: the square-root warp of two uniforms (Osada et al. 2002).
    r1, r2 = np.sqrt(rng.random(count)), rng.random(count)
    bary = np.stack([1 - r1, r1 * (1 - r2), r1 * r2], axis=1)
    return face, bary


def surface_colors(seq: MeshSequence, face: np.ndarray, bary: np.ndarray) -> np.ndarray:
    """(N, 3) display-encoded colour at each sample (module docstring)."""
    corners = seq.faces[face]                                                        # (N, 3)
    if seq.texture is not None:
        uv = np.einsum("nk,nkc->nc", bary, seq.uvs[corners].astype(np.float64))
        # MeshSequence's v runs up the image, glTF's (what sample_texture reads) down from its top row.
        return sample_texture(seq.texture, np.stack([uv[:, 0], 1.0 - uv[:, 1]], axis=1))
    if seq.colors is not None:
        return np.einsum("nk,nkc->nc", bary, seq.colors[corners].astype(np.float64))
    return np.full((len(face), 3), GREY)


def rotation_to_quaternion(m: np.ndarray) -> np.ndarray:
    """Rotation matrices (N, 3, 3) -> unit quaternions (N, 4), w first, sign chosen with w >= 0. The largest of
    w, x, y, z is taken from the diagonal and the rest from the off-diagonal terms (no division by a small number)."""
    t = np.stack([1 + m[:, 0, 0] + m[:, 1, 1] + m[:, 2, 2], 1 + m[:, 0, 0] - m[:, 1, 1] - m[:, 2, 2],
                  1 - m[:, 0, 0] + m[:, 1, 1] - m[:, 2, 2], 1 - m[:, 0, 0] - m[:, 1, 1] + m[:, 2, 2]], 1)
    k = t.argmax(1)
    s = np.sqrt(np.maximum(t[np.arange(len(m)), k], 1e-12)) * 2                       # 4 |q_k|
    d = lambda i, j: m[:, i, j]
    cand = {0: [s / 4, (d(2, 1) - d(1, 2)) / s, (d(0, 2) - d(2, 0)) / s, (d(1, 0) - d(0, 1)) / s],
            1: [(d(2, 1) - d(1, 2)) / s, s / 4, (d(0, 1) + d(1, 0)) / s, (d(0, 2) + d(2, 0)) / s],
            2: [(d(0, 2) - d(2, 0)) / s, (d(0, 1) + d(1, 0)) / s, s / 4, (d(1, 2) + d(2, 1)) / s],
            3: [(d(1, 0) - d(0, 1)) / s, (d(0, 2) + d(2, 0)) / s, (d(1, 2) + d(2, 1)) / s, s / 4]}
    q = np.zeros((len(m), 4))
    for i, parts in cand.items():
        q[k == i] = np.stack(parts, 1)[k == i]
    q *= np.where(q[:, :1] < 0, -1.0, 1.0)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def mesh_canonical(seq: MeshSequence, count: int = DEFAULT_COUNT, seed: int = 0) -> MeshCanonical:
    """Canonical Gaussians of frame 0 of `seq` (module docstring)."""
    v0 = seq.vertices[0].astype(np.float64)
    lo, hi = v0.min(0), v0.max(0)
    centre, extent = (lo + hi) / 2, float((hi - lo).max())
    v = (v0 - centre) / extent
    faces = seq.faces
    area = 0.5 * np.linalg.norm(np.cross(v[faces[:, 1]] - v[faces[:, 0]], v[faces[:, 2]] - v[faces[:, 0]]), axis=1)
    keep = area > area.max() * 1e-12   # degenerate faces have no normal and no area to sample
    face, bary = sample_surface(v, faces[keep], count, seed)
    face = np.flatnonzero(keep)[face]
    corners = v[faces[face]]                                                           # (N, 3, 3)
    xyz = np.einsum("nk,nkc->nc", bary, corners)
    e1, e2 = corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]
    normal = np.cross(e1, e2)
    normal /= np.linalg.norm(normal, axis=1, keepdims=True)
    t1 = e1 / np.linalg.norm(e1, axis=1, keepdims=True)
    frame = np.stack([t1, np.cross(normal, t1), normal], axis=2)                        # columns: local x, y, z
    sigma = COVER * math.sqrt(area.sum() / count / math.pi)
    n = len(face)
    rgb = surface_colors(seq, face, bary)
    f = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32)
    gaussians = Gaussians.from_activated(
        f(xyz), f((rgb - 0.5) / SH_C0), torch.full((n, 1), OPACITY), f(np.tile([sigma, sigma, THIN * sigma], (n, 1))),
        f(rotation_to_quaternion(frame)))
    return MeshCanonical(gaussians, face, bary, centre, extent)
