"""CPU mesh rasterizer (data_rendering/rasterizer.py) against independent float64 computations: ray casting, ray–plane
intersections, utils.cameras.project, exact-coverage counts and the Lambert formula."""
import numpy as np
import pytest
import torch

from data_rendering.rasterizer import render_mesh, silhouette
from utils.cameras import orbit_cameras, project

EDGE_TOL_PX = 1e-4  # pixel centres this close to a projected triangle edge may legitimately go either way


def _np(*xs):
    return tuple(x.double().numpy() if torch.is_tensor(x) else np.asarray(x, np.float64) for x in xs)


def _pixel_rays(ext, k, width, height):
    """Camera centre (3,) and world directions (H, W, 3) through every pixel centre, scaled so camera z = 1 per unit."""
    kpx = k * np.array([[width], [height], [1.0]])
    jj, ii = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    cam = np.stack([jj, ii, np.ones_like(jj)], -1) @ np.linalg.inv(kpx).T  # camera-space directions, z = 1
    R, t = ext[:3, :3], ext[:3, 3]
    return -R.T @ t, cam @ R                                               # rows: Rᵀ d, the directions in world


def _edge_distance_px(verts, faces, ext, k, width, height):
    """(H, W) distance in pixels from each pixel centre to the nearest projected edge segment of any triangle."""
    uv, _ = project(torch.from_numpy(verts), torch.from_numpy(ext), torch.from_numpy(k))
    p2 = uv.numpy() * [width, height]
    a = p2[faces].reshape(-1, 2)                       # edge starts (3F, 2): v0, v1, v2 of every face
    b = p2[faces[:, [1, 2, 0]]].reshape(-1, 2)         # edge ends: v1, v2, v0
    jj, ii = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    p = np.stack([jj, ii], -1).reshape(-1, 1, 2)
    d = b - a
    s = np.clip(((p - a) * d).sum(-1) / (d * d).sum(-1), 0.0, 1.0)
    return np.linalg.norm(p - (a + s[..., None] * d), axis=-1).min(1).reshape(height, width)


def _ray_cast(verts, faces, ext, k, width, height):
    """Brute-force reference: Möller–Trumbore for every pixel ray against every triangle in float64.
    Returns face_id (H, W) (−1 none), depth (H, W) camera z (inf none) and the gap to the second-nearest hit's depth."""
    origin, dirs = _pixel_rays(ext, k, width, height)
    d = dirs.reshape(-1, 1, 3)
    v0, v1, v2 = (verts[faces[:, i]] for i in range(3))
    e1, e2 = v1 - v0, v2 - v0
    pvec = np.cross(d, e2)
    det = (pvec * e1).sum(-1)
    tvec = origin - v0
    u = (tvec * pvec).sum(-1) / det
    qvec = np.cross(tvec, e1)
    v = (d * qvec).sum(-1) / det
    t = (e2 * qvec).sum(-1) / det                    # ray parameter = camera z, since the ray's camera-space z step is 1
    hit = (u >= 0) & (v >= 0) & (u + v <= 1) & (t > 0)
    z = np.where(hit, t, np.inf)
    order = np.sort(z, axis=1)
    face = np.where(np.isfinite(order[:, 0]), z.argmin(1), -1)
    with np.errstate(invalid="ignore"):  # inf − inf where nothing is hit: nan, never "ambiguous"
        gap = order[:, 1] - order[:, 0]
    shape = (height, width)
    return face.reshape(shape), order[:, 0].reshape(shape), gap.reshape(shape)


def _cams(azimuth, elevation, **kw):
    return _np(*orbit_cameras(azimuth, elevation, **kw))


# ----------------------------------------------------------------------------------------------- visibility
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_float64_ray_casting(seed):
    rng = np.random.default_rng(seed)
    centres = rng.uniform(-0.5, 0.5, (30, 1, 3))
    verts = (centres + 0.35 * rng.normal(size=(30, 3, 3))).reshape(-1, 3)
    faces = np.arange(90).reshape(30, 3)
    ext, k = _cams([0.0, 130.0, 250.0], [10.0, -20.0, 45.0])
    w, h = 48, 40
    out = render_mesh(verts.astype(np.float32), faces, ext, k, w, h, shading="flat-none")
    verts32 = verts.astype(np.float32).astype(np.float64)  # the renderer sees float32 vertices; so does the reference
    ambiguous_total = 0
    for n in range(3):
        face, depth, gap = _ray_cast(verts32, faces, ext[n], k[n], w, h)
        # A centre within EDGE_TOL_PX of some projected edge may go either way; so may two hits at (nearly) the same
        # depth (where random triangles intersect).
        ambiguous = (_edge_distance_px(verts32, faces, ext[n], k[n], w, h) < EDGE_TOL_PX) | (gap < 1e-6 * depth)
        ok = ~ambiguous
        ambiguous_total += ambiguous.sum()
        assert (face >= 0).mean() > 0.3, "scene should cover a good part of the image"
        np.testing.assert_array_equal(out["face_id"][n][ok], face[ok])
        np.testing.assert_array_equal(out["rgba"][n, ..., 3][ok], (face >= 0)[ok].astype(np.float32))
        covered = ok & (face >= 0)
        np.testing.assert_allclose(out["depth"][n][covered], depth[covered], rtol=1e-5)
        assert np.isinf(out["depth"][n][out["face_id"][n] < 0]).all()
        assert (out["rgba"][n][out["face_id"][n] < 0] == 0).all()
    assert ambiguous_total < 0.005 * 3 * w * h


def test_silhouette_equals_render_alpha():
    rng = np.random.default_rng(3)
    verts = rng.normal(size=(60, 3)).astype(np.float32) * 0.3
    faces = rng.integers(0, 60, (80, 3))
    ext, k = _cams([10.0, 200.0], [0.0, 30.0])
    out = render_mesh(verts, faces, ext, k, 33, 27)
    np.testing.assert_array_equal(silhouette(verts, faces, ext, k, 33, 27), out["rgba"][..., 3])


# ----------------------------------------------------------------------------------------------- interpolation
def test_perspective_correct_colour_uv_and_depth():
    # A quad running from camera depth ~0.8 to ~3.5: screen-space (affine) interpolation would be far off.
    corners = np.array([[-0.4, -1.2, -0.3], [0.4, -1.2, -0.3], [0.4, 1.5, 0.1], [-0.4, 1.5, 0.1]])
    ab = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], np.float64)  # surface coordinates, linear on the plane
    faces = np.array([[0, 1, 2], [0, 2, 3]])
    colors = np.concatenate([ab, np.full((4, 1), 0.5)], 1)
    uvs = 0.1 + 0.8 * ab
    tw, th = 64, 32  # ramps whose bilinear sample at (u, 1 − v) is exactly (u, v) away from the wrap-around
    texture = np.zeros((th, tw, 3))
    texture[..., 0] = (np.arange(tw) + 0.5)[None, :] / tw
    texture[..., 1] = 1.0 - (np.arange(th) + 0.5)[:, None] / th
    texture[..., 2] = 1.0
    ext, k = _cams([15.0], [5.0])
    w, h = 64, 48
    flat = render_mesh(corners, faces, ext, k, w, h, vertex_colors=colors, shading="flat-none")
    tex = render_mesh(corners, faces, ext, k, w, h, uvs=uvs, texture=texture, shading="flat-none")

    # Analytic: where the pixel ray meets the plane corners[0] + a·(c1 − c0) + b·(c3 − c0).
    origin, dirs = _pixel_rays(ext[0], k[0], w, h)
    e1, e2 = corners[1] - corners[0], corners[3] - corners[0]
    rhs = origin - corners[0]
    sol = np.linalg.solve(np.stack([np.broadcast_to(e1, dirs.shape), np.broadcast_to(e2, dirs.shape), -dirs], -1),
                          np.broadcast_to(rhs, dirs.shape)[..., None])[..., 0]
    a, b, t = sol[..., 0], sol[..., 1], sol[..., 2]
    inside = (a > 1e-3) & (a < 1 - 1e-3) & (b > 1e-3) & (b < 1 - 1e-3) & (t > 0)
    covered = flat["face_id"][0] >= 0
    assert inside.sum() > 300 and (covered == inside)[inside].all()
    assert np.abs(flat["rgba"][0, ..., 0] - a)[inside].max() < 2e-4
    assert np.abs(flat["rgba"][0, ..., 1] - b)[inside].max() < 2e-4
    assert np.abs(flat["rgba"][0, ..., 2] - 0.5)[inside].max() < 1e-6
    np.testing.assert_allclose(flat["depth"][0][inside], t[inside], rtol=1e-5)  # t is camera z (z step 1)
    assert np.abs(tex["rgba"][0, ..., 0] - (0.1 + 0.8 * a))[inside].max() < 2e-4
    assert np.abs(tex["rgba"][0, ..., 1] - (0.1 + 0.8 * b))[inside].max() < 2e-4

    # The scene must be able to catch affine interpolation: screen-space barycentrics give very different values.
    uv2, _ = project(torch.from_numpy(corners), torch.from_numpy(ext[0]), torch.from_numpy(k[0]))
    p2 = uv2.numpy() * [w, h]
    jj, ii = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    affine_a = np.zeros((h, w))
    for f, tri in enumerate(faces):
        m = np.stack([p2[tri[1]] - p2[tri[0]], p2[tri[2]] - p2[tri[0]]], 1)
        lam = np.linalg.solve(m, np.stack([jj - p2[tri[0], 0], ii - p2[tri[0], 1]], -1)[..., None])[..., 0]
        value = (1 - lam.sum(-1)) * ab[tri[0], 0] + lam[..., 0] * ab[tri[1], 0] + lam[..., 1] * ab[tri[2], 0]
        affine_a = np.where(flat["face_id"][0] == f, value, affine_a)
    assert np.abs(affine_a - a)[inside].max() > 0.05


# ----------------------------------------------------------------------------------------------- conventions
def _facing_triangle(point, ext, k, width, radius_px):
    """An equilateral triangle centred at `point`, parallel to the image plane, of circumradius `radius_px` pixels."""
    R, t = ext[:3, :3], ext[:3, 3]
    z = (R @ point + t)[2]
    rho = radius_px * z / (k[0, 0] * width)
    ang = np.deg2rad([90.0, 210.0, 330.0])
    return point + rho * (np.cos(ang)[:, None] * R[0] + np.sin(ang)[:, None] * R[1]), z


def test_small_triangle_lands_where_project_says():
    ext, k = _cams([30.0], [20.0], fov=40.0, aspect=64 / 48)
    w, h = 64, 48
    for point in ([0.13, -0.07, 0.21], [-0.4, 0.2, -0.1], [0.05, 0.3, 0.35]):
        point = np.array(point)
        # Inradius 0.8 px > the 0.71 px farthest a point can be from its nearest pixel centre: that pixel is covered.
        tri, z = _facing_triangle(point, ext[0], k[0], w, radius_px=1.6)
        out = render_mesh(tri, [[0, 1, 2]], ext, k, w, h, shading="flat-none")
        uv, depth = project(torch.from_numpy(point[None]), torch.from_numpy(ext[0]), torch.from_numpy(k[0]))
        x, y = uv[0, 0].item() * w - 0.5, uv[0, 1].item() * h - 0.5  # pixel-index coordinates of the projection
        ii, jj = np.nonzero(out["face_id"][0] == 0)
        assert out["face_id"][0, round(y), round(x)] == 0
        assert abs(jj.mean() - x) < 0.6 and abs(ii.mean() - y) < 0.6
        assert abs(out["depth"][0, round(y), round(x)] - depth.item()) < 1e-5


def test_front_camera_orientation():
    ext, k = _cams([0.0], [0.0])  # camera at (0, −2, 0) looking +Y
    w = h = 32
    for point, right, up in (([0.4, 0.0, 0.0], True, None), ([0.0, 0.0, 0.4], None, True)):
        tri, _ = _facing_triangle(np.array(point), ext[0], k[0], w, radius_px=2.0)
        ii, jj = np.nonzero(render_mesh(tri, [[0, 1, 2]], ext, k, w, h)["face_id"][0] == 0)
        assert len(ii)
        if right:   # +X on the image right, vertically centred
            assert jj.min() > w / 2 and abs(ii.mean() - (h / 2 - 0.5)) < 1
        if up:      # +Z up, horizontally centred
            assert ii.max() < h / 2 and abs(jj.mean() - (w / 2 - 0.5)) < 1


# ----------------------------------------------------------------------------------------------- watertightness
# Identity camera, fx = fy = 1 (normalised), 32²: a vertex at z = 1 lands exactly at pixel (32x + 16, 32y + 16), so
# edges can be made to pass exactly through pixel centres (the case a tie rule must get right).
W32 = 32
EXT_ID, K_UNIT = np.eye(4), np.array([[1.0, 0, 0.5], [0, 1.0, 0.5], [0, 0, 1]])


def _at_pixels(p):
    p = np.asarray(p, np.float64)
    return np.concatenate([(p - W32 / 2) / W32, np.ones((len(p), 1))], 1)


def _coverage_count(verts, faces):
    """How many triangles claim each pixel, each rendered alone."""
    return sum(render_mesh(verts, [f], EXT_ID, K_UNIT, W32, W32)["rgba"][0, ..., 3] for f in faces)


@pytest.mark.parametrize("diagonal", ["main", "anti"])
def test_two_triangles_sharing_an_edge_cover_each_pixel_once(diagonal):
    verts = _at_pixels([[4, 4], [28, 4], [28, 28], [4, 28]])  # both diagonals pass exactly through 24 pixel centres
    faces = np.array([[0, 1, 2], [0, 2, 3]] if diagonal == "main" else [[0, 1, 3], [1, 2, 3]])
    count = _coverage_count(verts, faces)
    jj, ii = np.meshgrid(np.arange(W32) + 0.5, np.arange(W32) + 0.5)
    inside = (jj > 4) & (jj < 28) & (ii > 4) & (ii < 28)  # the square's sides lie between pixel centres
    np.testing.assert_array_equal(count, inside.astype(np.float32))
    # Together, the z-buffer keeps each pixel's only owner.
    face_id = render_mesh(verts, faces, EXT_ID, K_UNIT, W32, W32)["face_id"][0]
    owner = render_mesh(verts, faces[1:], EXT_ID, K_UNIT, W32, W32)["face_id"][0] >= 0
    np.testing.assert_array_equal(face_id, np.where(owner, 1, np.where(inside, 0, -1)))


def test_snapped_grid_and_fan_are_watertight():
    rng = np.random.default_rng(0)
    # 7×7 cells of 4 px spanning (2, 2)–(30, 30); interior vertices jittered by multiples of 0.5 px so edges run
    # exactly through pixel centres in every direction (horizontal, vertical, diagonal) and vertices sit on centres.
    n = 7
    g = np.stack(np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="xy"), -1).reshape(-1, 2) * 4.0 + 2.0
    interior = (g > 2.0).all(1) & (g < 30.0).all(1)
    g[interior] += rng.integers(-3, 4, (interior.sum(), 2)) * 0.5
    faces = []
    for r in range(n):
        for c in range(n):
            a, b, d, e = r * (n + 1) + c, r * (n + 1) + c + 1, (r + 1) * (n + 1) + c, (r + 1) * (n + 1) + c + 1
            faces += [[a, b, e], [a, e, d]] if rng.random() < 0.5 else [[a, b, d], [b, e, d]]
    count = _coverage_count(_at_pixels(g), faces)
    jj, ii = np.meshgrid(np.arange(W32) + 0.5, np.arange(W32) + 0.5)
    inside = (jj > 2) & (jj < 30) & (ii > 2) & (ii < 30)
    np.testing.assert_array_equal(count, inside.astype(np.float32))

    # A fan of 8 triangles around a vertex on a pixel centre, spokes along rows, columns and diagonals of centres.
    ring = [[24.5, 16.5], [24.5, 24.5], [16.5, 24.5], [8.5, 24.5], [8.5, 16.5], [8.5, 8.5], [16.5, 8.5], [24.5, 8.5]]
    verts = _at_pixels([[16.5, 16.5]] + ring)
    fan = [[0, 1 + i, 1 + (i + 1) % 8] for i in range(8)]
    count = _coverage_count(verts, fan)
    strictly_inside = (jj > 8.5) & (jj < 24.5) & (ii > 8.5) & (ii < 24.5)
    outside = (jj < 8.5) | (jj > 24.5) | (ii < 8.5) | (ii > 24.5)
    assert (count[strictly_inside] == 1).all() and (count[outside] == 0).all() and count.max() == 1


# ----------------------------------------------------------------------------------------------- shading, near plane
def _quad_facing_front_camera(angle_deg, flip=False):
    """A 1×1 quad through the origin whose normal is turned `angle_deg` about Z away from the front camera's axis."""
    a = np.deg2rad(angle_deg)
    along = np.array([np.cos(a), np.sin(a), 0.0]) * 0.5
    up = np.array([0.0, 0.0, 0.5])
    verts = np.stack([-along - up, along - up, along + up, -along + up])
    faces = np.array([[0, 1, 2], [0, 2, 3]])
    return verts, faces[:, ::-1] if flip else faces


@pytest.mark.parametrize("flip", [False, True])  # two-sided: the back face shades the same
def test_lambert_headlight(flip):
    ext, k = _cams([0.0], [0.0])
    colour = np.array([0.8, 0.4, 0.2])
    ambient = 0.3
    for angle, factor in ((0.0, 1.0), (60.0, ambient + (1 - ambient) * 0.5)):
        verts, faces = _quad_facing_front_camera(angle, flip)
        out = render_mesh(verts, faces, ext, k, 40, 40, vertex_colors=np.tile(colour, (4, 1)), ambient=ambient)
        covered = out["face_id"][0] >= 0
        assert covered.sum() > 100
        np.testing.assert_allclose(out["rgba"][0][covered][:, :3], np.tile(colour * factor, (covered.sum(), 1)),
                                   atol=1e-5)
        assert (out["rgba"][0][covered][:, 3] == 1).all()
    # An explicit light grazing the face leaves only the ambient term; "flat-none" ignores the light.
    verts, faces = _quad_facing_front_camera(0.0, flip)
    out = render_mesh(verts, faces, ext, k, 40, 40, vertex_colors=np.tile(colour, (4, 1)), ambient=ambient,
                      light_dir=[0.0, 0.0, 1.0])
    covered = out["face_id"][0] >= 0
    np.testing.assert_allclose(out["rgba"][0][covered][:, :3], np.tile(colour * ambient, (covered.sum(), 1)), atol=1e-5)
    out = render_mesh(verts, faces, ext, k, 40, 40, shading="flat-none")
    np.testing.assert_allclose(out["rgba"][0][covered][:, :3], 0.7, atol=1e-6)  # default grey


def test_triangles_behind_near_are_skipped_and_inputs_checked():
    ext, k = _cams([0.0], [0.0])  # camera at y = −2
    verts = np.array([[-0.5, 0.0, -0.5], [0.5, 0.0, -0.5], [0.0, 0.0, 0.5], [0.0, -2.5, 0.0]])
    assert (render_mesh(verts, [[0, 1, 2]], ext, k, 16, 16)["face_id"] == 0).sum() > 10
    assert (render_mesh(verts, [[0, 1, 3]], ext, k, 16, 16)["face_id"] == -1).all()  # vertex 3 is behind the camera
    with pytest.raises(ValueError, match="face indices"):
        render_mesh(verts, [[0, 1, 4]], ext, k, 16, 16)
    with pytest.raises(ValueError, match="shading"):
        render_mesh(verts, [[0, 1, 2]], ext, k, 16, 16, shading="phong")
    with pytest.raises(ValueError, match="uvs and texture"):
        render_mesh(verts, [[0, 1, 2]], ext, k, 16, 16, uvs=np.zeros((4, 2)))
