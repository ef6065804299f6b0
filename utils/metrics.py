"""Image metrics for evaluation: PSNR, SSIM (the training loss's Gaussian-window SSIM) and LPIPS when its weights exist.

    m = ImageMetrics(lpips=load_lpips())            # or lpips=None
    scores = m(pred, gt)                            # (B, 3, H, W) in [0, 1] -> {"psnr": (B,), "ssim": (B,), ["lpips": (B,)]}
"""
from __future__ import annotations

import torch

from utils.losses import LPIPS, ssim


def psnr(pred: torch.Tensor, gt: torch.Tensor, max_value: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB of (B, C, H, W) images; identical images give +inf."""
    mse = (pred.float() - gt.float()).square().flatten(1).mean(1)
    return 10.0 * torch.log10(max_value ** 2 / mse)


class ImageMetrics:
    def __init__(self, lpips: LPIPS | None = None):
        self.lpips = lpips

    @torch.no_grad()
    def __call__(self, pred: torch.Tensor, gt: torch.Tensor) -> dict[str, torch.Tensor]:
        pred, gt = pred.float().clamp(0, 1), gt.float().clamp(0, 1)
        out = {"psnr": psnr(pred, gt), "ssim": ssim(pred, gt, reduction="none")}
        if self.lpips is not None:
            out["lpips"] = self.lpips.to(pred.device)(pred, gt).reshape(-1)
        return out
