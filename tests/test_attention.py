import math

import pytest
import torch

from models.attention import CrossAttention, MultiHeadRMSNorm, SelfAttention, attention, shared_query_attention


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
