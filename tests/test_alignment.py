"""Silhouette alignment of a canonical set to a first frame, and turning Gaussians about Z."""
import math

import torch

from pipeline.alignment import align_to_silhouette, rotate_z, rotation_z
from utils.cameras import BLENDER_DEFAULT_FOV, intrinsics_from_fov, orbit_cameras, published_views
from utils.gaussians import Gaussians
from utils.metrics import psnr
from utils.render import rasterize


def l_shape(n_per_arm=300, seed=0, dtype=torch.float32):
    """An asymmetric L of small anisotropic Gaussians in the z = 0 plane plus a vertical post: no rotational symmetry."""
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n_per_arm, generator=g, dtype=dtype)
    arm1 = torch.stack([t * 0.6 - 0.3, torch.full_like(t, -0.3), torch.zeros_like(t)], -1)
    arm2 = torch.stack([torch.full_like(t, -0.3), t * 0.35 - 0.3, torch.zeros_like(t)], -1)
    post = torch.stack([torch.full_like(t, 0.3), torch.full_like(t, -0.3), t * 0.4], -1)
    xyz = torch.cat([arm1, arm2, post])
    n = len(xyz)
    quat = torch.randn(n, 4, generator=g, dtype=dtype)
    scale_pre = torch.full((n, 3), -3.5, dtype=dtype) + 0.3 * torch.randn(n, 3, generator=g, dtype=dtype)
    return Gaussians(xyz, torch.rand(n, 3, generator=g, dtype=dtype), torch.full((n, 1), 3.0, dtype=dtype), scale_pre, quat)


def test_rotate_z_equals_turning_the_camera():
    """Rendering the turned set from E equals rendering the original from E·Rz(a) (float64, exact up to rounding)."""
    g = l_shape(dtype=torch.float64)
    ext, K = orbit_cameras(torch.tensor([10.0, 130.0]), 20.0, 2.0, 40.0)
    ext, K = ext.double(), K.double()
    a = 37.0
    turn = torch.eye(4, dtype=torch.float64)
    turn[:3, :3] = rotation_z(a, torch.float64)
    direct = rasterize(rotate_z(g, a), ext, K, 48, 48, backend="torch").rgb
    moved_camera = rasterize(g, ext @ turn, K, 48, 48, backend="torch").rgb
    assert direct.abs().max() > 0.1
    torch.testing.assert_close(direct, moved_camera, atol=1e-9, rtol=0)
    # The rotation matrices compose: R(turned) = Rz(a) R(original).
    def rot(q):
        w, x, y, z = torch.nn.functional.normalize(q, dim=-1).unbind(-1)
        return torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
                            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
                            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1).reshape(-1, 3, 3)
    torch.testing.assert_close(rot(rotate_z(g, a).quat), rotation_z(a, torch.float64) @ rot(g.quat))


def test_alignment_recovers_azimuth_and_scale():
    g = l_shape()
    ext, _ = published_views(1)
    K = intrinsics_from_fov(torch.tensor(BLENDER_DEFAULT_FOV))
    for true_az in (50.0, 215.0):
        frame = rasterize(rotate_z(g, true_az), ext[:1], K[None], 160, 160).alpha[0, ..., 0]
        a = align_to_silhouette(g, frame, ext[0], K, num_azimuths=72)
        err = (a.azimuth - true_az + 180) % 360 - 180
        assert abs(err) <= 5.0 + 1e-6, (true_az, a.azimuth)
        assert abs(a.scale - 1.0) < 0.08 and a.iou > 0.8
    # A frame where the object looks 1.5 times larger (camera at 2/1.5 of the distance, same direction).
    near = ext[0].clone()
    near[:3, 3] = near[:3, 3] / 1.5
    frame = rasterize(rotate_z(g, 50.0), near[None], K[None], 160, 160).alpha[0, ..., 0]
    a = align_to_silhouette(g, frame, ext[0], K)
    assert abs(a.scale - 1.5) < 0.15, a.scale


def test_psnr_analytic():
    x = torch.zeros(2, 3, 4, 4)
    y = x.clone()
    y[0] += 0.1                       # MSE 0.01 -> 20 dB
    y[1, :, :2] += 0.5                # MSE 0.125 -> 9.03 dB
    torch.testing.assert_close(psnr(y, x), torch.tensor([20.0, 10 * math.log10(8.0)]))
