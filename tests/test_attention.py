import math

import pytest
import torch

from models.attention import (CrossAttention, MultiHeadRMSNorm, SelfAttention, attention, low_rank_cross_attention,
                              shared_query_attention, window_plan, windowed_attention)


def naive(q, k, v):
    """float64 softmax(q kᵀ / sqrt(d)) v, heads as in (B, L, H, D)."""
    q, k, v = q.double(), k.double(), v.double()
    s = torch.einsum("blhd,bshd->bhls", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("bhls,bshe->blhe", torch.softmax(s, -1), v)


def _qkv(b=2, l=7, s=11, h=3, d=8, dv=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g).to(dtype) for shape in [(b, l, h, d), (b, s, h, d), (b, s, h, dv)]]


def test_attention_equals_float64_reference():
    q, k, v = _qkv()
    torch.testing.assert_close(attention(q, k, v).double(), naive(q, k, v), rtol=0, atol=2e-6)
    q, k, v = _qkv(dv=5)  # value width may differ from the key width
    torch.testing.assert_close(attention(q, k, v).double(), naive(q, k, v), rtol=0, atol=2e-6)


def test_shared_query_attention_equals_per_frame_reference():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 9, 3, 8, generator=g)
    k, v = torch.randn(2, 4, 6, 3, 8, generator=g), torch.randn(2, 4, 6, 3, 5, generator=g)
    out = shared_query_attention(q, k, v)
    assert out.shape == (2, 4, 9, 3, 5)
    for t in range(4):
        torch.testing.assert_close(out[:, t].double(), naive(q, k[:, t], v[:, t]), rtol=0, atol=2e-6)
    out64 = shared_query_attention(q.double(), k.double(), v.double())  # float64 stays float64
    torch.testing.assert_close(out64[:, 2], naive(q, k[:, 2], v[:, 2]), rtol=0, atol=1e-12)


def test_rms_norm_formula():
    norm = MultiHeadRMSNorm(8, 3)
    with torch.no_grad():
        norm.gamma.copy_(torch.rand(3, 8) + 0.5)
    x = torch.randn(4, 5, 3, 8) * 7
    want = x.double() / x.double().pow(2).sum(-1, keepdim=True).sqrt() * norm.gamma.double() * math.sqrt(8)
    torch.testing.assert_close(norm(x).double(), want, rtol=1e-6, atol=1e-6)


def test_layers_match_a_float64_composition():
    torch.manual_seed(0)
    sa = SelfAttention(24, 3, qk_rms_norm=True)
    x = torch.randn(2, 10, 24)
    q, k, v = (sa.to_qkv(x).double()).view(2, 10, 3, 3, 8).unbind(2)
    rms = lambda t, gmm: t / t.pow(2).sum(-1, keepdim=True).sqrt() * gmm.double() * math.sqrt(8)
    q, k = rms(q, sa.q_rms_norm.gamma), rms(k, sa.k_rms_norm.gamma)
    want = naive(q, k, v).flatten(-2) @ sa.to_out.weight.double().T + sa.to_out.bias.double()
    torch.testing.assert_close(sa(x).double(), want, rtol=0, atol=5e-6)

    ca = CrossAttention(24, 16, heads=2, head_dim=6, qkv_bias=False)
    ctx = torch.randn(2, 13, 16)
    q = (x @ ca.to_q.weight.T).view(2, 10, 2, 6)
    k, v = (ctx @ ca.to_kv.weight.T).view(2, 13, 2, 2, 6).unbind(2)
    want = naive(q, k, v).flatten(-2) @ ca.to_out.weight.double().T + ca.to_out.bias.double()
    torch.testing.assert_close(ca(x, ctx).double(), want, rtol=0, atol=5e-6)
    torch.testing.assert_close(ca(x, kv=ca.kv(ctx)), ca(x, ctx))


@pytest.mark.parametrize("bias", [True, False])
def test_low_rank_cross_attention_equals_attention_to_the_projected_context(bias):
    torch.manual_seed(2)
    ca = CrossAttention(24, 40, heads=3, head_dim=8, qkv_bias=bias).double()
    proj = torch.nn.Linear(5, 40, bias=bias).double()
    for p in [*ca.parameters(), *proj.parameters()]:  # biases non-zero too: the key bias must drop out exactly
        torch.nn.init.normal_(p, std=0.5)
    x, inputs = torch.randn(2, 10, 24, dtype=torch.float64), torch.randn(2, 13, 5, dtype=torch.float64)
    want = naive(ca.q(x), *ca.kv(proj(inputs))).flatten(-2) @ ca.to_out.weight.T + ca.to_out.bias
    torch.testing.assert_close(low_rank_cross_attention(ca, x, inputs, proj), want, rtol=0, atol=1e-12)
    torch.testing.assert_close(ca(x, affine_context=(inputs, proj)), want, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="at most 4 input features"):
        low_rank_cross_attention(ca, x, inputs, proj, width=4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_finite_and_close(dtype):
    # Large activations: the QK norm and the float32 softmax keep half precision finite.
    q, k, v = _qkv(l=64, s=64, h=4, d=32, dv=32, seed=3)
    sa = SelfAttention(128, 4, qk_rms_norm=True)
    x = torch.randn(2, 64, 128) * 300
    ref = sa(x)
    out = sa.to(dtype)(x.to(dtype)).float()
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() / ref.abs().max() < 0.05
    o = attention(q.to(dtype), k.to(dtype), v.to(dtype)).double()
    assert (o - naive(q, k, v)).abs().max() < 0.05


def _dense_window_reference(q, k, v, coords, window, shift):
    """float64 attention over all voxels, masked to pairs in the same batch element and the same window."""
    c = coords.long()
    w = torch.div(c[:, 1:] + shift, window, rounding_mode="floor")
    same = (c[:, None, 0] == c[None, :, 0]) & (w[:, None] == w[None, :]).all(-1)
    s = torch.einsum("nhd,mhd->hnm", q, k) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~same, float("-inf"))
    return torch.einsum("hnm,mhe->nhe", torch.softmax(s, -1), v)


@pytest.mark.parametrize("shift,min_length", [(0, 1), (4, 1), (0, 32), (4, 64)])
def test_windowed_attention_equals_masked_dense_reference(shift, min_length):
    g = torch.Generator().manual_seed(shift)
    # Two batch elements on a 32³ grid: a dense blob (full windows) and scattered voxels (ragged, singleton windows).
    blob = torch.stack(torch.meshgrid(*[torch.arange(4, 13)] * 3, indexing="ij"), -1).reshape(-1, 3)
    blob = blob[torch.rand(len(blob), generator=g) < 0.7]
    scattered = torch.unique(torch.randint(0, 32, (150, 3), generator=g), dim=0)
    coords = torch.cat([torch.cat([torch.zeros(len(blob), 1, dtype=torch.long), blob], 1),
                        torch.cat([torch.ones(len(scattered), 1, dtype=torch.long), scattered], 1)]).int()
    perm = torch.randperm(len(coords), generator=g)  # windowing must not rely on any input order
    coords = coords[perm]
    n = len(coords)
    q, k, v = (torch.randn(n, 2, 8, generator=g, dtype=torch.float64).requires_grad_(True) for _ in range(3))
    out = windowed_attention(torch.stack([q, k, v], 1), window_plan(coords, 8, shift, heads=2, max_elements=4096,
                                                                    min_length=min_length))  # small chunks too
    ref = _dense_window_reference(q, k, v, coords, 8, shift)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    weights = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    grads_ref = torch.autograd.grad((ref * weights).sum(), (q, k, v))
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # Shifting changes the partition: the two settings must differ on this set.
    other = windowed_attention(torch.stack([q, k, v], 1), window_plan(coords, 8, 4 - shift))
    assert (other - out).abs().max() > 1e-3
