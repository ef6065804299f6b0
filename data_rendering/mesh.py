"""Animated triangle meshes with fixed topology: what the synthetic source and the glTF importer produce and what the
CPU rasterizer, the Blender writer and the VAE data preparation consume."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np


def y_up_to_z_up(v: np.ndarray) -> np.ndarray:
    """Points (..., 3) of a Y-up file (glTF, OBJ) in the project's Z-up world: (x, y, z) -> (x, -z, y), Blender's own
    importer conversion. The one place the axis change is written (Y_UP_TO_Z_UP is its matrix)."""
    return np.stack([v[..., 0], -v[..., 2], v[..., 1]], axis=-1)


# The same change as a matrix acting on column vectors, for linear maps: M @ p == y_up_to_z_up(p).
Y_UP_TO_Z_UP = y_up_to_z_up(np.eye(3)).T + 0.0  # + 0.0: no negative zeros


@dataclass
class MeshSequence:
    vertices: np.ndarray                 # (T, V, 3) float32 world positions per frame (Z up)
    faces: np.ndarray                    # (F, 3) int64 triangles, the same in every frame
    colors: np.ndarray | None = None     # (V, 3) float32 in [0, 1], per-vertex colour
    uvs: np.ndarray | None = None        # (V, 2) float32 texture coordinates (u right, v up, OpenGL/glTF-flipped: see texture)
    texture: np.ndarray | None = None    # (H, W, 3) float32 in [0, 1]; row 0 is the image top, sampled at (u, 1 - v)

    def __post_init__(self):
        self.vertices = np.asarray(self.vertices, dtype=np.float32)
        self.faces = np.asarray(self.faces, dtype=np.int64)
        if self.vertices.ndim != 3 or self.vertices.shape[-1] != 3:
            raise ValueError(f"MeshSequence: vertices must be (T, V, 3), got {self.vertices.shape}")
        if self.faces.ndim != 2 or self.faces.shape[-1] != 3:
            raise ValueError(f"MeshSequence: faces must be (F, 3) triangles, got {self.faces.shape}")
        if len(self.faces) and (self.faces.min() < 0 or self.faces.max() >= self.vertices.shape[1]):
            raise ValueError(f"MeshSequence: face indices outside [0, {self.vertices.shape[1]})")
        if not np.isfinite(self.vertices).all():
            raise ValueError("MeshSequence: non-finite vertex positions")
        if (self.uvs is None) != (self.texture is None):
            raise ValueError("MeshSequence: uvs and texture come together")

    @property
    def num_frames(self) -> int:
        return self.vertices.shape[0]

    def normalized(self) -> "MeshSequence":
        """Scale and translate every frame by frame 0's bounding box: centred at the origin, largest extent 1 (as the
        published renderer does with the load-time box; later frames may leave the unit cube)."""
        lo, hi = self.vertices[0].min(0), self.vertices[0].max(0)
        extent = float((hi - lo).max())
        if extent <= 0:
            raise ValueError("MeshSequence: degenerate frame 0 (zero extent)")
        return replace(self, vertices=((self.vertices - (lo + hi) / 2) / extent).astype(np.float32))

    def frame_colors(self) -> np.ndarray:
        """(V, 3) per-vertex colour: the stored colours, the texture sampled at the vertex uvs, or mid grey."""
        if self.colors is not None:
            return np.asarray(self.colors, dtype=np.float32)
        if self.texture is not None:
            h, w = self.texture.shape[:2]
            x = np.clip((self.uvs[:, 0] % 1.0) * w, 0, w - 1).astype(int)
            y = np.clip((1.0 - self.uvs[:, 1] % 1.0) * h, 0, h - 1).astype(int)
            return self.texture[y, x].astype(np.float32)
        return np.full((self.vertices.shape[1], 3), 0.7, dtype=np.float32)

    def write_obj(self, path: str | Path, frame: int) -> Path:
        """One frame as a triangulated Wavefront OBJ (positions and faces), as the published renderer exports."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in self.vertices[frame]]
        lines += [f"f {a + 1} {b + 1} {c + 1}" for a, b, c in self.faces]
        path.write_text("\n".join(lines) + "\n")
        return path
