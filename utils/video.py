"""Writing frame sequences as videos (mp4 through imageio-ffmpeg, gif through Pillow), atomically."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from utils.fileio import atomic_write


def to_uint8(frames: torch.Tensor | np.ndarray) -> np.ndarray:
    """(T, H, W, 3) float in [0, 1] (values outside are clipped) or uint8 -> uint8 numpy."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    if frames.dtype == np.uint8:
        return frames
    return (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def write_video(path: str | os.PathLike, frames: torch.Tensor | np.ndarray, fps: float = 24.0, overwrite: bool = False) -> Path:
    """Write (T, H, W, 3) frames to `path` (.mp4 H.264 yuv420p, or .gif). Refuses to replace a file unless asked."""
    import imageio.v2 as imageio

    path = Path(path)
    if path.suffix.lower() not in (".mp4", ".gif"):
        raise ValueError(f"{path}: unsupported video format {path.suffix!r} (use .mp4 or .gif)")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (or --overwrite) to replace it")
    frames = to_uint8(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"{path}: expected frames of shape (T, H, W, 3), got {frames.shape}")

    def write(tmp):
        if path.suffix.lower() == ".gif":
            imageio.mimsave(tmp, list(frames), duration=1000.0 / fps, loop=0)
            return
        # yuv420p needs even sizes; macroblock_size=1 keeps the frame size exactly as given when it is even.
        h, w = frames.shape[1:3]
        with imageio.get_writer(tmp, fps=fps, codec="libx264", pixelformat="yuv420p", quality=8, macro_block_size=1) as writer:
            for f in frames[:, : h - h % 2, : w - w % 2]:
                writer.append_data(f)

    return atomic_write(path, write, overwrite=True)
