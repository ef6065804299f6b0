"""Aligning a canonical Gaussian set to the first video frame: azimuth about world Z and apparent scale, from one
batched pass of silhouette renders (the published code rendered and saved 360 PNGs and scored them with CLIP,
docs/published_system.md §6.4 step 2).

    a = align_to_silhouette(canonical, alpha0, extrinsics, intrinsics)   # alpha0 (H, W) in [0, 1]
    canonical = rotate_z(canonical, -a.azimuth)                           # now seen from that camera as in the frame

Each candidate azimuth renders the canonical turned by that angle. The render's silhouette is mapped onto the frame's
by the similarity (scale and shift) that matches their bounding boxes, and the candidates are ranked by IoU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from utils.gaussians import Gaussians
from utils.render import rasterize


@dataclass
class Alignment:
    azimuth: float          # degrees: the canonical turned by +azimuth about Z matches the frame
    scale: float            # frame bbox side / render bbox side (> 1: the object looks larger in the frame)
    iou: float              # silhouette IoU at the best azimuth after the similarity
    scores: torch.Tensor    # IoU of every candidate azimuth


def rotation_z(degrees: float, dtype=torch.float32, device=None) -> torch.Tensor:
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    return torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], dtype=dtype, device=device)


def _quat_multiply(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Hamilton product of wxyz quaternions."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack([aw * bw - ax * bx - ay * by - az * bz, aw * bx + ax * bw + ay * bz - az * by,
                        aw * by - ax * bz + ay * bw + az * bx, aw * bz + ax * by - ay * bx + az * bw], -1)


def rotate_z(g: Gaussians, degrees: float) -> Gaussians:
    """The set turned by `degrees` about world Z through the origin (positions and orientations)."""
    R = rotation_z(degrees, g.xyz.dtype, g.xyz.device)
    half = math.radians(degrees) / 2
    q = g.quat.new_tensor([math.cos(half), 0.0, 0.0, math.sin(half)])
    return Gaussians(g.xyz @ R.T, g.f_dc, g.opacity_logit, g.scale_pre, _quat_multiply(q.expand_as(g.quat), g.quat))


def _boxes(alpha: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """(V, H, W) -> (V, 4) x0, y0, x1, y1 in pixels (exclusive ends) of alpha > threshold; NaN when empty."""
    mask = alpha > threshold
    v, h, w = mask.shape
    out = torch.full((v, 4), float("nan"), device=alpha.device)
    rows, cols = mask.any(2), mask.any(1)
    for i in range(v):
        if rows[i].any():
            ys, xs = rows[i].nonzero()[:, 0], cols[i].nonzero()[:, 0]
            out[i] = torch.stack([xs[0], ys[0], xs[-1] + 1, ys[-1] + 1]).float()
    return out


@torch.no_grad()
def align_to_silhouette(canonical: Gaussians, target_alpha: torch.Tensor, extrinsics: torch.Tensor,
                        intrinsics: torch.Tensor, num_azimuths: int = 72, size: int = 128) -> Alignment:
    """Best azimuth (multiple of 360/num_azimuths) and scale for the camera (extrinsics (4, 4), intrinsics (3, 3))
    that took the frame whose silhouette is `target_alpha` (H, W). Raises ValueError when the frame or every
    render is empty."""
    dev = canonical.xyz.device
    target = F.interpolate(target_alpha[None, None].float().to(dev), size=(size, size), mode="area")[0, 0]
    tbox = _boxes(target[None])[0]
    if torch.isnan(tbox).any():
        raise ValueError("the first frame has no foreground to align to")
    azimuths = torch.arange(num_azimuths, dtype=torch.float32) * (360.0 / num_azimuths)
    # Turning the object by +a equals viewing the unturned object from the camera turned by -a: E · Rz(a).
    turns = torch.eye(4, device=dev).repeat(num_azimuths, 1, 1)
    turns[:, :3, :3] = torch.stack([rotation_z(float(a), device=dev) for a in azimuths])
    cams = extrinsics.to(dev).float() @ turns
    alpha = rasterize(canonical.map(lambda t: t.float()), cams, intrinsics.to(dev).float().expand(num_azimuths, 3, 3),
                      size, size).alpha[..., 0]                                                   # (V, S, S)
    boxes = _boxes(alpha)
    side = lambda b: torch.maximum(b[..., 2] - b[..., 0], b[..., 3] - b[..., 1])
    centre = lambda b: torch.stack([(b[..., 0] + b[..., 2]) / 2, (b[..., 1] + b[..., 3]) / 2], -1)
    ratio = side(boxes) / side(tbox)                                                  # render px per target px
    # Sample each render at the target's pixel centres mapped through the box similarity; grid_sample coordinates
    # are in [-1, 1] with align_corners=False: x_norm = (2 x + 1) / S - 1 for pixel index x, i.e. 2 p / S - 1 for
    # continuous pixel position p.
    p = (torch.arange(size, device=dev, dtype=torch.float32) + 0.5)
    ty, tx = torch.meshgrid(p, p, indexing="ij")
    src = (torch.stack([tx, ty], -1)[None] - centre(tbox)) * ratio[:, None, None, None] + centre(boxes)[:, None, None]
    grid = torch.nan_to_num(2 * src / size - 1, nan=-2.0)                             # empty renders sample nothing
    warped = F.grid_sample(alpha[:, None], grid, align_corners=False, padding_mode="zeros")[:, 0]
    inter = torch.minimum(warped, target).sum((1, 2))
    union = torch.maximum(warped, target).sum((1, 2))
    iou = torch.where(torch.isnan(ratio), torch.zeros_like(inter), inter / union.clamp_min(1e-9))
    best = int(iou.argmax())
    if float(iou[best]) == 0.0:
        raise ValueError("the canonical Gaussians render empty from every azimuth: check their position and scale")
    return Alignment(float(azimuths[best]), float(1.0 / ratio[best]), float(iou[best]), iou.cpu())
