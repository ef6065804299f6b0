import gc

import pytest
import torch
import torch.nn.functional as F

from models.sparse import SparseVoxels
from models.trellis import sparse_conv
from models.trellis.sparse_conv import (SparseConv3d, _CACHE, downsample_map, neighbour_map, sparse_downsample,
                                        sparse_upsample)
from reference import load_golden, load_manifest, rel_err


def _random_sites(gen, batch=3, shape=(5, 6, 7), density=0.3):
    """Batch-contiguous random occupancy, rows shuffled inside each element, all 8 grid corners of element 0 set."""
    rows = []
    for b in range(batch):
        occ = torch.rand(shape, generator=gen) < density
        if b == 0:
            occ[::shape[0] - 1, ::shape[1] - 1, ::shape[2] - 1] = True
        ijk = occ.nonzero()
        ijk = ijk[torch.randperm(len(ijk), generator=gen)]
        rows.append(torch.cat([torch.full((len(ijk), 1), b), ijk], 1))
    return torch.cat(rows).to(torch.int32)


def _dense_conv(coords, feats, weight, bias, shape):
    """Reference: scatter into a dense grid, torch conv3d with the spconv->torch weight permutation, read back."""
    b, i, j, k = coords.long().unbind(1)
    grid = feats.new_zeros(int(b.max()) + 1, *shape, feats.shape[1]).index_put((b, i, j, k), feats)
    out = F.conv3d(grid.permute(0, 4, 1, 2, 3), weight.permute(0, 4, 1, 2, 3), bias, padding=weight.shape[1] // 2)
    return out.permute(0, 2, 3, 4, 1)[b, i, j, k]


@pytest.mark.parametrize("seed,cin,cout,ksize,chunk_rows", [(0, 5, 7, 3, None), (1, 4, 3, 3, None), (2, 3, 2, 5, None),
                                                            (3, 4, 3, 3, 7)])
def test_subm_conv_equals_dense_conv3d_forward_and_backward(seed, cin, cout, ksize, chunk_rows, monkeypatch):
    if chunk_rows:  # the gathered block split into chunks of 7 rows (the last one shorter)
        monkeypatch.setattr(sparse_conv, "GATHER_ELEMENTS", chunk_rows * ksize ** 3 * cin)
    gen = torch.Generator().manual_seed(seed)
    shape = (5, 6, 7)
    coords = _random_sites(gen, shape=shape)
    conv = SparseConv3d(cin, cout, ksize).double()
    with torch.no_grad():   # non-symmetric random kernel and bias: a flipped kernel or a wrong axis would fail
        conv.conv.weight.copy_(torch.randn(conv.conv.weight.shape, generator=gen, dtype=torch.float64))
        conv.conv.bias.copy_(torch.randn(cout, generator=gen, dtype=torch.float64))
    feats = torch.randn(len(coords), cin, generator=gen, dtype=torch.float64, requires_grad=True)
    g = torch.randn(len(coords), cout, generator=gen, dtype=torch.float64)

    out = conv(SparseVoxels(coords, feats)).feats
    grads = torch.autograd.grad((out * g).sum(), [feats, conv.conv.weight, conv.conv.bias])
    w = conv.conv.weight.detach().clone().requires_grad_()
    bias = conv.conv.bias.detach().clone().requires_grad_()
    ref = _dense_conv(coords, feats, w, bias, shape)
    ref_grads = torch.autograd.grad((ref * g).sum(), [feats, w, bias])

    assert ref.abs().max() > 1
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for ours, theirs in zip(grads, ref_grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_no_neighbours_across_batch_elements_and_no_normalisation():
    # Two elements with a voxel at the same place: each sees only itself; the lone voxel's neighbour sum is unscaled.
    coords = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 2], [1, 1, 1, 1]], dtype=torch.int32)
    conv = SparseConv3d(1, 1, 3, bias=False).double()
    with torch.no_grad():
        conv.conv.weight.fill_(1.0)
    out = conv(SparseVoxels(coords, torch.tensor([[1.0], [2.0], [4.0]], dtype=torch.float64))).feats
    assert out.squeeze(1).tolist() == [3.0, 3.0, 4.0]


def test_neighbour_map_is_cached_per_coordinate_tensor():
    gen = torch.Generator().manual_seed(3)
    coords = _random_sites(gen)
    m = neighbour_map(coords)
    assert neighbour_map(coords) is m                          # reused by every conv/step on these coords
    assert neighbour_map(coords.clone()) is not m
    t = m.table()
    assert t.shape == (len(coords), 27) and (t[:, 13] == torch.arange(len(coords))).all()
    cid = id(coords)
    del coords, m
    gc.collect()
    assert cid not in _CACHE                                   # entries die with their coordinate tensor


def test_parameter_layout_matches_released_state_dicts():
    conv = SparseConv3d(8, 6, 3)
    assert {k: tuple(v.shape) for k, v in conv.state_dict().items()} == {"conv.weight": (6, 3, 3, 3, 8),
                                                                         "conv.bias": (6,)}
    sd = load_manifest("trellis_slat_flow_img_dit_L_64l8p2_fp16")["state_dict"]
    convs = {k[:-len(".conv.weight")]: v for k, v in sd.items() if k.endswith(".conv.weight")}
    assert len(convs) == 8
    with torch.device("meta"):                                 # shapes only: no 1024x1024x27 allocation
        for name, (cout, k, _, _, cin) in convs.items():
            got = {f"{name}.{key}": list(v.shape) for key, v in SparseConv3d(cin, cout, k).state_dict().items()}
            want = {key: sd[key] for key in (f"{name}.conv.weight", f"{name}.conv.bias")}
            assert got == want


def _loop_downsample(coords, feats):
    """docs/trellis.md §7 written out: sorted unique parents, sum of the children / (children + 1), nearest upsample."""
    parents = [(b, x // 2, y // 2, z // 2) for b, x, y, z in coords.tolist()]
    sites = sorted(set(parents))
    row = {s: r for r, s in enumerate(sites)}
    sums = [[0.0] * feats.shape[1] for _ in sites]
    counts = [0] * len(sites)
    for p, f in zip(parents, feats.tolist()):
        counts[row[p]] += 1
        sums[row[p]] = [a + v for a, v in zip(sums[row[p]], f)]
    pooled = [[a / (n + 1) for a in s] for s, n in zip(sums, counts)]
    return sites, [row[p] for p in parents], counts, pooled


def test_downsample_and_upsample_equal_the_spec_rules():
    gen = torch.Generator().manual_seed(4)
    coords = _random_sites(gen, batch=2, shape=(7, 8, 9), density=0.25)
    feats = torch.randn(len(coords), 3, generator=gen, dtype=torch.float64)
    down, m = sparse_downsample(SparseVoxels(coords, feats))
    sites, inverse, counts, pooled = _loop_downsample(coords, feats)
    assert down.coords.dtype == torch.int32 and down.coords.tolist() == [list(s) for s in sites]
    assert m.inverse.tolist() == inverse and m.counts.tolist() == counts
    assert max(counts) > 1 and min(counts) == 1                 # both the 1/2 and the n/(n+1) cases occur
    torch.testing.assert_close(down.feats, torch.tensor(pooled, dtype=torch.float64), rtol=1e-14, atol=1e-14)

    coarse = torch.randn(len(sites), 4, generator=gen, dtype=torch.float64)
    up = sparse_upsample(down.replace(coarse), m)
    assert up.coords is coords                                   # original sites and rows (and their cached maps)
    assert torch.equal(up.feats, torch.stack([coarse[r] for r in inverse]))
    assert downsample_map(coords).coords is down.coords         # cached: the coarse level's conv map is reused too


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_golden_trellis_sparse_ops(dtype):
    t, meta = load_golden("trellis_sparse_ops")
    tol = meta["tolerance"]["tol64" if dtype == torch.float64 else "tol"]
    out = "out64" if dtype == torch.float64 else "out"
    cfg = meta["config"]["subm"]
    conv = SparseConv3d(cfg["in_channels"], cfg["out_channels"], cfg["kernel_size"])
    conv.load_state_dict({"conv.weight": t["subm.in.weight"], "conv.bias": t["subm.in.bias"]}, strict=True)
    conv.to(dtype)
    x = SparseVoxels(t["in.coords"], t["in.feats"].to(dtype))
    with torch.no_grad():
        assert rel_err(conv(x).feats, t[f"subm.{out}.feats"]) <= tol
        down, m = sparse_downsample(x, meta["config"]["downsample"]["factor"])
        assert rel_err(down.feats, t[f"down.{out}.feats"]) <= tol
        assert torch.equal(down.coords, t["down.out.coords"]) and torch.equal(m.inverse, t["down.out.index"])
        up = sparse_upsample(down.replace(t["up.in.feats"].to(dtype)), m)
        assert torch.equal(up.coords, t["in.coords"])
        assert rel_err(up.feats, t["up.out.feats"]) <= (tol if dtype == torch.float64 else 0.0)
        # the trap: a plain mean of the children would be far off
        plain = down.feats * ((m.counts + 1) / m.counts).to(dtype).unsqueeze(1)
        assert rel_err(plain, t[f"down.{out}.feats"]) > 0.1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(5)
    coords = _random_sites(gen, batch=2, shape=(16, 16, 16), density=0.2)
    conv = SparseConv3d(16, 24).double()
    feats = torch.randn(len(coords), 16, generator=gen, dtype=torch.float64)
    ref = conv(SparseVoxels(coords, feats)).feats
    down_ref, _ = sparse_downsample(SparseVoxels(coords, feats))
    x = SparseVoxels(coords, feats).to("cuda")
    torch.testing.assert_close(conv.cuda()(x).feats.cpu(), ref, rtol=1e-12, atol=1e-12)
    down, _ = sparse_downsample(x)
    assert torch.equal(down.coords.cpu(), down_ref.coords)
    torch.testing.assert_close(down.feats.cpu(), down_ref.feats, rtol=1e-12, atol=1e-12)
