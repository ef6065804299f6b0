import pytest
import torch
import torch.nn.functional as F

from models.sparse import SparseVoxels
from models.trellis.slat_flow import SLatFlowModel, SparseResBlock3d
from models.trellis.sparse_conv import downsample_map
from reference import assert_matches_manifest, load_golden, load_golden_weights, load_manifest, rel_err


def _golden_model(dtype=torch.float32):
    t, meta = load_golden("trellis_slat_flow")
    model = SLatFlowModel(**meta["config"]["model"]).eval()
    model.load_state_dict(load_golden_weights("trellis_slat_flow"), strict=True)
    return model.to(dtype), t, meta["tolerance"]


def _inputs(t, dtype=torch.float32):
    return SparseVoxels(t["in.coords"], t["in.feats"].to(dtype)), t["in.t"].to(dtype), t["in.cond"].to(dtype)


def test_golden_slat_flow_stage_by_stage():
    model, t, tol = _golden_model()
    seen, blocks = {}, {0: [], 1: []}
    model.input_layer.register_forward_hook(lambda m, i, o: seen.update(input_layer=o))
    model.pos_embedder.register_forward_hook(lambda m, i, o: seen.update(ape=o))
    for k in range(2):
        model.input_blocks[k].register_forward_hook(lambda m, i, o, k=k: seen.update({f"input_block{k}": o.feats}))
        model.out_blocks[k].register_forward_hook(lambda m, i, o, k=k: seen.update({f"out_block{k}": o.feats}))
        model.blocks[k].register_forward_hook(lambda m, i, o, k=k: blocks[k].append(o[0]))  # one call per object
    x, tt, cond = _inputs(t)
    with torch.no_grad():
        assert rel_err(model.t_embedder(tt), t["dbg.t_emb"]) <= tol["tol"]
        out = model(x, tt, cond)
    seen.update(block0=torch.cat(blocks[0]), block1=torch.cat(blocks[1]))
    for k in ("input_layer", "input_block0", "input_block1", "ape", "block0", "block1", "out_block0", "out_block1"):
        assert seen[k].shape == t[f"dbg.{k}"].shape and rel_err(seen[k], t[f"dbg.{k}"]) <= tol["tol"], k
    m = downsample_map(t["in.coords"], 2)
    assert torch.equal(m.coords, t["dbg.down_coords"]) and torch.equal(m.inverse, t["dbg.down_index"])
    assert torch.equal(m.counts, t["dbg.down_counts"])
    assert torch.equal(out.coords, x.coords) and out.feats.dtype == torch.float32
    assert rel_err(out.feats, t["out.feats"]) <= tol["tol"]

    model64, _, _ = _golden_model(torch.float64)
    with torch.no_grad():
        out64 = model64(*_inputs(t, torch.float64))
    assert out64.feats.dtype == torch.float64 and rel_err(out64.feats, t["out64.feats"]) <= tol["tol64"]


def test_objects_do_not_see_each_other():
    """Per-object attention: object 0 alone gives the same rows as inside the two-object batch."""
    model, t, _ = _golden_model(torch.float64)
    x, tt, cond = _inputs(t, torch.float64)
    first = x.coords[:, 0] == 0
    with torch.no_grad():
        both = model(x, tt, cond).feats
        alone = model(SparseVoxels(x.coords[first].clone(), x.feats[first]), tt[:1], cond[:1]).feats
    torch.testing.assert_close(alone, both[first], rtol=0, atol=1e-10)


def test_released_config_matches_the_manifest():
    manifest = load_manifest("trellis_slat_flow_img_dit_L_64l8p2_fp16")
    with torch.device("meta"):
        model = SLatFlowModel(**manifest["config"])
    assert manifest["num_params"] == 600_432_520 and manifest["num_state_dict_entries"] == 526
    assert_matches_manifest(model, manifest, dtypes=True)


def test_fp16_torso_runs_and_stays_close_to_float32():
    model, t, _ = _golden_model()
    model.convert_to_fp16()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x, tt, cond = _inputs(t)
    with torch.no_grad():
        out = model.to(dev)(x.to(dev), tt.to(dev), cond.to(dev))
    assert out.feats.dtype == torch.float32
    assert rel_err(out.feats, t["out.feats"]) <= 5e-3  # float16 activations: ~1e-3 relative rounding (docs/trellis.md §11)


# --- independent float64 check of the res block on a dense grid ----------------------------------------------------
def _dense(coords, feats, shape):
    """(B, C, X, Y, Z) grid with the features at the active sites, and the (B, 1, X, Y, Z) occupancy."""
    b, i, j, k = coords.long().unbind(1)
    g = feats.new_zeros(int(b.max()) + 1, *shape, feats.shape[1]).index_put((b, i, j, k), feats)
    occ = feats.new_zeros(g.shape[:-1] + (1,)).index_put((b, i, j, k), feats.new_ones(len(b), 1))
    return g.permute(0, 4, 1, 2, 3), occ.permute(0, 4, 1, 2, 3)


def _read(g, coords):
    b, i, j, k = coords.long().unbind(1)
    return g.permute(0, 2, 3, 4, 1)[b, i, j, k]


def _dense_res_block(blk, g, occ, emb, mode):
    """trellis §8 on dense grids: re-sample, norm1 → SiLU → conv1, norm2 · (1 + scale) + shift → SiLU → conv2, + skip."""
    def ln(v, w=None, b=None):  # over channels (dim 1), eps 1e-6
        v = (v - v.mean(1, keepdim=True)) / torch.sqrt(v.var(1, unbiased=False, keepdim=True) + 1e-6)
        return v if w is None else v * w[:, None, None, None] + b[:, None, None, None]

    def conv(v, c):  # submanifold = dense conv of the zero-filled grid, read at the active sites
        return F.conv3d(v * occ, c.conv.weight.permute(0, 4, 1, 2, 3), c.conv.bias, padding=1) * occ

    if mode == "down":  # sum of children / (children + 1), kept only where a child exists
        cnt = F.avg_pool3d(occ, 2) * 8
        g, occ = F.avg_pool3d(g, 2) * 8 / (cnt + 1), (cnt > 0).to(g.dtype)
    lin = blk.emb_layers[1]
    scale, shift = (F.linear(F.silu(emb), lin.weight, lin.bias)[:, :, None, None, None]).chunk(2, 1)
    h = conv(F.silu(ln(g, blk.norm1.weight, blk.norm1.bias)), blk.conv1)
    h = conv(F.silu(ln(h) * (1 + scale) + shift), blk.conv2)
    skip = blk.skip_connection
    s = g if isinstance(skip, torch.nn.Identity) else torch.einsum("bcxyz,oc->boxyz", g, skip.weight) + skip.bias[
        None, :, None, None, None]
    return (h + s) * occ


@pytest.mark.parametrize("seed,mode,cin,cout", [(0, "plain", 5, 5), (1, "plain", 5, 7), (2, "down", 5, 7),
                                               (3, "up", 6, 4)])
def test_sparse_res_block_equals_dense_grid_float64(seed, mode, cin, cout):
    gen = torch.Generator().manual_seed(seed)
    shape, B, E = (6, 8, 6), 2, 9
    occ = torch.rand(B, *shape, generator=gen) < 0.35
    coords = torch.cat([torch.cat([torch.full((int(o.sum()), 1), b), o.nonzero()], 1)
                        for b, o in enumerate(occ)]).to(torch.int32)
    blk = SparseResBlock3d(cin, E, cout, downsample=mode == "down", upsample=mode == "up").double()
    with torch.no_grad():
        for p in blk.parameters():
            p.normal_(0, 0.3, generator=gen)
    emb = torch.randn(B, E, generator=gen, dtype=torch.float64)
    m = downsample_map(coords, 2)
    sites = m.coords if mode == "up" else coords               # the up block's input lives on the coarse cells
    x = SparseVoxels(sites, torch.randn(len(sites), cin, generator=gen, dtype=torch.float64))
    out = blk(x, emb, m if mode == "up" else None)

    if mode == "up":  # dense nearest upsample of the coarse grid, masked to the fine occupancy (fed as "g")
        gc, _ = _dense(m.coords, x.feats, tuple(s // 2 for s in shape))
        g = gc.repeat_interleave(2, 2).repeat_interleave(2, 3).repeat_interleave(2, 4)
        _, focc = _dense(coords, x.feats.new_zeros(len(coords), 1), shape)
        ref = _dense_res_block(blk, g * focc, focc, emb, "plain")
    else:
        g, docc = _dense(coords, x.feats, shape)
        ref = _dense_res_block(blk, g, docc, emb, mode)
    want_sites = m.coords if mode == "down" else coords
    assert torch.equal(out.coords, want_sites)
    # LayerNorm32 normalises in float32 as published, hence a float32-level bound.
    want = _read(ref, want_sites)
    assert want.shape == (len(want_sites), cout) and want.abs().max() > 0.1
    assert rel_err(out.feats, want) <= 1e-5


def test_res_block_modulation_order_is_scale_then_shift():
    """emb_layers output [scale | shift]: a bias on the first half only must act multiplicatively (scale)."""
    blk = SparseResBlock3d(3, 4, 3).double()
    coords = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 1]], dtype=torch.int32)
    x = SparseVoxels(coords, torch.randn(2, 3, dtype=torch.float64))
    with torch.no_grad():
        blk.emb_layers[1].weight.zero_()
        blk.emb_layers[1].bias.zero_()
        base = blk(x, torch.zeros(1, 4, dtype=torch.float64)).feats
        blk.emb_layers[1].bias[:3] = -1.0     # scale = -1 zeroes norm2's output; a shift of -1 would not
        h = blk(x, torch.zeros(1, 4, dtype=torch.float64)).feats
    conv2 = blk.conv2(x.replace(torch.zeros(2, 3, dtype=torch.float64))).feats   # conv2 of silu(0) = bias only
    torch.testing.assert_close(h, conv2 + x.feats)
    assert not torch.allclose(base, h)
