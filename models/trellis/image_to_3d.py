"""TRELLIS image-to-3D canonical stage as GVFDiffusion runs it (docs/trellis.md §0, §9, §10;
docs/published_system.md §6.4 step 1).

cond tokens -> SS flow (FlowEuler, 12 steps, cfg 7.5) -> SS decoder -> occupancy coords (logits > 0)
            -> SLat flow on those coords (12 steps, cfg 3) -> slat · std + mean -> GVF static-VAE decoder
            -> 8 Gaussians per voxel.
Only the Gaussian format is decoded: GVFDiffusion decodes mesh/RF too but never uses them.
No file I/O here: networks, conditioning tokens and the `slat_normalization` values are passed in.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Sequence

import torch

from models.sparse import SparseVoxels
from models.static_vae import StaticVAE
from models.trellis.flow_euler import SLAT_DEFAULTS, SS_DEFAULTS, FlowEulerSampler
from models.trellis.ss_decoder import occupancy_coords
from utils.gaussians import Gaussians


class ImageTo3D:
    """Canonical Gaussians from DINOv2 condition tokens. `__call__(cond, seed) -> (Gaussians, info)`.

    Resolutions must chain: SS decoder output grid = SLat flow resolution = static VAE resolution (64 when released).
    autocast_dtype (e.g. torch.float16) wraps the network calls in CUDA autocast; the sampler updates and the
    de-normalisation stay float32. It is ignored on CPU, where everything runs in float32.
    """

    def __init__(self, ss_flow: torch.nn.Module, ss_decoder: torch.nn.Module, slat_flow: torch.nn.Module,
                 static_vae: StaticVAE, slat_mean: Sequence[float] | torch.Tensor, slat_std: Sequence[float] | torch.Tensor,
                 ss_sampler: FlowEulerSampler | None = None, slat_sampler: FlowEulerSampler | None = None,
                 autocast_dtype: torch.dtype | None = None):
        self.ss_flow, self.ss_decoder, self.slat_flow, self.static_vae = ss_flow, ss_decoder, slat_flow, static_vae
        # Default instances built per object (a dataclass default argument would be shared and mutable).
        self.ss_sampler = ss_sampler if ss_sampler is not None else FlowEulerSampler(**SS_DEFAULTS)
        self.slat_sampler = slat_sampler if slat_sampler is not None else FlowEulerSampler(**SLAT_DEFAULTS)
        self.slat_mean = torch.as_tensor(slat_mean, dtype=torch.float32).reshape(1, -1)
        self.slat_std = torch.as_tensor(slat_std, dtype=torch.float32).reshape(1, -1)
        self.autocast_dtype = autocast_dtype
        # Noise shapes come from the networks' configs, so tiny test models and the release share one code path.
        p = ss_flow.patch_size
        self.ss_channels = ss_flow.input_layer.in_features // p ** 3          # 8 when released
        self.ss_resolution = ss_flow.resolution                                # 16 when released
        self.slat_channels = slat_flow.input_layer.in_features                 # 8 when released
        if self.slat_mean.shape[1] != self.slat_channels or self.slat_std.shape[1] != self.slat_channels:
            raise ValueError(f"ImageTo3D: slat_mean/std need {self.slat_channels} values, got "
                             f"{self.slat_mean.shape[1]} and {self.slat_std.shape[1]}")
        if slat_flow.resolution != static_vae.resolution:
            raise ValueError(f"ImageTo3D: SLat flow resolution {slat_flow.resolution} != static VAE resolution "
                             f"{static_vae.resolution}")

    @property
    def device(self) -> torch.device:
        return next(self.ss_flow.parameters()).device

    def _autocast(self, device: torch.device):
        if self.autocast_dtype is None or device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.autocast_dtype)

    @staticmethod
    def _sync(device: torch.device) -> None:
        if device.type == "cuda":  # so that per-stage seconds measure the work, not the kernel launches
            torch.cuda.synchronize(device)

    @torch.no_grad()
    def __call__(self, cond_tokens: torch.Tensor, seed: int = 0,
                 neg_cond: torch.Tensor | None = None) -> tuple[Gaussians, dict[str, Any]]:
        """cond_tokens (1, L, C) -> (Gaussians with 8·N entries in world [-0.5, 0.5]³, info).

        neg_cond defaults to zeros (what the pipeline passes, trellis §0 step 2; the sampler fills it in).
        info: num_voxels, num_gaussians, nfe {ss, slat}, seconds {ss_flow, ss_decode, slat_flow, gs_decode},
        coords (N, 4) int32 and slat (N, C) de-normalised, both on the device.
        """
        if cond_tokens.dim() != 3 or cond_tokens.shape[0] != 1:
            raise ValueError(f"ImageTo3D: cond_tokens must be (1, L, C), got {tuple(cond_tokens.shape)}")
        dev = self.device
        cond = cond_tokens.to(dev, torch.float32)
        neg = neg_cond.to(dev, torch.float32) if neg_cond is not None else None
        # trellis §0/§9: run() seeds the CPU default generator once and draws the SS noise, then the SLat noise, from it
        # on the CPU before moving them. A private CPU generator with the same seed gives the same stream without
        # touching the global RNG state, and the result does not depend on the device.
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        seconds: dict[str, float] = {}

        def timed(name: str, fn):
            self._sync(dev)
            t0 = time.perf_counter()
            with self._autocast(dev):
                out = fn()
            self._sync(dev)
            seconds[name] = time.perf_counter() - t0
            return out

        r = self.ss_resolution
        noise = torch.randn(1, self.ss_channels, r, r, r, generator=gen).to(dev)
        ss = timed("ss_flow", lambda: self.ss_sampler.sample(self.ss_flow, noise, cond, neg))
        logits = timed("ss_decode", lambda: self.ss_decoder(ss.samples.float()))
        if logits.shape[-1] != self.static_vae.resolution:
            raise ValueError(f"ImageTo3D: SS decoder grid {logits.shape[-1]} != static VAE resolution "
                             f"{self.static_vae.resolution}")
        coords = occupancy_coords(logits)
        if len(coords) == 0:
            raise ValueError("ImageTo3D: the sparse-structure decoder produced no occupied voxel (all logits <= 0); "
                             "try another seed or check the conditioning/weights")

        # Next draws from the same generator (nothing in between consumes random numbers, trellis §0 step 6).
        slat_noise = SparseVoxels(coords, torch.randn(len(coords), self.slat_channels, generator=gen).to(dev))
        slat = timed("slat_flow", lambda: self.slat_sampler.sample(self.slat_flow, slat_noise, cond, neg))
        # trellis §10: per-channel de-normalisation, a (1, C) broadcast to every voxel, in float32.
        feats = slat.samples.feats.float() * self.slat_std.to(dev) + self.slat_mean.to(dev)
        slat_dn = SparseVoxels(coords, feats)
        raw = timed("gs_decode", lambda: self.static_vae.decode(slat_dn))
        gaussians = self.static_vae.to_gaussians(raw.replace(raw.feats.float()))[0]

        info = {"num_voxels": len(coords), "num_gaussians": len(gaussians),
                "nfe": {"ss": ss.nfe, "slat": slat.nfe}, "seconds": seconds, "seed": int(seed),
                "coords": coords, "slat": feats}
        return gaussians, info
