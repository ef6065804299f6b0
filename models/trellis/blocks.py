"""Shared building blocks of the TRELLIS flow transformers (docs/trellis.md §4), on (B, N, C) token tensors.

Most pieces already exist in the project with exactly the TRELLIS numerics and parameter names, so they are re-exported
rather than re-implemented (checked against trellis §4.1-4.4, and by tests/test_ss_flow.py):
- trellis §4.1 `TimestepEmbedder` (models.dit): [cos | sin] float32 sinusoid of 256 channels, f_i = exp(-ln(1e4) i / 128),
  then `mlp.0` Linear(256, C) -> SiLU -> `mlp.2` Linear(C, C).
- trellis §4.2 `AbsolutePositionEmbedder` (models.layers): F = C // 3 // 2 float32 frequencies 1e4^(-j/F), per axis
  [sin | cos], axes x, y, z, zero-padded to C (1020 + 4 zeros at C = 1024). Same layout as the static VAE's.
- trellis §4.3 `LayerNorm32` (models.layers): LayerNorm in float32, cast back.
- trellis §4.4 `SelfAttention` (`to_qkv` split [q | k | v] x heads, `{q,k}_rms_norm.gamma` (H, D), `to_out`) and
  `CrossAttention` (`to_q`, `to_kv` split [k | v], `to_out`) from models.attention, through SDPA with scale 1/sqrt(D).
- `FeedForward` (models.layers): `mlp.0` Linear(C, 4C) -> GELU(tanh) -> `mlp.2`.
The only new piece is the modulated cross block of trellis §4.5.
"""
from __future__ import annotations

import torch
from torch import nn

from models.attention import CrossAttention, SelfAttention
from models.dit import TimestepEmbedder, modulate
from models.layers import AbsolutePositionEmbedder, FeedForward, LayerNorm32

__all__ = ["AbsolutePositionEmbedder", "LayerNorm32", "ModulatedTransformerCrossBlock", "TimestepEmbedder"]


class ModulatedTransformerCrossBlock(nn.Module):
    """adaLN-modulated self-attention, ungated cross-attention to the image tokens, adaLN-modulated MLP (trellis §4.5).

    Keys: norm2.{weight,bias}, self_attn.{to_qkv,to_out,q_rms_norm,k_rms_norm}, cross_attn.{to_q,to_kv,to_out},
    mlp.mlp.{0,2}, adaLN_modulation.1 (23,092,224 parameters at C = 1024, context 1024, mlp_ratio 4).
    """

    def __init__(self, channels: int, ctx_channels: int, num_heads: int, mlp_ratio: float = 4.0,
                 qk_rms_norm: bool = False, qk_rms_norm_cross: bool = False):
        super().__init__()
        self.norm1 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.norm2 = LayerNorm32(channels, elementwise_affine=True, eps=1e-6)  # before cross-attention: affine
        self.norm3 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.self_attn = SelfAttention(channels, num_heads, qk_rms_norm)
        self.cross_attn = CrossAttention(channels, ctx_channels, num_heads, channels // num_heads,
                                         qk_rms_norm=qk_rms_norm_cross)
        self.mlp = FeedForward(channels, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 6 * channels))

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x (B, N, C) tokens; t_emb (B, C); context (B, L, ctx_channels). Returns (B, N, C)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(t_emb).chunk(6, dim=-1)
        x = x + gate_msa[:, None] * self.self_attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + self.cross_attn(self.norm2(x), context)
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm3(x), shift_mlp, scale_mlp))
