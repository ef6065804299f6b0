"""grid.png (pipeline/outputs.grid_image): on neutral grey, the object framed to fill its cells, frames and views
labelled, and the motion still visible. Checked against a direct rasterisation of the same small, moving object."""
from types import SimpleNamespace

import numpy as np
import torch

from pipeline.outputs import GRID_AZIMUTHS, grid_image
from utils.cameras import orbit_cameras
from utils.gaussians import Gaussians
from utils.render import rasterize

R, T = 48, 3
S = SimpleNamespace(resolution=R, elevation_deg=0.0, radius=2.0, fov_deg=49.1)


def _moving_blob() -> Gaussians:
    """A 0.12-wide cluster at the origin, sliding 0.04 along x per frame (Gaussians batched over T frames)."""
    g = torch.Generator().manual_seed(0)
    n = 200
    xyz = (torch.rand(n, 3, generator=g) - 0.5) * 0.12
    red = torch.tensor([2.0, -2.0, -2.0]).repeat(n, 1)          # saturated red (SH DC), far from the grey
    base = Gaussians.from_activated(xyz, red, torch.full((n, 1), 0.9),
                                    torch.full((n, 3), 0.01), torch.tensor([1.0, 0, 0, 0]).repeat(n, 1))
    shift = torch.zeros(T, n, 3)
    shift[..., 0] = torch.arange(T)[:, None] * 0.04
    return Gaussians(base.xyz + shift, *(v.expand(T, *v.shape) for v in (base.f_dc, base.opacity_logit, base.scale_pre,
                                                                          base.quat)))


def _object_mask(rgb: np.ndarray, grey: int) -> np.ndarray:
    return np.abs(rgb.astype(int) - grey).sum(-1) > 30


def test_grid_is_grey_labelled_framed_and_keeps_the_motion():
    frames = _moving_blob()
    img = grid_image(frames, S)
    grey = int(0.5 * 255 + 0.5)
    top, left = img.shape[0] - len(GRID_AZIMUTHS) * R, img.shape[1] - T * R
    assert top > 0 and left > 0                                  # room for the labels
    cells = img[top:, left:].reshape(len(GRID_AZIMUTHS), R, T, R, 3).transpose(0, 2, 1, 3, 4)   # (views, T, R, R, 3)

    # Unframed, the object covers a small part of a render (independent rasterisation of the same cameras).
    ext, K = orbit_cameras(torch.tensor(GRID_AZIMUTHS), S.elevation_deg, S.radius, S.fov_deg)
    raw = rasterize(frames, ext, K, R, R, background=0.5).alpha[..., 0] > 0.05            # (T, views, R, R)
    ys, xs = np.nonzero(raw.any(0).any(0).numpy())
    raw_extent = max(np.ptp(ys), np.ptp(xs)) + 1
    assert raw_extent < 0.4 * R

    masks = np.stack([[_object_mask(cells[v, t], grey) for t in range(T)] for v in range(len(GRID_AZIMUTHS))])
    ys, xs = np.nonzero(masks.any((0, 1)))
    assert max(np.ptp(ys), np.ptp(xs)) + 1 >= 0.7 * R               # framed: the union of silhouettes fills the cell
    assert (cells[:, :, 0, 0] == grey).all()                     # neutral grey background in every cell corner

    # The motion survives the framing: in the front views the centroid slides with the object, frame after frame.
    cx = np.array([[np.nonzero(masks[v, t])[1].mean() for t in range(T)] for v in range(len(GRID_AZIMUTHS))])
    steps = np.diff(cx, axis=1)
    assert (np.abs(steps).max(axis=1) > 2).sum() >= 2            # the views that see x sideways show it move
    assert all((s > 0).all() or (s < 0).all() for s in steps[np.abs(steps).max(axis=1) > 2])  # steadily, one way

    # White label text above every column and left of every row; none of it inside the cells.
    assert all((img[:top, left + t * R: left + (t + 1) * R] > 200).all(-1).any() for t in range(T))
    assert all((img[top + v * R: top + (v + 1) * R, :left] > 200).all(-1).any() for v in range(len(GRID_AZIMUTHS)))
