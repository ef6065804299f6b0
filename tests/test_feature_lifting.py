"""Voxelisation and feature lifting, against hand-derived voxel sets, an independent clipping test, and
feature maps that encode 3D position (docs/published_system.md §1.4)."""
import itertools

import numpy as np
import pytest
import torch
import trimesh

from utils import cameras as C
from utils.feature_lifting import lift_features, voxel_centers, voxel_indices, voxelize_mesh


def _as_set(indices):
    return {tuple(v) for v in indices.tolist()}


# ----------------------------------------------------------------------------------------------- grid
def test_centres_and_indices_round_trip():
    res = 64
    idx = torch.randint(0, res, (1000, 3), generator=torch.Generator().manual_seed(0))
    centres = voxel_centers(idx, res)
    assert torch.equal(voxel_indices(centres, res), idx)
    expected = torch.tensor([[-0.5 + 0.5 / 64, -0.5 / 64, 0.5 - 0.5 / 64]])
    assert torch.allclose(voxel_centers(torch.tensor([[0, 31, 63]]), res), expected)
    # Any point inside a voxel maps back to it.
    jitter = (torch.rand(1000, 3, generator=torch.Generator().manual_seed(1)) - 0.5) * (0.999 / res)
    assert torch.equal(voxel_indices(centres + jitter, res), idx)


# ----------------------------------------------------------------------------------------------- voxelisation
def test_voxelize_right_triangle_exact():
    """Triangle in the plane z = 5.5 (grid units, mid-layer), legs along x and y from (a, a) to b. The closed
    square [i, i+1]×[j, j+1] meets it iff i+1 ≥ a, j+1 ≥ a and max(i, a) + max(j, a) ≤ a + b."""
    res, a, b, z = 16, 2.3, 11.6, 5.5
    corners = torch.tensor([[a, a, z], [b, a, z], [a, b, z]], dtype=torch.float64) / res - 0.5
    got = _as_set(voxelize_mesh(corners, torch.tensor([[0, 1, 2]]), res))
    expected = {(i, j, 5) for i in range(res) for j in range(res)
                if i + 1 >= a and j + 1 >= a and max(i, a) + max(j, a) <= a + b}
    assert got == expected and len(expected) > 30


def test_voxelize_axis_aligned_box_exact():
    """Box surface |x|,|y|,|z| = c (c off the voxel boundaries): a voxel meets the surface iff its box meets the
    solid box but does not lie inside its open interior."""
    res, c = 16, 0.3
    box = trimesh.creation.box(extents=(2 * c, 2 * c, 2 * c))
    got = voxelize_mesh(torch.tensor(box.vertices), torch.tensor(box.faces), res)
    lo = np.arange(res) / res - 0.5
    hi = lo + 1 / res
    meets = (lo < c) & (hi > -c)
    inside = (lo > -c) & (hi < c)
    expected = {(i, j, k) for i, j, k in itertools.product(range(res), repeat=3)
                if meets[i] and meets[j] and meets[k] and not (inside[i] and inside[j] and inside[k])}
    assert _as_set(got) == expected
    assert torch.equal(got, torch.tensor(sorted(expected)))   # sorted, unique, long
    assert got.dtype == torch.long


def test_voxelize_unit_box_keeps_the_border_faces():
    box = trimesh.creation.box(extents=(1, 1, 1))                 # faces exactly on the grid border
    got = voxelize_mesh(torch.tensor(box.vertices), torch.tensor(box.faces), 8)
    assert len(got) == 8 ** 3 - 6 ** 3 and got.min() == 0 and got.max() == 7


def _clip_hits(triangle, box_lo, box_hi):
    """Independent exact test: clip the triangle polygon by the box's six half-spaces (Sutherland–Hodgman)."""
    poly = [np.asarray(p, dtype=np.float64) for p in triangle]
    for axis, bound, sign in [(a, b, s) for a in range(3) for b, s in ((box_lo[a], 1), (box_hi[a], -1))]:
        out = []
        for p, q in zip(poly, poly[1:] + poly[:1]):
            dp, dq = sign * (p[axis] - bound), sign * (q[axis] - bound)
            if dp >= 0:
                out.append(p)
            if (dp >= 0) != (dq >= 0):
                out.append(p + (q - p) * (dp / (dp - dq)))
        poly = out
        if not poly:
            return False
    return True


def test_voxelize_random_triangles_match_clipping():
    res = 8
    rng = np.random.default_rng(0)
    centres = rng.uniform(-0.6, 0.6, (40, 1, 3))                 # some reach outside the grid
    sizes = rng.choice([0.05, 0.2, 0.8], (40, 1, 1))
    tris = centres + sizes * rng.normal(size=(40, 3, 3))
    verts = torch.tensor(tris.reshape(-1, 3))
    got = _as_set(voxelize_mesh(verts, torch.arange(120).reshape(40, 3), res))
    expected = set()
    for tri in tris:
        for ijk in itertools.product(range(res), repeat=3):
            lo = np.array(ijk) / res - 0.5
            if _clip_hits(list(tri), lo, lo + 1 / res):
                expected.add(ijk)
    assert got == expected and len(expected) > 50


def test_voxelize_chunking_and_validation(monkeypatch):
    import utils.feature_lifting as FL

    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.42)
    v, f = torch.tensor(sphere.vertices), torch.tensor(sphere.faces)
    whole = voxelize_mesh(v, f, 32)
    monkeypatch.setattr(FL, "_CANDIDATES_PER_CHUNK", 37)
    assert torch.equal(voxelize_mesh(v, f, 32), whole)
    assert voxelize_mesh(v + 5, f, 32).shape == (0, 3)           # entirely outside the grid
    with pytest.raises(ValueError, match="face indices"):
        voxelize_mesh(v, f + len(v), 32)
    with pytest.raises(ValueError, match="triangles"):
        voxelize_mesh(v, torch.zeros(3, 4, dtype=torch.long), 32)


# ----------------------------------------------------------------------------------------------- lifting
def _pixel_uv(h, w):
    """(h, w, 2) normalised uv of the pixel centres."""
    v, u = torch.meshgrid((torch.arange(h, dtype=torch.float64) + 0.5) / h,
                          (torch.arange(w, dtype=torch.float64) + 0.5) / w, indexing="ij")
    return torch.stack([u, v], dim=-1)


def _rays(extrinsics, intrinsics, uv):
    """World-space ray origins (V, 3) and directions (V, h, w, 3) through the pixels, from the matrices by hand."""
    R, t = extrinsics[:, :3, :3], extrinsics[:, :3, 3]
    fx, fy, cx, cy = (intrinsics[:, 0, 0], intrinsics[:, 1, 1], intrinsics[:, 0, 2], intrinsics[:, 1, 2])
    x = (uv[..., 0] - cx[:, None, None]) / fx[:, None, None]
    y = (uv[..., 1] - cy[:, None, None]) / fy[:, None, None]
    cam = torch.stack([x, y, torch.ones_like(x)], dim=-1)        # camera-space direction with z = 1
    return -(R.transpose(1, 2) @ t[..., None])[..., 0], torch.einsum("vji,vhwj->vhwi", R, cam)


def test_lifted_features_recover_voxel_positions():
    """Acceptance: each view's map holds, at every pixel, the 3D point of a known surface seen there (the plane
    x + 2y + 3z = c through a set of voxel centres). Lifting must give back the voxel centres."""
    res, size = 64, 256
    normal = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    m = 189                                                       # voxels with i + 2j + 3k = m share that plane
    ijk = torch.tensor([(i, j, (m - i - 2 * j) // 3) for i in range(res) for j in range(res)
                        if (m - i - 2 * j) % 3 == 0 and 0 <= (m - i - 2 * j) // 3 < res])
    centres = voxel_centers(ijk, res).double()
    ijk = ijk[centres.norm(dim=1) < 0.4]
    assert len(ijk) > 300
    offset = (m + 3) / res - 3                                     # x + 2y + 3z at those centres
    ext, K = C.published_views(40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    origin, dirs = _rays(ext, K, _pixel_uv(size, size))
    facing = (torch.nn.functional.normalize(origin, dim=1) @ normal).abs() / normal.norm() > 0.25
    assert facing[:8].sum() >= 5 and facing.sum() >= 20           # fixed views and random ones take part
    ext, K, origin, dirs = ext[facing], K[facing], origin[facing], dirs[facing]
    t = (offset - origin @ normal)[:, None, None] / (dirs @ normal)
    maps = (origin[:, None, None] + t[..., None] * dirs).permute(0, 3, 1, 2).float()   # (V, 3, h, w)
    feats, counts = lift_features(maps, ext, K, ijk, res, return_counts=True)
    assert (counts == len(ext)).all()
    err = (feats - voxel_centers(ijk, res)).abs().max().item()
    assert err < 1e-4, err                                        # < 1% of a voxel (measured ~1e-5)
    assert torch.equal(voxel_indices(feats, res), ijk)


def _setup_linear_maps(h=24, w=20, channels=5):
    """Voxels in a ball, eight cameras with maps linear in (u, v) (so bilinear sampling is exact): six orbit views
    that see everything, one that faces away (all voxels behind it) and one narrow view (most voxels outside)."""
    g = torch.Generator().manual_seed(3)
    idx = torch.unique(torch.randint(12, 52, (600, 3), generator=g), dim=0)
    ext, K = C.orbit_cameras(torch.arange(6) * 60.0, torch.tensor([20.0, -20.0] * 3), fov=40.0)
    away = C.look_at(torch.tensor([[0.0, -2.0, 0.0]]), torch.tensor([[0.0, -4.0, 0.0]]))
    narrow = C.orbit_cameras(30.0, 10.0, fov=6.0)
    ext = torch.cat([ext, away, narrow[0]]).float()
    K = torch.cat([K, K[:1], narrow[1]]).float()
    A = torch.randn(8, channels, 3, generator=g)
    uv1 = torch.cat([_pixel_uv(h, w), torch.ones(h, w, 1, dtype=torch.float64)], dim=-1).float()
    maps = torch.einsum("vcj,hwj->vchw", A, uv1)
    return idx, ext, K, A, maps


def test_lift_linear_maps_exact_with_visibility():
    h, w = 24, 20
    idx, ext, K, A, maps = _setup_linear_maps(h, w)
    feats, counts = lift_features(maps, ext, K, idx, 64, return_counts=True)
    # Expected by hand, in float64: per view x_cam = R p + t, u = fx x/z + cx, v = fy y/z + cy.
    p = voxel_centers(idx, 64).double()
    cam = torch.einsum("vij,nj->vni", ext[:, :3, :3].double(), p) + ext[:, None, :3, 3].double()
    z = cam[..., 2]
    u = K[:, None, 0, 0].double() * cam[..., 0] / z + 0.5
    v = K[:, None, 1, 1].double() * cam[..., 1] / z + 0.5
    visible = (z > 0) & (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
    assert visible[:6].all() and not visible[6].any() and 0 < visible[7].sum() < len(idx) // 2
    assert torch.equal(counts, visible.sum(0))
    values = torch.einsum("vcj,vnj->vnc", A.double(), torch.stack([u, v, torch.ones_like(u)], dim=-1))
    expected = (values * visible[..., None]).sum(0) / visible.sum(0)[:, None]
    # Bilinear sampling reproduces a linear map exactly between the outermost pixel centres; the outer half
    # pixel is clamped (border padding), so compare where every used projection stays inside that hull.
    inner = ((u >= 0.5 / w) & (u <= 1 - 0.5 / w) & (v >= 0.5 / h) & (v <= 1 - 0.5 / h)) | ~visible
    inner = inner.all(0)
    assert inner.sum() > len(idx) // 2
    assert torch.allclose(feats[inner].double(), expected[inner], atol=1e-5)


def test_lift_chunking_invariance_and_unseen_voxels():
    idx, ext, K, _, maps = _setup_linear_maps()
    ref = lift_features(maps, ext, K, idx, 64)
    assert torch.allclose(lift_features(maps, ext, K, idx, 64, voxel_chunk=37, view_chunk=3), ref, atol=1e-6)
    assert torch.allclose(lift_features(maps.half(), ext, K, idx, 64).float(), ref, atol=2e-2)
    # Only the view that faces away: no voxel is seen, so features are zero and counts zero.
    feats, counts = lift_features(maps[6:7], ext[6:7], K[6:7], idx, 64, return_counts=True)
    assert (counts == 0).all() and (feats == 0).all()


def test_lift_constant_maps_onto_a_voxelised_mesh():
    """The render-free part of published §1.4 (as data_rendering/prepare_vae_data.py composes it): constant maps lift to
    the same constant on every surface voxel."""
    sphere = trimesh.creation.icosphere(subdivisions=2, radius=0.3)
    ext, K = C.published_views(10, generator=torch.Generator().manual_seed(1))
    maps = torch.arange(4.0).view(1, 4, 1, 1).expand(10, 4, 9, 9)
    indices = voxelize_mesh(torch.tensor(sphere.vertices), torch.tensor(sphere.faces), 32)
    assert len(indices) > 0
    feats = lift_features(maps, ext, K, indices, 32)
    assert torch.allclose(feats, torch.arange(4.0).expand(len(indices), 4))
