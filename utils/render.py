"""Differentiable Gaussian rasterization: one `rasterize` function, two backends with the same conventions.

Conventions (shared by both backends, matching gsplat's antialiased mode and the published mip-splatting rasterizer):
- Cameras: OpenCV world->camera extrinsics and *normalised* intrinsics (utils/cameras.py); pixel (i, j) has its
  centre at (j + 0.5, i + 0.5) in pixel units.
- Projection: EWA splatting with the perspective Jacobian evaluated at the mean, its x/y clamped to 1.3x the field of
  view; Gaussians with camera depth outside [near, far] are culled.
- Low-pass: eps2d is added to the 2D covariance diagonal and opacity is multiplied by sqrt(det(Σ2D) / det(Σ2D + eps2d·I))
  (the "antialiased" compensation). The published model used eps2d = 0.1.
- Compositing: front to back in order of camera depth of the means; alpha = min(0.999, o·exp(-σ)); contributions with
  alpha < 1/255 are skipped; a pixel stops *before* the Gaussian that would drop its transmittance to <= 1e-4.
- Outputs: rgb = Σ w_i c_i + T·background; alpha = 1 - T; depth = Σ w_i z_i / max(alpha, 1e-10) (expected depth).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch.utils.checkpoint import checkpoint

from utils.cameras import intrinsics_to_pixels
from utils.gaussians import Gaussians

ALPHA_MIN = 1.0 / 255.0
ALPHA_MAX = 0.999
T_MIN = 1e-4


class RenderOutput(NamedTuple):
    rgb: torch.Tensor    # (..., V, H, W, 3)
    alpha: torch.Tensor  # (..., V, H, W, 1)
    depth: torch.Tensor  # (..., V, H, W, 1) expected camera-space z


def rasterize(
    gaussians: Gaussians,
    extrinsics: torch.Tensor,
    intrinsics: torch.Tensor,
    width: int,
    height: int,
    background: torch.Tensor | float | tuple | None = None,
    backend: str = "auto",
    eps2d: float = 0.1,
    near: float = 0.01,
    far: float = 1e10,
    tile_size: int | None = None,
) -> RenderOutput:
    """Render Gaussians batched over leading dims (frames, samples) from V cameras each.

    Args:
        gaussians: a `Gaussians` set of batch shape B (e.g. (), (T,), (B, T)) with N Gaussians each.
        extrinsics: (..., V, 4, 4) OpenCV world->camera; `...` broadcasts against B.
        intrinsics: (..., V, 3, 3) normalised (principal point ~0.5, focal 0.5/tan(fov/2)).
        width, height: image size in pixels.
        background: RGB composited behind the splats: None (black), a float, an RGB triple or a tensor
            broadcastable to (..., V, 3). The published training renders use white.
        backend: "gsplat" (CUDA), "torch" (any device) or "auto" (gsplat on CUDA when importable, else torch).
        eps2d: 2D low-pass added to the screen-space covariance (antialiased mode).
        near, far: camera-depth culling range.
        tile_size: tile edge in pixels; None picks each backend's fastest (gsplat 16, torch 8).
    Returns:
        RenderOutput(rgb (..., V, H, W, 3), alpha (..., V, H, W, 1), depth (..., V, H, W, 1)), differentiable in every
        Gaussian parameter (and in the cameras for the torch backend).
    """
    if extrinsics.shape[-2:] != (4, 4) or intrinsics.shape[-2:] != (3, 3) or extrinsics.shape[:-2] != intrinsics.shape[:-2]:
        raise ValueError(f"rasterize: expected extrinsics (..., V, 4, 4) and intrinsics (..., V, 3, 3) with equal leading dims, "
                         f"got {tuple(extrinsics.shape)} and {tuple(intrinsics.shape)}")
    batch = torch.broadcast_shapes(gaussians.batch_shape, extrinsics.shape[:-3])
    n, v = len(gaussians), extrinsics.shape[-3]
    dev, dtype = gaussians.xyz.device, gaussians.xyz.dtype

    flat = lambda t, c: t.expand(*batch, *t.shape[-2:]).reshape(-1, n, c)
    means, quats = flat(gaussians.xyz, 3), flat(gaussians.rotation, 4)
    scales, opacities, colors = flat(gaussians.scale, 3), flat(gaussians.opacity, 1)[..., 0], flat(gaussians.rgb, 3)
    viewmats = extrinsics.to(dev, dtype).expand(*batch, v, 4, 4).reshape(-1, v, 4, 4)
    ks = intrinsics_to_pixels(intrinsics.to(dev, dtype), width, height).expand(*batch, v, 3, 3).reshape(-1, v, 3, 3)

    if backend == "auto":
        backend = "gsplat" if dev.type == "cuda" and _gsplat_available() else "torch"
    if backend == "gsplat":
        tile_size = tile_size or 16
        rgb, alpha, depth = _rasterize_gsplat(means, quats, scales, opacities, colors, viewmats, ks, width, height, eps2d, near, far, tile_size)
    elif backend == "torch":
        tile_size = tile_size or 8
        rgb, alpha, depth = _rasterize_torch(means, quats, scales, opacities, colors, viewmats, ks, width, height, eps2d, near, far, tile_size)
    else:
        raise ValueError(f"rasterize: unknown backend {backend!r} (expected 'auto', 'gsplat' or 'torch')")

    if background is not None:
        bg = torch.as_tensor(background, dtype=rgb.dtype, device=rgb.device)
        bg = bg.expand(3) if bg.dim() == 0 else bg
        bg = bg.expand(*batch, v, 3).reshape(-1, v, 1, 1, 3)
        rgb = rgb + (1 - alpha) * bg
    shape = (*batch, v, height, width)
    return RenderOutput(rgb.reshape(*shape, 3), alpha.reshape(*shape, 1), depth.reshape(*shape, 1))


def _gsplat_available() -> bool:
    try:
        import gsplat  # noqa: F401
    except ImportError:
        return False
    return True


def _rasterize_gsplat(means, quats, scales, opacities, colors, viewmats, ks, width, height, eps2d, near, far, tile_size):
    import gsplat

    out, alpha, _ = gsplat.rasterization(
        means, quats, scales, opacities, colors, viewmats, ks, width, height, near_plane=near, far_plane=far,
        eps2d=eps2d, tile_size=tile_size, render_mode="RGB+ED", rasterize_mode="antialiased")
    return out[..., :3], alpha, out[..., 3:]


# --- torch backend --------------------------------------------------------------------------------

def _quat_to_rotmat(q: torch.Tensor) -> torch.Tensor:
    w, x, y, z = q.unbind(-1)
    rows = [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]
    return torch.stack(rows, -1).reshape(*q.shape[:-1], 3, 3)


def project(means, quats, scales, opacities, viewmats, ks, width, height, eps2d, near, far):
    """EWA projection of (B, N) Gaussians into (B, V) pixel-space cameras.

    Returns mean2d (B,V,N,2), conic (B,V,N,3) = (a, b, c) of the inverse blurred covariance [[a,b],[b,c]],
    opacity (B,V,N) after compensation, depth (B,V,N), radius (B,V,N,2) integer half-extents (0 = culled).
    """
    rot, trans = viewmats[..., :3, :3], viewmats[..., :3, 3]
    mean_c = torch.einsum("bvij,bnj->bvni", rot, means) + trans[:, :, None]
    m = _quat_to_rotmat(quats) * scales[..., None, :]                           # R·S, (B,N,3,3)
    cov_c = torch.einsum("bvij,bnjk,bnlk,bvml->bvnim", rot, m, m, rot)          # W R S Sᵀ Rᵀ Wᵀ
    x, y, z = mean_c.unbind(-1)
    fx, fy = ks[..., 0, 0, None], ks[..., 1, 1, None]
    cx, cy = ks[..., 0, 2, None], ks[..., 1, 2, None]
    # The Jacobian is evaluated at the mean clamped to 1.3x the field of view, which keeps off-screen splats bounded.
    lim_x = 0.3 * 0.5 * width / fx
    lim_y = 0.3 * 0.5 * height / fy
    tx = z * torch.minimum((width - cx) / fx + lim_x, torch.maximum(-(cx / fx + lim_x), x / z))
    ty = z * torch.minimum((height - cy) / fy + lim_y, torch.maximum(-(cy / fy + lim_y), y / z))
    zero = torch.zeros_like(z)
    jac = torch.stack([fx / z, zero, -fx * tx / z**2, zero, fy / z, -fy * ty / z**2], -1).reshape(*z.shape, 2, 3)
    cov2d = jac @ cov_c @ jac.transpose(-1, -2)
    a, b, c = cov2d[..., 0, 0], cov2d[..., 0, 1], cov2d[..., 1, 1]
    det_orig = a * c - b * b
    a, c = a + eps2d, c + eps2d
    det = a * c - b * b
    compensation = torch.sqrt((det_orig / det).clamp_min(0))
    opacity = opacities[:, None] * compensation
    det_safe = torch.where(det > 0, det, torch.ones_like(det))
    conic = torch.stack([c / det_safe, -b / det_safe, a / det_safe], -1)
    mean2d = torch.stack([fx * x / z + cx, fy * y / z + cy], -1)

    with torch.no_grad():
        # Opacity-aware extent: outside it alpha < 1/255 everywhere, so no contribution is lost. One pixel of margin
        # absorbs rounding.
        extend = torch.sqrt(2 * torch.log((opacity / ALPHA_MIN).clamp_min(1))).clamp_max(3.33)
        radius = torch.ceil(extend[..., None] * torch.sqrt(torch.stack([a, c], -1).clamp_min(0))) + 1
        visible = (z >= near) & (z <= far) & (det > 0) & (opacity >= ALPHA_MIN)
        visible &= (mean2d + radius > 0).all(-1) & (mean2d[..., 0] - radius[..., 0] < width) & (mean2d[..., 1] - radius[..., 1] < height)
        radius = torch.where(visible[..., None], radius, torch.zeros_like(radius))
    return mean2d, conic, opacity, z, radius


def _bin_tiles(mean2d, radius, depth, tiles_x, tiles_y, tile_size):
    """Pairs (image, tile, Gaussian) for every tile a visible Gaussian's box touches, sorted by image, tile, depth.

    Inputs are flattened over images: mean2d (C,N,2), radius (C,N,2), depth (C,N).
    Returns gaussian index (P,) into C*N, tile key (P,) = image * tiles + tile.
    """
    n = depth.shape[1]
    lo = torch.floor((mean2d - radius) / tile_size).clamp_min(0).long()
    hi = torch.ceil((mean2d + radius) / tile_size).long()
    hi = torch.stack([hi[..., 0].clamp_max(tiles_x), hi[..., 1].clamp_max(tiles_y)], -1)
    span = (hi - lo).clamp_min(0) * (radius > 0).all(-1, keepdim=True)
    count = (span[..., 0] * span[..., 1]).reshape(-1)
    # Visit Gaussians in depth order so that the stable sort by (image, tile) keeps each tile's list depth-sorted.
    order = torch.argsort(depth.reshape(-1), stable=True)
    gid = torch.repeat_interleave(order, count[order])
    first = torch.cumsum(count[order], 0) - count[order]
    local = torch.arange(gid.numel(), device=gid.device) - torch.repeat_interleave(first, count[order])
    w = span.reshape(-1, 2)[gid, 0]
    tx = lo.reshape(-1, 2)[gid, 0] + local % w
    ty = lo.reshape(-1, 2)[gid, 1] + local // w
    key = (gid // n) * (tiles_x * tiles_y) + ty * tiles_x + tx
    perm = torch.argsort(key, stable=True)
    return gid[perm], key[perm]


def _composite_tiles(mean2d, conic, opacity, feat, pix):
    """Front-to-back compositing of padded per-tile lists.

    mean2d (n,L,2) relative to each tile's origin, conic (n,L,3), opacity (n,L) (0 for padding),
    feat (n,L,F) per-Gaussian values to blend (colour, depth, 1), pix (P,2) pixel centres relative to the origin.
    Returns the blended values (n,P,F).
    """
    # σ = ½ dᵀ Σ⁻¹ d with d = mean - pixel, expanded as a quadratic in the pixel so one matmul evaluates every
    # (pixel, Gaussian) pair. Tile-local coordinates keep the cancellation small.
    (mx, my), (a, b, c) = mean2d.unbind(-1), conic.unbind(-1)
    coef = torch.stack([0.5 * a, 0.5 * c, b, -(a * mx + b * my), -(c * my + b * mx),
                        0.5 * a * mx * mx + 0.5 * c * my * my + b * mx * my], -2)           # (n,6,L)
    px, py = pix.unbind(-1)
    quad = torch.stack([px * px, py * py, px * py, px, py, torch.ones_like(px)], -1)     # (P,6)
    sigma = (quad @ coef).clamp_min(0)                                                     # (n,P,L)
    alpha = torch.clamp_max(opacity[:, None] * torch.exp(-sigma), ALPHA_MAX)
    alpha = alpha * (alpha >= ALPHA_MIN)
    one_minus = 1 - alpha
    trans_after = torch.cumprod(one_minus, -1)
    keep = trans_after > T_MIN  # non-increasing along L: the pixel stops before the first Gaussian failing it
    weight = alpha * (trans_after / one_minus) * keep   # one_minus >= 0.001, so the division is safe
    return weight @ feat


def _rasterize_torch(means, quats, scales, opacities, colors, viewmats, ks, width, height, eps2d, near, far, tile_size,
                     chunk_elements: int | None = None):
    b, v = viewmats.shape[:2]
    n = means.shape[1]
    mean2d, conic, opacity, depth, radius = project(means, quats, scales, opacities, viewmats, ks, width, height, eps2d, near, far)
    images = b * v
    tiles_x, tiles_y = math.ceil(width / tile_size), math.ceil(height / tile_size)
    num_tiles = tiles_x * tiles_y
    color = colors[:, None].expand(b, v, n, 3)
    # Everything a pair needs, in one row per Gaussian: mean (2), conic (3), opacity, colour (3), depth, 1 (for alpha).
    rows = torch.cat([mean2d, conic, opacity[..., None], color, depth[..., None], torch.ones_like(depth)[..., None]], -1)
    rows = rows.reshape(images * n, 11)

    with torch.no_grad():
        gid, key = _bin_tiles(mean2d.detach().reshape(images, n, 2), radius.reshape(images, n, 2), depth.detach().reshape(images, n),
                              tiles_x, tiles_y, tile_size)
        tiles, counts = torch.unique_consecutive(key, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        by_len = torch.argsort(counts)  # similar lengths share a chunk, so little padding
        ar = torch.arange(tile_size, device=means.device, dtype=means.dtype) + 0.5
        local = torch.stack(torch.meshgrid(ar, ar, indexing="xy"), -1).reshape(-1, 2)   # (P,2) as (x, y)
    pair_rows = rows[gid]
    p = tile_size * tile_size
    budget = chunk_elements or (1 << 25 if means.is_cuda else 1 << 22)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (means, quats, scales, opacities, colors, viewmats, ks))

    out_ids, out_vals = [], []
    i = 0
    counts_sorted = counts[by_len].tolist()
    while i < len(counts_sorted):
        j = i + 1
        longest = counts_sorted[i]
        while j < len(counts_sorted) and (j - i + 1) * counts_sorted[j] * p <= budget:
            longest = counts_sorted[j]
            j += 1
        sel = by_len[i:j]
        with torch.no_grad():
            slot = torch.arange(longest, device=means.device)
            valid = slot[None] < counts[sel][:, None]
            pair = (starts[sel][:, None] + slot[None])[valid]
            t = tiles[sel] % num_tiles
            origin = torch.stack([(t % tiles_x) * tile_size, (t // tiles_x) * tile_size], -1).to(means.dtype)
        # Padding is written by a masked assignment, not gathered: gathering every pad slot from one row would make the
        # backward pass accumulate millions of zeros into that row, which serialises on GPUs.
        padded = pair_rows.new_zeros(*valid.shape, 11).index_put((valid,), pair_rows[pair])
        args = (padded[..., 0:2] - origin[:, None], padded[..., 2:5], padded[..., 5], padded[..., 6:11], local)
        res = checkpoint(_composite_tiles, *args, use_reentrant=False) if grad else _composite_tiles(*args)
        out_ids.append(tiles[sel])
        out_vals.append(res)
        i = j

    buf = torch.zeros(images * num_tiles, p, 5, dtype=means.dtype, device=means.device)
    if out_ids:
        buf = buf.index_put((torch.cat(out_ids),), torch.cat(out_vals))
    img = buf.reshape(images, tiles_y, tiles_x, tile_size, tile_size, 5).permute(0, 1, 3, 2, 4, 5)
    img = img.reshape(images, tiles_y * tile_size, tiles_x * tile_size, 5)[:, :height, :width].reshape(b, v, height, width, 5)
    alpha = img[..., 4:5]  # Σ weights = 1 - final transmittance
    return img[..., :3], alpha, img[..., 3:4] / alpha.clamp_min(1e-10)
