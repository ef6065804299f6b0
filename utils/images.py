"""Image and voxel helpers shared by training data and inference: RGBA PNG loading, compositing on a background with
the published 3×3 alpha blur, and pooling voxel features onto a coarser grid (docs/published_system.md §1.1, §1.2)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def load_rgba(path: Path, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RGBA PNG -> rgb (3, H, W), alpha (1, H, W) in [0, 1], optionally resized to size x size."""
    img = Image.open(path)
    if img.mode != "RGBA":
        raise ValueError(f"{path}: expected an RGBA image, got mode {img.mode}")
    if size and img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return x[:3], x[3:]


def composite(rgb: torch.Tensor, alpha: torch.Tensor, background: float = 1.0, blur: bool = True) -> torch.Tensor:
    """rgb·a + background·(1 - a) with a 3×3 Gaussian blur of a ([1, 2, 1]/4 per axis, reflected borders), as published."""
    if blur:
        k = torch.tensor([0.25, 0.5, 0.25])
        kernel = (k[:, None] * k[None, :])[None, None]
        alpha = F.conv2d(F.pad(alpha[None], (1, 1, 1, 1), mode="reflect"), kernel)[0]
    return rgb * alpha + background * (1 - alpha)


def pool_voxels(coords: torch.Tensor, feats: torch.Tensor, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Coarsen voxel coords by an integer factor, averaging the features of merged voxels (published §1.1, load_feature)."""
    if factor == 1:
        return coords, feats
    coarse, inverse = torch.unique(torch.div(coords, factor, rounding_mode="floor"), dim=0, return_inverse=True)
    summed = torch.zeros(len(coarse), feats.shape[1]).index_add_(0, inverse, feats)
    counts = torch.bincount(inverse, minlength=len(coarse)).clamp_min(1)[:, None]
    return coarse.to(coords.dtype), summed / counts
