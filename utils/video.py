"""Reading frame sequences (videos through imageio-ffmpeg, gifs and frame folders through Pillow) and writing them as
videos (mp4 through imageio-ffmpeg, gif through Pillow), atomically."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from utils.fileio import atomic_write, natural_key


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
    if path.suffix.lower() == ".mp4":
        try:
            import imageio_ffmpeg  # noqa: F401  (without it imageio silently picks another writer that fails obscurely)
        except ImportError as err:
            raise RuntimeError(f"{path}: writing MP4 needs the imageio-ffmpeg package (`pip install imageio-ffmpeg`; "
                               f"setup.sh installs it), or write a .gif instead") from err
    frames = to_uint8(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"{path}: expected frames of shape (T, H, W, 3), got {frames.shape}")

    def write(tmp):
        if path.suffix.lower() == ".gif":
            imageio.mimsave(tmp, list(frames), duration=1000.0 / fps, loop=0)
            return
        # yuv420p needs even sizes; macroblock_size=1 keeps the frame size exactly as given when it is even.
        h, w = frames.shape[1:3]
        with imageio.get_writer(tmp, format="FFMPEG", fps=fps, codec="libx264", pixelformat="yuv420p", quality=8,
                                macro_block_size=1) as writer:
            for f in frames[:, : h - h % 2, : w - w % 2]:
                writer.append_data(f)

    return atomic_write(path, write, overwrite=True)


VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class VideoReadError(ValueError):
    """A video, gif or frame file that cannot be read; the message names the file and what went wrong."""


def _frame_files(folder: Path) -> list[Path]:
    """Image files of a folder in natural order (frame_2 before frame_10), hidden files left out."""
    files = [f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".") and f.is_file()]
    return sorted(files, key=natural_key)


def is_video_input(path: str | os.PathLike) -> bool:
    """True for an existing video/gif file of a known suffix, or a folder holding at least one frame image."""
    path = Path(path)
    if path.is_dir():
        return bool(_frame_files(path))
    return path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES + (".gif",)


def _pil_frame(img, where) -> np.ndarray:
    """A decoded Pillow image -> uint8 (H, W, 3), or (H, W, 4) when it has transparency."""
    try:
        if img.mode.startswith("I"):  # 16-bit grey: Pillow's convert would clip it at 255 rather than scale it
            return np.repeat((np.asarray(img).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8)[..., None], 3, -1)
        has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa") or "transparency" in img.info
        return np.asarray(img.convert("RGBA" if has_alpha else "RGB"))
    except Exception as exc:  # truncated or corrupt data surfaces at decode time
        raise VideoReadError(f"{where}: cannot decode image ({type(exc).__name__}: {exc})") from None


def _stack(frames: list[np.ndarray], where) -> np.ndarray:
    """Stack frames of one size; when some have alpha, the others get an opaque one."""
    if len({f.shape[:2] for f in frames}) > 1:
        raise VideoReadError(f"{where}: frames differ in size ({sorted({f.shape[1::-1] for f in frames})} as W x H)")
    if any(f.shape[-1] == 4 for f in frames):
        frames = [f if f.shape[-1] == 4 else np.concatenate([f, np.full_like(f[..., :1], 255)], -1) for f in frames]
    return np.stack(frames)


def _ffmpeg_reason(exc: Exception) -> str:
    """imageio-ffmpeg errors carry ffmpeg's whole banner; keep the first line and ffmpeg's last words."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    return lines[0] if len(lines) == 1 else f"{lines[0]}: {lines[-1]}"


MAX_SIDE = 2048  # larger frames are shrunk as they are decoded: an 8000² clip would otherwise take gigabytes


def _probe(path: Path) -> str:
    """Why ffmpeg found no frames: a readable container with a video stream has none, else the data is not a video."""
    import subprocess

    import imageio_ffmpeg
    try:
        err = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(path)], capture_output=True,
                             text=True, timeout=30).stderr
    except (OSError, subprocess.SubprocessError) as exc:
        return f"cannot run ffmpeg to look at it ({type(exc).__name__})"
    if "Video:" in err:
        return "has a video stream but no frames in it (0 frames)"
    if "Input #0" in err:
        return "has no video frames (a container with no video stream: 0 frames)"
    lines = [ln.strip() for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "rror" in ln] or lines or ["no output"]
    return f"is not a readable video (ffmpeg: {errors[-1]})"


def _shrink(frame: np.ndarray, max_side: int | None) -> np.ndarray:
    h, w = frame.shape[:2]
    if max_side is None or max(h, w) <= max_side:
        return frame
    from PIL import Image
    f = max_side / max(h, w)
    return np.asarray(Image.fromarray(frame).resize((max(1, round(w * f)), max(1, round(h * f))), Image.BOX))


def read_frames(path: str | os.PathLike, start: int = 0, stride: int = 1, num_frames: int | None = None,
                max_side: int | None = MAX_SIDE) -> tuple[np.ndarray, float | None]:
    """Frames start, start + stride, ... (num_frames of them, or to the end) of a video, gif or frame folder.

    Returns uint8 frames (T, H, W, C), C = 4 where the source has transparency (gif, RGBA images), else 3, and the frame
    rate of the returned sequence (the source rate / stride; None for a frame folder or when the file does not say).
    Videos: .mp4 .mov .mkv .webm .avi (imageio-ffmpeg, decoded as RGB). Folders: .png .jpg .jpeg .webp, natural order.
    A sequence shorter than asked raises ValueError; an unreadable or empty file raises VideoReadError (a ValueError).
    Frames whose longer side exceeds `max_side` are shrunk to it as they are decoded, with one warning naming the size.
    """
    import warnings
    from PIL import Image, ImageSequence

    path = Path(path)
    if start < 0 or stride < 1 or (num_frames is not None and num_frames < 1):
        raise ValueError(f"{path}: need start >= 0, stride >= 1, num_frames >= 1; got {start}, {stride}, {num_frames}")
    if not path.exists():
        raise VideoReadError(f"{path}: no such file or folder")
    wanted = (lambda i: i >= start and (i - start) % stride == 0
              and (num_frames is None or (i - start) // stride < num_frames))
    last = None if num_frames is None else start + (num_frames - 1) * stride  # decoding stops after this frame
    suffix = path.suffix.lower()
    if path.is_file() and path.stat().st_size == 0:
        raise VideoReadError(f"{path}: the file is empty (0 bytes)")
    fps, frames, total = None, [], 0
    big: list[tuple[int, int]] = []

    def keep(frame: np.ndarray) -> None:
        if max_side is not None and max(frame.shape[:2]) > max_side and not big:
            big.append(frame.shape[1::-1])
        frames.append(_shrink(frame, max_side))

    if path.is_dir():
        files = _frame_files(path)
        total = len(files)
        for i, f in enumerate(files):
            if wanted(i):
                try:
                    with Image.open(f) as img:
                        img.load()
                        keep(_pil_frame(img, f))
                except VideoReadError:
                    raise
                except Exception as exc:
                    raise VideoReadError(f"{f}: cannot read frame image ({type(exc).__name__}: {exc})") from None
    elif suffix == ".gif":
        try:
            with Image.open(path) as img:
                durations = []
                for i, frame in enumerate(ImageSequence.Iterator(img)):
                    total = i + 1
                    durations.append(frame.info.get("duration", 0))
                    if wanted(i):
                        keep(_pil_frame(frame, path))  # Pillow composes each frame with its disposal rules
                    if i == last:
                        break
        except VideoReadError:
            raise
        except Exception as exc:
            raise VideoReadError(f"{path}: cannot read gif ({type(exc).__name__}: {exc})") from None
        ms = float(np.median(durations)) if durations else 0.0
        fps = 1000.0 / ms if ms > 0 else None
        # Pillow's per-frame mode can change (P -> RGBA); keep alpha only where it says something.
        if frames and all(f.shape[-1] == 3 or (f[..., 3] == 255).all() for f in frames):
            frames = [f[..., :3] for f in frames]
    elif suffix in VIDEO_SUFFIXES:
        import imageio.v2 as imageio
        try:
            with imageio.get_reader(path, format="FFMPEG") as reader:
                fps = reader.get_meta_data().get("fps")
                for i, frame in enumerate(reader):
                    total = i + 1
                    if wanted(i):
                        keep(np.asarray(frame)[..., :3])
                    if i == last:
                        break
        except Exception as exc:
            if total == 0:  # ffmpeg fails before the first frame both for broken files and for empty streams
                raise VideoReadError(f"{path}: {_probe(path)}") from None
            raise VideoReadError(f"{path}: cannot decode video after {total} frames ({_ffmpeg_reason(exc)})") from None
    else:
        raise VideoReadError(f"{path}: not a video ({', '.join(VIDEO_SUFFIXES)}, .gif) or a folder of frame images")

    if big:
        w, h = big[0]
        f = max_side / max(w, h)
        warnings.warn(f"{path}: frames of {w}x{h} pixels are large; shrunk to {round(w * f)}x{round(h * f)} as they "
                      f"are read (more pixels would not help: the model sees a small crop)", stacklevel=2)
    if not frames or (num_frames is not None and len(frames) < num_frames):
        asked = "at least one frame" if num_frames is None else f"{num_frames} frames"
        raise ValueError(f"{path}: has {total} frame{'' if total == 1 else 's'}; asked for {asked} from frame {start} with stride {stride}"
                         + ("" if num_frames is None else f" (needs {last + 1})"))
    fps = float(fps) / stride if fps and np.isfinite(fps) and fps > 0 else None
    return _stack(frames, path), fps
