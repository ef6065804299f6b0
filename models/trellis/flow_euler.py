"""FlowEuler sampler of TRELLIS with classifier-free guidance and a guidance interval (docs/trellis.md §9).

Flow convention (t = 1 is noise, t = 0 is data, sigma_min = 1e-5):
    x_t = (1 - t) x_0 + (sigma_min + (1 - sigma_min) t) eps,    v = (1 - sigma_min) eps - x_0.
Sampling integrates dx/dt = v from t = 1 to t = 0 with explicit Euler on the warped grid
    s = linspace(1, 0, steps + 1),  t = r s / (1 + (r - 1) s),  r = rescale_t   (float64; r > 1 puts more steps near t = 1)
and per step i (t_i -> t_{i+1}):
    t_in = float32([1000 t_i] * B);  v_c = model(x, t_in, cond)
    if guided (cfg_strength != 0 and cfg_interval is None or lo <= t_i <= hi, inclusive, float64):
        v_n = model(x, t_in, neg_cond)                 # a separate call after the cond call
        v = (1 + w) v_c - w v_n                        # "1 + w" guidance: w = 0 means none
    else: v = v_c                                      # one call
    x <- x - (t_i - t_{i+1}) v                         # float64 scalar step, x keeps its dtype
pred_x_0 = (1 - sigma_min) x - (sigma_min + (1 - sigma_min) t_i) v is only reported; sigma_min never enters the update.

The published samplers map onto one class: FlowEulerSampler = cfg_strength 0; FlowEulerCfgSampler = cfg_interval None;
FlowEulerGuidanceIntervalSampler = the GVF/pipeline defaults below.

x is a dense tensor (B, ...) or a `SparseVoxels` (the SLat stage): for the latter the update runs on the features with
the coordinates fixed, the model receives a SparseVoxels and may return one or its (N, C) features.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from typing import Any, Callable

import numpy as np
import torch

from models.sparse import SparseVoxels

Tensor = torch.Tensor

# pipeline.json of TRELLIS-image-large (both stages); GVFDiffusion overrides only steps and cfg_strength
# (trellis §9, table).
PIPELINE_DEFAULTS: dict[str, Any] = dict(steps=25, cfg_strength=5.0, cfg_interval=(0.5, 1.0), rescale_t=3.0,
                                         sigma_min=1e-5)
SS_DEFAULTS: dict[str, Any] = {**PIPELINE_DEFAULTS, "steps": 12, "cfg_strength": 7.5}    # sparse-structure flow
SLAT_DEFAULTS: dict[str, Any] = {**PIPELINE_DEFAULTS, "steps": 12, "cfg_strength": 3.0}  # SLat flow


def time_grid(steps: int, rescale_t: float = 1.0) -> np.ndarray:
    """(steps + 1,) float64 times from 1 to 0: r s / (1 + (r - 1) s) over s = linspace(1, 0, steps + 1).

    With steps 12 and r = 3 entry 9 is exactly 0.5 (s = 0.25 is exact), so that step stays inside the [0.5, 1] interval.
    """
    s = np.linspace(1.0, 0.0, steps + 1)
    return rescale_t * s / (1.0 + (rescale_t - 1.0) * s)


@dataclass
class FlowEulerOutput:
    samples: Tensor | SparseVoxels       # x at t = 0, same type/dtype as the input noise
    nfe: int                             # number of model calls
    pred_x_t: list | None = None         # x after each step (steps entries), if return_trajectory
    pred_x_0: list | None = None         # predicted x_0 at each step (steps entries), if return_trajectory


@dataclass
class FlowEulerSampler:
    """Euler sampler for TRELLIS rectified-flow models; `FlowEulerSampler(**SS_DEFAULTS)` gives the GVF SS stage.

    cfg_interval: (lo, hi) on t, inclusive, or None for guidance at every step; cfg_strength 0 disables guidance
    (and the neg call).
    """
    steps: int = 25
    cfg_strength: float = 0.0
    cfg_interval: tuple[float, float] | None = None
    rescale_t: float = 1.0
    sigma_min: float = 1e-5

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.cfg_interval is not None:
            self.cfg_interval = (float(self.cfg_interval[0]), float(self.cfg_interval[1]))

    def guided(self, t: float) -> bool:
        """Whether the step starting at t (float64) uses CFG."""
        if self.cfg_strength == 0:
            return False
        return self.cfg_interval is None or self.cfg_interval[0] <= t <= self.cfg_interval[1]

    @torch.no_grad()
    def sample(self, model: Callable, noise: Tensor | SparseVoxels, cond: Any, neg_cond: Any = None,
               return_trajectory: bool = False, **model_kwargs) -> FlowEulerOutput:
        """Integrate from `noise` at t = 1 to t = 0.

        model(x, t_in, cond, **model_kwargs) -> v, with t_in (B,) float32 = 1000 t. neg_cond defaults to
        zeros_like(cond), what the TRELLIS pipeline passes.
        """
        sparse = isinstance(noise, SparseVoxels)
        x = noise.feats if sparse else noise
        batch = noise.batch_size if sparse else noise.shape[0]
        if neg_cond is None and self.cfg_strength != 0:
            neg_cond = torch.zeros_like(cond)

        def velocity(x: Tensor, t_in: Tensor, c: Any) -> Tensor:
            v = model(noise.replace(x) if sparse else x, t_in, c, **model_kwargs)
            return v.feats if isinstance(v, SparseVoxels) else v

        t_seq = time_grid(self.steps, self.rescale_t).tolist()   # Python floats = float64
        nfe, traj, x0s = 0, [], []
        w, smin = self.cfg_strength, self.sigma_min
        for t, t_next in zip(t_seq[:-1], t_seq[1:]):
            t_in = torch.tensor([1000.0 * t] * batch, dtype=torch.float32, device=x.device)
            v = velocity(x, t_in, cond)
            nfe += 1
            if self.guided(t):
                v = (1 + w) * v - w * velocity(x, t_in, neg_cond)
                nfe += 1
            if return_trajectory:
                x0s.append((1 - smin) * x - (smin + (1 - smin) * t) * v)
            x = x - (t - t_next) * v
            if return_trajectory:
                traj.append(x)
        wrap = (lambda f: noise.replace(f)) if sparse else (lambda f: f)
        if not return_trajectory:
            return FlowEulerOutput(wrap(x), nfe)
        return FlowEulerOutput(wrap(x), nfe, [wrap(f) for f in traj], [wrap(f) for f in x0s])


def add_sampler_args(parser: argparse.ArgumentParser, prefix: str, defaults: dict[str, Any]) -> None:
    """--{prefix}-steps, --{prefix}-cfg-strength, --{prefix}-cfg-interval LO HI, --{prefix}-rescale-t."""
    what = {"ss": "sparse-structure flow", "slat": "structured-latent flow"}.get(prefix, prefix)
    parser.add_argument(f"--{prefix}-steps", type=int, default=defaults["steps"],
                        help=f"{what}: Euler steps (default %(default)s)")
    parser.add_argument(f"--{prefix}-cfg-strength", type=float, default=defaults["cfg_strength"],
                        help=f"{what}: guidance strength w, v = (1 + w) v_cond - w v_uncond (default %(default)s)")
    parser.add_argument(f"--{prefix}-cfg-interval", type=float, nargs=2, default=list(defaults["cfg_interval"]),
                        metavar=("LO", "HI"), help=f"{what}: guide the steps starting at t in [LO, HI] (default "
                                                   f"%(default)s)")
    parser.add_argument(f"--{prefix}-rescale-t", type=float, default=defaults["rescale_t"],
                        help=f"{what}: time warp r > 1 puts more steps near t = 1 (default %(default)s)")


def sampler_from_args(args: argparse.Namespace, prefix: str, defaults: dict[str, Any]) -> FlowEulerSampler:
    """The sampler configured by `add_sampler_args` flags (missing flags fall back to `defaults`)."""
    kw = {f.name: getattr(args, f"{prefix}_{f.name}", defaults[f.name]) for f in fields(FlowEulerSampler)}
    return FlowEulerSampler(**kw)
