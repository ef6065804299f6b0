"""The temporal diffusion transformer (docs/published_system.md §5.2-5.3): v-prediction over normalised motion latents
(B, T, N, C).

Each of the N latent tokens sits on one of the N FPS anchors of the canonical Gaussians; its xyz gives an absolute
position embedding. Frames carry no position embedding: they are told apart by their image tokens, so any T works.
A block runs, in order:
  1. spatial self-attention over the N tokens of each frame       (adaLN: shift, scale, gate)
  2. temporal self-attention over the T frames of each token      (adaLN: shift, scale, gate)
  3. cross-attention to that frame's image tokens                  (affine LayerNorm, no gate)
  4. cross-attention to the static condition (canonical Gaussians) (affine LayerNorm, no gate)
  5. MLP                                                           (adaLN: shift, scale, gate)
The diffusion time is the only adaLN signal. Parameter names equal the published checkpoint's (published §9.1).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from models import attention
from models.attention import CrossAttention, SelfAttention, low_rank_applies
from models.layers import AbsolutePositionEmbedder, FeedForward, LayerNorm32, timestep_sinusoid


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (B, ..., C) * (1 + scale) + shift with per-sample (B, C) modulation."""
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
    return x * (1 + scale.view(shape)) + shift.view(shape)


class TimestepEmbedder(nn.Module):
    def __init__(self, channels: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, channels), nn.SiLU(), nn.Linear(channels, channels))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_sinusoid(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class DiTBlock(nn.Module):
    def __init__(self, channels: int, num_heads: int, mlp_ratio: float, qk_rms_norm: bool, qk_rms_norm_cross: bool,
                 temporal: bool, recompute_image_attn: bool):
        super().__init__()
        self.recompute_image_attn = recompute_image_attn
        head_dim = channels // num_heads
        self.norm1 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.norm2 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.norm3 = LayerNorm32(channels, elementwise_affine=True, eps=1e-6)
        self.norm4 = LayerNorm32(channels, elementwise_affine=True, eps=1e-6)
        self.norm5 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.spatial_self_attn = SelfAttention(channels, num_heads, qk_rms_norm)
        self.temporal = temporal
        if temporal:
            self.temporal_self_attn = SelfAttention(channels, num_heads, qk_rms_norm)
            self.adaLN_modulation_temporal = nn.Sequential(nn.SiLU(), nn.Linear(channels, 3 * channels))
        self.image_cross_attn = CrossAttention(channels, channels, num_heads, head_dim, qk_rms_norm=qk_rms_norm_cross)
        self.static_cross_attn = CrossAttention(channels, channels, num_heads, head_dim, qk_rms_norm=qk_rms_norm_cross)
        self.mlp = FeedForward(channels, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 6 * channels))

    def forward(self, x: torch.Tensor, c: torch.Tensor, image: torch.Tensor, static: dict) -> torch.Tensor:
        """x (B, T, N, C); c (B, C); image (B*T, L, C) projected image tokens; static: how this block's static
        cross-attention sees the condition, {"kv": (k, v)} or {"affine_context": (inputs, projection)}."""
        b, t, n, ch = x.shape
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        h = modulate(self.norm1(x), shift, scale).reshape(b * t, n, ch)
        x = x + gate.view(b, 1, 1, ch) * self.spatial_self_attn(h).view(b, t, n, ch)

        if self.temporal:
            shift, scale, gate = self.adaLN_modulation_temporal(c).chunk(3, dim=-1)
            h = modulate(self.norm2(x), shift, scale).transpose(1, 2).reshape(b * n, t, ch)
            x = x + gate.view(b, 1, 1, ch) * self.temporal_self_attn(h).view(b, n, t, ch).transpose(1, 2)

        if self.recompute_image_attn and torch.is_grad_enabled():
            x = x + checkpoint(self.image_attention, x, image, use_reentrant=False)
        else:
            x = x + self.image_attention(x, image)
        # The static condition is shared by all frames: its keys and values were projected once per sample (or it is
        # attended in its input space), and the queries of all frames attend to it in one sequence of T*N.
        x = x + self.static_cross_attn(self.norm4(x).reshape(b, t * n, ch), **static).view(b, t, n, ch)

        h = modulate(self.norm5(x), shift_mlp, scale_mlp)
        return x + gate_mlp.view(b, 1, 1, ch) * self.mlp(h)

    def image_attention(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Step 3 without the residual. Its keys and values, 1370 per frame, are the block's largest saved activations
        in training (about 135 MB at batch 2, T=24): `recompute_image_attn` recomputes them in the backward instead."""
        b, t, n, ch = x.shape
        return self.image_cross_attn(self.norm3(x).reshape(b * t, n, ch), image).view(b, t, n, ch)


class FinalLayer(nn.Module):
    def __init__(self, channels: int, out_channels: int):
        super().__init__()
        self.norm_final = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(channels, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 2 * channels))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Takes the published constructor arguments (configs/diffusion.yml `model`); unused ones are accepted and ignored.
    `recompute_image_attn` (ours, on by default) trades a recomputed image cross-attention for its saved activations in
    training, the same result: at paper scale, batch 2, T=24, a compiled step took 14.7 GiB instead of 16.2 (H200,
    BENCHMARKS.md). Inference is unaffected."""

    def __init__(self, in_channels: int = 16, out_channels: int = 16, model_channels: int = 512, num_blocks: int = 12,
                 num_heads: int | None = 16, num_head_channels: int = 64, mlp_ratio: float = 4.0,
                 image_cond_channels: int = 1024, static_cond_channels: int = 14, resolution: int = 512,
                 pe_mode: str = "ape", qk_rms_norm: bool = True, qk_rms_norm_cross: bool = False, share_mod: bool = False,
                 no_temporal_attn: bool = False, use_checkpoint: bool = False, patch_size: int = 1, use_fp16: bool = False,
                 use_skip_connection: bool = True, recompute_image_attn: bool = True):
        super().__init__()
        if pe_mode != "ape" or share_mod or patch_size != 1:
            raise ValueError(f"DiT: only pe_mode='ape', share_mod=False, patch_size=1 are supported "
                             f"(got {pe_mode!r}, {share_mod}, {patch_size})")
        num_heads = num_heads or model_channels // num_head_channels
        self.num_tokens = resolution  # the published config names the token count "resolution"
        self.use_checkpoint = use_checkpoint
        self.t_embedder = TimestepEmbedder(model_channels)
        self.input_layer = nn.Linear(in_channels, model_channels)
        self.pos_embedder = AbsolutePositionEmbedder(model_channels, 3)
        self.image_cond_proj = nn.Linear(image_cond_channels, model_channels)
        self.static_cond_proj = nn.Linear(static_cond_channels, model_channels)
        self.blocks = nn.ModuleList(
            DiTBlock(model_channels, num_heads, mlp_ratio, qk_rms_norm, qk_rms_norm_cross, not no_temporal_attn,
                     recompute_image_attn and not use_checkpoint)  # whole-block checkpointing recomputes it anyway
            for _ in range(num_blocks))
        self.final_layer = FinalLayer(model_channels, out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Published §5.3: xavier-uniform linears with zero bias; N(0, 0.02) time MLP and condition projections; zero adaLN
        and output layers, so an untrained model predicts v = 0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for lin in (self.t_embedder.mlp[0], self.t_embedder.mlp[2], self.image_cond_proj, self.static_cond_proj):
            nn.init.normal_(lin.weight, std=0.02)
        zero = [self.final_layer.linear, self.final_layer.adaLN_modulation[-1]]
        for blk in self.blocks:
            zero.append(blk.adaLN_modulation[-1])
            if blk.temporal:
                zero.append(blk.adaLN_modulation_temporal[-1])
        for lin in zero:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond_images: torch.Tensor, static_latent: torch.Tensor,
                deformation_position_xyz: torch.Tensor) -> torch.Tensor:
        """x (B, T, N, in) noisy latents; t (B,) model time; cond_images (B, T, L, image_cond_channels);
        static_latent (B, S, 14) normalised canonical Gaussians; deformation_position_xyz (B, N, 3) token positions.
        Returns v (B, T, N, out)."""
        b, t_len, n, _ = x.shape
        h = self.input_layer(x) + self.pos_embedder(deformation_position_xyz).to(x.dtype)[:, None]
        c = self.t_embedder(t)
        image = self.image_cond_proj(cond_images).flatten(0, 1)
        low_rank = self.static_low_rank(x, static_latent)
        context = None if low_rank else self.static_cond_proj(static_latent)
        for blk in self.blocks:
            static = (dict(affine_context=(static_latent, self.static_cond_proj)) if low_rank
                      else dict(kv=blk.static_cross_attn.kv(context)))
            if self.use_checkpoint and self.training and torch.is_grad_enabled():
                h = checkpoint(blk, h, c, image, static, use_reentrant=False)
            else:
                h = blk(h, c, image, static)
        return self.final_layer(h, c)

    def static_low_rank(self, x: torch.Tensor, static_latent: torch.Tensor) -> bool:
        """Whether the static cross-attention runs in the condition's 14-d input space (attention.low_rank_cross_attention,
        the same function), which is faster on a GPU: always for inference, and in training where the Triton kernels
        are on and the condition needs no gradient (it is data), so the attention's backward is the query-only kernel.
        The CPU keeps the (k, v) form, so the golden-file parity path stays as published."""
        return (x.is_cuda and low_rank_applies(self.blocks[0].static_cross_attn, self.static_cond_proj.in_features)
                and (not torch.is_grad_enabled() or (attention.FUSED and not static_latent.requires_grad)))
