"""The static (structured-latent) VAE, docs/published_system.md §3: frame-0 voxels carrying image features ->
8-channel latents per voxel -> 112 channels per voxel -> 8 Gaussians per voxel, the canonical Gaussians every animation
deforms.

Network (the TRELLIS SLat VAE with a Gaussian decoder):
  encode: h = input_layer(feats) + APE(ijk) -> encoder blocks -> LayerNorm -> to_latent -> (mean, logvar)
  decode: h = from_latent(z) + APE(ijk)     -> decoder blocks -> LayerNorm -> out_layer (112)
  block:  h += SwinAttn(LN h) (windows of 8³, shifted by 4 on odd blocks); h += MLP(LN h)
Gaussians (published §3.2): per voxel and Gaussian g, position = voxel centre + tanh(raw + P_g)·(voxel_size/2)/resolution,
where P_g places g at its Hammersley point inside the voxel when raw = 0; the other channels go through the MipGS
activations of utils/gaussians.py after their learning-rate multipliers.
Parameter names equal the published checkpoint's (published §9.3), including the buffer `MipGS_perturbation`.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.attention import SelfAttention, WindowPlan, window_plan, windowed_attention
from models.layers import AbsolutePositionEmbedder, DiagonalGaussian, FeedForward, LayerNorm32
from models.sparse import SparseVoxels
from utils.gaussians import FILTER_3D, OPACITY_BIAS, SCALE_BIAS, Gaussians

# The published MipGS representation (configs/vae.yml static_vae.framework.args.representation_config.MipGS).
MIPGS = {"num_gaussians": 8, "voxel_size": 1.5, "perturb_offset": True, "reg_mode": "soft_invoxel",
         "scaling_activation": "softplus", "scaling_bias": SCALE_BIAS, "opacity_bias": OPACITY_BIAS,
         "3d_filter_kernel_size": FILTER_3D, "2d_filter_kernel_size": 0.1,
         "lr": {"_xyz": 1.0, "_features_dc": 1.0, "_opacity": 1.0, "_scaling": 1.0, "_rotation": 0.1}}
# Channel layout of the decoder output, per voxel: (name, channels per Gaussian), in this order.
LAYOUT = (("_xyz", 3), ("_features_dc", 3), ("_scaling", 3), ("_rotation", 4), ("_opacity", 1))


def radical_inverse(base: int, n: int) -> float:
    inv, denom = 0.0, 1.0
    while n:
        denom *= base
        n, digit = divmod(n, base)
        inv += digit / denom
    return inv


def hammersley_perturbation(num_gaussians: int, voxel_size: float) -> torch.Tensor:
    """(G, 3) atanh of the Hammersley points (g/G, φ2(g), φ3(g)) rescaled to the tanh offset range."""
    h = torch.tensor([[g / num_gaussians, radical_inverse(2, g), radical_inverse(3, g)] for g in range(num_gaussians)],
                     dtype=torch.float64)
    return torch.atanh((h - 0.5) / 0.5 / voxel_size).float()


class SwinBlock(nn.Module):
    def __init__(self, channels: int, num_heads: int, mlp_ratio: float, window: int, shift: int):
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.norm2 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(channels, num_heads)
        self.mlp = FeedForward(channels, mlp_ratio)
        self.use_checkpoint = False

    def _forward(self, h: torch.Tensor, plan: WindowPlan) -> torch.Tensor:
        qkv = self.attn.to_qkv(self.norm1(h)).unflatten(-1, (3, self.attn.heads, self.attn.head_dim))
        h = h + self.attn.to_out(windowed_attention(qkv, plan).flatten(-2))
        return h + self.mlp(self.norm2(h))

    def forward(self, h: torch.Tensor, plan: WindowPlan) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, h, plan, use_reentrant=False)
        return self._forward(h, plan)


class StaticVAE(nn.Module):
    """Takes the published backbone arguments (configs/vae.yml `static_vae.backbones.vae.args`) and, optionally, the
    MipGS representation config (`static_vae.framework.args.representation_config.MipGS`) and `mem_ratio`."""

    def __init__(self, resolution: int = 64, in_channels: int = 1024, model_channels: int = 768, latent_channels: int = 8,
                 num_blocks: int = 12, num_heads: int | None = 12, num_head_channels: int = 64, mlp_ratio: float = 4,
                 attn_mode: str = "swin", window_size: int = 8, pe_mode: str = "ape", out_channels: int = 112,
                 norm_output: bool = True, use_fp16: bool = False, use_checkpoint: bool = False,
                 use_old_attn_impl: bool = False, representation: dict | None = None, mem_ratio: float = 1.0):
        super().__init__()
        rep = {**MIPGS, **(representation or {})}
        self._check_representation(rep, out_channels)
        if attn_mode != "swin" or pe_mode != "ape" or use_old_attn_impl or not norm_output:
            raise ValueError(f"StaticVAE: only attn_mode='swin', pe_mode='ape', use_old_attn_impl=False, norm_output=True "
                             f"are supported (got {attn_mode!r}, {pe_mode!r}, {use_old_attn_impl}, {norm_output})")
        num_heads = num_heads or model_channels // num_head_channels
        self.resolution, self.rep = resolution, rep
        self.input_layer = nn.Linear(in_channels, model_channels)
        self.pos_embedder = AbsolutePositionEmbedder(model_channels, 3)
        block = lambda i: SwinBlock(model_channels, num_heads, mlp_ratio, window_size, (window_size // 2) * (i % 2))
        self.encoder = nn.ModuleList(block(i) for i in range(num_blocks))
        self.to_latent = nn.Linear(model_channels, 2 * latent_channels)
        self.from_latent = nn.Linear(latent_channels, model_channels)
        self.decoder = nn.ModuleList(block(i) for i in range(num_blocks))
        self.out_layer = nn.Linear(model_channels, out_channels)
        self.norm_out = LayerNorm32(model_channels, elementwise_affine=False, eps=1e-5)  # F.layer_norm's default, as published
        self.register_buffer("MipGS_perturbation", hammersley_perturbation(rep["num_gaussians"], rep["voxel_size"]))
        self.set_mem_ratio(mem_ratio if not use_checkpoint else 0.0)

    @classmethod
    def from_config(cls, cfg) -> "StaticVAE":
        """From the `static_vae` block of configs/vae.yml (published `backbones.vae.args` + `framework.args`)."""
        fw = cfg["framework"]["args"]
        return cls(**cfg["backbones"]["vae"]["args"], representation=fw["representation_config"]["MipGS"],
                   mem_ratio=fw.get("mem_ratio", 1.0))

    @staticmethod
    def _check_representation(rep: dict, out_channels: int) -> None:
        fixed = ("perturb_offset", "reg_mode", "scaling_activation", "scaling_bias", "opacity_bias", "3d_filter_kernel_size")
        bad = [k for k in fixed if rep[k] != MIPGS[k]]
        if bad:
            raise ValueError(f"StaticVAE: representation values {({k: rep[k] for k in bad})} differ from the published "
                             f"MipGS ones {({k: MIPGS[k] for k in bad})}, which utils/gaussians.py implements")
        if out_channels != 14 * rep["num_gaussians"]:
            raise ValueError(f"StaticVAE: out_channels {out_channels} != 14 x num_gaussians ({rep['num_gaussians']})")

    def set_mem_ratio(self, mem_ratio: float) -> None:
        """Gradient checkpointing on the first blocks (encoder, then decoder) so that roughly `mem_ratio` of the
        activation memory remains: min(ceil((1 - r)·n) + 1, n) blocks for r < 1, none for r = 1 (the published rule)."""
        blocks = list(self.encoder) + list(self.decoder)
        n = 0 if mem_ratio >= 1 else min(math.ceil((1 - mem_ratio) * len(blocks)) + 1, len(blocks))
        for i, blk in enumerate(blocks):
            blk.use_checkpoint = i < n

    def _trunk(self, blocks: nn.ModuleList, h: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        h = h + self.pos_embedder(coords[:, 1:].to(h.dtype))
        plans = {}  # one window partition per shift, shared by the blocks
        for blk in blocks:
            if blk.shift not in plans:
                plans[blk.shift] = window_plan(coords, blk.window, blk.shift, blk.attn.heads)
            h = blk(h, plans[blk.shift])
        return self.norm_out(h)

    def encode(self, x: SparseVoxels) -> DiagonalGaussian:
        """Voxel features (N, in_channels) -> posterior over (N, latent_channels). Its KL: posterior.kl(dims=(0, 1))."""
        mean, logvar = self.to_latent(self._trunk(self.encoder, self.input_layer(x.feats), x.coords)).chunk(2, dim=-1)
        return DiagonalGaussian(mean, logvar)

    def decode(self, z: SparseVoxels) -> SparseVoxels:
        """Latents (N, latent_channels) -> raw Gaussian parameters (N, 112)."""
        return z.replace(self.out_layer(self._trunk(self.decoder, self.from_latent(z.feats), z.coords)))

    def to_gaussians(self, raw: SparseVoxels) -> list[Gaussians]:
        """Raw decoder output -> one Gaussian set per batch element, G per voxel (voxel-major, then Gaussian index)."""
        g = self.rep["num_gaussians"]
        parts, start = {}, 0
        for name, c in LAYOUT:
            parts[name] = raw.feats[:, start:start + g * c].reshape(-1, g, c) * self.rep["lr"][name]
            start += g * c
        centre = (raw.coords[:, None, 1:].to(raw.feats.dtype) + 0.5) / self.resolution
        offset = torch.tanh(parts["_xyz"] + self.MipGS_perturbation.to(raw.feats.dtype)) * (
            0.5 * self.rep["voxel_size"] / self.resolution)
        xyz = centre + offset - 0.5  # the unit cube [0, 1]³ of the grid -> world [-0.5, 0.5]³
        flat = Gaussians.from_raw(xyz, parts["_features_dc"], parts["_opacity"], parts["_scaling"], parts["_rotation"])
        flat = flat.map(lambda t: t.reshape(-1, t.shape[-1]))
        sizes = (raw.counts() * g).tolist()
        return [Gaussians(*(t.split(sizes)[b] for t in (flat.xyz, flat.f_dc, flat.opacity_logit, flat.scale_pre, flat.quat)))
                for b in range(len(sizes))]

    def forward(self, x: SparseVoxels, sample_posterior: bool = True, generator: torch.Generator | None = None):
        """encode -> sample (or mean) -> decode -> Gaussians. Returns (list of Gaussians, raw SparseVoxels, posterior)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mean
        raw = self.decode(x.replace(z))
        return self.to_gaussians(raw), raw, posterior
