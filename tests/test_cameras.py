"""Camera conventions, checked against hand-built matrices and analytic answers (never against the code itself)."""
import json
import math

import pytest
import torch

from utils import cameras as C

SQ = math.sqrt(2.0)

# Blender matrix_world of the published front camera, by hand: centre (0, -2, 0); local -Z (view) = world +Y,
# so local Z = world -Y; local Y (up) = world +Z; local X = Y x Z = world +X. Columns are the local axes.
FRONT_BLENDER = torch.tensor([[1.0, 0.0, 0.0, 0.0],
                              [0.0, 0.0, -1.0, -2.0],
                              [0.0, 1.0, 0.0, 0.0],
                              [0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
# The same camera as OpenCV world->camera, by hand: rows are right (+X), down (-Z), forward (+Y); t = -R·centre.
FRONT_EXTRINSICS = torch.tensor([[1.0, 0.0, 0.0, 0.0],
                                 [0.0, 0.0, -1.0, 0.0],
                                 [0.0, 1.0, 0.0, 2.0],
                                 [0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)


def _apply(E, p):
    return (E[:3, :3] @ torch.as_tensor(p, dtype=E.dtype) + E[:3, 3])


def _random_rigid(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, 3, 3, generator=g, dtype=torch.float64))
    q = q * torch.linalg.det(q)[:, None, None]  # make det +1
    E = torch.eye(4, dtype=torch.float64).repeat(n, 1, 1)
    E[:, :3, :3], E[:, :3, 3] = q, torch.randn(n, 3, generator=g, dtype=torch.float64)
    return E


# ------------------------------------------------------------------------------------------------- Blender

def test_front_blender_camera_maps_to_opencv():
    E = C.extrinsics_from_blender(FRONT_BLENDER)
    torch.testing.assert_close(E, FRONT_EXTRINSICS)
    torch.testing.assert_close(_apply(E, [0, 0, 0]), torch.tensor([0.0, 0.0, 2.0], dtype=torch.float64))
    K = C.intrinsics_from_fov(C.BLENDER_DEFAULT_FOV)
    uv, depth = C.project(torch.tensor([[0.0, 0, 0], [0.1, 0, 0], [0, 0, 0.1]], dtype=torch.float64), E, K.double())
    torch.testing.assert_close(uv[0], torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert uv[1, 0] > 0.5 and abs(uv[1, 1] - 0.5) < 1e-12  # +X world is image right
    assert uv[2, 1] < 0.5 and abs(uv[2, 0] - 0.5) < 1e-12  # +Z world is image up
    torch.testing.assert_close(depth, torch.full((3,), 2.0, dtype=torch.float64))


def test_blender_round_trip_batched():
    E = _random_rigid(5)
    torch.testing.assert_close(C.extrinsics_from_blender(C.blender_from_extrinsics(E)), E)
    torch.testing.assert_close(C.blender_from_extrinsics(FRONT_EXTRINSICS), FRONT_BLENDER)
    B = C.blender_from_extrinsics(E)
    torch.testing.assert_close(C.blender_from_extrinsics(C.extrinsics_from_blender(B)), B)


def test_json_write_then_load(tmp_path):
    record = C.blender_camera_json(FRONT_EXTRINSICS, C.BLENDER_DEFAULT_FOV, 512, 256, bbox=[[-0.5] * 3, [0.5] * 3])
    # Published field layout; values known by hand for the front camera.
    fields = {"matrix_world", "x_fov", "y_fov", "format_version", "max_depth", "origin", "x", "y", "z", "bbox"}
    assert fields <= set(record)
    assert record["format_version"] == 6 and record["max_depth"] == 5.0
    assert record["matrix_world"] == FRONT_BLENDER.tolist()
    assert record["origin"] == [0.0, -2.0, 0.0]
    assert record["x"] == [1.0, 0.0, 0.0] and record["y"] == [0.0, 0.0, -1.0] and record["z"] == [0.0, 1.0, 0.0]
    assert math.isclose(record["y_fov"], 2 * math.atan(math.tan(C.BLENDER_DEFAULT_FOV / 2) / 2.0))
    path = tmp_path / "timestep_00_view_00.json"
    path.write_text(json.dumps(record))
    E, K = C.load_blender_camera(path, width=512, height=256)
    assert E.dtype == torch.float32 and K.dtype == torch.float32
    torch.testing.assert_close(E, FRONT_EXTRINSICS.float())
    f = 0.5 / math.tan(C.BLENDER_DEFAULT_FOV / 2)
    torch.testing.assert_close(K, torch.tensor([[f, 0, 0.5], [0, 2 * f, 0.5], [0, 0, 1]]))
    # Random cameras survive the file round trip too.
    for E_ref in _random_rigid(3, seed=1):
        path.write_text(json.dumps(C.blender_camera_json(E_ref, 0.8)))
        E, K = C.load_blender_camera(path)
        torch.testing.assert_close(E, E_ref.float(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(K[0, 0], torch.tensor(0.5 / math.tan(0.4)))


def test_load_ignores_stored_y_fov():
    E, K = C.load_blender_camera({"matrix_world": FRONT_BLENDER.tolist(), "x_fov": 0.7, "y_fov": 0.1})
    assert math.isclose(K[1, 1].item(), 0.5 / math.tan(0.35), rel_tol=1e-6)


@pytest.mark.parametrize("content, needle", [
    ("{not json", "cannot read"),
    ('{"x_fov": 0.69}', "matrix_world"),
    ('{"matrix_world": [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]}', "x_fov"),
    ('{"matrix_world": [[1, 0, 0], [0, 1, 0], [0, 0, 1]], "x_fov": 0.69}', "4x4"),
    ('{"matrix_world": [[1, 0, 0, NaN], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], "x_fov": 0.69}', "non-finite"),
    ('{"matrix_world": [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], "x_fov": "wide"}', "x_fov"),
    ('[1, 2, 3]', "JSON object"),
])
def test_bad_json_raises_with_path(tmp_path, content, needle):
    path = tmp_path / "bad_cam.json"
    path.write_text(content)
    with pytest.raises(ValueError) as info:
        C.load_blender_camera(path)
    assert str(path) in str(info.value) and needle in str(info.value)


def test_missing_file_raises_with_path(tmp_path):
    with pytest.raises(ValueError, match="nope.json"):
        C.load_blender_camera(tmp_path / "nope.json")


# ------------------------------------------------------------------------------------------------- orbits

def test_orbit_centres_and_centre_projection():
    r = 2.5
    E, K = C.orbit_cameras(torch.tensor([0.0, 90.0, 180.0, 270.0]), radius=r)
    expected = torch.tensor([[0, -r, 0], [r, 0, 0], [0, r, 0], [-r, 0, 0]])
    torch.testing.assert_close(C.camera_centers(E), expected, atol=1e-6, rtol=0)
    uv, depth = C.project(torch.zeros(4, 1, 3), E, K)
    torch.testing.assert_close(uv, torch.full((4, 1, 2), 0.5))
    torch.testing.assert_close(depth, torch.full((4, 1), r))
    f = 0.5 / math.tan(math.radians(C.INFERENCE_FOV_DEG) / 2)
    torch.testing.assert_close(K[0], torch.tensor([[f, 0, 0.5], [0, f, 0.5], [0, 0, 1]]))


def test_orbit_azimuth0_is_front_and_elevation_is_up():
    E, _ = C.orbit_cameras(0.0)  # default radius 2
    torch.testing.assert_close(E[0].double(), FRONT_EXTRINSICS, atol=1e-6, rtol=0)
    E, _ = C.orbit_cameras([30.0], elevation=[45.0, -20.0], radius=3.0, target=(0.1, 0.2, 0.3))
    az, el = math.radians(30), torch.tensor([math.radians(45), math.radians(-20)])
    expected = torch.stack([3 * el.cos() * math.sin(az) + 0.1, -3 * el.cos() * math.cos(az) + 0.2,
                            3 * el.sin() + 0.3], -1)
    torch.testing.assert_close(C.camera_centers(E), expected.float(), atol=1e-6, rtol=0)
    assert C.camera_centers(E)[0, 2] > 0.3 > C.camera_centers(E)[1, 2]


def test_look_at_rotation_is_proper():
    g = torch.Generator().manual_seed(0)
    eye = torch.randn(16, 3, generator=g, dtype=torch.float64) * 3
    E = C.look_at(eye, torch.zeros(3, dtype=torch.float64))
    R = E[:, :3, :3]
    torch.testing.assert_close(R @ R.transpose(-1, -2), torch.eye(3, dtype=torch.float64).expand(16, 3, 3))
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(16, dtype=torch.float64))
    torch.testing.assert_close(C.camera_centers(E), eye)
    torch.testing.assert_close(E[:, 3], torch.tensor([0, 0, 0, 1.0], dtype=torch.float64).expand(16, 4))
    # Upright: world +Z never points image-down (camera y row · Z ≤ 0).
    assert (R[:, 1, 2] <= 1e-12).all()


def test_straight_down_and_up_are_finite():
    E, K = C.orbit_cameras([0.0, 0.0], elevation=[90.0, -90.0])
    assert torch.isfinite(E).all()
    R = E[:, :3, :3]
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(2))
    torch.testing.assert_close(C.camera_centers(E), torch.tensor([[0, 0, 2.0], [0, 0, -2.0]]), atol=1e-6, rtol=0)
    # Looking down: forward = -Z, and the fallback keeps image right = +X (the azimuth-0 limit).
    torch.testing.assert_close(R[0, 2], torch.tensor([0, 0, -1.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(R[0, 0], torch.tensor([1.0, 0, 0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(R[1, 0], torch.tensor([1.0, 0, 0]), atol=1e-6, rtol=0)
    uv, depth = C.project(torch.zeros(2, 1, 3), E, K)
    torch.testing.assert_close(uv, torch.full((2, 1, 2), 0.5))


def test_turntable_and_degree_guard():
    E, K = C.turntable(8, elevation=10.0)
    assert E.shape == (8, 4, 4) and K.shape == (8, 3, 3)
    az = torch.arange(8) * (2 * math.pi / 8)
    el = math.radians(10)
    expected = 2 * torch.stack([math.cos(el) * az.sin(), -math.cos(el) * az.cos(), torch.full((8,), math.sin(el))], -1)
    torch.testing.assert_close(C.camera_centers(E), expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="degrees"):
        C.orbit_cameras(0.0, fov=C.BLENDER_DEFAULT_FOV)


def test_orbit_is_differentiable():
    az = torch.tensor([20.0], requires_grad=True)
    E, _ = C.orbit_cameras(az)
    C.camera_centers(E).sum().backward()
    # d/daz of 2(sin az − cos az) (x + y with el = 0), per degree.
    expected = 2 * (math.cos(math.radians(20)) + math.sin(math.radians(20))) * math.pi / 180
    assert math.isclose(az.grad.item(), expected, rel_tol=1e-4)


# ------------------------------------------------------------------------------------------------- projection

@pytest.mark.parametrize("theta_deg, fov_deg", [(10.0, 40.0), (-15.0, 49.1), (25.0, 60.0)])
def test_projection_off_axis_angle(theta_deg, fov_deg):
    theta, fov = math.radians(theta_deg), math.radians(fov_deg)
    K = C.intrinsics_from_fov(torch.tensor(fov, dtype=torch.float64))
    E = torch.eye(4, dtype=torch.float64)  # camera at the origin looking +Z
    d = 3.0
    pts = torch.tensor([[d * math.sin(theta), 0, d * math.cos(theta)],    # off axis to the right
                        [0, d * math.sin(theta), d * math.cos(theta)]], dtype=torch.float64)  # off axis downward
    uv, depth = C.project(pts, E, K)
    expected = 0.5 + 0.5 * math.tan(theta) / math.tan(fov / 2)
    torch.testing.assert_close(uv, torch.tensor([[expected, 0.5], [0.5, expected]], dtype=torch.float64))
    torch.testing.assert_close(depth, torch.full((2,), d * math.cos(theta), dtype=torch.float64))


def test_projection_broadcasts_batch_dims():
    E = _random_rigid(3).reshape(3, 1, 4, 4).expand(3, 2, 4, 4)
    K = C.intrinsics_from_fov(torch.tensor([0.5, 0.9], dtype=torch.float64))  # (2, 3, 3)
    pts = torch.randn(3, 2, 7, 3, dtype=torch.float64)
    uv, depth = C.project(pts, E, K)
    assert uv.shape == (3, 2, 7, 2) and depth.shape == (3, 2, 7)
    i, j, n = 2, 1, 4
    cam = E[i, j, :3, :3] @ pts[i, j, n] + E[i, j, :3, 3]
    f = 0.5 / math.tan(0.45)
    torch.testing.assert_close(uv[i, j, n], torch.stack([f * cam[0] / cam[2] + 0.5, f * cam[1] / cam[2] + 0.5]))


def test_intrinsics_known_values_and_pixel_round_trip():
    K = C.intrinsics_from_fov(math.pi / 2)  # tan(45°) = 1 -> f = 0.5
    torch.testing.assert_close(K, torch.tensor([[0.5, 0, 0.5], [0, 0.5, 0.5], [0, 0, 1]]))
    K = C.intrinsics_from_fov(math.pi / 2, aspect=2.0)  # W = 2H: fy = 2·fx in normalised units
    torch.testing.assert_close(K[1, 1], torch.tensor(1.0))
    K_px = C.intrinsics_to_pixels(K, 640, 320)
    torch.testing.assert_close(K_px, torch.tensor([[320.0, 0, 320], [0, 320, 160], [0, 0, 1]]))  # square pixels
    torch.testing.assert_close(C.intrinsics_to_normalised(K_px, 640, 320), K)
    K = C.intrinsics_from_fov(0.7, fov_y=0.5)
    fx, fy = C.fov_from_intrinsics(K)
    assert math.isclose(fx.item(), 0.7, rel_tol=1e-6) and math.isclose(fy.item(), 0.5, rel_tol=1e-6)
    assert math.isclose(C.BLENDER_DEFAULT_FOV, 0.6911, abs_tol=1e-4)
    assert K.dtype == torch.get_default_dtype()
    assert C.intrinsics_from_fov(torch.tensor([0.3, 0.4], dtype=torch.float64)).dtype == torch.float64


# ------------------------------------------------------------------------------------------------- published views

def test_published_fixed_views_exact():
    pos = C.published_view_positions(8, dtype=torch.float64)
    expected = torch.tensor([[0, -2, 0], [0, 2, 0], [-2, 0, 0], [2, 0, 0],
                             [SQ, -SQ, 0], [-SQ, -SQ, 0], [-SQ, SQ, 0], [SQ, SQ, 0]], dtype=torch.float64)
    assert torch.equal(pos, expected)
    E, K = C.published_views(8, dtype=torch.float64)
    torch.testing.assert_close(C.camera_centers(E), expected)
    torch.testing.assert_close(E[0], FRONT_EXTRINSICS)  # view 0 is the hand-built front camera
    f = 0.5 / math.tan(C.BLENDER_DEFAULT_FOV / 2)
    torch.testing.assert_close(K[:, 0, 0], torch.full((8,), f, dtype=torch.float64))
    uv, depth = C.project(torch.zeros(8, 1, 3, dtype=torch.float64), E, K)
    torch.testing.assert_close(uv, torch.full((8, 1, 2), 0.5, dtype=torch.float64))


def test_published_random_views():
    pos = C.published_view_positions(200, generator=torch.Generator().manual_seed(3), dtype=torch.float64)[8:]
    torch.testing.assert_close(pos.norm(dim=-1), torch.full((192,), 2.0, dtype=torch.float64))
    polar = torch.rad2deg(torch.acos(pos[:, 2] / 2))
    assert polar.min() >= 75 - 1e-9 and polar.max() <= 135 + 1e-9
    assert polar.max() - polar.min() > 45  # actually spread over the range
    azimuth = torch.rad2deg(torch.atan2(pos[:, 1], pos[:, 0])) % 360
    assert azimuth.max() - azimuth.min() > 300
    again = C.published_view_positions(200, generator=torch.Generator().manual_seed(3), dtype=torch.float64)[8:]
    other = C.published_view_positions(200, generator=torch.Generator().manual_seed(4), dtype=torch.float64)[8:]
    assert torch.equal(pos, again) and not torch.allclose(pos, other)
    E, K = C.published_views(20, generator=torch.Generator().manual_seed(3))
    assert E.shape == (20, 4, 4) and K.shape == (20, 3, 3) and E.dtype == torch.float32
    pos20 = C.published_view_positions(20, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(C.camera_centers(E), pos20.float(), atol=1e-5, rtol=0)
