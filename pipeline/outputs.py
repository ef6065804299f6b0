"""The files of one result (a folder per input): ply/frame_XXXX.ply (a standard 3DGS PLY per frame), animation.npz
(canonical + Δ, reloadable with utils.gaussians), orbit.mp4, compare.mp4 (per frame: the input frame fed to the model |
the 4D result from the input camera | from a camera orbiting once over the clip) and grid.png (frames × 4 views,
labelled, the object framed to fill its cells, on grey), viewer.html (the animation to orbit and play in a browser,
offline, pipeline/viewer.py).

    write_rendered(folder, render_outputs(canonical, delta, Views.from_sampling(cfg.sampling), fps, inputs))
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from datasets.condition import COND_BACKGROUND, condition_camera
from pipeline.viewer import write_viewer
from utils.cameras import orbit_cameras
from utils.fileio import atomic_write
from utils.gaussians import Gaussians, write_ply_sequence
from utils.render import rasterize
from utils.video import to_uint8, write_video


# What each name writes (summary.json always): a run that wants only some files renders only those.
OUTPUTS = {"ply": "ply/frame_XXXX.ply", "npz": "animation.npz", "orbit": "orbit.mp4", "compare": "compare.mp4",
           "grid": "grid.png", "viewer": "viewer.html"}


@dataclass(frozen=True)
class Views:
    """The output cameras (a config's `sampling:` block: orbit at elevation_deg, radius, fov_deg) and images."""
    resolution: int = 512
    elevation_deg: float = 0.0
    radius: float = 2.0
    fov_deg: float = 49.1
    background: str = "white"         # orbit.mp4's; compare.mp4 uses the input's, grid.png grey
    orbit_frames: int = 48            # frames of orbit.mp4 (one turn)
    outputs: frozenset = frozenset()  # the files to write (OUTPUTS); empty: all of them

    def __post_init__(self):
        unknown = set(self.outputs) - set(OUTPUTS)
        if unknown:
            raise ValueError(f"unknown outputs {sorted(unknown)}; choose from {', '.join(OUTPUTS)}")

    def wants(self, name: str) -> bool:
        return not self.outputs or name in self.outputs

    @classmethod
    def from_sampling(cls, sampling, **overrides) -> "Views":
        keys = ("resolution", "elevation_deg", "radius", "fov_deg", "background")
        return cls(**{k: sampling[k] for k in keys if k in sampling}, **overrides)


def render_views(frames: Gaussians, extrinsics, intrinsics, size: int, background: float) -> torch.Tensor:
    """frames (T, N) each seen by its own camera (T, 4, 4) -> (T, H, W, 3)."""
    return rasterize(frames, extrinsics[:, None], intrinsics[:, None], size, size, background=background).rgb[:, 0]


COMPARE_LABELS = ("input", "4D, input view", "4D, orbit")


def label_patch(text: str, width: int) -> np.ndarray:
    """White `text` on a black band (readable on any background), at most `width` wide: (h, w, 3) uint8."""
    from PIL import Image, ImageDraw, ImageFont
    font = ImageFont.load_default()
    _, _, right, bottom = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((3, 2), text, font=font)
    band = Image.new("RGB", (min(right + 3, width), bottom + 3))
    ImageDraw.Draw(band).text((3, 2), text, fill=(255, 255, 255), font=font)
    return np.asarray(band)


def compare_frames(frames: Gaussians, inputs: torch.Tensor, s: Views) -> np.ndarray:
    """The frames of compare.mp4: (T, R, 3·R, 3) uint8 at the sampling resolution R = s.resolution, frame t of every
    column side by side. Columns: the input frames (T, 3, h, w) resized to R; the animation `frames` (T, N) from the
    input camera (condition_camera: the video is view 0; a video's canonical is already turned to its silhouette); the
    same from an orbit camera whose azimuth advances with the frame (360°·t/T) at the config's elevation, radius and
    fov. All on the input's background, so the columns compare like with like; each column carries its label."""
    t, dev, size = len(inputs), frames.xyz.device, s.resolution
    src = F.interpolate(inputs.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    ext, K = condition_camera(dev)
    front = render_views(frames, ext.expand(t, 4, 4), K.expand(t, 3, 3), size, COND_BACKGROUND)
    ext_o, K_o = orbit_cameras(torch.arange(t) * (360.0 / t), s.elevation_deg, s.radius, s.fov_deg)
    orbit = render_views(frames, ext_o.to(dev), K_o.to(dev), size, COND_BACKGROUND)
    panels = []
    for panel, text in zip((src.permute(0, 2, 3, 1), front, orbit), COMPARE_LABELS):
        panel = to_uint8(panel.cpu()).copy()   # to_uint8 passes uint8 through: copy before drawing on it
        patch = label_patch(text, size)
        panel[:, : patch.shape[0], : patch.shape[1]] = patch  # the same band on every frame: drawn once
        panels.append(panel)
    return np.concatenate(panels, axis=2)


GRID_AZIMUTHS = (0.0, 90.0, 180.0, 270.0)
GRID_BACKGROUND = 0.5  # neutral grey: pale and dark objects both stand out


def grid_image(frames: Gaussians, s: Views, margin: float = 0.08) -> np.ndarray:
    """grid.png as (H, W, 3) uint8: rows the views at GRID_AZIMUTHS (s's elevation, radius, fov), columns the frames.
    Every cell shows the same square crop, the union of the object's silhouettes over all frames and views plus a
    `margin`, resized to R = s.resolution: the object fills its cell, and sizes and motion stay comparable between
    cells. Frame numbers label the columns, azimuths the rows."""
    t, dev, size = frames.xyz.shape[0], frames.xyz.device, s.resolution
    ext, K = orbit_cameras(torch.tensor(GRID_AZIMUTHS), s.elevation_deg, s.radius, s.fov_deg)
    out = rasterize(frames, ext.to(dev), K.to(dev), size, size, background=GRID_BACKGROUND)
    rgb = out.rgb.flatten(0, 1).movedim(-1, 1).float().cpu()                  # (T·4, 3, R, R), frame-major
    seen = (out.alpha[..., 0] > 0.05).flatten(0, 1).any(0).cpu()              # (R, R) union of the silhouettes
    if seen.any():
        ys, xs = torch.nonzero(seen, as_tuple=True)
        side = min(size, int((max(ys.max() - ys.min(), xs.max() - xs.min()) + 1) * (1 + 2 * margin)) + 1)
        y0 = int(min(max((ys.max() + ys.min() + 1) // 2 - side // 2, 0), size - side))
        x0 = int(min(max((xs.max() + xs.min() + 1) // 2 - side // 2, 0), size - side))
        rgb = F.interpolate(rgb[..., y0:y0 + side, x0:x0 + side], size=(size, size), mode="bilinear",
                            antialias=True, align_corners=False)
    cells = to_uint8(rgb.movedim(1, -1).reshape(t, len(GRID_AZIMUTHS), size, size, 3))
    body = cells.transpose(1, 2, 0, 3, 4).reshape(len(GRID_AZIMUTHS) * size, t * size, 3)   # rows views, cols frames
    tops = [label_patch(f"frame {i}", size) for i in range(t)]
    lefts = [label_patch(f"{a:g}°", size) for a in GRID_AZIMUTHS]
    top, left = max(p.shape[0] for p in tops), max(p.shape[1] for p in lefts)
    canvas = np.full((top + body.shape[0], left + body.shape[1], 3), to_uint8(torch.tensor(GRID_BACKGROUND)),
                     dtype=np.uint8)
    canvas[top:, left:] = body
    for i, p in enumerate(tops):
        canvas[:p.shape[0], left + i * size: left + i * size + p.shape[1]] = p
    for j, p in enumerate(lefts):
        canvas[top + j * size: top + j * size + p.shape[0], :p.shape[1]] = p
    return canvas


@dataclass
class Rendered:
    """Everything the files of one result hold, on the CPU: what render_outputs computed on the model's device and
    write_rendered writes, so that the writing (PLY, npz, video encoding) can run beside the next input's GPU work."""
    canonical: Gaussians                  # (N)
    delta: torch.Tensor                   # (T, N, 14)
    orbit: np.ndarray | None              # (orbit_frames, R, R, 3) uint8
    compare: np.ndarray | None            # (T, R, 3·R, 3) uint8
    grid: np.ndarray | None               # (H, W, 3) uint8
    inputs: np.ndarray                    # (T, h, w, 3) uint8: the frames the model saw, beside viewer.html's render
    fps: float
    views: Views                          # the files to write, and viewer.html's first view (the orbit camera)


@torch.no_grad()
def render_outputs(canonical: Gaussians, delta: torch.Tensor, s: Views, fps: float,
                   inputs: torch.Tensor) -> Rendered:
    """The images of one result (module docstring); `inputs` (T, 3, h, w) are the frames the model saw."""
    frames = canonical.apply_delta(delta)                                                     # (T, N)
    orbit = None
    if s.wants("orbit"):
        t, k, dev = delta.shape[0], s.orbit_frames, delta.device
        bg = 1.0 if s.background == "white" else 0.0
        ext, K = orbit_cameras(torch.arange(k) * (360.0 / k), s.elevation_deg, s.radius, s.fov_deg)
        idx = torch.arange(k) % t
        orbit = to_uint8(torch.cat([render_views(frames.map(lambda x: x[idx[i:i + 8]]), ext[i:i + 8].to(dev),
                                                 K[i:i + 8].to(dev), s.resolution, bg) for i in range(0, k, 8)]).cpu())
    return Rendered(canonical.to("cpu"), delta.float().cpu(), orbit,
                    compare_frames(frames, inputs, s) if s.wants("compare") else None,
                    grid_image(frames, s) if s.wants("grid") else None,
                    to_uint8(inputs.movedim(1, -1).float().cpu()), fps, s)


def write_rendered(out: Path, r: Rendered) -> dict:
    """Write the files of one result into `out` (module docstring); returns what summary.json records of them."""
    c, s = r.canonical, r.views
    if s.wants("ply"):
        write_ply_sequence(c.apply_delta(r.delta), out / "ply", overwrite=True)
    if s.wants("npz"):
        arrays = {"xyz": c.xyz, "f_dc": c.f_dc, "opacity_logit": c.opacity_logit, "scale_pre": c.scale_pre,
                  "quat": c.quat, "delta": r.delta}

        def save(tmp):
            with open(tmp, "wb") as f:  # a file object: numpy would append ".npz" to the temporary name
                np.savez_compressed(f, **{k: v.float().numpy() for k, v in arrays.items()})

        atomic_write(out / "animation.npz", save, overwrite=True)
    if r.orbit is not None:
        write_video(out / "orbit.mp4", r.orbit, fps=r.fps, overwrite=True)
    if r.compare is not None:
        write_video(out / "compare.mp4", r.compare, fps=r.fps, overwrite=True)
    if r.grid is not None:
        atomic_write(out / "grid.png", lambda tmp: Image.fromarray(r.grid).save(tmp, format="PNG"), overwrite=True)
    if s.wants("viewer"):
        camera = {"el": s.elevation_deg, "radius": s.radius, "fov": s.fov_deg}
        write_viewer(out, c, r.delta, r.fps, r.inputs, overwrite=True, camera=camera)
    return {"ply_frames": r.delta.shape[0] if s.wants("ply") else 0, "gaussians": len(c),
            "outputs": sorted(s.outputs or OUTPUTS)}
