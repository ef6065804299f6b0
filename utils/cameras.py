"""Cameras: the one place that fixes the project's camera conventions (docs/architecture.md §3.2).

World       the object normalised to a unit bounding box, centred at the origin, **Z up** (the Blender render frame).
Extrinsics  OpenCV world→camera 4×4 ``[[R, t], [0, 1]]``: ``x_cam = R @ x_world + t``; the camera looks along +Z,
            +X is image right, +Y is image down.
Intrinsics  *normalised* 3×3 ``[[fx, 0, cx], [0, fy, cy], [0, 0, 1]]`` with ``cx = cy = 0.5``,
            ``fx = 0.5 / tan(fov_x / 2)``, ``fy = 0.5 / tan(fov_y / 2)``: a visible point lands at ``u, v ∈ [0, 1]``
            across the image width / height, ``v`` growing downward.
Pixels      ``fx_px = fx·W, cx_px = cx·W, fy_px = fy·H, cy_px = cy·H`` (pixel centres at integer + 0.5, as gsplat).

Angles are radians, except in the orbit helpers (:func:`orbit_cameras`, :func:`turntable`, :func:`orbit_position`),
whose azimuth, elevation and fov are **degrees** because that is how views are talked about.

Published data (docs/published_system.md §1.2, §1.9): Blender writes ``matrix_world`` (camera-to-world, camera looks
−Z, +Y up) and ``x_fov``; :func:`load_blender_camera` / :func:`blender_camera_json` read and write that layout.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from utils.camera_rig import (BLENDER_DEFAULT_FOV, POLAR_RANGE_DEG, PUBLISHED_DIRECTIONS,  # noqa: F401 (re-exported)
                              PUBLISHED_VIEW_NAMES, TRAIN_RADIUS)

INFERENCE_FOV_DEG = 49.1
"""Field of view in degrees of the published inference / alignment cameras (published §6.3)."""

# Blender camera axes (X right, Y up, Z back) → OpenCV (X right, Y down, Z forward): negate columns 1 and 2.
_GL_TO_CV = (1.0, -1.0, -1.0, 1.0)


def _tensors(*xs, dtype=None, device=None):
    """Convert numbers / sequences / tensors to floating tensors sharing the dtype and device of the first
    floating tensor among them (else the default dtype on the CPU). Tensors keep their autograd graph."""
    ref = next((x for x in xs if torch.is_tensor(x) and x.is_floating_point()), None)
    dtype = dtype or (ref.dtype if ref is not None else torch.get_default_dtype())
    device = device or (ref.device if ref is not None else None)
    return tuple(torch.as_tensor(x, dtype=dtype, device=device) for x in xs)


# ----------------------------------------------------------------------------------------------- intrinsics
def intrinsics_from_fov(fov_x, fov_y=None, aspect=1.0) -> torch.Tensor:
    """Normalised intrinsics from fields of view in radians.

    fov_x: (...) horizontal fov. fov_y: (...) vertical fov, or None to derive it from ``aspect = W / H``
    through ``tan(fov_y/2) = tan(fov_x/2) / aspect`` (square pixels), as Blender does.
    Returns K (..., 3, 3).
    """
    fov_x, aspect = _tensors(fov_x, aspect)
    fx = 0.5 / torch.tan(fov_x / 2)
    fy = fx * aspect if fov_y is None else 0.5 / torch.tan(_tensors(fov_y, dtype=fx.dtype, device=fx.device)[0] / 2)
    fx, fy = torch.broadcast_tensors(fx, fy)
    zero, half, one = torch.zeros_like(fx), torch.full_like(fx, 0.5), torch.ones_like(fx)
    return torch.stack([fx, zero, half, zero, fy, half, zero, zero, one], dim=-1).unflatten(-1, (3, 3))


def fov_from_intrinsics(K: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fov_x, fov_y) in radians, each (...), from normalised K (..., 3, 3): ``fov = 2·atan(0.5 / f)``."""
    return 2 * torch.atan(0.5 / K[..., 0, 0]), 2 * torch.atan(0.5 / K[..., 1, 1])


def _row_scale(K, width, height):
    (K,) = _tensors(K)
    return K, torch.tensor([float(width), float(height), 1.0], dtype=K.dtype, device=K.device)[:, None]


def intrinsics_to_pixels(K: torch.Tensor, width, height) -> torch.Tensor:
    """Normalised K (..., 3, 3) → pixel K (x row × width, y row × height)."""
    K, s = _row_scale(K, width, height)
    return K * s


def intrinsics_to_normalised(K_px: torch.Tensor, width, height) -> torch.Tensor:
    """Pixel K (..., 3, 3) → normalised K; the inverse of :func:`intrinsics_to_pixels`."""
    K_px, s = _row_scale(K_px, width, height)
    return K_px / s


# ----------------------------------------------------------------------------------------------- extrinsics
def extrinsics_from_blender(matrix_world) -> torch.Tensor:
    """Blender camera ``matrix_world`` (..., 4, 4; camera-to-world, camera looks −Z, +Y up) → OpenCV
    world→camera extrinsics (..., 4, 4): negate rotation columns 1 and 2, then invert (published §1.2)."""
    (m,) = _tensors(matrix_world)
    return torch.linalg.inv(m * m.new_tensor(_GL_TO_CV))


def blender_from_extrinsics(extrinsics) -> torch.Tensor:
    """OpenCV world→camera extrinsics (..., 4, 4) → Blender ``matrix_world`` (..., 4, 4). Inverse of
    :func:`extrinsics_from_blender`."""
    (e,) = _tensors(extrinsics)
    return torch.linalg.inv(e) * e.new_tensor(_GL_TO_CV)


def camera_centers(extrinsics: torch.Tensor) -> torch.Tensor:
    """Camera positions in world (..., 3) from world→camera extrinsics (..., 4, 4): ``−Rᵀ t``."""
    R, t = extrinsics[..., :3, :3], extrinsics[..., :3, 3:]
    return -(R.transpose(-1, -2) @ t)[..., 0]


def _rigid(R: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """4×4 from R (..., 3, 3) and t (..., 3)."""
    bottom = torch.zeros(*R.shape[:-2], 1, 4, dtype=R.dtype, device=R.device)
    bottom[..., 0, 3] = 1
    return torch.cat([torch.cat([R, t[..., None]], dim=-1), bottom], dim=-2)


def look_at(eye, target=(0.0, 0.0, 0.0), up=(0.0, 0.0, 1.0)) -> torch.Tensor:
    """OpenCV world→camera extrinsics (..., 4, 4) of cameras at ``eye`` (..., 3) looking at ``target`` (..., 3),
    with ``up`` (..., 3) appearing upward in the image. Inputs broadcast.

    When the view direction is parallel to ``up`` (straight down / up at Z-up), the image's upward direction
    falls back to +Y when looking along −up and −Y when looking along +up (Z instead of Y if ``up`` is mostly Y):
    the limit of an orbit at azimuth 0 as the elevation goes to ±90°, so such cameras stay finite and continuous.
    """
    eye, target, up = torch.broadcast_tensors(*_tensors(eye, target, up))
    forward = F.normalize(target - eye, dim=-1)
    right = torch.linalg.cross(forward, up, dim=-1)
    degenerate = right.norm(dim=-1, keepdim=True) <= 1e-5 * up.norm(dim=-1, keepdim=True)
    # Fallback "up": a world axis away from `up`, signed so the image keeps the orbit's orientation.
    axis_y, axis_z = up.new_tensor([0.0, 1.0, 0.0]), up.new_tensor([0.0, 0.0, 1.0])
    up_n = F.normalize(up, dim=-1)
    second = torch.where(up_n[..., 1:2].abs() > 0.9, axis_z, axis_y)
    sign = -torch.sign((forward * up).sum(-1, keepdim=True))
    right = torch.where(degenerate, torch.linalg.cross(forward, sign * second, dim=-1), right)
    right = F.normalize(right, dim=-1)
    down = torch.linalg.cross(forward, right, dim=-1)
    R = torch.stack([right, down, forward], dim=-2)  # rows: camera axes in world
    return _rigid(R, -(R @ eye[..., None])[..., 0])


# ----------------------------------------------------------------------------------------------- orbits
def orbit_position(azimuth, elevation=0.0, radius=TRAIN_RADIUS) -> torch.Tensor:
    """Camera position (..., 3) on a sphere around the origin; angles in **degrees**, inputs broadcast.

    ``r·(cos el·sin az, −cos el·cos az, sin el)``: azimuth 0 = published "front" (0, −r, 0), 90 = "right" (r, 0, 0),
    180 = back (0, r, 0); positive elevation puts the camera above (z > 0).
    """
    az, el, r = torch.broadcast_tensors(*_tensors(azimuth, elevation, radius))
    az, el = torch.deg2rad(az), torch.deg2rad(el)
    direction = torch.stack([torch.cos(el) * torch.sin(az), -torch.cos(el) * torch.cos(az), torch.sin(el)], dim=-1)
    return direction * r[..., None]


def orbit_cameras(azimuth, elevation=0.0, radius=TRAIN_RADIUS, fov=INFERENCE_FOV_DEG, target=(0.0, 0.0, 0.0),
                  aspect=1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Cameras on an orbit looking at ``target``, Z up.

    azimuth, elevation, fov: **degrees** (fov is the horizontal fov); radius in world units. All broadcast to a
    batch shape S (at least 1-d, so a scalar gives N = 1); target (3,) or broadcastable to (*S, 3).
    Azimuth/elevation convention as :func:`orbit_position`. Returns (extrinsics (*S, 4, 4), intrinsics (*S, 3, 3)).
    """
    az, el, r, fov, target = _tensors(azimuth, elevation, radius, fov, target)
    if bool((fov < 1.0).any()):  # a radians value passed by mistake would give a useless telephoto camera
        raise ValueError(f"orbit_cameras: fov is in degrees, got {fov.min().item():.4g} (< 1°); radians passed?")
    az, el, r, fov = torch.broadcast_tensors(torch.atleast_1d(az), el, r, fov)
    eye = orbit_position(az, el, r) + target
    return look_at(eye, target.expand_as(eye)), intrinsics_from_fov(torch.deg2rad(fov), aspect=aspect)


def turntable(num_views: int, elevation=0.0, radius=TRAIN_RADIUS, fov=INFERENCE_FOV_DEG, aspect=1.0):
    """``num_views`` evenly spaced azimuths from 0° (front), k·360/num_views; degrees as :func:`orbit_cameras`.
    Returns (extrinsics (N, 4, 4), intrinsics (N, 3, 3))."""
    azimuth = torch.arange(num_views, dtype=torch.float64) * (360.0 / num_views)
    return orbit_cameras(azimuth.to(torch.get_default_dtype()), elevation, radius, fov, aspect=aspect)


# ----------------------------------------------------------------------------------------------- published views
def published_view_positions(num_views: int, radius=TRAIN_RADIUS, generator: torch.Generator | None = None,
                             dtype=None) -> torch.Tensor:
    """Camera positions (num_views, 3) of the published render views (published §1.9).

    Views 0..7 are fixed, in order front, back, left, right, front_right, front_left, back_left, back_right
    (e.g. front (0, −r, 0), front_right (r/√2, −r/√2, 0)); views ≥ 8 draw azimuth U[0°, 360°) and polar angle
    (from +Z) U[75°, 135°], i.e. elevation 90° − polar, from ``generator`` (the global RNG when None).
    """
    dtype = dtype or torch.get_default_dtype()
    fixed = torch.tensor(PUBLISHED_DIRECTIONS[:num_views], dtype=torch.float64).reshape(-1, 3) * radius
    n_random = max(num_views - len(PUBLISHED_DIRECTIONS), 0)
    draws = torch.rand(n_random, 2, generator=generator, dtype=torch.float64)
    lo, hi = POLAR_RANGE_DEG
    polar = lo + (hi - lo) * draws[:, 1]
    random = orbit_position(360.0 * draws[:, 0], 90.0 - polar, torch.tensor(float(radius), dtype=torch.float64))
    return torch.cat([fixed, random]).to(dtype)


def published_views(num_views: int, radius=TRAIN_RADIUS, generator: torch.Generator | None = None, dtype=None):
    """The published render cameras (see :func:`published_view_positions`), looking at the origin with Z up and
    the Blender default fov (:data:`BLENDER_DEFAULT_FOV`), square images.
    Returns (extrinsics (num_views, 4, 4), intrinsics (num_views, 3, 3))."""
    eye = published_view_positions(num_views, radius, generator, dtype=torch.float64)
    extrinsics = look_at(eye, torch.zeros_like(eye))
    intrinsics = intrinsics_from_fov(torch.full((num_views,), BLENDER_DEFAULT_FOV, dtype=torch.float64))
    dtype = dtype or torch.get_default_dtype()
    return extrinsics.to(dtype), intrinsics.to(dtype)


# ----------------------------------------------------------------------------------------------- projection
def project(points: torch.Tensor, extrinsics: torch.Tensor, intrinsics: torch.Tensor):
    """Project world points into images.

    points (..., N, 3), extrinsics (..., 4, 4) world→camera, intrinsics (..., 3, 3); batch dims broadcast.
    Returns (uv (..., N, 2) in the K's units (normalised K → [0, 1] across the image), depth (..., N) = camera z).
    Points with depth ≤ 0 are behind the camera and their uv is meaningless (left unmasked, so gradients flow).
    """
    R, t = extrinsics[..., None, :3, :3], extrinsics[..., None, :3, 3]
    cam = (R @ points[..., None])[..., 0] + t
    uvw = (intrinsics[..., None, :, :] @ cam[..., None])[..., 0]
    return uvw[..., :2] / uvw[..., 2:3], cam[..., 2]


# ----------------------------------------------------------------------------------------------- JSON files
def _bad(source, what):
    return ValueError(f"camera file {source}: {what}")


def load_blender_camera(source, width=None, height=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one published camera JSON (published §1.2): a path, or an already parsed dict.

    Uses ``matrix_world`` and ``x_fov`` only; ``fov_y`` comes from ``x_fov`` and ``width / height`` (square when
    not given), as the published loader does, so a stored ``y_fov`` is ignored.
    Returns (extrinsics (4, 4) float32 OpenCV world→camera, intrinsics (3, 3) float32 normalised).
    Raises ValueError naming the file and the problem for unreadable JSON, missing keys, bad shapes or values.
    """
    name = "<dict>" if isinstance(source, Mapping) else str(source)
    if isinstance(source, Mapping):
        meta = source
    else:
        try:
            meta = json.loads(Path(source).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise _bad(name, f"cannot read JSON ({err})") from err
    if not isinstance(meta, Mapping):
        raise _bad(name, f"expected a JSON object, found {type(meta).__name__}")
    for key in ("matrix_world", "x_fov"):
        if key not in meta:
            raise _bad(name, f"missing key {key!r} (found {sorted(meta)})")
    try:
        m = np.asarray(meta["matrix_world"], dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise _bad(name, f"matrix_world is not a numeric 4x4 array ({err})") from err
    if m.shape != (4, 4):
        raise _bad(name, f"matrix_world must be 4x4, found shape {m.shape}")
    if not np.isfinite(m).all():
        raise _bad(name, "matrix_world has non-finite values")
    if not np.allclose(m[3], [0, 0, 0, 1], atol=1e-6) or abs(np.linalg.det(m[:3, :3])) < 1e-8:
        raise _bad(name, f"matrix_world is not an invertible affine transform (last row {m[3].tolist()})")
    fov = meta["x_fov"]
    if isinstance(fov, bool) or not isinstance(fov, (int, float)) or not 0.0 < fov < math.pi:
        raise _bad(name, f"x_fov must be a number of radians in (0, pi), found {fov!r}")
    if (width is None) != (height is None) or (width is not None and (width <= 0 or height <= 0)):
        raise ValueError(f"load_blender_camera: give both width and height (> 0) or neither, got {width}x{height}")
    aspect = 1.0 if width is None else width / height
    extrinsics = extrinsics_from_blender(torch.from_numpy(m)).float()  # computed in float64, stored float32
    intrinsics = intrinsics_from_fov(torch.tensor(float(fov), dtype=torch.float64), aspect=aspect).float()
    return extrinsics, intrinsics


def blender_camera_json(extrinsics, fov_x: float, width=None, height=None, bbox=None) -> dict:
    """The published camera record (published §1.2, Blender ``write_camera_metadata`` layout) for one camera.

    extrinsics (4, 4) OpenCV world→camera; fov_x in radians; width/height give ``y_fov`` (square when omitted);
    bbox optional ``[[min xyz], [max xyz]]`` of the scene. Fields: ``matrix_world`` (Blender camera-to-world rows),
    ``format_version`` 6, ``max_depth`` 5.0, ``bbox``, ``origin`` (camera centre), ``x_fov``, ``y_fov``, and
    ``x``, ``y``, ``z``: the camera's OpenCV right / down / forward axes in world. Plain Python floats (json-ready).
    """
    c2w = blender_from_extrinsics(torch.as_tensor(extrinsics, dtype=torch.float64).detach().cpu())
    if c2w.shape != (4, 4):
        raise ValueError(f"blender_camera_json: extrinsics must be 4x4, got {tuple(c2w.shape)}")
    fov_x = float(fov_x)
    aspect = 1.0 if width is None or height is None else width / height
    axes = c2w * c2w.new_tensor(_GL_TO_CV)  # OpenCV camera-to-world: columns are right, down, forward
    record = {"matrix_world": c2w.tolist(), "format_version": 6, "max_depth": 5.0}
    if bbox is not None:
        record["bbox"] = [[float(v) for v in corner] for corner in bbox]
    record.update(origin=c2w[:3, 3].tolist(), x_fov=fov_x, y_fov=2 * math.atan(math.tan(fov_x / 2) / aspect),
                  x=axes[:3, 0].tolist(), y=axes[:3, 1].tolist(), z=axes[:3, 2].tolist())
    return record
