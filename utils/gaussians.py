"""Gaussian sets: parameters, MipGS activations, the two 14-d layouts, per-frame variations, PLY files.

A `Gaussians` holds pre-activation parameters with the MipGS biases already added (docs/published_system.md §3.2):

    opacity  = sigmoid(opacity_logit)                      opacity_logit = raw + logit(0.1)
    scale    = sqrt(softplus(scale_pre)^2 + FILTER_3D^2)    scale_pre     = raw + softplus^-1(0.004)
    rotation = quat / |quat|   (w, x, y, z)                 quat          = raw + (1, 0, 0, 0)
    colour   = 0.5 + SH_C0 * f_dc                           (SH degree 0)

Keeping the biases inside the stored values makes a per-frame variation a plain sum (published §2.4, Δ layout)
and lets the standard 3DGS PLY fields `opacity` and `rot_*` hold our values exactly. Every tensor may
carry leading batch dimensions (..., N, C); all methods broadcast over them.

The two 14-d layouts of published §2.4 differ and both live here:
    condition (activated): xyz 0:3 | f_dc 3:6 | opacity 6 | scale 7:10 | quaternion 10:14
    delta Δ (pre-activation offsets): xyz 0:3 | scale 3:6 | quaternion 6:10 | f_dc 10:13 | opacity logit 13
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from utils.fileio import atomic_write

SH_C0 = 0.28209479177387814
OPACITY_BIAS = 0.1
SCALE_BIAS = 0.004
FILTER_3D = 9e-4
OPACITY_LOGIT_BIAS = math.log(OPACITY_BIAS / (1 - OPACITY_BIAS))
SCALE_PRE_BIAS = SCALE_BIAS + math.log(-math.expm1(-SCALE_BIAS))  # softplus^-1(0.004)
IDENTITY_QUAT = (1.0, 0.0, 0.0, 0.0)

CONDITION_SLICES = {"xyz": slice(0, 3), "f_dc": slice(3, 6), "opacity": slice(6, 7), "scale": slice(7, 10), "rotation": slice(10, 14)}
DELTA_SLICES = {"xyz": slice(0, 3), "scale_pre": slice(3, 6), "quat": slice(6, 10), "f_dc": slice(10, 13), "opacity_logit": slice(13, 14)}


def inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    """softplus^-1(y) = log(expm1(y)), written to stay finite for small and large y."""
    return y + torch.log(-torch.expm1(-y))


def scale_activation(scale_pre: torch.Tensor) -> torch.Tensor:
    """The MipGS scale: softplus, then the 3D filter added in quadrature."""
    return torch.sqrt(F.softplus(scale_pre) ** 2 + FILTER_3D**2)


def inverse_scale_activation(scale: torch.Tensor) -> torch.Tensor:
    """scale_pre for a given scale; scales at or below the 3D filter are raised just above it."""
    s2 = (scale**2 - FILTER_3D**2).clamp_min((FILTER_3D * 1e-3) ** 2)
    return inverse_softplus(torch.sqrt(s2))


@dataclass
class Gaussians:
    xyz: torch.Tensor            # (..., N, 3) world position
    f_dc: torch.Tensor           # (..., N, 3) SH DC colour coefficient
    opacity_logit: torch.Tensor  # (..., N, 1)
    scale_pre: torch.Tensor      # (..., N, 3)
    quat: torch.Tensor           # (..., N, 4) un-normalised, w first

    def __post_init__(self):
        want = {"xyz": 3, "f_dc": 3, "opacity_logit": 1, "scale_pre": 3, "quat": 4}
        lead = self.xyz.shape[:-1]
        for name, c in want.items():
            t = getattr(self, name)
            if t.shape[-1] != c or t.shape[:-1] != lead:
                raise ValueError(f"Gaussians.{name}: expected shape {(*lead, c)}, got {tuple(t.shape)}")

    # construction ----------------------------------------------------------------------------------
    @classmethod
    def from_raw(cls, xyz, f_dc, opacity, scaling, rotation) -> "Gaussians":
        """From the static VAE's raw outputs (published §3.2, after lr multipliers): the biases are added here."""
        identity = rotation.new_tensor(IDENTITY_QUAT)
        return cls(xyz, f_dc, opacity + OPACITY_LOGIT_BIAS, scaling + SCALE_PRE_BIAS, rotation + identity)

    @classmethod
    def from_activated(cls, xyz, f_dc, opacity, scale, rotation) -> "Gaussians":
        """From activated values (opacity in (0,1), scale > FILTER_3D, any non-zero quaternion).

        Scales at or below the 3D filter cannot be represented; they are raised just above it.
        """
        eps = torch.finfo(opacity.dtype).eps
        opacity = opacity.clamp(eps, 1 - eps)
        return cls(xyz, f_dc, torch.logit(opacity), inverse_scale_activation(scale), rotation)

    @classmethod
    def from_condition(cls, cond: torch.Tensor) -> "Gaussians":
        """Inverse of `to_condition` (the activated 14-d layout)."""
        s = {k: cond[..., v] for k, v in CONDITION_SLICES.items()}
        return cls.from_activated(s["xyz"], s["f_dc"], s["opacity"], s["scale"], s["rotation"])

    # activated values ------------------------------------------------------------------------------
    @property
    def opacity(self) -> torch.Tensor:
        return torch.sigmoid(self.opacity_logit)

    @property
    def scale(self) -> torch.Tensor:
        return scale_activation(self.scale_pre)

    @property
    def rotation(self) -> torch.Tensor:
        return F.normalize(self.quat, dim=-1)

    @property
    def rgb(self) -> torch.Tensor:
        """Colour as rendered (SH degree 0): 0.5 + C0 * f_dc, clamped at 0 like gsplat and the published rasterizer."""
        return (0.5 + SH_C0 * self.f_dc).clamp_min(0.0)

    def to_condition(self) -> torch.Tensor:
        """The activated 14-d layout (published §2.4): xyz | f_dc | opacity | scale | quaternion."""
        return torch.cat([self.xyz, self.f_dc, self.opacity, self.scale, self.rotation], dim=-1)

    # per-frame variations ---------------------------------------------------------------------------
    def apply_delta(self, delta: torch.Tensor) -> "Gaussians":
        """Canonical (..., N) + Δ (..., T, N, 14) in the Δ layout -> per-frame Gaussians (..., T, N)."""
        if delta.shape[-1] != 14 or delta.shape[-2] != self.xyz.shape[-2]:
            raise ValueError(f"apply_delta: expected Δ of shape (..., T, {self.xyz.shape[-2]}, 14), got {tuple(delta.shape)}")
        return Gaussians(**{k: getattr(self, k).unsqueeze(-3) + delta[..., s] for k, s in DELTA_SLICES.items()})

    # container helpers -----------------------------------------------------------------------------
    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Gaussians":
        return Gaussians(**{f.name: fn(getattr(self, f.name)) for f in fields(self)})

    def to(self, *args, **kwargs) -> "Gaussians":
        return self.map(lambda t: t.to(*args, **kwargs))

    def detach(self) -> "Gaussians":
        return self.map(torch.Tensor.detach)

    def __getitem__(self, index) -> "Gaussians":
        """Index the leading dimensions (frames, batch, Gaussians); never the channel axis."""
        return self.map(lambda t: t[index])

    def __len__(self) -> int:
        return self.xyz.shape[-2]

    @property
    def batch_shape(self) -> torch.Size:
        return self.xyz.shape[:-2]

    @staticmethod
    def cat(items: Sequence["Gaussians"]) -> "Gaussians":
        """Concatenate sets along the Gaussian axis."""
        return Gaussians(**{f.name: torch.cat([getattr(g, f.name) for g in items], dim=-2) for f in fields(Gaussians)})

    # PLY (writing: write_ply) -----------------------------------------------------------------------
    @classmethod
    def load_ply(cls, path: str | os.PathLike) -> "Gaussians":
        return read_ply(path)


# --- PLY in the standard 3DGS layout --------------------------------------------------------------
# Field order of the reference 3DGS exporter: x y z nx ny nz f_dc_0..2 [f_rest_*] opacity scale_0..2 rot_0..3.
# Viewers read `opacity` as a logit and `scale_*` as log scales; ours are stored that way. Because the log of the
# filtered scale cannot give back `scale_pre` exactly, the exact values follow as extra `gvf_scale_pre_*` fields
# (the same practice as mip-splatting's extra fields); readers that do not know them ignore them.
PLY_FIELDS = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
              "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
PLY_EXTRA_FIELDS = ["gvf_scale_pre_0", "gvf_scale_pre_1", "gvf_scale_pre_2"]


def _check_writable(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (or --overwrite) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)


def write_ply(g: Gaussians, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write one set (N Gaussians, no batch dims) as a binary little-endian 3DGS PLY, atomically."""
    from plyfile import PlyData, PlyElement

    path = Path(path)
    if g.batch_shape != ():
        raise ValueError(f"write_ply: expected a single set of shape (N, ·), got batch shape {tuple(g.batch_shape)}")
    _check_writable(path, overwrite)
    with torch.no_grad():
        g32 = g.to(device="cpu", dtype=torch.float32)
        cols = [g32.xyz, torch.zeros_like(g32.xyz), g32.f_dc, g32.opacity_logit,
                torch.log(g32.scale), g32.quat, g32.scale_pre]
        data = torch.cat(cols, dim=-1).numpy()
    names = PLY_FIELDS + PLY_EXTRA_FIELDS
    rec = np.empty(len(data), dtype=[(n, "<f4") for n in names])
    for i, n in enumerate(names):
        rec[n] = data[:, i]
    return atomic_write(path, lambda tmp: PlyData([PlyElement.describe(rec, "vertex")], byte_order="<").write(str(tmp)),
                        overwrite=True)


def read_ply(path: str | os.PathLike) -> Gaussians:
    """Read a 3DGS PLY (ours or any tool's). Higher-order SH (`f_rest_*`) is dropped with a warning."""
    from plyfile import PlyData

    path = Path(path)
    try:
        ply = PlyData.read(str(path), mmap=False)  # no mapping: the caller may overwrite the file next
        v = ply["vertex"].data
    except Exception as e:  # plyfile raises several types for malformed files
        raise ValueError(f"{path}: not a readable PLY file with a 'vertex' element ({e})") from e
    missing = [n for n in PLY_FIELDS if n not in v.dtype.names and not n.startswith("n")]
    if missing:
        raise ValueError(f"{path}: not a 3DGS PLY, missing fields {missing}")
    col = lambda names: torch.from_numpy(np.stack([np.asarray(v[n], dtype=np.float32) for n in names], axis=-1))
    xyz, f_dc, logit = col(["x", "y", "z"]), col(["f_dc_0", "f_dc_1", "f_dc_2"]), col(["opacity"])
    log_scale, quat = col(["scale_0", "scale_1", "scale_2"]), col(["rot_0", "rot_1", "rot_2", "rot_3"])
    for name, t in [("x/y/z", xyz), ("f_dc", f_dc), ("opacity", logit), ("scale", log_scale), ("rot", quat)]:
        if not torch.isfinite(t).all():
            raise ValueError(f"{path}: non-finite values in field(s) {name}")
    if any(n.startswith("f_rest_") for n in v.dtype.names):
        warnings.warn(f"{path}: higher-order SH (f_rest_*) ignored; GVFDiffusion uses SH degree 0", stacklevel=2)
    if (quat.norm(dim=-1) == 0).any():
        raise ValueError(f"{path}: zero-length rotation quaternion(s)")
    if all(n in v.dtype.names for n in PLY_EXTRA_FIELDS):
        scale_pre = col(PLY_EXTRA_FIELDS)
        # Trust our exact field only if it still agrees with the standard one (an editor may have changed the scales).
        if torch.allclose(torch.log(scale_activation(scale_pre)), log_scale, rtol=0, atol=1e-5):
            return Gaussians(xyz, f_dc, logit, scale_pre, quat)
        warnings.warn(f"{path}: gvf_scale_pre_* disagree with scale_*; using scale_*", stacklevel=2)
    # The standard opacity field is already our logit, and rot_* our quaternion: only the scale is converted.
    return Gaussians(xyz, f_dc, logit, inverse_scale_activation(torch.exp(log_scale)), quat)


def write_ply_sequence(frames: Gaussians, folder: str | os.PathLike, prefix: str = "frame", overwrite: bool = False) -> list[Path]:
    """Write a (T, N) set as `folder/{prefix}_0000.ply ...`; refuses to replace existing files unless asked."""
    folder = Path(folder)
    if len(frames.batch_shape) != 1:
        raise ValueError(f"write_ply_sequence: expected frames of shape (T, N, ·), got batch shape {tuple(frames.batch_shape)}")
    paths = [folder / f"{prefix}_{t:04d}.ply" for t in range(frames.batch_shape[0])]
    if not overwrite:
        clash = [p for p in paths if p.exists()]
        if clash:
            raise FileExistsError(f"{clash[0]} exists ({len(clash)} of {len(paths)} frames); pass overwrite=True to replace them")
    return [write_ply(frames[t], p, overwrite=overwrite) for t, p in enumerate(paths)]
