"""Scoring an animation of a prepared sample against its ground truth: the held-out renders (every view but the
conditioning one) and the oracle motion (the true mesh motion interpolated at the Gaussians).

    views = held_out_views(sample, num_frames, device)                      # read once, scored any number of times
    summary["metrics"] = ground_truth_metrics(views, canonical, delta, ImageMetrics(...))
    scores, strips = score_rows(views, canonical, {"generated": d1, "still": d2}, metrics)   # scripts/evaluate.py

Speed: each row is rasterized in one call over all its frames, a row that does not move once per distinct camera set,
and each row's images are scored in one batch. On the CPU the torch rasterizer runs with 4-pixel tiles (RENDER_TILE):
about twice as fast as its default 8 at 64² (2 is slower again), and the same images up to the splat tails that its
3.33σ cut-off leaves to the tile size (within 1e-3 dB of one call per view at the default tile, tests/test_evaluate.py).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from datasets import layout
from datasets.condition import COND_VIEW
from datasets.vae_dataset import VAEDataset
from utils.cameras import load_blender_camera
from utils.gaussians import Gaussians
from utils.images import composite, load_rgba
from utils.metrics import ImageMetrics
from utils.pointcloud import interpolate_displacements
from utils.render import rasterize

RENDER_TILE = 4  # torch-rasterizer tile on the CPU (module docstring); None: the backend's default


def held_out_views(sample: Path, num_frames: int, device) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per frame, the ground truth of the views not given to the model (all but COND_VIEW): images (V, 3, H, W) on
    white, extrinsics (V, 4, 4), intrinsics (V, 3, 3). Read once, scored against any number of animations."""
    out = []
    for i in range(num_frames):
        held_out = [v for v in range(layout.count_views(sample, i)) if v != COND_VIEW]
        if not held_out:
            raise ValueError(f"{sample}: frame {i} has no view other than the conditioning view")
        gts, exts, ks = [], [], []
        for v in held_out:
            rgb, alpha = load_rgba(layout.image_path(sample, i, v))
            gts.append(composite(rgb, alpha, 1.0, blur=False))
            e, k = load_blender_camera(layout.camera_path(sample, i, v), rgb.shape[2], rgb.shape[1])
            exts.append(e), ks.append(k)
        out.append((torch.stack(gts).to(device), torch.stack(exts).to(device), torch.stack(ks).to(device)))
    return out


def mesh_motion(sample: Path, num_frames: int, num_points: int, extractor: str) -> dict:
    """A prepared sample's mesh points as the motion VAE trains on them (datasets/vae_dataset.py): static_pc (P, 3) at
    frame 0 and deltas (T, P, 3) from it. Drawn as for a dataset of this one object (index 0), so that evaluate.py
    and summary.json use the same points whatever list the object comes from."""
    return VAEDataset(sample.parent, [sample.name], num_points=num_points, num_timesteps=num_frames,
                      sample_timesteps=num_frames, train=False, extractor=extractor, images=False).load(0)


@torch.no_grad()
def oracle_delta_xyz(canonical_xyz: torch.Tensor, static_pc: torch.Tensor, deltas: torch.Tensor,
                     motion_vae) -> torch.Tensor:
    """The oracle Δxyz (T, N, 3) of canonical Gaussians at `canonical_xyz` (N, 3): the true mesh displacements
    interpolated at each centre by the mesh-guided KNN, exactly the motion VAE's xyz training target
    (utils/losses.mesh_guided_xyz_loss, with the VAE's k and beta)."""
    static_pc, deltas = static_pc.to(canonical_xyz), deltas.to(canonical_xyz)
    return interpolate_displacements(canonical_xyz[None], static_pc[None], (static_pc + deltas)[None],
                                     k=motion_vae.knn_k, beta=motion_vae.beta)[0]


def frames_covered(num_frames: int, after_first: bool) -> str:
    """How a mean over frames names the frames it covers, in summary.json, the printed line and scripts/evaluate.py
    alike: the same object's numbers compare only over the same frames (frame 0 is the canonical, already seen)."""
    if num_frames == 1:
        return "frame 0 (the only one)"
    return f"frames 1..{num_frames - 1} (after the first)" if after_first else f"all frames 0..{num_frames - 1}"


def render_frames(canonical: Gaussians, delta: torch.Tensor, views, frames: list[int],
                  tile: int | None) -> list[torch.Tensor]:
    """canonical + delta at `frames`, each from its frame's held-out cameras on white: (V, 3, H, W) per frame, in one
    rasterize call when every frame has the same number and size of views (else one call per frame)."""
    if len({tuple(views[t][0].shape) for t in frames}) == 1:
        size = views[frames[0]][0].shape[-1]
        ext, K = torch.stack([views[t][1] for t in frames]), torch.stack([views[t][2] for t in frames])
        rgb = rasterize(canonical.apply_delta(delta[frames]), ext, K, size, size, background=1.0, tile_size=tile).rgb
        return list(rgb.movedim(-1, -3).unbind(0))
    return [rasterize(canonical.apply_delta(delta[[t]]), views[t][1][None], views[t][2][None], views[t][0].shape[-1],
                      views[t][0].shape[-1], background=1.0, tile_size=tile).rgb[0].movedim(-1, -3) for t in frames]


@torch.no_grad()
def score_rows(views, canonical: Gaussians, deltas: dict[str, torch.Tensor], metrics: ImageMetrics,
               keep: list[int] = (), keep_view: int = 0, first_for: tuple[str, ...] = ("still",)) -> tuple[dict, dict]:
    """PSNR / SSIM (/ LPIPS) of several animations ("rows": {name: Δ (T, N, 14)}) of one canonical against the
    held-out `views`, batched (module docstring, Speed).

    Per row: "mean_after_first" (the means over the frames after the first, or over the only frame) and "per_frame"
    {t: metrics} of the frames rendered: those, and frame 0 for the rows named in `first_for`. A row that does not
    move (Δ all zero) is rendered once per distinct camera set and scored against every frame's ground truth. Also the
    renders of view `keep_view` at the frames `keep` per row: {row: [(3, H, W)]}."""
    later = list(range(1, len(views))) or [0]
    tile = RENDER_TILE if canonical.xyz.device.type == "cpu" else None
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(views[a][1:], views[b][1:])) and \
        views[a][0].shape == views[b][0].shape
    scores, kept = {}, {}
    for row, delta in deltas.items():
        frames = ([0] if row in first_for and 0 not in later else []) + later
        source = {t: t for t in frames}
        if not bool(delta.any()):  # a still row: frames seen by the same cameras see the same image
            for i, t in enumerate(frames):
                source[t] = next((u for u in frames[:i] if source[u] == u and same(u, t)), t)
        drawn = sorted(set(source.values()))
        images = dict(zip(drawn, render_frames(canonical, delta.float(), views, drawn, tile)))
        pred = torch.cat([images[source[t]] for t in frames])
        gt = torch.cat([views[t][0] for t in frames])
        values = {k: v.split([len(views[t][0]) for t in frames]) for k, v in metrics(pred, gt).items()}
        per_frame = {t: {k: float(v[i].mean()) for k, v in values.items()} for i, t in enumerate(frames)}
        keys = per_frame[later[0]].keys()
        scores[row] = {"per_frame": per_frame,
                       "mean_after_first": {k: float(np.mean([per_frame[t][k] for t in later])) for k in keys}}
        kept[row] = [images[source[t]][keep_view] for t in keep]
    return scores, kept


def ground_truth_metrics(views, canonical: Gaussians, delta: torch.Tensor, metrics: ImageMetrics) -> dict:
    """One animation's scores for summary.json: per frame, the mean over the held-out `views` of PSNR / SSIM
    (/ LPIPS); their means over all frames ("mean") and over the frames after the first ("mean_after_first", the frames
    scripts/evaluate.py reports), each named in "frames_covered"."""
    scores, _ = score_rows(views, canonical, {"result": delta}, metrics, first_for=("result",))
    per_frame = [scores["result"]["per_frame"][t] for t in range(len(views))]
    keys = per_frame[0].keys()
    return {"per_frame": per_frame, "mean": {k: float(np.mean([f[k] for f in per_frame])) for k in keys},
            "mean_after_first": scores["result"]["mean_after_first"],
            "frames_covered": {"mean": frames_covered(len(per_frame), False),
                               "mean_after_first": frames_covered(len(per_frame), True)},
            "views_per_frame": len(views[-1][0])}
