"""The VAE training dataset over sample directories (docs/published_system.md §1.1, §1.2): surface points with
per-frame displacements, frame-0 voxel features, one canonical view and the deformation views, with the published
image processing (3×3-blurred alpha, white background; utils/images.py).

Randomness comes from (seed, epoch, index), so an epoch is reproducible whatever the worker count, and resuming at a
data position gives the same samples. An unreadable sample is skipped with a warning: the item of the next readable
index is returned and `skipped` counts how many were passed over (the trainer sums it and stops if too many fail).
A file that resolves outside the data root through a symlink is not skipped: InputError (datasets/layout.py).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from datasets import layout
from models.sparse import SparseVoxels
from utils.cameras import load_blender_camera
from utils.checkpoint import safe_load
from utils.cli import InputError
from utils.images import composite, load_rgba, pool_voxels


class VAEDataset(Dataset):
    def __init__(self, data_root, names: list[str], *, num_points: int = 8192, num_timesteps: int = 24,
                 sample_timesteps: int = 1, load_camera: int = 1, num_views: int = 50, train: bool = True,
                 extractor: str = layout.DEFAULT_EXTRACTOR, voxel_resolution: int = layout.VOXEL_RESOLUTION,
                 image_size: int | None = None, background: float = 1.0, blur_alpha: bool = True, seed: int = 0,
                 max_skips: int = 10, images: bool = True):
        if not names:
            raise ValueError(f"VAEDataset: no samples under {data_root}")
        if layout.VOXEL_RESOLUTION % voxel_resolution:
            raise ValueError(f"VAEDataset: voxel_resolution must divide {layout.VOXEL_RESOLUTION}, got {voxel_resolution}")
        self.data_root, self.names = Path(data_root), list(names)
        for name in self.names:
            layout.resolve_sample(self.data_root, name)  # refuse entries leaving the data root before any work
        self.num_points, self.num_timesteps, self.sample_timesteps = num_points, num_timesteps, sample_timesteps
        self.load_camera, self.num_views, self.train = load_camera, num_views, train
        self.extractor, self.voxel_resolution, self.image_size = extractor, voxel_resolution, image_size
        self.background, self.blur_alpha, self.seed, self.max_skips = background, blur_alpha, seed, max_skips
        self.images = images  # False: geometry and voxels only (encode_latent.py needs no renders)
        self.epoch = 0

    @classmethod
    def from_list(cls, data_root, list_file, **kwargs) -> "VAEDataset":
        return cls(data_root, layout.read_list_file(list_file, data_root), **kwargs)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict:
        for skipped in range(self.max_skips + 1):
            i = (index + skipped) % len(self.names)
            try:
                item = self.load(i)
                item["skipped"] = skipped
                return item
            except InputError:  # a path refused by the layout (a symlink leading outside the data root): not skipped
                raise
            except Exception as e:  # unreadable sample: warn, count, move on
                warnings.warn(f"VAEDataset: skipping sample {self.names[i]!r}: {type(e).__name__}: {e}", stacklevel=2)
        raise RuntimeError(f"VAEDataset: {self.max_skips + 1} unreadable samples in a row from index {index}; "
                           f"check the data under {self.data_root}")

    def _view(self, root: Path, t: int, v: int) -> dict:
        rgb, alpha = load_rgba(layout.image_path(root, t, v, data_root=self.data_root), self.image_size)
        extrinsics, intrinsics = load_blender_camera(layout.camera_path(root, t, v, data_root=self.data_root),
                                                     rgb.shape[2], rgb.shape[1])
        return {"image": composite(rgb, alpha, self.background, self.blur_alpha), "alpha": alpha,
                "extrinsics": extrinsics, "intrinsics": intrinsics}

    def load(self, index: int) -> dict:
        name = self.names[index]
        root = layout.resolve_sample(self.data_root, name)
        rng = np.random.default_rng([self.seed, self.epoch, index])

        static = safe_load(layout.static_vertices_path(root, data_root=self.data_root)).float()
        deltas = safe_load(layout.frame_deltas_path(root, data_root=self.data_root)).float()
        if static.dim() != 2 or static.shape[1] != 3 or deltas.shape[1:] != static.shape or len(deltas) < self.num_timesteps:
            raise ValueError(f"{root}: points {tuple(static.shape)} and deltas {tuple(deltas.shape)} do not match "
                             f"(N, 3) and (>= {self.num_timesteps}, N, 3)")
        if len(static) < self.num_points:
            raise ValueError(f"{root}: {len(static)} surface points, {self.num_points} needed")
        moving = static[None] + deltas[: self.num_timesteps]
        points = torch.from_numpy(rng.permutation(len(static))[: self.num_points])
        # The canonical frame is frame 0 (published §1.1): deltas are re-based on it whatever the stored static points are.
        static_pc = moving[0, points]
        if self.train and self.sample_timesteps < self.num_timesteps:
            frames = np.sort(rng.choice(self.num_timesteps, self.sample_timesteps, replace=False))
        else:
            frames = np.arange(self.num_timesteps)
        deltas_out = moving[frames][:, points] - static_pc[None]

        coords, feats = layout.read_voxel_features(layout.voxel_features_path(root, 0, self.extractor,
                                                                              data_root=self.data_root))
        coords, feats = pool_voxels(coords, feats, layout.VOXEL_RESOLUTION // self.voxel_resolution)
        item = {
            "name": name,
            "static_pc": static_pc,                                   # (N, 3)
            "deltas": deltas_out,                                     # (T', N, 3)
            "frame_idx": torch.from_numpy(frames).long(),             # (T',)
            # float16 as stored (pooled means rounded back): half the bytes through the loader; models cast on the device
            "voxel_coords": coords, "voxel_feats": feats.half(),      # (M, 3) int32, (M, C) float16
        }
        if not self.images:
            return item

        available = layout.count_views(root, data_root=self.data_root)
        views = min(self.num_views, available)
        if views == 0:
            raise FileNotFoundError(f"{root}: no renders of frame 0")
        canonical = self._view(root, 0, int(rng.integers(views)) if self.train else 0)
        if self.train:  # one random view for each of the first load_camera sampled frames
            picks = [(k, int(rng.integers(views))) for k in range(min(self.load_camera, len(frames)))]
        else:  # views 0..load_camera-1 of every frame
            picks = [(k, v) for k in range(len(frames)) for v in range(min(self.load_camera, views))]
        deform = [self._view(root, int(frames[k]), v) for k, v in picks]
        item.update({
            "canonical": canonical,                                   # image (3,H,W), alpha (1,H,W), extrinsics, intrinsics
            "views": {k: torch.stack([d[k] for d in deform]) for k in deform[0]},   # (L, ...)
            "view_frame": torch.tensor([k for k, _ in picks]),       # (L,) position of each view's frame in frame_idx
        })
        return item


def collate_vae(items: list[dict]) -> dict:
    """Stack a batch; the voxels become one SparseVoxels with batch indices."""
    stack = lambda key: torch.stack([it[key] for it in items])
    batch = {
        "names": [it["name"] for it in items],
        "static_pc": stack("static_pc"),
        "deltas": stack("deltas"),
        "frame_idx": stack("frame_idx"),
        "voxels": SparseVoxels.from_list([it["voxel_coords"] for it in items], [it["voxel_feats"] for it in items]),
        "skipped": sum(it["skipped"] for it in items),
    }
    if "views" in items[0]:
        batch["canonical"] = {k: torch.stack([it["canonical"][k] for it in items]) for k in items[0]["canonical"]}
        batch["views"] = {k: torch.stack([it["views"][k] for it in items]) for k in items[0]["views"]}
        batch["view_frame"] = stack("view_frame")
    return batch
