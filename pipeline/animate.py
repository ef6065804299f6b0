"""The motion stage of inference: canonical Gaussians + per-frame image tokens -> Δ per frame
(docs/published_system.md §6.4 steps 3-6).

    motion = MotionStage(dit, motion_vae, stats, sampling=cfg.sampling, num_static_cond=4096)  # or a SamplerConfig
    result = motion(canonical, tokens, seed=0)            # tokens (T, L, C); result.delta (T, N, 14), result.nfe

Conditions as in training, by the same functions (datasets/condition.py): the num_latents FPS anchors of the canonical
Gaussians (their xyz, normalised by the static statistics when the DiT was trained so, published §10.7) and num_static_cond
FPS Gaussians normalised by the static statistics; noise (T, L, C) is solved by DPM-Solver++ (models/dpm_solver.py),
de-normalised and decoded by the motion VAE against every canonical Gaussian. No file I/O here.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from datasets.condition import dit_condition, fps_gaussians
from models.dpm_solver import SamplerConfig, sample
from utils.gaussians import Gaussians


@dataclass
class MotionResult:
    delta: torch.Tensor                    # (T, N, 14) Δ layout, float32
    latents: torch.Tensor                  # (T, L, C) de-normalised motion latents
    nfe: int                               # model evaluations of the solver (a batched CFG pass counts once)
    seconds: dict = field(default_factory=dict)   # condition, sampling, decoding


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def keep_compile_cache() -> Path:
    """Where torch.compile keeps its compiled graphs and kernels: $TORCHINDUCTOR_CACHE_DIR when set, else
    ~/.cache/gvfdiffusion/inductor. Inductor's default is under /tmp, which a reboot or a fresh container empties; kept
    here, a second process loads the DiT's compiled graphs instead of compiling them again (BENCHMARKS.md, end to
    end: the cold start with and without the cache)."""
    return Path(os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                                      str(Path.home() / ".cache" / "gvfdiffusion" / "inductor")))


class MotionStage:
    def __init__(self, dit, motion_vae, stats: Mapping[str, torch.Tensor], sampling: SamplerConfig | Mapping,
                 num_static_cond: int, normalize_position_xyz: bool = True, dtype: torch.dtype = torch.float32,
                 compile: bool = False):
        self.dit, self.motion_vae = dit.eval(), motion_vae.eval()
        # CUDA graphs ("reduce-overhead"): the compiled forward is launch-bound without them (T=32 on an H200: 18.9 ms
        # with, 19.2 to 25.0 ms without, BENCHMARKS.md). A replay overwrites the last output; the solver has already
        # turned it into a new x0 tensor by then. The decode stays eager (faster so).
        if compile:
            keep_compile_cache()
        self.model_fn = torch.compile(self.dit, mode="reduce-overhead") if compile else self.dit
        self.device = next(dit.parameters()).device
        self.stats = {k: v.to(self.device, torch.float32) for k, v in stats.items()}
        # A `sampling:` config block (its non-solver keys skipped) or a ready SamplerConfig.
        self.sampling = sampling if isinstance(sampling, SamplerConfig) else SamplerConfig.from_config(sampling)
        self.num_static_cond, self.normalize_position_xyz, self.dtype = num_static_cond, normalize_position_xyz, dtype

    def condition(self, cond: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """DiT conditions for one object from its canonical Gaussians in the condition layout, cond (1, N, 14):
        cond_images (1, T, L, C), static_latent (1, S, 14), deformation_position_xyz (1, num_latents, 3)."""
        n, s = cond.shape[1], self.num_static_cond
        if n < max(s, self.motion_vae.num_latents):
            raise ValueError(f"the canonical has {n} Gaussians; the models need at least "
                             f"{max(s, self.motion_vae.num_latents)}")
        # The sets encode_latent.py stores for training: the same FPS (MotionVAE.encode's anchors, the static set).
        anchors, static = fps_gaussians(cond, self.motion_vae.num_latents, s, graph=True)
        return dit_condition(static, anchors, tokens.to(self.device, torch.float32)[None], self.stats,
                             self.normalize_position_xyz)

    @torch.no_grad()
    def __call__(self, canonical: Gaussians, tokens: torch.Tensor, seed: int = 0, **overrides) -> MotionResult:
        """Animate `canonical` (N Gaussians) to the T frames of `tokens` (T, L, C). `overrides` replace SamplerConfig
        fields for this call (steps, method, guidance_scale, ...) and are checked as such."""
        config = dataclasses.replace(self.sampling, **overrides) if overrides else self.sampling
        dev, seconds = self.device, {}
        _sync(dev)
        t0 = time.perf_counter()
        gaussians = canonical.to_condition().float()[None].to(dev)   # (1, N, 14): FPS sets and decoder queries
        cond = self.condition(gaussians, tokens)
        frames, L, C = tokens.shape[0], self.motion_vae.num_latents, self.motion_vae.latent_dim
        gen = torch.Generator(dev).manual_seed(seed)
        x_T = torch.randn(1, frames, L, C, generator=gen, device=dev)
        _sync(dev)
        seconds["condition"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            x0, info = sample(self.model_fn, x_T, cond, config)
        latents = x0.float() * self.stats["deformation_std"] + self.stats["deformation_mean"]
        _sync(dev)
        seconds["sampling"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            delta = self.motion_vae.decode(latents, gaussians)[0].float()                 # (T, N, 14)
        _sync(dev)
        seconds["decoding"] = time.perf_counter() - t0
        return MotionResult(delta, latents[0], int(info["nfe"]), seconds)
