import math

import torch
import torch.nn.functional as F

from models.trellis.blocks import AbsolutePositionEmbedder, ModulatedTransformerCrossBlock, TimestepEmbedder
from models.trellis.ss_flow import SparseStructureFlowModel, patchify, unpatchify
from reference import assert_matches_manifest, load_golden, load_golden_weights, load_manifest, rel_err


def _golden_model(dtype=torch.float32):
    t, meta = load_golden("trellis_ss_flow")
    model = SparseStructureFlowModel(**meta["config"]["model"]).eval()
    model.load_state_dict(load_golden_weights("trellis_ss_flow"), strict=True)
    return model.to(dtype), t, meta["tolerance"]


def test_golden_ss_flow_forward_stage_by_stage():
    model, t, tol = _golden_model()
    seen = {}
    model.blocks[0].register_forward_hook(lambda m, i, o: seen.update(tokens=i[0], block0=o))
    model.blocks[1].register_forward_hook(lambda m, i, o: seen.update(block1=o))
    with torch.no_grad():
        assert rel_err(model.t_embedder(t["in.t"]), t["dbg.t_emb"]) <= tol["tol"]
        out = model(t["in.x"], t["in.t"], t["in.cond"])
    for k in ("tokens", "block0", "block1"):
        assert rel_err(seen[k], t[f"dbg.{k}"]) <= tol["tol"], k
    assert out.shape == t["out.v"].shape and out.dtype == torch.float32
    assert rel_err(out, t["out.v"]) <= tol["tol"]
    model64, _, _ = _golden_model(torch.float64)
    with torch.no_grad():
        out64 = model64(*(t[k].double() for k in ("in.x", "in.t", "in.cond")))
    assert out64.dtype == torch.float64 and rel_err(out64, t["out64.v"]) <= tol["tol64"]


def test_recomputed_pos_emb_equals_the_stored_buffer():
    """The published file's pos_emb (loaded, never recomputed) agrees with docs/trellis.md §4.2 up to float32 sin/cos
    rounding."""
    _, meta = load_golden("trellis_ss_flow")
    fresh = SparseStructureFlowModel(**meta["config"]["model"]).pos_emb
    torch.testing.assert_close(fresh, load_golden_weights("trellis_ss_flow")["pos_emb"], rtol=0, atol=1e-5)


def test_released_config_matches_the_manifest():
    manifest = load_manifest("trellis_ss_flow_img_dit_L_16l8_fp16")
    with torch.device("meta"):
        model = SparseStructureFlowModel(**manifest["config"])
    assert manifest["num_params"] == 555_543_560 and manifest["num_state_dict_entries"] == 489
    # use_fp16 leaves exactly the released dtype layout (float16 Linear layers inside `blocks`, the rest float32).
    assert_matches_manifest(model, manifest, dtypes=True)
    assert sum(p.numel() for p in model.blocks[0].parameters()) == 23_092_224


def test_fp16_torso_runs_and_stays_close_to_float32():
    model, t, _ = _golden_model()
    model16, _, _ = _golden_model()
    model16.convert_to_fp16()
    args = (t["in.x"], t["in.t"], t["in.cond"])
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.no_grad():
        out16 = model16.to(dev)(*(a.to(dev) for a in args))
    assert out16.dtype == torch.float32
    assert rel_err(out16, t["out.v"]) <= 5e-3  # float16 activations: ~1e-3 relative rounding (trellis §11)


def test_patchify_layout_and_inverse():
    x = torch.randn(2, 3, 4, 6, 8, dtype=torch.float64)
    p = patchify(x, 2)
    c, i, j, k, X, Y, Z = 1, 1, 0, 1, 1, 2, 3
    assert p[1, c * 8 + i * 4 + j * 2 + k, X, Y, Z] == x[1, c, 2 * X + i, 2 * Y + j, 2 * Z + k]
    assert torch.equal(unpatchify(p, 2), x)


def test_block_components_against_direct_float64_formulas():
    """trellis §4.1, §4.2 and §4.5 written out independently, in float64, with random weights."""
    g = torch.Generator().manual_seed(0)
    # trellis §4.1: [cos | sin] of t · exp(-ln(1e4) i / 128), through Linear -> SiLU -> Linear.
    temb = TimestepEmbedder(32).double()
    tt = torch.tensor([0.0, 3.5, 999.0], dtype=torch.float64)
    freqs = torch.tensor([math.exp(-math.log(10000) * i / 128) for i in range(128)], dtype=torch.float64)
    sinus = torch.cat([torch.cos(tt[:, None] * freqs), torch.sin(tt[:, None] * freqs)], -1)
    m0, m2 = temb.mlp[0], temb.mlp[2]
    want = F.linear(F.silu(F.linear(sinus, m0.weight, m0.bias)), m2.weight, m2.bias)
    torch.testing.assert_close(temb(tt), want, rtol=0, atol=1e-4)  # the sinusoid is float32 as published

    # trellis §4.2: [sin x, cos x, sin y, cos y, sin z, cos z, 0...] with F = C // 6 frequencies 1e4^(-j/F).
    pe = AbsolutePositionEmbedder(1024, 3)(torch.tensor([[3.0, 0.0, 15.0]]))[0].double()
    w = torch.tensor([10000 ** (-j / 170) for j in range(170)], dtype=torch.float64)
    want = torch.cat([f(a * w) for a in (3.0, 0.0, 15.0) for f in (torch.sin, torch.cos)] + [torch.zeros(4)])
    torch.testing.assert_close(pe, want, rtol=0, atol=1e-5)

    # trellis §4.5: the modulated cross block by hand (explicit softmax attention, per-head RMS norm).
    C, H, Cc, B, N, L = 48, 4, 24, 2, 7, 5
    D = C // H
    blk = ModulatedTransformerCrossBlock(C, Cc, H, mlp_ratio=2, qk_rms_norm=True).double()
    for p in blk.parameters():
        torch.nn.init.normal_(p, std=0.3, generator=g)
    x, te, ctx = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((B, N, C), (B, C), (B, L, Cc)))

    def ln(v, w=None, b=None):
        mu, var = v.mean(-1, keepdim=True), v.var(-1, unbiased=False, keepdim=True)
        out = (v - mu) / torch.sqrt(var + 1e-6)
        return out if w is None else out * w + b

    def mha(q, k, v):  # (B, n, C) each -> (B, n, C)
        q, k, v = (a.reshape(a.shape[0], a.shape[1], H, D).transpose(1, 2) for a in (q, k, v))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D), -1)
        return (att @ v).transpose(1, 2).reshape(q.shape[0], -1, C)

    def rms(a, gamma):  # per head: a / |a| · gamma · sqrt(D)
        a = a.reshape(*a.shape[:-1], H, D)
        return (a / a.norm(dim=-1, keepdim=True) * gamma * math.sqrt(D)).flatten(-2)

    sa, ca, mlp = blk.self_attn, blk.cross_attn, blk.mlp.mlp
    mod = F.linear(F.silu(te), blk.adaLN_modulation[1].weight, blk.adaLN_modulation[1].bias)
    sh1, sc1, g1, sh2, sc2, g2 = (mod[:, i * C:(i + 1) * C, None].transpose(1, 2) for i in range(6))
    h = ln(x) * (1 + sc1) + sh1
    qkv = F.linear(h, sa.to_qkv.weight, sa.to_qkv.bias)
    q, k, v = qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:]
    q, k = rms(q, sa.q_rms_norm.gamma), rms(k, sa.k_rms_norm.gamma)
    ref = x + g1 * F.linear(mha(q, k, v), sa.to_out.weight, sa.to_out.bias)
    kv = F.linear(ctx, ca.to_kv.weight, ca.to_kv.bias)
    q = F.linear(ln(ref, blk.norm2.weight, blk.norm2.bias), ca.to_q.weight, ca.to_q.bias)
    ref = ref + F.linear(mha(q, kv[..., :C], kv[..., C:]), ca.to_out.weight, ca.to_out.bias)
    h = ln(ref) * (1 + sc2) + sh2
    hidden = F.gelu(F.linear(h, mlp[0].weight, mlp[0].bias), approximate="tanh")
    ref = ref + g2 * F.linear(hidden, mlp[2].weight, mlp[2].bias)
    out = blk(x, te, ctx)
    # The block's norms and q/k norms compute in float32 as published; hence a float32-level tolerance.
    assert rel_err(out, ref) <= 1e-5
    assert rel_err(out, x) > 1e-2  # the block does something
