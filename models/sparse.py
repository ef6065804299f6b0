"""Sparse voxel tensors in plain PyTorch: coordinates (N, 4) = [batch, i, j, k] and features (N, C)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SparseVoxels:
    coords: torch.Tensor  # (N, 4) int32: batch index, then i, j, k on the voxel grid; each batch's rows are contiguous
    feats: torch.Tensor   # (N, C)

    def __post_init__(self):
        if self.coords.dim() != 2 or self.coords.shape[1] != 4 or self.feats.dim() != 2 or len(self.feats) != len(self.coords):
            raise ValueError(f"SparseVoxels: expected coords (N, 4) and feats (N, C), got {tuple(self.coords.shape)} "
                             f"and {tuple(self.feats.shape)}")

    def replace(self, feats: torch.Tensor) -> "SparseVoxels":
        """Same voxels, new features."""
        return SparseVoxels(self.coords, feats)

    def to(self, *args, **kwargs) -> "SparseVoxels":
        """Move (accelerate's send_to_device calls this); coordinates stay int32."""
        feats = self.feats.to(*args, **kwargs)
        return SparseVoxels(self.coords.to(feats.device), feats)

    @property
    def batch_size(self) -> int:
        return int(self.coords[:, 0].max()) + 1 if len(self.coords) else 0

    def counts(self) -> torch.Tensor:
        """Voxels per batch element (B,)."""
        return torch.bincount(self.coords[:, 0].long(), minlength=self.batch_size)

    @staticmethod
    def from_list(coords: list[torch.Tensor], feats: list[torch.Tensor]) -> "SparseVoxels":
        """Batch per-sample (N_b, 3) voxel indices and (N_b, C) features."""
        rows = [torch.cat([torch.full((len(c), 1), b, dtype=torch.int32, device=c.device), c.to(torch.int32)], 1)
                for b, c in enumerate(coords)]
        return SparseVoxels(torch.cat(rows), torch.cat(feats))
