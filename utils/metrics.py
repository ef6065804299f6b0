"""Evaluation metrics: PSNR, SSIM (the training loss's Gaussian-window SSIM) and LPIPS when its weights exist, and the
motion statistics of a predicted Δxyz against the oracle one (what PSNR cannot see: a still object often scores well).

    m = ImageMetrics(lpips=load_lpips())            # or lpips=None
    scores = m(pred, gt)                            # (B, 3, H, W) in [0, 1] -> {"psnr": (B,), "ssim": (B,), ["lpips": (B,)]}
    motion = motion_statistics(delta[..., :3], oracle)  # (T, N, 3) each -> {"epe": ..., "displacement": ...}
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


def motion_statistics(pred: torch.Tensor, oracle: torch.Tensor | None = None) -> dict:
    """Motion of the predicted Δxyz `pred` (T, N, 3) against the `oracle` Δxyz (T, N, 3), in float64.

    Means run over the Gaussians and the frames after the first (frame 0 is the canonical: the oracle does not move
    there), or over the only frame when T = 1, as ground_truth_metrics does for the images. Returns
    - displacement_per_frame: mean |pred_t| for every frame t, frame 0 included;
    - displacement: mean |pred|;
    with an oracle also
    - true_displacement: mean |oracle|;
    - epe: mean end-point error |pred - oracle| (a still prediction scores exactly true_displacement);
    - ratio: displacement / true_displacement (None when the oracle does not move);
    - cosine: the cosine between pred and oracle vectors averaged with weights |oracle|, i.e. sum |o| cos / sum |o|.
      Weighting rather than a threshold needs no length scale, and Gaussians that barely move, whose direction is
      noise, count as little as they move. A zero prediction has cosine 0 (no direction is no agreement).
      None when the oracle does not move.
    """
    if pred.dim() != 3 or pred.shape[-1] != 3 or (oracle is not None and oracle.shape != pred.shape):
        raise ValueError(f"motion_statistics: expected (T, N, 3) Δxyz of one shape, got {tuple(pred.shape)} and "
                         f"{None if oracle is None else tuple(oracle.shape)}")
    p = pred.detach().double()
    later = slice(1, None) if len(p) > 1 else slice(None)
    norm_p = p.norm(dim=-1)                                                      # (T, N)
    out = {"displacement_per_frame": norm_p.mean(1).tolist(), "displacement": float(norm_p[later].mean())}
    if oracle is None:
        return out
    o = oracle.detach().double().to(p.device)
    norm_o = o.norm(dim=-1)[later]
    true = float(norm_o.mean())
    # |o| cos(p, o) = p·o / |p|, taken as 0 where p = 0 (the clamp only keeps the unused branch finite)
    weighted_cos = torch.where(norm_p[later] > 0, (p * o)[later].sum(-1) / norm_p[later].clamp_min(1e-300), 0.0)
    out.update(true_displacement=true, epe=float((p - o).norm(dim=-1)[later].mean()),
               ratio=out["displacement"] / true if true > 0 else None,
               cosine=float(weighted_cos.sum() / norm_o.sum()) if true > 0 else None)
    return out
