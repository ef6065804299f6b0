"""viewer.html: one self-contained file that plays a result's animated Gaussians in a browser, offline, from disk.

    write_viewer(out, canonical, delta, fps=12.0, input_frames=frames)   # out/viewer.html
    viewer_from_result("outputs/demo/obj_00023")                         # the same from a result folder's animation.npz

Why a renderer of our own (pipeline/viewer_template.html, about 600 lines of HTML, CSS, JavaScript and GLSL) rather
than a splat-viewer library: the file must open from disk (file://) on a machine with no network, so nothing may come
from a CDN, and a library inlined into every result would be a dependency to vendor, update and license; it would also
render by its own conventions, whereas ours is a port of utils/render.py (the same EWA projection, 2D low-pass and
opacity compensation, alpha clamp and cut-off, depth order and background) and of utils/cameras.py (the same orbit
cameras), so that the browser shows what the project's renders show, and a test checks it (tests/test_viewer.py:
50-58 dB PSNR against utils.render.rasterize).

Page: WebGL2, the Gaussians drawn back to front as screen-space quads, blended into the 8-bit canvas. Two differences
from render.py remain: each blend rounds to 1/255, and the rasterizer's early stop (a pixel ends before the Gaussian
that would take its transmittance T to 1e-4 or below, and keeps the background at weight T) cannot be had with fixed
blending, so there the viewer blends that Gaussian and those behind it: a difference of at most T times a colour
difference, where T < 0.1 (alpha <= 0.999), and in practice far less. A Web Worker (created from a Blob URL, which
file:// allows) decodes each frame and sorts by depth (a counting sort on 16-bit depth keys; about 50 ms a frame at
200k Gaussians, BENCHMARKS.md "Viewer"), so the page's thread never waits for a sort: it draws with the newest order
while the next one is computed.

URL query parameters set the view: frame, az, el, radius, fov (degrees; orbit_cameras' convention, fov horizontal),
tx ty tz (orbit target), w h (canvas size in pixels; default: the window), bg (black | grey | white), play (0 | 1),
speed, ui (0 hides the side panel), bench=N (renders N frames while orbiting and reports the median frame time in
document.title). Once the first frame is drawn with a finished sort for the requested view, <html> gets data-ready="1"
and the title ends in "ready".

Data format (all inside the HTML, since Chromium blocks fetch() of sibling files from file://):
- <script id="gvf-header" type="application/json">: format, count N, frames T, fps, the quantisation steps below, the
  default camera, the channel names.
- <script id="gvf-payload" type="application/octet-stream">: base64 of a zlib stream (RFC 1950, the browser's
  DecompressionStream("deflate")) of T + 1 blocks. Each block holds N x 14 16-bit integers, Gaussian-major, channels
  in the Δ layout of utils/gaussians.py (xyz 0:3 | scale_pre 3:6 | quat 6:10 | f_dc 10:13 | opacity_logit 13), stored as
  two byte planes (the N·14 low bytes, then the N·14 high bytes): the high bytes of small numbers repeat, which deflate
  compresses, where interleaved bytes would not.
    block 0, canonical, uint16 q:  value[c] = offset[c] + q * step[c]         offset = min over Gaussians,
                                                                             step = (max - min) / 65535
    block 1 + t, Δ of frame t, int16 d:  frame_t[c] = value[c] + d * delta_step[t][c]   delta_step = max |Δ| / 32767
  evaluated in float64 in this order and then rounded to float32; the page then applies exactly apply_delta's sum for
  all 14 channels, then the activations of utils/gaussians.py. Quantisation error: at most step/2 + delta_step/2 per
  value (1/131070 of the channel's range plus 1/65534 of the frame's largest |Δ|), far below a pixel and a colour level.
- <script id="gvf-inputs" type="application/json">: the input video's frames as JPEG data URLs (longer side at most
  INPUT_SIDE pixels), shown beside the render; [] when there are none.
"""
from __future__ import annotations

import base64
import io
import json
import warnings
import zlib
from importlib import resources
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from utils.cameras import INFERENCE_FOV_DEG, TRAIN_RADIUS
from utils.cli import InputError
from utils.fileio import atomic_write
from utils.gaussians import DELTA_SLICES, Gaussians

FORMAT = "gvf-viewer/1"
CHANNELS = 14
CANONICAL_LEVELS = 65535   # uint16
DELTA_LEVELS = 32767       # int16, symmetric
TEMPLATE = "viewer_template.html"
PLACEHOLDERS = ("@@HEADER@@", "@@INPUTS@@", "@@PAYLOAD@@")  # in this order in the template
INPUT_SIDE = 256
DEFAULT_CAMERA = {"az": 0.0, "el": 15.0, "radius": TRAIN_RADIUS, "fov": INFERENCE_FOV_DEG, "target": [0.0, 0.0, 0.0]}
# True in the page once the requested view is drawn after its sort (the template sets data-ready): what screenshots and
# timings wait for.
READY_JS = "document.documentElement.dataset.ready === '1'"
ANIMATION_KEYS = ("xyz", "f_dc", "opacity_logit", "scale_pre", "quat", "delta")


def channel_names() -> list[str]:
    """The 14 channel names in Δ-layout order, e.g. xyz0 .. opacity_logit0."""
    names = [""] * CHANNELS
    for name, s in DELTA_SLICES.items():
        for i, c in enumerate(range(s.start, s.stop)):
            names[c] = f"{name}{i}"
    return names


def to_channels(g: Gaussians) -> np.ndarray:
    """(N, 14) float64 in the Δ layout: the canonical's values lined up with Δ's channels."""
    out = np.empty((len(g), CHANNELS), dtype=np.float64)
    for name, s in DELTA_SLICES.items():
        out[:, s] = getattr(g, name).detach().to("cpu", torch.float64).numpy()
    return out


def byte_planes(q: np.ndarray) -> bytes:
    """16-bit integers as two byte planes: all low bytes, then all high bytes."""
    u = np.ascontiguousarray(q).view(np.uint16).ravel()
    return (u & 0xFF).astype(np.uint8).tobytes() + (u >> 8).astype(np.uint8).tobytes()


def levels(x: np.ndarray, step: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """round(x / step) clipped to [lo, hi]; 0 where the step is 0 (a constant channel, a channel still in a frame)."""
    return np.clip(np.rint(x / np.where(step > 0, step, 1.0)), lo, hi)


def quantise(canonical: Gaussians, delta: torch.Tensor) -> tuple[dict, Iterator[bytes]]:
    """The header fields of the quantisation and the payload's blocks, uncompressed (module docstring). The blocks are
    made one frame at a time: a float64 copy of all of Δ would be 700 MB at 200k Gaussians and 32 frames."""
    values = to_channels(canonical)
    offset = values.min(0)
    step = (values.max(0) - offset) / CANONICAL_LEVELS
    delta = delta.detach()
    delta_step = delta.abs().amax(dim=1).to("cpu", torch.float64).numpy() / DELTA_LEVELS    # (T, 14), per frame

    def blocks():
        yield byte_planes(levels(values - offset, step, 0, CANONICAL_LEVELS).astype(np.uint16))
        for frame, frame_step in zip(delta, delta_step):
            d = frame.to("cpu", torch.float64).numpy()
            yield byte_planes(levels(d, frame_step, -DELTA_LEVELS, DELTA_LEVELS).astype(np.int16))

    return {"offset": offset.tolist(), "step": step.tolist(), "delta_step": delta_step.tolist()}, blocks()


def _check(canonical: Gaussians, delta: torch.Tensor, fps: float) -> None:
    if canonical.batch_shape != ():
        raise ValueError(f"write_viewer: expected one canonical set (N, ·), got batch shape {tuple(canonical.batch_shape)}")
    n = len(canonical)
    if n == 0:
        raise ValueError("write_viewer: the canonical set holds no Gaussians")
    if delta.dim() != 3 or delta.shape[1:] != (n, CHANNELS) or delta.shape[0] == 0:
        raise ValueError(f"write_viewer: expected Δ of shape (T >= 1, {n}, {CHANNELS}), got {tuple(delta.shape)}")
    for name in ("xyz", "f_dc", "opacity_logit", "scale_pre", "quat"):
        if not torch.isfinite(getattr(canonical, name)).all():
            raise ValueError(f"write_viewer: canonical {name} has non-finite values")
    if not torch.isfinite(delta).all():
        raise ValueError("write_viewer: Δ has non-finite values")
    if not (fps > 0 and np.isfinite(fps)):
        raise ValueError(f"write_viewer: fps must be a positive number, got {fps}")


def jpeg_data_urls(frames: np.ndarray, max_side: int = INPUT_SIDE) -> list[str]:
    """(T, H, W, 3|4) uint8 or float in [0, 1] -> JPEG data URLs, shrunk so the longer side is at most max_side."""
    from PIL import Image

    from utils.video import to_uint8

    frames = to_uint8(np.asarray(frames) if not torch.is_tensor(frames) else frames)
    if frames.ndim != 4 or frames.shape[-1] not in (3, 4):
        raise ValueError(f"write_viewer: expected input frames of shape (T, H, W, 3), got {frames.shape}")
    urls = []
    for frame in frames:
        img = Image.fromarray(frame[..., :3])
        f = max_side / max(img.size)
        if f < 1:
            img = img.resize((max(1, round(img.width * f)), max(1, round(img.height * f))), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
        urls.append("data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"))
    return urls


def _json_for_script(obj) -> str:
    """JSON safe inside <script>: '<' escaped, so no '</script>' can end the tag early."""
    return json.dumps(obj, separators=(",", ":")).replace("<", "\\u003c")


def template_parts() -> list[str]:
    """The template split at its placeholders: len(PLACEHOLDERS) + 1 pieces."""
    text = resources.files("pipeline").joinpath(TEMPLATE).read_text(encoding="utf-8")
    parts = []
    for token in PLACEHOLDERS:
        if text.count(token) != 1:
            raise RuntimeError(f"pipeline/{TEMPLATE}: placeholder {token} must occur exactly once")
        head, text = text.split(token)
        parts.append(head)
    return parts + [text]


def write_viewer(folder: Path, canonical: Gaussians, delta: torch.Tensor, fps: float,
                 input_frames: np.ndarray | None = None, overwrite: bool = False, camera: dict | None = None,
                 level: int = 6) -> Path:
    """Write folder/viewer.html (atomically) for canonical (N) + Δ (T, N, 14) played at `fps`.

    input_frames: optional (T, H, W, 3) frames of the input video (uint8, or float in [0, 1]), shown beside the render.
    camera: the default view, keys of DEFAULT_CAMERA (az, el, radius, fov in degrees; target xyz). level: zlib level.
    Refuses to replace an existing viewer.html unless overwrite.
    """
    path = Path(folder) / "viewer.html"
    if path.exists() and not overwrite:  # before the work, not only in atomic_write
        raise FileExistsError(f"{path} exists; pass overwrite=True (or --overwrite) to replace it")
    _check(canonical, delta, fps)
    inputs = [] if input_frames is None else jpeg_data_urls(input_frames)
    if inputs and len(inputs) != delta.shape[0]:
        raise ValueError(f"write_viewer: {len(inputs)} input frames for an animation of {delta.shape[0]} frames")
    unknown = set(camera or {}) - set(DEFAULT_CAMERA)
    if unknown:
        raise ValueError(f"write_viewer: unknown camera keys {sorted(unknown)} (known: {sorted(DEFAULT_CAMERA)})")
    fields, blocks = quantise(canonical, delta)
    header = {"format": FORMAT, "count": len(canonical), "frames": int(delta.shape[0]), "fps": float(fps),
              "channels": channel_names(), **fields, "camera": {**DEFAULT_CAMERA, **(camera or {})}}
    zipper = zlib.compressobj(level)
    compressed = memoryview(b"".join([zipper.compress(block) for block in blocks] + [zipper.flush()]))
    pieces = template_parts()

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(pieces[0] + _json_for_script(header) + pieces[1] + _json_for_script(inputs) + pieces[2])
            chunk = 3 << 20   # a multiple of 3 bytes: the base64 of the chunks joins into the base64 of the whole
            for i in range(0, len(compressed), chunk):
                f.write(base64.b64encode(compressed[i:i + chunk]).decode("ascii"))
            f.write(pieces[3])

    return atomic_write(path, write, overwrite=True)


# --- from a result folder ---------------------------------------------------------------------------------------------
def read_animation(path: Path) -> tuple[Gaussians, torch.Tensor]:
    """animation.npz (inference's writer) -> canonical Gaussians (N) and Δ (T, N, 14), float32. InputError names the file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file (a result folder holds animation.npz)")
    try:
        with np.load(path) as data:
            missing = [k for k in ANIMATION_KEYS if k not in data.files]
            if missing:
                raise InputError(f"{path}: missing arrays {missing} (found {sorted(data.files)})")
            arrays = {k: torch.from_numpy(np.asarray(data[k], dtype=np.float32)) for k in ANIMATION_KEYS}
    except InputError:
        raise
    except Exception as e:  # numpy raises several types for a damaged or foreign file
        raise InputError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    delta = arrays.pop("delta")
    try:
        canonical = Gaussians(**arrays)
    except ValueError as e:
        raise InputError(f"{path}: {e}") from None
    if delta.dim() != 3 or delta.shape[1:] != (len(canonical), CHANNELS):
        raise InputError(f"{path}: delta has shape {tuple(delta.shape)}, expected (T, {len(canonical)}, {CHANNELS})")
    return canonical, delta


def input_frames_from_compare(path: Path) -> tuple[np.ndarray | None, float | None]:
    """The input column of compare.mp4 (its left third: the frames fed to the model, labelled) and its frame rate;
    (None, None) when the file is absent or unreadable (with a warning: the viewer is still useful without it)."""
    from utils.video import read_frames

    if not path.is_file():
        return None, None
    try:
        frames, fps = read_frames(path, max_side=None)
    except ValueError as e:
        warnings.warn(f"{path}: input frames left out of the viewer ({e})", stacklevel=2)
        return None, None
    return frames[:, :, : frames.shape[2] // 3, :3], fps


def result_fps(folder: Path, fallback: float | None) -> float:
    """The animation's frame rate: summary.json's "fps" (the input video's), else `fallback`, else 12."""
    try:
        fps = json.loads((folder / "summary.json").read_text()).get("fps")
    except (OSError, ValueError, AttributeError):
        fps = None
    return float(fps or fallback or 12.0)


def viewer_from_result(folder: Path, overwrite: bool = False) -> Path:
    """Write folder/viewer.html from the result folder's animation.npz, with compare.mp4's input column as the input
    frames when it has one frame per animation frame."""
    folder = Path(folder)
    canonical, delta = read_animation(folder / "animation.npz")
    frames, video_fps = input_frames_from_compare(folder / "compare.mp4")
    if frames is not None and len(frames) != delta.shape[0]:
        warnings.warn(f"{folder / 'compare.mp4'}: {len(frames)} frames for {delta.shape[0]} animation frames; "
                      "input frames left out of the viewer", stacklevel=2)
        frames = None
    return write_viewer(folder, canonical, delta, result_fps(folder, video_fps), frames, overwrite=overwrite)
