"""From raw video frames to model-ready square frames (docs/published_system.md §6.6): a matte per frame, one square
crop around the object for the whole clip, and compositing on the background the features were trained with
(published §10.5: black for the training renders, white for the published in-the-wild frames).

Matting backends:
- "alpha": the frames' own alpha channel (RGBA frames, transparent gifs), used exactly.
- "rembg": the rembg package with its u2net weights, only when both are present locally; nothing is ever downloaded.
- "threshold": for plain, clean backgrounds. The background colour of each frame is the median of a band of pixels along
  the image border; alpha is a smooth ramp of every pixel's RGB distance to it, followed by a small grey-scale opening
  (drops specks of compression noise) and closing (fills pin holes). It cannot separate an object from a background
  of the same colour, and it counts shadows that differ enough from the background as object.
- "auto": "alpha" when the frames have a not-all-opaque alpha channel, else "rembg" when usable, else "threshold".
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from utils.images import composite
from utils.video import VIDEO_SUFFIXES, is_video_input, read_frames, to_uint8

BACKENDS = ("auto", "alpha", "rembg", "threshold")
REMBG_MODEL = "u2net"  # the model the published preprocessing uses
REMBG_URL = "https://github.com/danielgatis/rembg/releases/download/v0.0.0/{}.onnx"


def _as_float(frames) -> torch.Tensor:
    """uint8 (or float in [0, 1]) (T, H, W, C) numpy/torch -> float32 torch in [0, 1]."""
    x = torch.as_tensor(np.asarray(frames)) if not isinstance(frames, torch.Tensor) else frames
    if x.ndim != 4 or x.shape[-1] not in (3, 4):
        raise ValueError(f"expected frames of shape (T, H, W, 3 or 4), got {tuple(x.shape)}")
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


def _has_transparency(frames) -> bool:
    return frames.shape[-1] == 4 and bool((frames[..., 3] < (255 if frames.dtype in (np.uint8, torch.uint8) else 1.0)).any())


def _rembg_weights(model: str = REMBG_MODEL) -> Path:
    # rembg's own lookup: $U2NET_HOME, else $XDG_DATA_HOME/.u2net, else ~/.u2net.
    home = os.environ.get("U2NET_HOME", os.path.join(os.environ.get("XDG_DATA_HOME", "~"), ".u2net"))
    return Path(home).expanduser() / f"{model}.onnx"


def rembg_problem(model: str = REMBG_MODEL) -> str | None:
    """None when rembg matting can run offline, else what is missing and how to get it."""
    import importlib.util

    missing = []
    if importlib.util.find_spec("rembg") is None:
        missing.append("the rembg package (pip install rembg onnxruntime)")
    if not _rembg_weights(model).is_file():
        missing.append(f"its {model} weights at {_rembg_weights(model)} (download {REMBG_URL.format(model)} there, "
                       f"or set U2NET_HOME to the folder holding {model}.onnx)")
    if not missing:
        return None
    return f"rembg matting needs {' and '.join(missing)}; this tool never downloads weights"


def choose_backend(frames, backend: str = "auto") -> str:
    """The concrete backend for these frames; "auto" warns once about the choice when the frames carry no alpha."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown matting backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "alpha" and frames.shape[-1] != 4:
        raise ValueError("matting='alpha' needs frames with an alpha channel (RGBA images or a transparent gif)")
    if backend == "rembg" and (problem := rembg_problem()):
        raise RuntimeError(problem)
    if backend != "auto":
        return backend
    if _has_transparency(frames):
        return "alpha"
    if rembg_problem() is None:
        warnings.warn("matting: the frames have no transparency; removing the background with rembg", stacklevel=2)
        return "rembg"
    warnings.warn("matting: the frames have no transparency and rembg is not usable; using the border-colour threshold "
                  "matte, which suits plain backgrounds only (install rembg and its u2net weights for others)", stacklevel=2)
    return "threshold"


def _erode(x: torch.Tensor, r: int) -> torch.Tensor:
    return -F.max_pool2d(-x, 2 * r + 1, stride=1, padding=r)


def _dilate(x: torch.Tensor, r: int) -> torch.Tensor:
    return F.max_pool2d(x, 2 * r + 1, stride=1, padding=r)


def threshold_matte(rgb: torch.Tensor, background_threshold: float = 0.15, softness: float = 0.1,
                    border: float = 0.03, cleanup: int = 1) -> torch.Tensor:
    """Alpha (T, H, W) of float rgb (T, H, W, 3) in [0, 1] against a plain background.

    background_threshold: RGB distance (Euclidean, channels in [0, 1]) to the background colour at which alpha is 0.5.
    softness: width of the smoothstep ramp around it (alpha 0 below threshold - softness/2, 1 above threshold + softness/2).
    border: width of the border band that estimates the background colour, as a fraction of the shorter image side
    (per frame, median per channel, so the object may cover up to half of the band).
    cleanup: radius in pixels of the square opening and closing (0 turns it off).
    """
    t, h, w, _ = rgb.shape
    b = max(1, round(border * min(h, w)))
    band = torch.cat([rgb[:, :b].reshape(t, -1, 3), rgb[:, -b:].reshape(t, -1, 3),
                      rgb[:, b:-b, :b].reshape(t, -1, 3), rgb[:, b:-b, -b:].reshape(t, -1, 3)], 1)
    background = band.median(1).values  # (T, 3)
    distance = (rgb - background[:, None, None]).norm(dim=-1)
    x = ((distance - (background_threshold - softness / 2)) / max(softness, 1e-6)).clamp(0, 1)
    alpha = (x * x * (3 - 2 * x))[:, None]  # smoothstep: a soft edge without a kink
    if cleanup > 0:
        alpha = _erode(_dilate(_dilate(_erode(alpha, cleanup), cleanup), cleanup), cleanup)  # opening, then closing
    return alpha[:, 0]


def _rembg_matte(frames, model: str = REMBG_MODEL) -> torch.Tensor:
    if problem := rembg_problem(model):
        raise RuntimeError(problem)
    import rembg
    from PIL import Image

    # Newer rembg re-fetches a file whose checksum differs; a file that is present is used as it is.
    previous = os.environ.get("MODEL_CHECKSUM_DISABLED")
    os.environ["MODEL_CHECKSUM_DISABLED"] = "1"
    try:
        session = rembg.new_session(model)
    finally:
        if previous is None:
            os.environ.pop("MODEL_CHECKSUM_DISABLED")
        else:
            os.environ["MODEL_CHECKSUM_DISABLED"] = previous
    masks = [np.asarray(session.predict(Image.fromarray(to_uint8(f[..., :3])))[0], dtype=np.float32) / 255.0 for f in frames]
    return torch.from_numpy(np.stack(masks))


def matte(frames, backend: str = "auto", background_threshold: float = 0.15, softness: float = 0.1,
          border: float = 0.03, cleanup: int = 1) -> torch.Tensor:
    """Alpha (T, H, W) float32 in [0, 1] of frames (T, H, W, 3|4), uint8 or float in [0, 1].

    The keyword arguments after `backend` tune the "threshold" backend (see threshold_matte).
    """
    backend = choose_backend(frames, backend)
    if backend == "rembg":
        return _rembg_matte(frames)
    # Frame by frame: a float copy of a whole full-resolution clip is large.
    return torch.cat([_as_float(frames[i:i + 1])[..., 3] if backend == "alpha" else
                      threshold_matte(_as_float(frames[i:i + 1])[..., :3], background_threshold, softness, border, cleanup)
                      for i in range(len(frames))])


def empty_frames(alpha) -> list[int]:
    """Indices of the frames whose matte has no foreground pixel (alpha > 0.5)."""
    fg = torch.as_tensor(np.asarray(alpha) if not isinstance(alpha, torch.Tensor) else alpha) > 0.5
    return (~fg.flatten(1).any(1)).nonzero()[:, 0].tolist()


def square_box(alpha, margin: float = 0.1, reference: str = "first") -> tuple[int, int, int, int]:
    """One square (x0, y0, x1, y1), ends exclusive, in source pixels, for the whole clip.

    It is centred on the bounding box of alpha > 0.5 of the first frame (reference="first", as published) or of the union
    over frames ("union": nothing leaves the crop, the object is smaller); its side is the box's longer side times
    1 + 2·margin (margin on each side). It may reach outside the image; crop_square pads there with transparency.
    """
    alpha = torch.as_tensor(np.asarray(alpha) if not isinstance(alpha, torch.Tensor) else alpha)
    if reference not in ("first", "union"):
        raise ValueError(f"reference must be 'first' or 'union', got {reference!r}")
    if empty := empty_frames(alpha):
        raise ValueError(f"frame {empty[0]} has no foreground (no alpha > 0.5)"
                         + (f", nor {len(empty) - 1} other frame(s)" if len(empty) > 1 else ""))
    fg = alpha > 0.5
    mask = fg[0] if reference == "first" else fg.any(0)
    ys, xs = mask.any(1).nonzero()[:, 0], mask.any(0).nonzero()[:, 0]
    x0, x1, y0, y1 = int(xs[0]), int(xs[-1]) + 1, int(ys[0]), int(ys[-1]) + 1
    side = math.ceil(max(x1 - x0, y1 - y0) * (1 + 2 * margin))
    left, top = (x0 + x1 - side) // 2, (y0 + y1 - side) // 2
    return left, top, left + side, top + side


def crop_square(frames_rgb, alpha, margin: float = 0.1, size: int = 512, reference: str = "first",
                box: tuple[int, int, int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop every frame to one square box (square_box, unless given) and resize it to size × size.

    frames_rgb: (T, H, W, 3|4) uint8 or float in [0, 1] (a fourth channel is ignored); alpha: (T, H, W) in [0, 1].
    Returns rgb (T, 3, size, size) in [0, 1] (not premultiplied) and alpha (T, 1, size, size), float32. Outside the
    image the crop is transparent. Resizing is antialiased (bilinear) on premultiplied colour, so the background colour
    under transparent pixels does not bleed into the edges.
    """
    if empty := empty_frames(alpha):
        raise ValueError(f"frame {empty[0]} has no foreground (no alpha > 0.5); cannot crop around the object")
    x0, y0, x1, y1 = square_box(alpha, margin, reference) if box is None else box
    alpha = torch.as_tensor(np.asarray(alpha) if not isinstance(alpha, torch.Tensor) else alpha).float()
    h, w = alpha.shape[1:]
    # The part of the box inside the image, and the transparent padding around it.
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    pad = (cx0 - x0, x1 - cx1, cy0 - y0, y1 - cy1)
    rgbs, alphas = [], []
    for frame, a in zip(frames_rgb, alpha):  # one frame at a time: full-resolution float clips get large
        rgb = _as_float(frame[None, cy0:cy1, cx0:cx1, :3])[0].permute(2, 0, 1)
        a = a[None, cy0:cy1, cx0:cx1]
        x = F.pad(torch.cat([rgb * a, a]), pad)[None]
        if x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        premultiplied, a = x[0, :3], x[0, 3:].clamp(0, 1)
        rgbs.append(torch.where(a > 1e-4, premultiplied / a.clamp_min(1e-4), 0.0).clamp(0, 1))
        alphas.append(a)
    return torch.stack(rgbs), torch.stack(alphas)


@dataclass
class VideoFrames:
    images: torch.Tensor               # (T, 3, S, S) in [0, 1], composited on the background
    alpha: torch.Tensor                # (T, 1, S, S) in [0, 1]
    fps: float | None                  # of the selected frames (source rate / stride)
    source: Path
    box: tuple[int, int, int, int]     # (x0, y0, x1, y1) crop square in source pixels, ends exclusive; may leave the image
    matting: str                       # the backend used


def background_value(background: str | float) -> float:
    if isinstance(background, str):
        if background not in ("black", "white"):
            raise ValueError(f"background must be 'black', 'white' or a number in [0, 1], got {background!r}")
        return 0.0 if background == "black" else 1.0
    if not 0.0 <= float(background) <= 1.0:
        raise ValueError(f"background must be in [0, 1], got {background}")
    return float(background)


def prepare_video_frames(path: str | os.PathLike, num_frames: int, start: int = 0, stride: int = 1, size: int = 518,
                         background: str | float = "black", matting: str = "auto", margin: float = 0.1,
                         reference: str = "first") -> VideoFrames:
    """Video, gif or frame folder -> num_frames square frames around the object, composited on the background.

    Frames start, start + stride, ...; black background by default because the training renders are (published §10.5).
    """
    path = Path(path)
    bg = background_value(background)
    if not is_video_input(path):
        found = ("nothing" if not path.exists() else "a folder without frame images" if path.is_dir()
                 else f"a {path.suffix or 'suffix-less'} file")
        raise ValueError(f"{path}: expected a video ({', '.join(VIDEO_SUFFIXES)}, .gif) or a folder of .png/.jpg/.webp "
                         f"frames; found {found}")
    frames, fps = read_frames(path, start=start, stride=stride, num_frames=num_frames)
    backend = choose_backend(frames, matting)
    alpha = matte(frames, backend)
    if empty := empty_frames(alpha):
        raise ValueError(f"{path}: source frame {start + empty[0] * stride} has no foreground after {backend} matting"
                         + (f" ({len(empty)} frames in all)" if len(empty) > 1 else "")
                         + "; try another matting backend or a clip where the object stays in view")
    box = square_box(alpha, margin, reference)
    rgb, alpha = crop_square(frames, alpha, size=size, box=box)
    return VideoFrames(composite(rgb, alpha, bg, blur=False), alpha, fps, path, box, backend)


# ----------------------------------------------------------------------------------------------- TRELLIS (docs/trellis.md §2)
TRELLIS_SIZE = 518            # DINOv2's 37 × 14 input
TRELLIS_MAX_SIDE = 1024       # opaque inputs are shrunk to this longer side before matting
TRELLIS_ALPHA_CUT = 0.8 * 255  # bbox pixels: alpha > 204
TRELLIS_SCALE = 1.2           # crop side / longer bbox side


def trellis_crop_box(alpha: np.ndarray) -> tuple[float, float, float, float]:
    """The crop box of trellis §2 step 2 for a uint8 alpha (H, W): (x0, y0, x1, y1) in PIL's crop convention, may be .5.

    Differs from square_box on purpose (that one follows the video pipeline): threshold alpha > 0.8·255 instead of
    > 0.5, inclusive bbox ends, side int(1.2 · (max inclusive extent)) with halves of size//2 around the float centre,
    no ceil; PIL's crop then rounds the float edges half-to-even.
    """
    ys, xs = np.nonzero(alpha > TRELLIS_ALPHA_CUT)
    if len(xs) == 0:
        raise ValueError("trellis_preprocess: no pixel with alpha > 0.8·255; nothing to crop around")
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    size = int(TRELLIS_SCALE * max(x1 - x0, y1 - y0))
    if size // 2 == 0:  # a 1-pixel object: the published code would crash on an empty crop
        raise ValueError("trellis_preprocess: the object is too small to crop around (bbox under 2 pixels)")
    return cx - size // 2, cy - size // 2, cx + size // 2, cy + size // 2


def trellis_preprocess(image, alpha=None, matting: str = "auto", size: int = TRELLIS_SIZE) -> torch.Tensor:
    """One image -> TRELLIS's conditioning image (3, size, size) float32 in [0, 1]: the object on black, premultiplied.

    image: (H, W, 4) RGBA or (H, W, 3) RGB, uint8 or float in [0, 1] (numpy, torch or a PIL image); alpha: optional
    (H, W) matte for an RGB image (uint8 or float), used like an alpha channel. Trellis §2 step by step, with Pillow for
    the crop and resizes so that the pixels match the published pipeline:
    1. a not-all-opaque alpha is used as it is; otherwise the RGB image is shrunk (LANCZOS) to a longer side <= 1024 and
       matted (matting: "auto" = rembg/u2net when usable as published, else the border-colour threshold matte;
       or "rembg" / "threshold"). Our rembg path takes u2net's mask as alpha and keeps the RGB as is.
    2. crop to trellis_crop_box (outside the image: transparent black);
    3. resize the RGBA crop to size² with LANCZOS (Pillow filters RGBA premultiplied);
    4. rgb · alpha in float32, then ×255 cast to uint8, which truncates (as published), on a black background.
    The ImageNet normalisation of the encoder (trellis §2 step 5) is left to DinoV2Extractor.
    """
    from PIL import Image

    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGBA" if image.mode in ("RGBA", "LA", "P") else "RGB"))
    x = to_uint8(np.asarray(image.detach().cpu() if isinstance(image, torch.Tensor) else image)[None])[0]
    if x.ndim != 3 or x.shape[-1] not in (3, 4):
        raise ValueError(f"trellis_preprocess: expected an image (H, W, 3 or 4), got {tuple(x.shape)}")
    if alpha is not None:
        a = np.asarray(alpha.detach().cpu() if isinstance(alpha, torch.Tensor) else alpha)
        if a.shape != x.shape[:2]:
            raise ValueError(f"trellis_preprocess: alpha {a.shape} does not match the image {x.shape[:2]}")
        x = np.concatenate([x[..., :3], to_uint8(a[None, ..., None])[0]], -1)
    if x.shape[-1] == 4 and (x[..., 3] < 255).any():
        rgba = Image.fromarray(x, "RGBA")  # real transparency: no resize, no matting (the synthetic-data path)
    else:
        rgb = Image.fromarray(np.ascontiguousarray(x[..., :3]), "RGB")
        scale = min(1.0, TRELLIS_MAX_SIDE / max(rgb.size))
        if scale < 1:
            rgb = rgb.resize((int(rgb.width * scale), int(rgb.height * scale)), Image.LANCZOS)
        if matting not in ("auto", "rembg", "threshold"):
            raise ValueError(f"trellis_preprocess: matting must be 'auto', 'rembg' or 'threshold', got {matting!r}")
        frames = np.array(rgb)[None]  # writable: matte wraps it in a tensor
        backend = "rembg" if matting == "rembg" or (matting == "auto" and rembg_problem() is None) else "threshold"
        if matting == "auto" and backend == "threshold":
            warnings.warn("trellis_preprocess: opaque image and rembg is not usable; using the border-colour threshold "
                          "matte (plain backgrounds only)", stacklevel=2)
        a = matte(frames, backend)[0].numpy()
        rgba = Image.fromarray(np.concatenate([frames[0], to_uint8(a[None, ..., None])[0]], -1), "RGBA")
    crop = rgba.crop(trellis_crop_box(np.asarray(rgba)[..., 3])).resize((size, size), Image.LANCZOS)
    c = np.asarray(crop).astype(np.float32) / 255
    out = (c[..., :3] * c[..., 3:] * 255).astype(np.uint8)  # truncation, not rounding: as published
    return torch.from_numpy(out).permute(2, 0, 1).float() / 255
