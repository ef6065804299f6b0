import numpy as np
import pytest
import torch

from render_reference import random_scene, reference_render
from utils.cameras import orbit_cameras
from utils.gaussians import Gaussians
from utils.render import _rasterize_torch, rasterize


def _cameras(dtype=torch.float32):
    ext, k = orbit_cameras([0.0, 70.0, 200.0], [10.0, -20.0, 35.0], [2.0, 1.6, 2.4], [40.0, 55.0, 30.0])
    return ext.to(dtype), k.to(dtype)


@pytest.mark.parametrize("seed,n,scales,tile", [(0, 300, (-5.5, -3.5), 8), (1, 400, (-4.5, -2.5), 16), (2, 400, (-3.5, -2.0), 4)])
def test_torch_backend_matches_float64_brute_force(seed, n, scales, tile):
    g = random_scene(n, seed, scale_range=scales)
    ext, k = _cameras()
    w, h = 44, 36
    bg = torch.tensor([[0.2, 0.5, 1.0]]).expand(3, 3)
    out = rasterize(g, ext, k, w, h, background=bg, backend="torch", tile_size=tile)
    saturated = 0
    for v in range(3):
        rgb, alpha, depth, stopped = reference_render(g, ext[v], k[v], w, h, background=bg[v].numpy())
        assert np.abs(out.rgb[v].numpy() - rgb).max() <= 1e-4
        assert np.abs(out.alpha[v, ..., 0].numpy() - alpha).max() <= 1e-4
        covered = alpha > 0.5  # expected depth is well conditioned where something is drawn
        rel = np.abs(out.depth[v, ..., 0].numpy() - depth)[covered] / depth[covered]
        assert rel.max() <= 1e-4
        saturated += stopped
    if seed == 2:  # the dense scene must exercise the transmittance cut-off
        assert saturated > 50


def test_torch_backend_float64_is_exact_and_chunking_invariant():
    g = random_scene(200, 3, scale_range=(-4.0, -2.5)).to(dtype=torch.float64)
    ext, k = _cameras(torch.float64)
    out = rasterize(g, ext, k, 30, 26, backend="torch", tile_size=8)
    rgb, alpha, _, _ = reference_render(g, ext[1], k[1], 30, 26)
    assert np.abs(out.rgb[1].numpy() - rgb).max() < 1e-12
    assert np.abs(out.alpha[1, ..., 0].numpy() - alpha).max() < 1e-12
    # Tiny chunks (one tile at a time) give the same image as the default budget, up to summation order.
    from utils.cameras import intrinsics_to_pixels
    args = (g.xyz[None], g.rotation[None], g.scale[None], g.opacity[None, :, 0], g.rgb[None], ext[None], intrinsics_to_pixels(k, 30, 26)[None],
            30, 26, 0.1, 0.01, 1e10, 8)
    small = _rasterize_torch(*args, chunk_elements=1)
    torch.testing.assert_close(small[0][0], out.rgb, rtol=0, atol=1e-13)
    torch.testing.assert_close(small[1][0], out.alpha, rtol=0, atol=1e-13)


def test_batched_frames_and_views_equal_single_renders():
    frames = random_scene(120, 4, batch=(2,))
    ext, k = _cameras()
    out = rasterize(frames, ext, k, 24, 20, background=1.0, backend="torch")
    assert out.rgb.shape == (2, 3, 20, 24, 3) and out.alpha.shape == (2, 3, 20, 24, 1)
    for t in range(2):
        for v in range(3):
            one = rasterize(frames[t], ext[v:v + 1], k[v:v + 1], 24, 20, background=1.0, backend="torch")
            torch.testing.assert_close(out.rgb[t, v], one.rgb[0], rtol=0, atol=5e-5)  # summation order only
    # Per-frame cameras (T, V, 4, 4) broadcast against the frame axis.
    per_frame = rasterize(frames, torch.stack([ext, ext.flip(0)]), torch.stack([k, k.flip(0)]), 24, 20, backend="torch")
    torch.testing.assert_close(per_frame.alpha[1, 0], out.alpha[1, 2], rtol=0, atol=5e-5)


def test_empty_and_culled_scenes_give_background():
    ext, k = _cameras()
    behind = random_scene(10, 5)
    behind.xyz = behind.xyz * 0.01 + ext[0].inverse()[:3, 3] * 1.5  # beyond the camera centre: behind it
    out = rasterize(behind[None], ext[:1], k[:1], 16, 16, background=(0.3, 0.6, 0.9), backend="torch")
    assert torch.equal(out.alpha, torch.zeros_like(out.alpha))
    torch.testing.assert_close(out.rgb[0, 0, 5, 5], torch.tensor([0.3, 0.6, 0.9]))


def test_gradients_match_finite_differences():
    g = random_scene(4, 6, scale_range=(-2.6, -2.0)).to(dtype=torch.float64)
    g.xyz = g.xyz * 0.4
    g.opacity_logit = g.opacity_logit.abs() + 0.5
    ext, k = orbit_cameras([15.0, 100.0], [10.0, -25.0], 2.0, 40.0)
    ext, k = ext.double(), k.double()
    names = ["xyz", "f_dc", "opacity_logit", "scale_pre", "quat"]
    params = [getattr(g, n).clone().requires_grad_(True) for n in names]

    def fn(*p):
        out = rasterize(Gaussians(*p), ext, k, 12, 10, background=(0.5, 0.5, 0.5), backend="torch", tile_size=4)
        return out.rgb, out.alpha, out.depth * out.alpha

    assert torch.autograd.gradcheck(fn, params, eps=1e-6, atol=1e-6, rtol=1e-4)
    # Cameras are differentiable too.
    ext_p = ext.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda e: rasterize(g, e, k, 12, 10, backend="torch", tile_size=4).rgb, (ext_p,), eps=1e-6, atol=1e-6)
