"""Sparse operators of TRELLIS in plain PyTorch (docs/trellis.md §7), no spconv.

- `SparseConv3d`: submanifold 3x3x3 convolution (outputs at the input sites), weight layout (out, k, k, k, in)
  as in the released state dicts (`<name>.conv.weight` / `<name>.conv.bias`).
- `sparse_downsample` / `sparse_upsample`: the factor-2 pooling with TRELLIS's sum/(children + 1) rule and its
  nearest-neighbour inverse back to the original rows.

Neighbour look-up is by sorting: every site (b, x, y, z) becomes one int64 key, and `searchsorted` into the sorted
keys finds the row of each shifted site. The conv gathers the neighbours' features and multiplies once (gather-GEMM).
Maps are cached per coordinate tensor, so every conv at one level and every sampler step (the coordinates never
change) reuse them.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.sparse import SparseVoxels

# --- per-coordinate-tensor cache ---------------------------------------------------------------------------------
# Keyed by id(coords) and checked against the tensor's in-place version counter; entries die with the tensor.
_CACHE: dict[int, tuple[int, dict]] = {}
GATHER_ELEMENTS = 1 << 26  # per chunk of the conv's gathered (rows, k³·in) block: 128 MiB in float16


def _cached(coords: torch.Tensor, key, build):
    cid = id(coords)
    entry = _CACHE.get(cid)
    if entry is None or entry[0] != coords._version:
        if entry is None:
            weakref.finalize(coords, _CACHE.pop, cid, None)
        entry = _CACHE[cid] = (coords._version, {})
    store = entry[1]
    if key not in store:
        store[key] = build(coords)
    return store[key]


def _encode(coords: torch.Tensor, pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int64 keys of (b, x, y, z) with `pad` cells of margin per spatial axis, so shifted sites cannot alias."""
    c = coords.long()
    lo = c[:, 1:].amin(0) - pad
    ext = c[:, 1:].amax(0) - lo + 1 + pad                # lookups stay inside [0, ext)
    strides = torch.stack([ext[0] * ext[1] * ext[2], ext[1] * ext[2], ext[2], ext.new_ones(())])
    return ((c - torch.cat([lo.new_zeros(1), lo])) * strides).sum(1), strides, lo


@dataclass
class NeighbourMap:
    """Submanifold neighbours: `rows[p, o]` is the row of site p's neighbour at offset o, or N (one past the last row,
    a zero row the conv appends) where that neighbour is inactive."""
    kernel_size: int
    rows: torch.Tensor  # (N, k³) int64

    def table(self) -> torch.Tensor:
        """(N, k³) int64 with -1 where inactive (for inspection/tests)."""
        return self.rows.masked_fill(self.rows == len(self.rows), -1)


def _build_neighbour_map(coords: torch.Tensor, kernel_size: int) -> NeighbourMap:
    r = kernel_size // 2
    keys, strides, _ = _encode(coords, r)
    sorted_keys, order = torch.sort(keys)
    rng = torch.arange(-r, r + 1, device=coords.device)
    # Offset index (a, b, c) -> displacement (a - r, b - r, c - r), a slowest: the weight's (k, k, k) order, no flip.
    offs = torch.stack(torch.meshgrid(rng, rng, rng, indexing="ij"), -1).reshape(-1, 3)
    q = keys[:, None] + (offs * strides[1:]).sum(1)[None]   # batch is part of the key: no cross-element neighbours
    pos = torch.searchsorted(sorted_keys, q).clamp_(max=len(keys) - 1)
    rows = torch.where(sorted_keys[pos] == q, order[pos], len(keys))
    return NeighbourMap(kernel_size, rows)


def neighbour_map(coords: torch.Tensor, kernel_size: int = 3) -> NeighbourMap:
    """Cached neighbour map of a coordinate set (one per coords tensor and kernel size)."""
    if len(coords) == 0:
        raise ValueError("neighbour_map: empty voxel set")
    return _cached(coords, ("subm", kernel_size), lambda c: _build_neighbour_map(c, kernel_size))


class _ConvParams(nn.Module):
    """Holds `weight` (out, k, k, k, in) and `bias` so keys read `<name>.conv.weight` like the released files."""

    def __init__(self, cin: int, cout: int, k: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cout, k, k, k, cin))
        self.bias = nn.Parameter(torch.empty(cout)) if bias else None
        bound = 1 / math.sqrt(cin * k ** 3)                 # torch Conv3d's default init bounds
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)


class SparseConv3d(nn.Module):
    """Submanifold convolution (spconv SubMConv3d semantics): out[p] = bias + Σ_o W_o · x[p + o] over active
    neighbours of the same batch element; equals a dense conv3d with padding k//2 read at the active sites."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 dilation: int = 1, padding=None, bias: bool = True, indice_key=None):
        super().__init__()
        if stride != 1 or dilation != 1 or kernel_size % 2 == 0:
            raise NotImplementedError("only submanifold convs (stride 1, dilation 1, odd kernel) are used by TRELLIS")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.conv = _ConvParams(in_channels, out_channels, kernel_size, bias)

    def forward(self, x: SparseVoxels, nmap: NeighbourMap | None = None) -> SparseVoxels:
        if nmap is None:
            nmap = neighbour_map(x.coords, self.kernel_size)
        f = x.feats
        # Gather-GEMM: each site's k³ neighbour rows (zeros where inactive) side by side, times the weight laid out
        # (out, k³·in): one matmul instead of k³ small ones. Rows go in chunks so the gathered block stays bounded.
        w = self.conv.weight.to(f.dtype).reshape(self.out_channels, -1)
        fz = torch.cat([f, f.new_zeros(1, f.shape[1])])
        bias = None if self.conv.bias is None else self.conv.bias.to(f.dtype)
        step = max(1, GATHER_ELEMENTS // nmap.rows.shape[1] // f.shape[1])
        # index_select, not fz[rows]: its backward is an atomic index_add; advanced indexing sorts (~100x slower)
        gather = lambda rows: fz.index_select(0, rows.flatten()).view(len(rows), -1)
        out = [F.linear(gather(rows), w, bias) for rows in nmap.rows.split(step)]
        return x.replace(torch.cat(out) if len(out) > 1 else out[0])


# --- factor-2 down/upsampling ------------------------------------------------------------------------------------
@dataclass
class DownsampleMap:
    """What SparseDownsample computes and SparseUpsample needs (TRELLIS caches the same in the sparse tensor)."""
    fine_coords: torch.Tensor  # (N, 4) int32 pre-downsampling sites, original row order (the upsample's output)
    coords: torch.Tensor       # (M, 4) int32 unique (b, x//f, y//f, z//f), lexicographically sorted
    inverse: torch.Tensor      # (N,) int64 parent row of every input voxel
    counts: torch.Tensor       # (M,) int64 children per cell


def downsample_map(coords: torch.Tensor, factor: int = 2) -> DownsampleMap:
    def build(c):
        parent = torch.cat([c[:, :1], torch.div(c[:, 1:], factor, rounding_mode="floor")], 1)
        sites, inverse, counts = torch.unique(parent, dim=0, sorted=True, return_inverse=True, return_counts=True)
        return sites.to(torch.int32), inverse, counts   # not `c` itself: the cache must not keep its key alive
    # The coarse `coords` tensor is the cached object, so the coarse level's neighbour map is cached as well.
    return DownsampleMap(coords, *_cached(coords, ("down", factor), build))


def sparse_downsample(x: SparseVoxels, factor: int = 2) -> tuple[SparseVoxels, DownsampleMap]:
    """SparseDownsample: features = sum of the children / (children + 1). [TRAP, trellis §7] The official
    scatter_reduce('mean', include_self=True) onto zeros counts the zero as one more element; the released model
    was trained with it, so it is reproduced, not "fixed"."""
    m = downsample_map(x.coords, factor)
    f = x.feats
    pooled = f.new_zeros(len(m.coords), f.shape[1]).index_add(0, m.inverse, f)
    return SparseVoxels(m.coords, pooled / (m.counts + 1).to(f.dtype).unsqueeze(1)), m


def sparse_upsample(x: SparseVoxels, m: DownsampleMap) -> SparseVoxels:
    """SparseUpsample: back to the cached fine sites in their original row order; each voxel copies its parent."""
    if len(x.feats) != len(m.coords):
        raise ValueError(f"sparse_upsample: {len(x.feats)} rows, the map has {len(m.coords)} cells")
    return SparseVoxels(m.fine_coords, x.feats.index_select(0, m.inverse))
