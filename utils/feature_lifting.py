"""Voxel features lifted from multi-view image features (docs/published_system.md §1.4; the published code for this
step is missing).

Grid: ``resolution³`` voxels tiling the box [−0.5, 0.5]³ (world units, Z up, utils/cameras.py), voxel size
``1 / resolution``; voxel (i, j, k) covers ``[i, i+1]·s − 0.5`` along x (likewise y, z), centre
``(ijk + 0.5)·s − 0.5``; a point maps to ``floor((p + 0.5)·resolution)``.

Recipe: voxelise the frame mesh (:func:`voxelize_mesh`), render views and turn them into patch-feature maps
elsewhere (data_rendering/, utils/image_features.py ``patch_grid``), then :func:`lift_features` projects every
voxel centre into every view, samples the map bilinearly and averages over the views. Published recipe: about
150 Hammersley views at radius 2, FoV 40°, 512² renders with RGB premultiplied by alpha (black background), DINOv2
pre-norm patch tokens at 518² (a 37×37 grid), resolution 64.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from utils.cameras import project

_CANDIDATES_PER_CHUNK = 1 << 20  # triangle × voxel pairs tested at once in voxelize_mesh (≈ 0.2 GB of float64)


# ----------------------------------------------------------------------------------------------- grid
def voxel_centers(indices: torch.Tensor, resolution: int = 64) -> torch.Tensor:
    """indices (..., 3) integer → voxel centres (..., 3) float32, ``(ijk + 0.5) / resolution − 0.5``."""
    return (indices.to(torch.float32) + 0.5) / resolution - 0.5


def voxel_indices(points: torch.Tensor, resolution: int = 64) -> torch.Tensor:
    """points (..., 3) → the indices (..., 3) long of the voxels holding them (not clipped to the grid)."""
    return torch.floor((points + 0.5) * resolution).long()


# ----------------------------------------------------------------------------------------------- voxelisation
def voxelize_mesh(vertices: torch.Tensor, faces: torch.Tensor, resolution: int = 64) -> torch.Tensor:
    """The voxels of the [−0.5, 0.5]³ grid whose CLOSED box intersects the mesh surface, EXACTLY.

    vertices (V, 3) float, faces (F, 3) integer (triangles; triangulate polygons first). Each triangle is tested
    against the voxels of its bounding box with the separating-axis theorem (3 box normals, the triangle normal,
    9 edge × axis cross products), in float64 grid units. Closed boxes: a triangle that only touches a voxel face
    counts, so surfaces lying exactly on the grid border (a unit-box-normalised object) are kept. Voxels outside
    the grid are dropped. Returns indices (N, 3) long, unique, sorted by (i, j, k), on the vertices' device.
    """
    vertices, faces = torch.as_tensor(vertices), torch.as_tensor(faces)
    if vertices.ndim != 2 or vertices.shape[1] != 3 or not vertices.is_floating_point():
        raise ValueError(f"voxelize_mesh: vertices must be float (V, 3), got {vertices.dtype} {tuple(vertices.shape)}")
    if faces.ndim != 2 or faces.shape[1] != 3 or faces.is_floating_point():
        raise ValueError(f"voxelize_mesh: faces must be integer (F, 3) triangles, "
                         f"got {faces.dtype} {tuple(faces.shape)}")
    if faces.numel() and (faces.min() < 0 or faces.max() >= vertices.shape[0]):
        raise ValueError(f"voxelize_mesh: face indices must lie in [0, {vertices.shape[0]}), "
                         f"found [{faces.min().item()}, {faces.max().item()}]")
    if not torch.isfinite(vertices).all():
        raise ValueError("voxelize_mesh: vertices hold non-finite values")
    device, res = vertices.device, int(resolution)
    tri = (vertices.double()[faces.long()] + 0.5) * res            # (F, 3 corners, 3 xyz) in grid units
    # Candidate voxels: those whose closed box overlaps the triangle's bounding box (ceil − 1 keeps touching ones).
    lo = (torch.ceil(tri.min(dim=1).values) - 1).clamp(min=0).long()
    hi = torch.floor(tri.max(dim=1).values).clamp(max=res - 1).long()
    keep = (hi >= lo).all(dim=1)
    tri, lo, hi = tri[keep], lo[keep], hi[keep]
    extent = hi - lo + 1                                            # (F', 3)
    count = extent.prod(dim=1)
    keys = []
    ends = torch.cumsum(count, 0)
    start = 0
    while start < tri.shape[0]:
        # Chunk of triangles with at most _CANDIDATES_PER_CHUNK candidates (at least one triangle).
        base = ends[start - 1] if start else ends.new_zeros(())
        stop = max(int(torch.searchsorted(ends, base + _CANDIDATES_PER_CHUNK, right=True)), start + 1)
        keys.append(_hit_keys(tri[start:stop], lo[start:stop], extent[start:stop], count[start:stop], res))
        start = stop
    if not keys:
        return torch.zeros(0, 3, dtype=torch.long, device=device)
    key = torch.unique(torch.cat(keys))                             # sorted, so (i, j, k) lexicographic
    return torch.stack([key // (res * res), (key // res) % res, key % res], dim=1)


def _hit_keys(tri, lo, extent, count, res):
    """Linear keys (i·res + j)·res + k of the candidate voxels that a triangle of the chunk intersects."""
    owner = torch.repeat_interleave(torch.arange(tri.shape[0], device=tri.device), count)
    first = torch.repeat_interleave(torch.cumsum(count, 0) - count, count)   # each owner's first candidate
    offset = torch.arange(owner.shape[0], device=tri.device) - first
    ny, nz = extent[owner, 1], extent[owner, 2]
    ijk = lo[owner] + torch.stack([offset // (ny * nz), (offset // nz) % ny, offset % nz], dim=1)
    verts = tri[owner] - (ijk.double() + 0.5)[:, None]              # triangle relative to the voxel centre
    hit = _triangle_box_overlap(verts, half=0.5)
    ijk = ijk[hit]
    return (ijk[:, 0] * res + ijk[:, 1]) * res + ijk[:, 2]


def _triangle_box_overlap(verts: torch.Tensor, half: float) -> torch.Tensor:
    """verts (M, 3, 3) triangles relative to the centres of boxes of half-size ``half`` → (M,) bool overlap
    (closed sets). Separating-axis test; an axis separates when the projections' gap exceeds a tolerance."""
    tol = 1e-9
    v0, v1, v2 = verts.unbind(dim=1)
    edges = (v1 - v0, v2 - v1, v0 - v2)

    def separated(axis):                                            # axis (M, 3)
        p = torch.stack([(v * axis).sum(-1) for v in (v0, v1, v2)], dim=-1)
        r = half * axis.abs().sum(-1)
        return (p.min(-1).values > r + tol) | (p.max(-1).values < -r - tol)

    # Box face normals: the triangle's extent along x, y, z must overlap [−half, half].
    out = ((verts.amin(dim=1) <= half + tol) & (verts.amax(dim=1) >= -half - tol)).all(dim=-1)
    normal = torch.linalg.cross(edges[0], edges[1], dim=-1)
    out &= (v0 * normal).sum(-1).abs() <= half * normal.abs().sum(-1) + tol
    eye = torch.eye(3, dtype=verts.dtype, device=verts.device)
    for e in edges:
        for a in range(3):
            out &= ~separated(torch.linalg.cross(eye[a].expand_as(e), e, dim=-1))
    return out


# ----------------------------------------------------------------------------------------------- lifting
def lift_features(feature_maps: torch.Tensor, extrinsics: torch.Tensor, intrinsics: torch.Tensor,
                  indices: torch.Tensor, resolution: int = 64, voxel_chunk: int = 4096, view_chunk: int = 8,
                  return_counts: bool = False):
    """Average over views of the feature maps sampled at each voxel centre's projection.

    feature_maps (V, C, h, w): the map of view v; its pixel (r, c) is centred at normalised uv ((c+0.5)/w,
    (r+0.5)/h), e.g. ImageFeatureExtractor.patch_grid. extrinsics (V, 4, 4) OpenCV world→camera, intrinsics
    (V, 3, 3) normalised (utils/cameras.py); indices (N, 3) voxel indices at ``resolution``.
    Sampling: bilinear, ``grid_sample(align_corners=False)`` at grid = 2·uv − 1, border padding for the outer half
    pixel. A view counts for a voxel only if the centre is in front of the camera (depth > 0) and projects inside
    the image (uv ∈ [0, 1]²); the published recipe averaged the zeros of such views in, which darkens features at
    the frustum edges. A voxel no view sees gets zeros (count 0). No occlusion test, as published.
    Memory: one step holds view_chunk·C·voxel_chunk values (8·1024·4096 float32 = 128 MB) besides the output.
    Returns feats (N, C) float32 on the maps' device, and counts (N,) long if ``return_counts``.
    """
    if feature_maps.ndim != 4:
        raise ValueError(f"lift_features: feature_maps must be (V, C, h, w), got {tuple(feature_maps.shape)}")
    V, C = feature_maps.shape[:2]
    if extrinsics.shape != (V, 4, 4) or intrinsics.shape != (V, 3, 3):
        raise ValueError(f"lift_features: need extrinsics (V={V}, 4, 4) and intrinsics (V, 3, 3), "
                         f"got {tuple(extrinsics.shape)} and {tuple(intrinsics.shape)}")
    if indices.ndim != 2 or indices.shape[1] != 3:
        raise ValueError(f"lift_features: indices must be (N, 3), got {tuple(indices.shape)}")
    device = feature_maps.device
    extrinsics = extrinsics.to(device, torch.float32)
    intrinsics = intrinsics.to(device, torch.float32)
    centers = voxel_centers(indices.to(device), resolution)
    feats = torch.zeros(indices.shape[0], C, dtype=torch.float32, device=device)
    counts = torch.zeros(indices.shape[0], dtype=torch.long, device=device)
    for s in range(0, indices.shape[0], voxel_chunk):
        uv, depth = project(centers[s:s + voxel_chunk], extrinsics, intrinsics)   # (V, n, 2), (V, n)
        valid = (depth > 0) & ((uv >= 0) & (uv <= 1)).all(dim=-1)
        # Invalid entries get a harmless grid point: uv of points behind the camera can be inf / nan.
        grid = torch.where(valid[..., None], 2 * uv - 1, torch.zeros_like(uv)).to(feature_maps.dtype)
        acc = torch.zeros(C, uv.shape[1], dtype=torch.float32, device=device)   # (C, n): no transposes in the loop
        for g in range(0, V, view_chunk):
            sampled = F.grid_sample(feature_maps[g:g + view_chunk], grid[g:g + view_chunk, None], mode="bilinear",
                                    padding_mode="border", align_corners=False)[:, :, 0]   # (k, C, n)
            acc += (sampled.float() * valid[g:g + view_chunk, None]).sum(dim=0)
        n_views = valid.sum(dim=0)
        feats[s:s + voxel_chunk] = (acc / n_views.clamp(min=1)).t()
        counts[s:s + voxel_chunk] = n_views
    return (feats, counts) if return_counts else feats
