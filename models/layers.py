"""Small layers shared by the networks: float32 LayerNorm, sinusoidal position embedding, the transformer MLP,
a diagonal Gaussian posterior, stochastic depth."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm32(nn.LayerNorm):
    """LayerNorm evaluated in float32 whatever the activation dtype (bf16/fp16 safe), cast back afterwards."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class AbsolutePositionEmbedder(nn.Module):
    """Sinusoidal embedding of D-d coordinates into `channels`: per axis [sin(x f_k), cos(x f_k)] with
    f_k = 10000^(-k/F), F = channels // D // 2, axes concatenated and zero-padded to `channels` (DiT, static VAE).
    The frequencies are float32 constants: a non-persistent buffer, so they move with the module (no host-to-device copy,
    and no synchronisation, per call) and stay out of the state dict."""

    def __init__(self, channels: int, in_dims: int = 3):
        super().__init__()
        self.channels, self.in_dims = channels, in_dims
        self.freq_dim = channels // in_dims // 2
        freqs = 1.0 / 10000 ** (torch.arange(self.freq_dim, dtype=torch.float32) / self.freq_dim)
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., D) -> (..., channels)
        angles = x[..., None] * self.freqs.float()  # float32 even after module.double(), as published
        emb = torch.cat([angles.sin(), angles.cos()], -1).flatten(-2)
        return F.pad(emb, (0, self.channels - emb.shape[-1]))


def timestep_sinusoid(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """[cos | sin] embedding of (B,) timesteps, float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], -1)


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch per sample with probability p, rescaling the rest."""
    if p == 0.0 or not training:
        return x
    keep = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device) >= p
    return x * keep.to(x.dtype) / (1 - p)


class FeedForward(nn.Module):
    """Linear -> GELU(tanh) -> Linear (`mlp.0`, `mlp.2`: the DiT's and the static VAE's block MLP)."""

    def __init__(self, channels: int, mlp_ratio: float):
        super().__init__()
        hidden = int(channels * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


@dataclass
class DiagonalGaussian:
    """A VAE posterior N(mean, exp(logvar))."""
    mean: torch.Tensor
    logvar: torch.Tensor

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def kl(self, dims: tuple[int, ...]) -> torch.Tensor:
        """KL to N(0, I), averaged (not summed) over `dims`, as both published VAEs do."""
        return 0.5 * (self.mean**2 + self.logvar.exp() - 1.0 - self.logvar).mean(dim=dims)
