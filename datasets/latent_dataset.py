"""The diffusion training dataset (docs/published_system.md §1.6): per-object motion-latent posteriors, the
canonical-Gaussian condition and the per-frame image tokens, normalised with the four statistics files.

Per item: a fresh latent draw mean + std·ε over T frames chosen from the clip (sorted; all of them when T equals the clip
length), or the posterior mean itself with `posterior_draws=False` (see compute_latent_stats for why),
x = (latent - deformation_mean) / deformation_std, static = (fps_4096 - static_mean) / static_std, token
positions = the 512 anchors' xyz normalised by the static statistics' xyz part (published §10.7), and the matching frames'
image tokens; the condition is built by datasets/condition.dit_condition, which inference calls too. With probability
`uncond_p` all image tokens of the item are zeroed (classifier-free guidance dropout); the static condition is never
dropped. Randomness comes from (seed, epoch, index), as in the VAE dataset.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from datasets import layout
from datasets.condition import dit_condition
from utils.checkpoint import safe_load


def load_latent_stats(stats_dir) -> dict[str, torch.Tensor]:
    """The four normalisation tensors; a missing file is an error naming it (compute them with encode_latent.py)."""
    out = {}
    for which in layout.LATENT_STATS:
        path = layout.latent_stats_path(stats_dir, which)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: latent statistics not found; encode_latent.py writes them")
        out[which] = safe_load(path).float()
    return out


def compute_latent_stats(data_root, names: list[str], posterior_draws: bool = True) -> dict[str, torch.Tensor]:
    """The four normalisation tensors from encoded latents (published §7: not downloadable, so computed here).

    deformation_{mean,std} (C,): per channel, over all objects, frames and tokens, of the latents the DiT trains on.
    Draws mean + std·ε (published, `posterior_draws`): their moments are exact from the stored posteriors
    (E[x] = E[μ], E[x²] = E[μ² + σ²]), no sampling needed. Posterior means (`posterior_draws=False`): E[μ²] only.
    Why the choice matters: with the published KL weight (1e-6) channels the decoder ignores keep σ of 5-12 while the
    informative ones spread μ by about 1, so the draws' std, and the DiT's target, is mostly posterior noise
    (docs/training_notes.md). static_{mean,std} (14,): per channel of fps_sampled_gs_4096. Accumulated in float64.
    """
    if not names:
        raise ValueError(f"compute_latent_stats: no latents to compute statistics from under {data_root}")
    acc = {"deformation": [0, 0.0, 0.0], "static": [0, 0.0, 0.0]}  # count, sum, sum of squares

    def add(key, x, x2):
        a = acc[key]
        a[0] += x.shape[0]
        a[1] = a[1] + x.sum(0)
        a[2] = a[2] + x2.sum(0)

    for name in names:
        path = layout.latent_path(data_root, name)
        latent = safe_load(path)
        mu, sd = latent["latent_mean"].double(), latent["latent_std"].double()
        second = mu * mu + sd * sd if posterior_draws else mu * mu
        add("deformation", mu.reshape(-1, mu.shape[-1]), second.reshape(-1, mu.shape[-1]))
        gs = latent["fps_sampled_gs_4096"].double()
        add("static", gs, gs * gs)
    out = {}
    for key, (n, total, squares) in acc.items():
        mean = total / n
        var = (squares / n - mean * mean).clamp_min(0)
        out[f"{key}_mean"], out[f"{key}_std"] = mean.float(), var.sqrt().clamp_min(1e-6).float()
    return out


class LatentDataset(Dataset):
    def __init__(self, data_root, names: list[str], stats: dict[str, torch.Tensor], *, num_frames: int = 24,
                 extractor: str = layout.DEFAULT_EXTRACTOR, uncond_p: float = 0.1, normalize_position_xyz: bool = True,
                 posterior_draws: bool = True, train: bool = True, seed: int = 0):
        if not names:
            raise ValueError(f"LatentDataset: no samples under {data_root}")
        self.data_root, self.names, self.stats = Path(data_root), list(names), stats
        for name in self.names:
            layout.resolve_sample(self.data_root, name)
        self.num_frames, self.extractor, self.uncond_p = num_frames, extractor, uncond_p
        self.normalize_position_xyz, self.train, self.seed = normalize_position_xyz, train, seed
        self.posterior_draws = posterior_draws
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict:
        name = self.names[index]
        path = layout.latent_path(self.data_root, name)
        latent = safe_load(path)
        mean, std = latent["latent_mean"].float(), latent["latent_std"].float()
        # float16 as stored: half the bytes through the loader workers; the trainer casts on the device
        tokens = layout.read_cond_features(layout.cond_features_path(self.data_root, name, self.extractor), torch.float16)
        clip = min(len(mean), len(tokens))
        if clip < self.num_frames:
            raise ValueError(f"{path}: {clip} frames of latents and image tokens, {self.num_frames} needed")
        rng = np.random.default_rng([self.seed, self.epoch, index])
        if self.train and self.num_frames < clip:
            frames = np.sort(rng.choice(clip, self.num_frames, replace=False))
        else:
            frames = np.arange(self.num_frames)
        frames = torch.from_numpy(frames)
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        x = mean[frames]
        if self.posterior_draws:
            x = x + std[frames] * torch.randn(x.shape, generator=gen)
        s = self.stats
        cond_images = tokens[frames]
        if self.train and rng.random() < self.uncond_p:
            cond_images = torch.zeros_like(cond_images)
        # "fps_sampled_gs_1024" keeps its published name; it holds the num_latents anchors
        cond = dit_condition(latent["fps_sampled_gs_4096"], latent["fps_sampled_gs_1024"], cond_images, s,
                             self.normalize_position_xyz)
        return {
            "x": (x - s["deformation_mean"]) / s["deformation_std"],  # (T, 512, 16)
            **cond,  # cond_images (T, L, C) float16, static_latent (S, 14), deformation_position_xyz (512, 3)
            "frame_idx": frames,
        }
