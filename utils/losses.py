"""Training losses. The image losses (L1, SSIM, LPIPS) arrive with the trainers; this holds the motion VAE's geometry loss."""
from __future__ import annotations

import torch

from utils.pointcloud import interpolate_displacements


def mesh_guided_xyz_loss(pred_delta: torch.Tensor, gaussians_xyz: torch.Tensor, lengths: torch.Tensor,
                         static_pc: torch.Tensor, moving_pc: torch.Tensor, k: int = 8, beta: float = 7.0):
    """Masked L1 between the predicted xyz variation and the mesh displacement interpolated at every canonical Gaussian
    (spec §4.1 phase 2, step 4; L1 as published, although the paper's text says L2).

    pred_delta (B, T, Q, 14) in the Δ layout; gaussians_xyz (B, Q, 3) padded canonical positions with `lengths` (B,) valid
    rows; static_pc (B, N, 3), moving_pc (B, T, N, 3). Returns (loss, target (B, T, Q, 3), zero on padding); the loss is
    averaged over the valid Gaussians of the whole batch, the 3 axes and the T frames.
    """
    with torch.no_grad():
        target = interpolate_displacements(gaussians_xyz, static_pc, moving_pc, k, beta, anchor_lengths=lengths)
    valid = (torch.arange(gaussians_xyz.shape[1], device=lengths.device) < lengths[:, None])[:, None, :, None]
    err = (pred_delta[..., :3] - target).abs() * valid
    return err.sum() / (valid.sum() * 3 * pred_delta.shape[1]), target
