"""utils/pointcloud.py against independent brute-force references and the golden motion-VAE run."""
import math

import numpy as np
import pytest
import torch

from reference import load_golden, rel_err
from utils.pointcloud import farthest_point_sample, gather_points, interpolate_displacements, knn


# ----------------------------------------------------------------------------- references
def naive_fps(pts, count, start):
    """Pure-Python float64 FPS: farthest unpicked point, ties to the lowest index."""
    pts = [tuple(float(c) for c in p) for p in pts]
    best = [math.inf] * len(pts)
    picks = [start]
    while len(picks) < count:
        last = pts[picks[-1]]
        for j, p in enumerate(pts):
            best[j] = min(best[j], sum((a - b) ** 2 for a, b in zip(p, last)))
        nxt, nxt_d = None, -1.0
        for j in range(len(pts)):
            if j not in picks and best[j] > nxt_d:  # strict '>' keeps the first (lowest) index
                nxt, nxt_d = j, best[j]
        picks.append(nxt)
    return picks


def brute_knn(q, p, k, q_len, p_len):
    """numpy float64 full distance matrix + stable argsort; padded query rows -> 0 / 0."""
    q, p = np.asarray(q, np.float64), np.asarray(p, np.float64)
    B, M = q.shape[:2]
    dist, idx = np.zeros((B, M, k)), np.zeros((B, M, k), np.int64)
    for b in range(B):
        d = ((q[b, :q_len[b], None, :] - p[b, None, :p_len[b], :]) ** 2).sum(-1)
        o = np.argsort(d, axis=1, kind="stable")[:, :k]
        idx[b, :q_len[b]] = o
        dist[b, :q_len[b]] = np.take_along_axis(d, o, 1)
    return dist, idx


def naive_interp(anchors, static, moving, k, beta, a_len):
    """The formula of docs/published_system.md §2.2 step 3, one anchor, neighbour and frame at a time, in float64."""
    anchors, static, moving = (np.asarray(x, np.float64) for x in (anchors, static, moving))
    B, M = anchors.shape[:2]
    T, N = moving.shape[1:3]
    out = np.zeros((B, T, M, 3))
    for b in range(B):
        for m in range(a_len[b]):
            d = [float(((anchors[b, m] - static[b, j]) ** 2).sum()) for j in range(N)]
            nn = sorted(range(N), key=lambda j: (d[j], j))[:k]
            r2 = (math.sqrt(sum(d[j] for j in nn) / k) + 1e-6) ** 2
            w = [math.exp(-beta * d[j] / r2) if d[j] <= r2 else 0.0 for j in nn]
            s = sum(w) + 1e-8
            for t in range(T):
                for wj, j in zip(w, nn):
                    out[b, t, m] += wj / s * (moving[b, t, j] - static[b, j])
    return out


def pad_batch(clouds, fill=float("nan")):
    """List of (n_b, 3) tensors -> (B, max n, 3) padded with `fill`, and lengths (B,)."""
    n = max(len(c) for c in clouds)
    out = torch.full((len(clouds), n, clouds[0].shape[1]), fill, dtype=clouds[0].dtype)
    for b, c in enumerate(clouds):
        out[b, :len(c)] = c
    return out, torch.tensor([len(c) for c in clouds])


# ----------------------------------------------------------------------------- FPS
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B,N,S", [(1, 1, 1), (2, 50, 50), (3, 80, 17), (4, 33, 1)])
def test_fps_matches_naive(B, N, S, dtype):
    g = torch.Generator().manual_seed(1000 * B + N)
    pts = torch.randn(B, N, 3, generator=g, dtype=dtype)
    idx = farthest_point_sample(pts.requires_grad_(), S)  # grad-carrying input (canonical GS in training)
    assert idx.shape == (B, S) and idx.dtype == torch.long
    pts = pts.detach()
    for b in range(B):
        assert len(set(idx[b].tolist())) == S
        assert idx[b].tolist() == naive_fps(pts[b].double(), S, 0)


def test_fps_grid_ties_lowest_index():
    # Integer coordinates: squared distances are exact in float32, and a grid is full of ties.
    g = torch.Generator().manual_seed(0)
    grid = torch.stack(torch.meshgrid(torch.arange(4.), torch.arange(4.), torch.arange(3.), indexing="ij"), -1)
    pts = grid.reshape(-1, 3)[torch.randperm(48, generator=g)]
    for start in (0, 7, 47):
        got = farthest_point_sample(pts[None], 30, start=start)[0].tolist()
        assert got == naive_fps(pts, 30, start)


def test_fps_duplicate_points_never_repeat_an_index():
    base = torch.randn(10, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    pts = base.repeat(3, 1)  # every point three times
    idx = farthest_point_sample(pts[None], 30)[0].tolist()
    assert sorted(idx) == list(range(30))
    assert idx == naive_fps(pts, 30, 0)


def test_fps_padding_and_start_tensor():
    g = torch.Generator().manual_seed(5)
    clouds = [torch.randn(n, 3, generator=g, dtype=torch.float64) for n in (60, 37, 45)]
    pts, lengths = pad_batch(clouds, fill=1e6)  # padding would be the farthest points if picked
    pts[1, 40:] = float("nan")
    start = torch.tensor([5, 0, 44])
    idx = farthest_point_sample(pts, 20, lengths=lengths, start=start)
    for b, c in enumerate(clouds):
        assert idx[b].tolist() == naive_fps(c, 20, int(start[b]))
    # every valid point can be drawn, and no more
    full = farthest_point_sample(pts, 37, lengths=lengths)
    assert all(int(full[b].max()) < lengths[b] for b in range(3))
    with pytest.raises(ValueError, match="cannot pick 38"):
        farthest_point_sample(pts, 38, lengths=lengths)


def test_fps_random_start_is_seedable():
    pts = torch.randn(8, 500, 3, generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor([500, 3, 500, 1, 500, 500, 2, 500])
    a = farthest_point_sample(pts, 1, lengths, generator=torch.Generator().manual_seed(1))
    b = farthest_point_sample(pts, 1, lengths, generator=torch.Generator().manual_seed(1))
    c = farthest_point_sample(pts, 1, lengths, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert bool((a[:, 0] < lengths).all()) and bool((c[:, 0] < lengths).all())
    assert a[[0, 2, 4, 5, 7], 0].unique().numel() > 1  # not a constant start
    # a random start is just the first pick: the rest follows the deterministic rule
    r = farthest_point_sample(pts, 3, generator=torch.Generator().manual_seed(4))
    assert torch.equal(r, farthest_point_sample(pts, 3, start=r[:, 0]))


# ----------------------------------------------------------------------------- KNN
def test_knn_random_float64_chunked():
    g = torch.Generator().manual_seed(11)
    q, p = torch.randn(2, 37, 3, generator=g, dtype=torch.float64), torch.randn(2, 50, 3, generator=g, dtype=torch.float64)
    for k in (1, 8, 50):
        d, i = knn(q, p, k, chunk_size=5)
        rd, ri = brute_knn(q, p, k, [37, 37], [50, 50])
        assert np.array_equal(i.numpy(), ri)
        np.testing.assert_allclose(d.numpy(), rd, rtol=1e-12, atol=0)
    # gather_points agrees with plain fancy indexing
    assert torch.equal(gather_points(p, i), p[torch.arange(2)[:, None, None], i])


def test_knn_scattered_duplicates():
    # Each point three times at scattered indices: equal distances inside the k nearest (ordered by
    # index) and across the cut (the lowest indices make it), on random float64 data.
    g = torch.Generator().manual_seed(13)
    base = torch.randn(2, 12, 3, generator=g, dtype=torch.float64)
    p = base.repeat(1, 3, 1)[:, torch.randperm(36, generator=g)]
    q = torch.randn(2, 40, 3, generator=g, dtype=torch.float64)
    for k in (2, 3, 5, 6, 7):
        d, i = knn(q, p, k, chunk_size=16)
        rd, ri = brute_knn(q, p, k, [40, 40], [36, 36])
        assert np.array_equal(i.numpy(), ri), k
        np.testing.assert_allclose(d.numpy(), rd, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_knn_ties_duplicates_and_padding(dtype):
    g = torch.Generator().manual_seed(12)
    # Small integer coordinates: many duplicate points and equal distances, all exact.
    q_len, p_len = [13, 20], [40, 9]
    q = torch.randint(-2, 3, (2, 20, 3), generator=g).to(dtype)
    p = torch.randint(-2, 3, (2, 40, 3), generator=g).to(dtype)
    p[0, 30:] = p[0, :10]  # explicit duplicates of lower-index points
    p[1, 9:29] = q[1]  # padding sitting exactly on the queries: must be ignored
    p[1, 29:] = float("nan")
    q[0, 13:] = float("nan")  # padded query rows
    d, i = knn(q, p, 6, query_lengths=torch.tensor(q_len), point_lengths=torch.tensor(p_len), chunk_size=4)
    rd, ri = brute_knn(q.nan_to_num(0), p, 6, q_len, p_len)
    assert np.array_equal(i.numpy(), ri)
    assert np.array_equal(d.double().numpy(), rd)
    assert bool((d[0, 13:] == 0).all()) and bool((i[0, 13:] == 0).all())
    with pytest.raises(ValueError, match="k=10"):
        knn(q, p, 10, point_lengths=torch.tensor(p_len))


# ----------------------------------------------------------------------------- interpolation
@pytest.mark.parametrize("k", [3, 8])
def test_interpolation_matches_naive_loop(k):
    g = torch.Generator().manual_seed(20 + k)
    B, M, N, T = 2, 20, 40, 3
    static = torch.rand(B, N, 3, generator=g, dtype=torch.float64) - 0.5
    moving = static[:, None] + 0.05 * torch.randn(B, T, N, 3, generator=g, dtype=torch.float64)
    anchors = torch.rand(B, M, 3, generator=g, dtype=torch.float64) - 0.5
    anchors[0, 0] = static[0, 3]  # an anchor exactly on a mesh point (d = 0)
    static[1, 5:5 + k] = static[1, 4]  # k duplicates: an anchor on them has all d_k = 0
    moving[1, :, 5:5 + k] = moving[1, :, 4:5] + 0.01 * torch.randn(T, k, 3, generator=g, dtype=torch.float64)
    anchors[1, 1] = static[1, 4]
    a_len = [M, 13]
    anchors[1, 13:] = float("nan")
    out = interpolate_displacements(anchors, static, moving, k=k, beta=7.0, anchor_lengths=torch.tensor(a_len),
                                    chunk_size=6)
    ref = naive_interp(anchors.nan_to_num(0), static, moving, k, 7.0, a_len)
    assert out.shape == (B, T, M, 3)
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=1e-13 * np.abs(ref).max())
    assert bool((out[1, :, 13:] == 0).all())


# ----------------------------------------------------------------------------- golden
def _golden_inputs(t):
    xyz, lengths = pad_batch([t["in.static_gs0"][:, :3], t["in.static_gs1"][:, :3]])
    return xyz, lengths, t["in.static_pc"], t["in.delta_pc"]


def test_golden_motion_vae_fps():
    t, meta = load_golden("motion_vae")
    xyz, lengths, _, _ = _golden_inputs(t)
    S = meta["config"]["model"]["num_latents"]
    idx = farthest_point_sample(xyz, S, lengths=lengths)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
    assert torch.equal((idx + offsets[:, None]).reshape(-1), t["enc.out.fps_index"])


def test_golden_motion_vae_interpolation():
    t, meta = load_golden("motion_vae")
    tol, tol64 = meta["tolerance"]["tol"], meta["tolerance"]["tol64"]
    cfg = meta["config"]["model"]
    k, beta = cfg["knn_k"], cfg["beta"]
    xyz, lengths, static, delta = _golden_inputs(t)
    anchors = t["enc.out.sampled_static_gs"][..., :3]
    for dt, key, bound in ((torch.float32, "enc.out.delta_interp", tol), (torch.float64, "enc.out64.delta_interp", tol64)):
        s = static.to(dt)
        ours = interpolate_displacements(anchors.to(dt), s, s[:, None] + delta.to(dt), k=k, beta=beta)
        assert rel_err(ours, t[key]) <= bound, key
    # xyz-loss target: every canonical Gaussian of each sample, padded rows zero
    target = interpolate_displacements(xyz, static, static[:, None] + delta, k=k, beta=beta, anchor_lengths=lengths)
    assert rel_err(target, t["xyzloss.out.target"]) <= tol
    assert bool((target[1, :, 80:] == 0).all())


# ----------------------------------------------------------------------------- device parity
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(30)
    pts = torch.randn(3, 2000, 3, generator=g, dtype=torch.float64)
    lengths = torch.tensor([2000, 1500, 777])
    static, anchors = pts[:, :500], torch.randn(3, 300, 3, generator=g, dtype=torch.float64)
    moving = static[:, None] + 0.05 * torch.randn(3, 4, 500, 3, generator=g, dtype=torch.float64)
    cpu = (farthest_point_sample(pts, 256, lengths), *knn(anchors, pts, 8, point_lengths=lengths, chunk_size=64),
           interpolate_displacements(anchors, static, moving, anchor_lengths=lengths.clamp_max(300) - 20))
    c = lambda x: x.cuda()  # noqa: E731
    gpu = (farthest_point_sample(c(pts), 256, c(lengths)),
           *knn(c(anchors), c(pts), 8, point_lengths=c(lengths), chunk_size=64),
           interpolate_displacements(c(anchors), c(static), c(moving), anchor_lengths=c(lengths.clamp_max(300) - 20)))
    assert torch.equal(gpu[0].cpu(), cpu[0]) and torch.equal(gpu[2].cpu(), cpu[2])
    torch.testing.assert_close(gpu[1].cpu(), cpu[1], rtol=1e-12, atol=0)
    torch.testing.assert_close(gpu[3].cpu(), cpu[3], rtol=1e-12, atol=1e-15)
    # integer grids: ties inside and across the cut, where GPU topk orders ties its own way
    qi, pi = torch.randint(-3, 4, (2, 500, 3), generator=g).float(), torch.randint(-3, 4, (2, 900, 3), generator=g).float()
    for a, b in zip(knn(qi, pi, 8, chunk_size=128), knn(c(qi), c(pi), 8, chunk_size=128)):
        assert torch.equal(b.cpu(), a)
    # float32 FPS on the GPU draws from the GPU generator
    gg = torch.Generator(device="cuda").manual_seed(0)
    assert farthest_point_sample(c(pts.float()), 4, c(lengths), generator=gg).device.type == "cuda"
