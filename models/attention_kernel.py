"""Triton attention kernels for narrow heads (width 16 or 32) in bf16/fp16 on CUDA GPUs: the DiT's attention.

At head width 32 PyTorch's SDPA kernels (cuDNN, flash, memory-efficient) are tuned for wider heads. Two kernels here
do better on the DiT's shapes (BENCHMARKS.md):
- a tiled FlashAttention-2-style forward for long key sequences (static, image and spatial attention); its backward
  is PyTorch's cuDNN attention backward, fed with this forward's output and log-sum-exp, or, where the keys and values
  need no gradient (the static condition in its low-rank form), a query-gradient-only kernel of the same tiling;
- a forward and a backward that hold whole short sequences (at most 64 tokens: the temporal attention over T frames)
  in one tile, several heads per program, where SDPA's kernels leave most of each tile empty.
`attention()` in models/attention.py decides when they are used; everything else goes through SDPA.
Tensors are (batch, length, heads, head_dim) with a contiguous last dimension; outputs are contiguous.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

SHORT = 64  # key and query sequences up to this length use the whole-sequence kernels
LN2 = tl.constexpr(0.6931471805599453)
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _tile_indices(heads, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """The tiled kernels' program: batch b, head h, their flat index bh, and the query, key and feature offsets of its
    (BM queries, batch, head) tile. Indices only: loads stay in the kernels (see _short_backward_kernel)."""
    bh = tl.program_id(1)
    return (bh // heads, bh % heads, bh, tl.program_id(0) * BM + tl.arange(0, BM), tl.arange(0, BN),
            tl.arange(0, D))


@triton.autotune([triton.Config({"BM": bm, "BN": bn}, num_warps=4, num_stages=4)
                   for bm, bn in ((128, 64), (64, 64), (64, 128))], key=["len_q", "len_k", "D"])
@triton.heuristics({"EVEN_K": lambda args: args["len_k"] % args["BN"] == 0})
@triton.jit
def _forward_kernel(Q, K, V, O, LSE,
                    sqb, sql, sqh, skb, skl, skh, svb, svl, svh, sob, sol, soh,
                    heads, len_q, len_k,
                    QK_SCALE: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, EVEN_K: tl.constexpr):
    """One (BM queries, batch, head) tile per program, online softmax over key blocks of BN. QK_SCALE is the softmax
    scale times log2(e), so the kernel works in base 2; LSE is stored in natural log, (B, H, Lq). The scale is a
    compile-time constant because torch.compile would pass a float argument as float64."""
    b, h, bh, offs_m, offs_n, offs_d = _tile_indices(heads, D, BM, BN)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sql + offs_d[None, :], mask=offs_m[:, None] < len_q, other=0.0)
    k_ptrs = K + b * skb + h * skh + offs_n[:, None] * skl + offs_d[None, :]
    v_ptrs = V + b * svb + h * svh + offs_n[:, None] * svl + offs_d[None, :]

    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    for start in range(0, len_k, BN):
        if EVEN_K:  # no masking work in the inner loop when the keys fill whole blocks
            k = tl.load(k_ptrs + start * skl)
            v = tl.load(v_ptrs + start * svl)
            s = tl.dot(q, tl.trans(k))
        else:
            valid = (start + offs_n) < len_k
            k = tl.load(k_ptrs + start * skl, mask=valid[:, None], other=0.0)
            v = tl.load(v_ptrs + start * svl, mask=valid[:, None], other=0.0)
            s = tl.where(valid[None, :], tl.dot(q, tl.trans(k)), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * QK_SCALE)
        p = tl.exp2(s * QK_SCALE - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new

    row_ok = offs_m < len_q
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sol + offs_d[None, :], (acc / l_i[:, None]).to(O.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(LSE + bh * len_q + offs_m, (m_i + tl.log2(l_i)) * LN2, mask=row_ok)


@triton.jit
def _dq_block(q, do, lse2, delta, k_ptrs, v_ptrs, start, skl, svl, len_k, dq, offs_n,
              QK_SCALE: tl.constexpr, MASK: tl.constexpr):
    """dq += dS K over one key block, with P recomputed from the log-sum-exp (base 2) and dS = P (dO Vᵀ - delta)."""
    if MASK:
        valid = (start + offs_n) < len_k
        k = tl.load(k_ptrs + start * skl, mask=valid[:, None], other=0.0)
        v = tl.load(v_ptrs + start * svl, mask=valid[:, None], other=0.0)
        p = tl.where(valid[None, :], tl.exp2(tl.dot(q, tl.trans(k)) * QK_SCALE - lse2[:, None]), 0.0)
    else:
        k = tl.load(k_ptrs + start * skl)
        v = tl.load(v_ptrs + start * svl)
        p = tl.exp2(tl.dot(q, tl.trans(k)) * QK_SCALE - lse2[:, None])
    ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, dq)


@triton.autotune([triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=3)
                  for bm, bn in ((128, 64), (64, 64), (64, 128)) for w in (4, 8)], key=["len_q", "len_k", "D"])
@triton.jit
def _backward_dq_kernel(Q, K, V, O, DO, LSE, DQ,
                        sqb, sql, sqh, skb, skl, skh, svb, svl, svh, sob, sol, soh, sdob, sdol, sdoh,
                        heads, len_q, len_k,
                        SCALE: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """The query gradient alone, for long keys and values that need none (the DiT's static condition is data): the
    same tiling as _forward_kernel, one pass over the keys per query tile, no atomics; only the ragged last key block
    is masked. DO and DQ share strides."""
    b, h, bh, offs_m, offs_n, offs_d = _tile_indices(heads, D, BM, BN)
    row_ok = offs_m < len_q
    do_off = b * sdob + h * sdoh + offs_m[:, None] * sdol + offs_d[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sql + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * sol + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + do_off, mask=row_ok[:, None], other=0.0)
    lse2 = tl.load(LSE + bh * len_q + offs_m, mask=row_ok, other=0.0) * LOG2E
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    k_ptrs = K + b * skb + h * skh + offs_n[:, None] * skl + offs_d[None, :]
    v_ptrs = V + b * svb + h * svh + offs_n[:, None] * svl + offs_d[None, :]

    dq = tl.zeros([BM, D], tl.float32)
    full = len_k - len_k % BN
    for start in range(0, full, BN):
        dq = _dq_block(q, do, lse2, delta, k_ptrs, v_ptrs, start, skl, svl, len_k, dq, offs_n, SCALE * LOG2E, False)
    if full < len_k:
        dq = _dq_block(q, do, lse2, delta, k_ptrs, v_ptrs, full, skl, svl, len_k, dq, offs_n, SCALE * LOG2E, True)
    tl.store(DQ + do_off, (dq * SCALE).to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.autotune([triton.Config({"G": g}, num_warps=w) for g in (4, 8) for w in (2, 4)],
                  key=["len_q", "len_k", "heads", "D"])
@triton.jit
def _short_forward_kernel(Q, K, V, O, LSE,
                          sqb, sql, sqh, skb, skl, skh, svb, svl, svh, sob, sol, soh,
                          heads, len_q, len_k,
                          QK_SCALE: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                          G: tl.constexpr):
    """Whole sequences of at most 64 tokens (the DiT's temporal attention over T frames), G heads of one batch entry
    per program as a batched product, so each load covers G heads' adjacent rows."""
    b = tl.program_id(0)
    g = tl.program_id(1) * G + tl.arange(0, G)[:, None, None]
    m = tl.arange(0, BM)[None, :, None]
    n = tl.arange(0, BN)[None, :, None]
    d = tl.arange(0, D)[None, None, :]
    q = tl.load(Q + b * sqb + g * sqh + m * sql + d, mask=(g < heads) & (m < len_q), other=0.0)
    k = tl.load(K + b * skb + g * skh + n * skl + d, mask=(g < heads) & (n < len_k), other=0.0)
    v = tl.load(V + b * svb + g * svh + n * svl + d, mask=(g < heads) & (n < len_k), other=0.0)
    s = tl.dot(q, tl.permute(k, (0, 2, 1))) * QK_SCALE
    s = tl.where(tl.arange(0, BN)[None, None, :] < len_k, s, float("-inf"))
    m_i = tl.max(s, 2)
    p = tl.exp2(s - m_i[:, :, None])
    l_i = tl.sum(p, 2)
    o = tl.dot(p.to(v.dtype), v) / l_i[:, :, None]
    tl.store(O + b * sob + g * soh + m * sol + d, o.to(O.dtype.element_ty), mask=(g < heads) & (m < len_q))
    g2 = tl.program_id(1) * G + tl.arange(0, G)[:, None]
    rows = tl.arange(0, BM)[None, :]
    tl.store(LSE + (b * heads + g2) * len_q + rows, (m_i + tl.log2(l_i)) * LN2, mask=(g2 < heads) & (rows < len_q))


@triton.autotune([triton.Config({"G": g}, num_warps=w) for g in (4, 8) for w in (2, 4)],
                  key=["len_q", "len_k", "heads", "D"])
@triton.jit
def _short_backward_kernel(Q, K, V, O, DO, LSE, DQ, DK, DV,
                           sqb, sql, sqh, skb, skl, skh, svb, svl, svh, sob, sol, soh, sdob, sdol, sdoh,
                           sdkb, sdkl, sdkh, heads, len_q, len_k,
                           SCALE: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                           G: tl.constexpr):
    """Backward of _short_forward_kernel, same tiling. DO and DQ share strides, and so do DK and DV. The loads stay
    inline here and in the forward: torch.compile's analysis of which tensors a kernel writes counts tensors loaded
    inside a @triton.jit helper as written, and would copy them."""
    b = tl.program_id(0)
    g = tl.program_id(1) * G + tl.arange(0, G)[:, None, None]
    m = tl.arange(0, BM)[None, :, None]
    n = tl.arange(0, BN)[None, :, None]
    d = tl.arange(0, D)[None, None, :]
    row_ok = (g < heads) & (m < len_q)
    col_ok = (g < heads) & (n < len_k)
    do_off = b * sdob + g * sdoh + m * sdol + d
    dk_off = b * sdkb + g * sdkh + n * sdkl + d
    q = tl.load(Q + b * sqb + g * sqh + m * sql + d, mask=row_ok, other=0.0)
    k = tl.load(K + b * skb + g * skh + n * skl + d, mask=col_ok, other=0.0)
    v = tl.load(V + b * svb + g * svh + n * svl + d, mask=col_ok, other=0.0)
    o = tl.load(O + b * sob + g * soh + m * sol + d, mask=row_ok, other=0.0)
    do = tl.load(DO + do_off, mask=row_ok, other=0.0)
    g2 = tl.program_id(1) * G + tl.arange(0, G)[:, None]
    rows = tl.arange(0, BM)[None, :]
    lse = tl.load(LSE + (b * heads + g2) * len_q + rows, mask=(g2 < heads) & (rows < len_q), other=0.0)

    s = tl.dot(q, tl.permute(k, (0, 2, 1))) * (SCALE * LOG2E)
    p = tl.exp2(s - lse[:, :, None] * LOG2E)
    p = tl.where(tl.arange(0, BN)[None, None, :] < len_k, p, 0.0)
    dv = tl.dot(tl.permute(p.to(do.dtype), (0, 2, 1)), do)
    dp = tl.dot(do, tl.permute(v, (0, 2, 1)))
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 2)
    ds = (p * (dp - delta[:, :, None]) * SCALE).to(q.dtype)
    tl.store(DQ + do_off, tl.dot(ds, k).to(q.dtype), mask=row_ok)
    tl.store(DK + dk_off, tl.dot(tl.permute(ds, (0, 2, 1)), q).to(q.dtype), mask=col_ok)
    tl.store(DV + dk_off, dv.to(q.dtype), mask=col_ok)


def _strides(*tensors):
    return [st for t in tensors for st in t.stride()[:3]]


@triton_op("gvf::attention_forward", mutates_args=())
def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, Lq, H, D), k and v (B, Lk, H, D) -> out (B, Lq, H, D) contiguous, logsumexp (B, H, Lq) float32."""
    b, len_q, heads, d = q.shape
    len_k = k.shape[1]
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    lse = torch.empty(b, heads, len_q, device=q.device, dtype=torch.float32)
    args = (q, k, v, out, lse, *_strides(q, k, v, out), heads, len_q, len_k)
    qk_scale = scale * math.log2(math.e)
    if max(len_q, len_k) <= SHORT:
        wrap_triton(_short_forward_kernel)[lambda meta: (b, triton.cdiv(heads, meta["G"]))](
            *args, QK_SCALE=qk_scale, D=d, BM=max(16, triton.next_power_of_2(len_q)),
            BN=max(16, triton.next_power_of_2(len_k)))
    else:
        wrap_triton(_forward_kernel)[lambda meta: (triton.cdiv(len_q, meta["BM"]), b * heads)](
            *args, QK_SCALE=qk_scale, D=d)
    return out, lse


@triton_op("gvf::attention_backward_short", mutates_args=())
def attention_backward_short(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             out: torch.Tensor, lse: torch.Tensor, scale: float
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), contiguous, for sequences of at most SHORT tokens."""
    b, len_q, heads, d = q.shape
    len_k = k.shape[1]
    grad_out = grad_out.contiguous()
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    wrap_triton(_short_backward_kernel)[lambda meta: (b, triton.cdiv(heads, meta["G"]))](
        q, k, v, out, grad_out, lse.contiguous(), dq, dk, dv, *_strides(q, k, v, out, grad_out, dk),
        heads, len_q, len_k, SCALE=scale, D=d, BM=max(16, triton.next_power_of_2(len_q)),
        BN=max(16, triton.next_power_of_2(len_k)))
    return dq, dk, dv


@triton_op("gvf::attention_backward_dq", mutates_args=())
def attention_backward_dq(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          out: torch.Tensor, lse: torch.Tensor, scale: float) -> torch.Tensor:
    """dq, contiguous, for long keys and values that need no gradient."""
    b, len_q, heads, d = q.shape
    grad_out = grad_out.contiguous()
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    wrap_triton(_backward_dq_kernel)[lambda meta: (triton.cdiv(len_q, meta["BM"]), b * heads)](
        q, k, v, out, grad_out, lse.contiguous(), dq, *_strides(q, k, v, out, grad_out), heads, len_q, k.shape[1],
        SCALE=scale, D=d)
    return dq


def _setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.scale = scale


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    if max(q.shape[1], k.shape[1]) <= SHORT:
        dq, dk, dv = attention_backward_short(grad_out, q, k, v, out, lse, ctx.scale)
    elif not (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]):
        dq, dk, dv = attention_backward_dq(grad_out, q, k, v, out, lse, ctx.scale), None, None
    else:
        t = lambda x: x.transpose(1, 2)  # cuDNN's (B, H, L, D) views
        none = torch.empty((), dtype=torch.int64, device=q.device)  # dropout seed and offset, unused
        dq, dk, dv = (t(g) for g in torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            t(grad_out.contiguous()), t(q), t(k), t(v), t(out), lse.unsqueeze(-1), none, none, None, None, None,
            q.shape[1], k.shape[1], 0.0, False, scale=ctx.scale))
    return dq, dk, dv, None


attention_forward.register_autograd(_backward, setup_context=_setup_context)


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q kᵀ * scale) v (scale defaults to 1/sqrt(D)) for q (B, Lq, H, D), k and v (B, Lk, H, D)."""
    return attention_forward(q, k, v, q.shape[-1] ** -0.5 if scale is None else scale)[0]
