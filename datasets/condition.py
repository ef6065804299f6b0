"""The DiT condition of one object (docs/published_system.md §1.6, §1.7, §10.7), built here for training and inference
alike.

The DiT (models/dit.py) takes, besides the noisy latents and the time, three condition tensors, the dict that
`dit_condition` returns:
- cond_images (T, L, C): the image tokens of view COND_VIEW of each frame composited on COND_BACKGROUND
  (`condition_frames`, then the image extractor);
- static_latent (S, 14): S canonical Gaussians in the condition layout, sampled by FPS (`fps_gaussians`, S =
  data.num_static_cond), normalised per channel by static_mean / static_std;
- deformation_position_xyz (N, 3): the xyz of the N FPS anchors of the motion latents (N = motion_vae.num_latents),
  normalised by the xyz part of the same static statistics when the DiT is trained so (data.normalize_position_xyz).

Training: encode_latent.py stores the static set (`fps_gaussians`), the anchors MotionVAE.encode sampled (the same
FPS from the first Gaussian) and the tokens (`condition_frames`); datasets/latent_dataset.py normalises them with
`dit_condition`. Inference: pipeline/animate.MotionStage samples both sets from the canonical with `fps_gaussians` and
normalises them with `dit_condition`; pipeline/video_to_4d.py makes a prepared sample's tokens from
`condition_frames` and takes a video as seen by `condition_camera`. One definition of each step is what keeps the DiT's inputs at inference those it was trained on.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from datasets import layout
from utils.cameras import BLENDER_DEFAULT_FOV, intrinsics_from_fov, published_views
from utils.images import composite, load_rgba
from utils.pointcloud import farthest_point_sample, gather_points

COND_VIEW = 0          # the front view of the renders is the video (published §1.7)
COND_BACKGROUND = 0.0  # black, as the published training features (published §1.7, §10.5)
CONDITION_KEYS = ("cond_images", "static_latent", "deformation_position_xyz")  # DiT.forward's condition arguments


def condition_camera(device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """View COND_VIEW's camera, extrinsics (4, 4) and intrinsics (3, 3): the camera a video is assumed to come from
    (published §1.9), since the DiT only ever saw the renders of that view."""
    ext, _ = published_views(COND_VIEW + 1)
    return ext[COND_VIEW].to(device), intrinsics_from_fov(torch.tensor(BLENDER_DEFAULT_FOV)).to(device)


def condition_frames(sample_root: Path, num_frames: int, *, data_root: Path | None = None) -> torch.Tensor:
    """The images the extractor turns into a prepared sample's tokens: view COND_VIEW of frames 0..num_frames-1
    composited on COND_BACKGROUND without the VAE's alpha blur, (T, 3, H, W) in [0, 1]. `data_root` confines the
    reads to it (datasets/layout.py)."""
    images = []
    for t in range(num_frames):
        rgb, alpha = load_rgba(layout.image_path(sample_root, t, COND_VIEW, data_root=data_root))
        images.append(composite(rgb, alpha, COND_BACKGROUND, blur=False))
    return torch.stack(images)


def fps_gaussians(gaussians: torch.Tensor, *counts: int,
                  graph: bool = False) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """`count` of the Gaussians (B, N, 14) by farthest point sampling of their xyz, started at the first Gaussian as
    MotionVAE.encode starts its anchors: (B, count, 14), one tensor per count. Deterministic, so a canonical gives the
    same sets whenever they are sampled. Several counts share one FPS run: FPS is greedy, so the first k picks of a
    longer run are the k-pick run itself (inference needs the 512 anchors and the 4096 static set: one run of 4096).
    `graph`: on a CUDA GPU, one set, pick with utils/fps_cuda.py (the same picks as one CUDA graph, milliseconds
    instead of the reference loop's launch-bound 0.3 s at 160k Gaussians)."""
    picks = None
    if graph and gaussians.is_cuda and gaussians.shape[0] == 1:  # inference: one set, the same picks in one graph
        try:
            from utils.fps_cuda import farthest_point_sample_cuda
            picks = farthest_point_sample_cuda(gaussians[0, :, :3], max(counts))[None]
        except ImportError:  # no Triton: the reference loop
            pass
    if picks is None:
        picks = farthest_point_sample(gaussians[..., :3], max(counts))
    sets = tuple(gather_points(gaussians, picks[:, :c]) for c in counts)
    return sets if len(sets) > 1 else sets[0]


def dit_condition(static_gaussians: torch.Tensor, anchors: torch.Tensor, tokens: torch.Tensor,
                  stats: Mapping[str, torch.Tensor], normalize_position_xyz: bool = True) -> dict[str, torch.Tensor]:
    """The condition tensors the DiT receives for one object: static_gaussians (..., S, 14) the FPS static set,
    anchors (..., N, >=3) the FPS anchors (only their xyz is used), tokens (..., T, L, C) the image tokens, all with
    the same leading dims (none in the dataset, the batch of one at inference); stats holds static_mean and
    static_std (14,) (datasets/latent_dataset.load_latent_stats). The Gaussians are computed on in float32; the
    tokens are passed through as given (the dataset keeps them float16 for the loader, the trainer casts them)."""
    mean, std = stats["static_mean"], stats["static_std"]
    xyz = anchors[..., :3].float()
    if normalize_position_xyz:  # published §10.7: the token positions share the static statistics' xyz part
        xyz = (xyz - mean[..., :3]) / std[..., :3]
    return {"cond_images": tokens,
            "static_latent": (static_gaussians.float() - mean) / std,
            "deformation_position_xyz": xyz}
