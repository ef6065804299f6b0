"""The variation-field VAE (docs/published_system.md §2): per-frame mesh motion -> 512 latent tokens anchored on
canonical Gaussians -> a 14-d variation Δ for every canonical Gaussian in every frame. There is no mixing across frames:
T is only a batch axis.

Encode (per frame t):
  anchors   = FPS(canonical Gaussians' xyz, 512)                                    (fixed count, seedable start)
  Δ̂_anchor  = mesh-guided KNN interpolation of the mesh-point displacements at the anchors
  queries   = embed(Δ̂_anchor) + PE(anchor xyz);  context = embed(Δ mesh points) + PE(mesh points)
  x         = CrossAttn(LN q, LN c) + q;  x = FF(LN x) + x;  posterior N(mean_fc(x), exp(logvar_fc(x)))
Decode:
  x         = proj(z), then `depth` blocks of latent self-attention and feed-forward (DropPath 0.1)
  Δ(g, t)   = to_outputs(CrossAttn(LN(embed_gs(g) + PE(g.xyz)), LN x_t)) for every canonical Gaussian g (no residual)

Parameter names equal the published checkpoint's (published §9.2), including the float64 buffer `position_encoding.0.omega`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.attention import CrossAttention, shared_query_attention
from models.layers import DiagonalGaussian, drop_path
from utils.pointcloud import farthest_point_sample, gather_points, interpolate_displacements

LOGVAR_RANGE = (-30.0, 20.0)
PAD_GAUSSIAN = (0.0,) * 10 + (1.0, 0.0, 0.0, 0.0)  # pad rows of the query batch: zeros with an identity quaternion


def layer_norm(dim: int, eps: float = 1e-6) -> nn.LayerNorm:
    """Affine-free LayerNorm: eps 1e-6 in the PreNorm blocks, PyTorch's default 1e-5 after the embeddings (as published)."""
    return nn.LayerNorm(dim, eps=eps, elementwise_affine=False)


class PointEmbed(nn.Module):
    """Per axis [sin(p ω_k), cos(p ω_k)] with ω_k = 10000^(-k/64), k < 128 (float64, as published): 3 x 256 = 768."""

    def __init__(self, dim: int = 768):
        super().__init__()
        freqs = dim // 6
        self.register_buffer("omega", 1.0 / 10000 ** (torch.arange(freqs, dtype=torch.float64) / (freqs // 2)))

    def forward(self, p: torch.Tensor) -> torch.Tensor:  # (..., 3) -> (..., dim)
        angles = p[..., None].to(self.omega.dtype) * self.omega
        return torch.cat([angles.sin(), angles.cos()], -1).flatten(-2).to(p.dtype)


class PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module, context_dim: int | None = None):
        super().__init__()
        self.norm = layer_norm(dim)
        self.norm_context = layer_norm(context_dim) if context_dim else None
        self.fn = fn

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if self.norm_context is not None:
            return self.fn(self.norm(x), self.norm_context(context))
        return self.fn(self.norm(x))


class Attention(CrossAttention):
    """The published motion-VAE attention: no q/kv bias, optional DropPath on the output."""

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, head_dim: int, drop_path: float = 0.0):
        super().__init__(query_dim, context_dim or query_dim, heads, head_dim, qkv_bias=False)
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return drop_path(super().forward(x, context), self.drop_path, self.training)


class FeedForward(nn.Module):
    """Linear -> GEGLU (x * gelu(gate), split [x | gate]) -> Linear, optional DropPath."""

    def __init__(self, dim: int, mult: int = 4, drop_path: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim * mult * 2), nn.Identity(), nn.Linear(dim * mult, dim))
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.net[0](x).chunk(2, dim=-1)
        return drop_path(self.net[2](a * F.gelu(gate)), self.drop_path, self.training)


@dataclass
class Encoded:
    posterior: DiagonalGaussian  # mean, logvar (B, T, L, latent_dim)
    anchors: torch.Tensor      # (B, L, 14) the FPS-sampled canonical Gaussians (condition layout)
    anchor_index: torch.Tensor  # (B, L) their rows in the padded query batch
    delta_interp: torch.Tensor  # (B, T, L, 3) interpolated displacements at the anchors

    def kl(self) -> torch.Tensor:
        """(B, T): the KL averaged over tokens and channels, as published (published §2.2)."""
        return self.posterior.kl(dims=(-2, -1))


def pad_gaussians(gaussians: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A list of (N_b, 14) canonical sets -> padded (B, max N_b, 14) and lengths (B,). Pad rows: identity Gaussians."""
    lengths = torch.tensor([len(g) for g in gaussians], device=gaussians[0].device)
    out = gaussians[0].new_tensor(PAD_GAUSSIAN).repeat(len(gaussians), int(lengths.max()), 1)
    for i, g in enumerate(gaussians):
        out[i, : len(g)] = g
    return out, lengths


class MotionVAE(nn.Module):
    """Takes the published constructor arguments (configs/vae.yml `model`). T is a forward argument, not a constructor one."""

    def __init__(self, depth: int = 12, dim: int = 768, queries_dim: int = 768, output_dim: int = 14, num_inputs: int = 8192,
                 num_latents: int = 512, latent_dim: int = 16, heads: int = 12, dim_head: int = -1,
                 weight_tie_layers: bool = False, decoder_ff: bool = False, input_dim: int = 3, gs_dim: int = 14,
                 chunk_size: int = 8192, knn_k: int = 8, beta: float = 7.0, drop_path: float = 0.1,
                 use_checkpoint: bool = False, num_timesteps: int | None = None, enable_flash_attn: bool = True):
        super().__init__()
        if weight_tie_layers or decoder_ff:
            raise ValueError("MotionVAE: weight_tie_layers and decoder_ff are not supported (the published config has neither)")
        if dim % 6:
            raise ValueError(f"MotionVAE: dim must be a multiple of 6 (3 axes x sin/cos point embedding), got {dim}")
        dim_head = dim // heads if dim_head == -1 else dim_head
        self.num_inputs, self.num_latents, self.latent_dim = num_inputs, num_latents, latent_dim
        self.chunk_size, self.knn_k, self.beta, self.use_checkpoint = chunk_size, knn_k, beta, use_checkpoint

        self.cross_attend_blocks = nn.ModuleList([
            PreNorm(dim, Attention(dim, dim, heads, dim_head), context_dim=dim),
            PreNorm(dim, FeedForward(dim)),
        ])
        self.input_embedding = nn.Sequential(nn.Linear(input_dim, dim), layer_norm(dim, 1e-5))
        self.gs_embedding = nn.Sequential(nn.Linear(gs_dim, queries_dim), layer_norm(queries_dim, 1e-5))
        self.position_encoding = nn.Sequential(PointEmbed(dim), layer_norm(dim, 1e-5))
        self.layers = nn.ModuleList(
            nn.ModuleList([PreNorm(dim, Attention(dim, None, heads, dim_head, drop_path)),
                           PreNorm(dim, FeedForward(dim, drop_path=drop_path))])
            for _ in range(depth))
        self.decoder_cross_attn = PreNorm(queries_dim, Attention(queries_dim, dim, heads, dim_head), context_dim=dim)
        self.to_outputs = nn.Linear(queries_dim, output_dim)
        self.proj = nn.Linear(latent_dim, dim)
        self.mean_fc = nn.Linear(dim, latent_dim)
        self.logvar_fc = nn.Linear(dim, latent_dim)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Published §2.1: truncated-normal(0.02) linears with zero bias; `to_outputs` zero, so the initial Δ is
        exactly 0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.zeros_(self.to_outputs.weight)
        nn.init.zeros_(self.to_outputs.bias)

    # --- encoder -------------------------------------------------------------------------------------------------
    def encode(self, static_pc: torch.Tensor, delta_pc: torch.Tensor, gaussians: torch.Tensor, lengths: torch.Tensor | None = None,
               fps_start=None, generator: torch.Generator | None = None) -> Encoded:
        """static_pc (B, N, 3) canonical mesh points; delta_pc (B, T, N, 3) their displacement per frame;
        gaussians (B, Q, 14) canonical Gaussians (condition layout, padded; `lengths` valid rows).
        FPS starts at row 0 unless `fps_start` or a `generator` (random start) is given."""
        index = farthest_point_sample(gaussians[..., :3], self.num_latents, lengths, start=fps_start, generator=generator)
        anchors = gather_points(gaussians, index)
        with torch.no_grad():
            delta_interp = interpolate_displacements(anchors[..., :3], static_pc, static_pc[:, None] + delta_pc,
                                                     self.knn_k, self.beta)
        queries = self.input_embedding(delta_interp) + self.position_encoding(anchors[..., :3])[:, None]
        context = self.input_embedding(delta_pc) + self.position_encoding(static_pc)[:, None]
        b, t = delta_pc.shape[:2]
        cross, ff = self.cross_attend_blocks
        x = cross(queries.flatten(0, 1), context.flatten(0, 1)) + queries.flatten(0, 1)
        x = ff(x) + x
        mean = self.mean_fc(x).unflatten(0, (b, t))
        logvar = self.logvar_fc(x).unflatten(0, (b, t)).clamp(*LOGVAR_RANGE)
        return Encoded(DiagonalGaussian(mean, logvar), anchors, index, delta_interp)

    # --- decoder -------------------------------------------------------------------------------------------------
    def decode(self, z: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """z (B, T, L, latent_dim); queries (B, Q, 14) canonical Gaussians (padded with PAD_GAUSSIAN rows).
        Returns Δ (B, T, Q, 14) in the Δ layout of utils/gaussians.py."""
        b, t = z.shape[:2]
        x = self.proj(z).flatten(0, 1)
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x

        cross = self.decoder_cross_attn.fn
        k, v = (t_.unflatten(0, (b, t)) for t_ in cross.kv(self.decoder_cross_attn.norm_context(x)))  # (B, T, L, H, D)
        # to_outputs ∘ to_out is linear: one 14-row projection of the attention output instead of two.
        w = self.to_outputs.weight @ cross.to_out.weight
        bias = self.to_outputs.weight @ cross.to_out.bias + self.to_outputs.bias

        def run(chunk: torch.Tensor) -> torch.Tensor:
            e = self.gs_embedding(chunk) + self.position_encoding(chunk[..., :3])
            q = cross.q(self.decoder_cross_attn.norm(e))                                  # once per Gaussian, not per frame
            return F.linear(shared_query_attention(q, k, v).flatten(-2), w, bias)        # (B, T, Qc, 14)

        outs = []
        for s in range(0, queries.shape[1], self.chunk_size):
            chunk = queries[:, s:s + self.chunk_size]
            if self.use_checkpoint and self.training and torch.is_grad_enabled():
                outs.append(checkpoint(run, chunk, use_reentrant=False))
            else:
                outs.append(run(chunk))
        return torch.cat(outs, dim=2)

    def forward(self, static_pc, delta_pc, gaussians, lengths=None, sample_posterior: bool = True, generator=None):
        """encode -> sample (or mean) -> decode. Returns (Δ (B, T, Q, 14), Encoded)."""
        enc = self.encode(static_pc, delta_pc, gaussians, lengths, generator=generator)
        z = enc.posterior.sample(generator) if sample_posterior else enc.posterior.mean
        return self.decode(z, gaussians), enc
