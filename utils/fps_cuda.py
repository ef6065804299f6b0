"""Farthest point sampling of one point set on a CUDA GPU: one Triton kernel per pick, the picks replayed as one CUDA
graph. Same picks as utils/pointcloud.farthest_point_sample (tests/test_fps_cuda.py).

The reference loop launches four kernels per pick; at the 4096 picks inference takes from 160k Gaussians it is
launch-bound (about 0.3 s). Here pick i is one kernel: every block updates the running distances to the picked set
with pick i-1 and folds its farthest point into one 64-bit atomic maximum, keys[i], whose high half is the distance's
float bits (non-negative floats order as their bits) and whose low half is the inverted index, so the largest key is
the farthest point and ties go to the lowest index, as the reference's argmax does. A picked point's distance becomes
-1 and its key 0, below every unpicked point's (duplicates of picked points stay pickable, as in the reference). The
distances are summed x² + y² + z² left to right without fused multiply-adds, the reference's rounding.

The count launches are captured once per (capacity, count) into a CUDA graph; the point count is read from device
memory, so one graph serves every set of up to `capacity` points (capacities are powers of two, from BLOCK).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024
LOW = 0xFFFFFFFF  # the key's index half


@triton.jit(do_not_specialize=["i"])
def _pick_kernel(xyz, dist, keys, n_ptr, i, BLOCK: tl.constexpr):
    n = tl.load(n_ptr)
    prev = tl.load(keys + i - 1)
    idx = (0xFFFFFFFF - (prev & 0xFFFFFFFF)).to(tl.int32)           # pick i-1
    px, py, pz = tl.load(xyz + idx * 3), tl.load(xyz + idx * 3 + 1), tl.load(xyz + idx * 3 + 2)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dx = tl.load(xyz + offs * 3, mask=mask, other=0.0) - px
    dy = tl.load(xyz + offs * 3 + 1, mask=mask, other=0.0) - py
    dz = tl.load(xyz + offs * 3 + 2, mask=mask, other=0.0) - pz
    d = dx * dx + dy * dy + dz * dz
    new = tl.minimum(tl.load(dist + offs, mask=mask, other=-1.0), d)
    new = tl.where(offs == idx, -1.0, new)
    tl.store(dist + offs, new, mask=mask)
    bits = new.to(tl.int32, bitcast=True).to(tl.int64)
    key = tl.where(mask & (new >= 0), (bits << 32) | (0xFFFFFFFF - offs.to(tl.int64)), 0)
    tl.atomic_max(keys + i, tl.max(key, 0))


class _Picker:
    """Static buffers for up to `capacity` points and `count` picks, and (on a GPU) the launches captured as a graph."""

    def __init__(self, capacity: int, count: int, device: torch.device, graph: bool):
        self.count = count
        self.xyz = torch.zeros(capacity, 3, device=device)
        self.dist = torch.empty(capacity, device=device)
        self.keys = torch.zeros(count, dtype=torch.int64, device=device)
        self.n = torch.zeros(1, dtype=torch.int32, device=device)
        self.grid = (triton.cdiv(capacity, BLOCK),)
        self.graph = None
        if graph:
            self.reset(torch.zeros(1, 3, device=device), 0)
            self.launch(1)  # compiles the kernel outside the capture
            torch.cuda.synchronize(device)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                for i in range(1, count):
                    self.launch(i)

    def launch(self, i: int) -> None:
        _pick_kernel[self.grid](self.xyz, self.dist, self.keys, self.n, i, BLOCK=BLOCK, enable_fp_fusion=False)

    def reset(self, points: torch.Tensor, start: int) -> None:
        self.xyz[: len(points)] = points
        self.n.fill_(len(points))
        self.dist.fill_(float("inf"))
        self.keys.zero_()
        self.keys[0] = LOW - start

    def __call__(self, points: torch.Tensor, start: int) -> torch.Tensor:
        self.reset(points, start)
        if self.graph is not None:
            self.graph.replay()
        else:
            for i in range(1, self.count):
                self.launch(i)
        return (LOW - (self.keys & LOW)).long()


_PICKERS: dict[tuple, _Picker] = {}


def farthest_point_sample_cuda(points: torch.Tensor, count: int, start: int = 0) -> torch.Tensor:
    """points (N, 3) float32 -> (count,) long indices in pick order, from `start`. On a CUDA device the picks run as
    one CUDA graph; elsewhere (TRITON_INTERPRET=1, for the tests) launch by launch."""
    n = points.shape[0]
    if points.dim() != 2 or points.shape[1] != 3 or not 0 < count <= n or not 0 <= start < n:
        raise ValueError(f"farthest_point_sample_cuda: (N, 3) points and 0 < count <= N, got {tuple(points.shape)}, "
                         f"count {count}, start {start}")
    capacity = max(BLOCK, 1 << (n - 1).bit_length())
    key = (capacity, count, points.device)
    if key not in _PICKERS:
        _PICKERS[key] = _Picker(capacity, count, points.device, graph=points.is_cuda)
    return _PICKERS[key](points.detach().float(), start)
