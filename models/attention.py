"""Attention layers through `torch.nn.functional.scaled_dot_product_attention` (flash / cuDNN / memory-efficient kernels
on GPU, the math kernel on CPU), except for narrow heads (width 16 or 32) in bf16/fp16 on a CUDA GPU: those go through
the Triton kernels of models/attention_kernel.py, which are faster there (BENCHMARKS.md). GVF_FUSED_ATTENTION=0 in the
environment turns them off. Tensors are laid out (batch, length, heads, head_dim) between the projections.

Parameter names follow the published checkpoints: `to_qkv` (fused, DiT self-attention), `to_q` / `to_kv` (cross-attention,
and the motion VAE's attention in general), `to_out`, and `q_rms_norm.gamma` / `k_rms_norm.gamma`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

try:  # Triton comes with CUDA builds of PyTorch; CPU-only installs have none and always use SDPA
    from models.attention_kernel import fused_attention
except ImportError:
    fused_attention = None

FUSED = fused_attention is not None and os.environ.get("GVF_FUSED_ATTENTION", "1") != "0"


def uses_fused_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    return (FUSED and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and q.dtype == k.dtype == v.dtype
            and q.shape[-1] in (16, 32) and v.shape[-1] == q.shape[-1]
            and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
            and torch.cuda.get_device_capability(q.device)[0] >= 8)  # bf16 tensor cores, cuDNN attention backward


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q kᵀ * scale) v, scale 1/sqrt(d) by default, for q (B, L, H, D), k (B, S, H, D), v (B, S, H, Dv)
    -> (B, L, H, Dv)."""
    if uses_fused_kernel(q, k, v):
        return fused_attention(q, k, v, scale)
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          scale=scale).transpose(1, 2)


def shared_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One set of queries attending to T key/value sets (one per frame): q (B, Q, H, D), k (B, T, S, H, D),
    v (B, T, S, H, Dv) -> (B, T, Q, H, Dv).

    The motion-VAE decoder queries every Gaussian against every frame's latents. The queries are projected once and
    repeated over frames here, so the fused attention kernels never materialise the (Q, S) scores.
    """
    b, t = k.shape[:2]
    q = q[:, None].expand(b, t, *q.shape[1:]).flatten(0, 1)
    return attention(q, k.flatten(0, 1), v.flatten(0, 1)).unflatten(0, (b, t))


class MultiHeadRMSNorm(nn.Module):
    """Per-head RMS normalisation of queries or keys: normalize(x) * gamma * sqrt(head_dim), computed in float32."""

    def __init__(self, head_dim: int, heads: int):
        super().__init__()
        self.scale = head_dim**0.5
        self.gamma = nn.Parameter(torch.ones(heads, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., H, D)
        return (F.normalize(x.float(), dim=-1) * self.gamma.float() * self.scale).to(x.dtype)


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection and optional QK RMS-norm (the DiT's)."""

    def __init__(self, dim: int, heads: int, qk_rms_norm: bool = False):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.to_qkv = nn.Linear(dim, 3 * dim)
        if qk_rms_norm:
            self.q_rms_norm = MultiHeadRMSNorm(self.head_dim, heads)
            self.k_rms_norm = MultiHeadRMSNorm(self.head_dim, heads)
        self.qk_rms_norm = qk_rms_norm
        self.to_out = nn.Linear(dim, dim)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(..., C) -> q, k, v each (..., H, D), the fused projection split as [q | k | v] blocks."""
        q, k, v = self.to_qkv(x).unflatten(-1, (3, self.heads, self.head_dim)).unbind(-3)
        if self.qk_rms_norm:
            q, k = self.q_rms_norm(q), self.k_rms_norm(k)
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, C)
        return self.to_out(attention(*self.qkv(x)).flatten(-2))


class CrossAttention(nn.Module):
    """Multi-head attention from x to a context: separate `to_q` and `to_kv` (split [k | v]) projections.

    The motion VAE uses it for self-attention too (context = x) and without q/kv biases, as published.
    `kv(context)` and `forward(x, kv=...)` let callers project a context once and reuse it (the DiT's static condition).
    """

    def __init__(self, query_dim: int, context_dim: int, heads: int, head_dim: int, qkv_bias: bool = True,
                 qk_rms_norm: bool = False):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.to_q = nn.Linear(query_dim, inner, bias=qkv_bias)
        self.to_kv = nn.Linear(context_dim, 2 * inner, bias=qkv_bias)
        if qk_rms_norm:
            self.q_rms_norm = MultiHeadRMSNorm(head_dim, heads)
            self.k_rms_norm = MultiHeadRMSNorm(head_dim, heads)
        self.qk_rms_norm = qk_rms_norm
        self.to_out = nn.Linear(inner, query_dim)

    def q(self, x: torch.Tensor) -> torch.Tensor:
        q = self.to_q(x).unflatten(-1, (self.heads, self.head_dim))
        return self.q_rms_norm(q) if self.qk_rms_norm else q

    def kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.to_kv(context).unflatten(-1, (2, self.heads, self.head_dim)).unbind(-3)
        return (self.k_rms_norm(k) if self.qk_rms_norm else k), v

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                affine_context: tuple[torch.Tensor, nn.Linear] | None = None) -> torch.Tensor:
        """Attend to `context`, to pre-projected `kv`, or to `affine_context` = (inputs, projection), a context that
        is an affine function of narrow inputs, through low_rank_cross_attention (same result)."""
        if affine_context is not None:
            return low_rank_cross_attention(self, x, *affine_context)
        k, v = kv if kv is not None else self.kv(x if context is None else context)
        return self.to_out(attention(self.q(x), k, v).flatten(-2))


LOW_RANK_WIDTH = 16  # head width of low_rank_cross_attention: the inputs are zero-padded to it


def low_rank_applies(attn: CrossAttention, features: int) -> bool:
    """Whether low_rank_cross_attention can stand in for `attn` on inputs of `features` features: keys must be affine
    in the inputs (no key RMS-norm) and the inputs must fit the padded width."""
    return not attn.qk_rms_norm and features <= LOW_RANK_WIDTH


def low_rank_cross_attention(attn: CrossAttention, x: torch.Tensor, inputs: torch.Tensor, proj: nn.Linear,
                             width: int = LOW_RANK_WIDTH) -> torch.Tensor:
    """attn(x, context=proj(inputs)) for inputs (B, S, F) of F <= width features, without forming the context.

    Keys and values are then affine in the inputs s: per head, k = A s + a and v = V s + c. The scores q·k equal
    (Aᵀ q)·s plus q·a, which is the same for every key of a query and drops out of the softmax; the output is
    V (Σ p s) + c. So all heads attend to the same zero-padded inputs at head width `width` (one sequence of L*H
    queries), the query projection absorbs A and the output projection absorbs V and c. The DiT's static condition has
    14 features against head width 32: this halves the attention's matrix work and skips the key/value projections.
    Requires no key RMS-norm (it is not affine)."""
    if not low_rank_applies(attn, inputs.shape[-1]) or inputs.shape[-1] > width:
        raise ValueError("low_rank_cross_attention: needs an attention without QK RMS-norm and at most "
                         f"{width} input features (got {inputs.shape[-1]})")
    h, d, f = attn.heads, attn.head_dim, inputs.shape[-1]
    bias = lambda lin, n: lin.bias if lin.bias is not None else lin.weight.new_zeros(n)
    w_k, w_v = attn.to_kv.weight.view(2, h, d, -1).unbind(0)
    a = w_k @ proj.weight                                                       # (H, D, F)
    val = w_v @ proj.weight                                                     # (H, D, F)
    c = w_v @ bias(proj, proj.out_features) + bias(attn.to_kv, 2 * h * d).view(2, h, d)[1]  # (H, D)
    pad = lambda t: F.pad(t, (0, width - f))
    w_q = pad(attn.to_q.weight.view(h, d, -1).transpose(1, 2) @ a)             # (H, C_x, width)
    b_q = pad(torch.einsum("hd,hdf->hf", bias(attn.to_q, h * d).view(h, d), a))
    w_o = attn.to_out.weight.view(-1, h, d)
    w_out = pad(torch.einsum("ohd,hdf->ohf", w_o, val))                         # (C_out, H, width)
    b_out = bias(attn.to_out, w_o.shape[0]) + torch.einsum("ohd,hd->o", w_o, c)

    b, length = x.shape[:2]
    q = F.linear(x, w_q.permute(0, 2, 1).reshape(h * width, -1), b_q.flatten())      # (B, L, H*width)
    s = pad(inputs).to(q.dtype)[:, :, None]                                           # (B, S, 1, width)
    o = attention(q.view(b, length * h, 1, width), s, s, scale=d ** -0.5)             # (B, L*H, 1, width)
    return F.linear(o.reshape(b, length, h * width), w_out.flatten(1), b_out)


# --- sparse windowed (swin) attention over voxel tokens -----------------------------------------------------------------

def window_ids(coords: torch.Tensor, window: int, shift: int) -> torch.Tensor:
    """(N,) window id of each voxel: (batch, floor((ijk + shift) / window)) flattened; coords (N, 4) = [b, i, j, k]."""
    w = torch.div(coords[:, 1:].long() + shift, window, rounding_mode="floor")
    dims = w.amax(0) + 1
    return ((coords[:, 0].long() * dims[0] + w[:, 0]) * dims[1] + w[:, 1]) * dims[2] + w[:, 2]


@dataclass
class WindowPlan:
    """How the voxels of a sparse set split into windows, batched for SDPA: built once per (coords, shift) and shared
    by every block with that shift. Each group holds windows padded to one power-of-two length."""
    num_tokens: int
    groups: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]  # (tokens (K,), valid (w, L), key mask or None)
    tokens: torch.Tensor  # all groups' tokens, in output order


def window_plan(coords: torch.Tensor, window: int = 8, shift: int = 0, heads: int = 1,
                max_elements: int = 1 << 24, min_length: int = 32) -> WindowPlan:
    """Sort voxels by window, bucket windows by padded length (powers of two from `min_length`: a handful of buckets,
    never a loop over windows) and chunk each bucket so its (windows, heads, L, L) scores stay under `max_elements`."""
    ids = window_ids(coords, window, shift)
    order = torch.argsort(ids, stable=True)
    _, counts = torch.unique_consecutive(ids[order], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    padded_len = torch.pow(2, torch.ceil(torch.log2(counts.double())).long()).clamp_min(min_length)
    groups = []
    for length in torch.unique(padded_len).tolist():
        wins = torch.nonzero(padded_len == length).flatten()
        per_chunk = max(1, max_elements // (length * length * heads))
        for c in range(0, len(wins), per_chunk):
            sel = wins[c:c + per_chunk]
            slot = torch.arange(length, device=coords.device)
            valid = slot[None] < counts[sel][:, None]
            tokens = order[(starts[sel][:, None] + slot[None])[valid]]
            groups.append((tokens, valid, None if bool(valid.all()) else valid[:, None, None, :]))
    return WindowPlan(len(coords), groups, torch.cat([g[0] for g in groups]))


def windowed_attention(qkv: torch.Tensor, plan: WindowPlan) -> torch.Tensor:
    """Full attention among the voxels of each non-empty window, none across windows: qkv (N, 3, H, D) -> (N, H, D)."""
    outs = []
    for tokens, valid, mask in plan.groups:
        # Padding is written by masked assignment (gathering pad slots from one row would serialise the backward).
        padded = qkv.new_zeros(*valid.shape, *qkv.shape[1:]).index_put((valid,), qkv[tokens])   # (w, L, 3, H, D)
        q, k, v = padded.transpose(1, 3).unbind(2)                                                # (w, H, L, D) each
        outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)[valid])
    return qkv.new_zeros(plan.num_tokens, *qkv.shape[2:]).index_put((plan.tokens,), torch.cat(outs))
