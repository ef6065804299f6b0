import math

import numpy as np
import pytest
import torch
from plyfile import PlyData, PlyElement

from reference import load_golden, rel_err
from utils.gaussians import Gaussians, read_ply, write_ply, write_ply_sequence


def _random(batch=(), n=50, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    r = lambda c: torch.randn(*batch, n, c, generator=g, dtype=dtype)
    return Gaussians(r(3) * 0.3, r(3), r(1) * 2, r(3) - 4, r(4))


def _softplus(x):
    return np.log1p(np.exp(x))


def test_activations_follow_mipgs_formulas():
    # Zero raw outputs of the static VAE: opacity 0.1, scale sqrt(0.004² + 0.0009²) ≈ 0.0041, identity rotation
    # (docs/published_system.md §3.2).
    zero = torch.zeros(5, 3, dtype=torch.float64)
    g = Gaussians.from_raw(zero, zero, zero[:, :1], zero, torch.zeros(5, 4, dtype=torch.float64))
    assert torch.allclose(g.opacity, torch.full((5, 1), 0.1, dtype=torch.float64), atol=1e-15)
    assert torch.allclose(g.scale, torch.full((5, 3), math.sqrt(0.004**2 + 0.0009**2), dtype=torch.float64), atol=1e-15)
    assert torch.equal(g.rotation, torch.tensor([[1.0, 0, 0, 0]] * 5, dtype=torch.float64))
    assert torch.allclose(g.rgb, torch.full((5, 3), 0.5, dtype=torch.float64))

    raw = torch.randn(40, 14, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    g = Gaussians.from_raw(raw[:, 0:3], raw[:, 3:6], raw[:, 6:7], raw[:, 7:10], raw[:, 10:14])
    r = raw.numpy()
    logit01 = math.log(0.1 / 0.9)
    inv_sp = math.log(math.expm1(0.004))
    want_opacity = 1 / (1 + np.exp(-(r[:, 6:7] + logit01)))
    want_scale = np.sqrt(_softplus(r[:, 7:10] + inv_sp) ** 2 + 0.0009**2)
    q = r[:, 10:14] + np.array([1.0, 0, 0, 0])
    want_rot = q / np.linalg.norm(q, axis=1, keepdims=True)
    cond = g.to_condition().numpy()
    np.testing.assert_allclose(cond[:, 0:3], r[:, 0:3], rtol=1e-14)
    np.testing.assert_allclose(cond[:, 3:6], r[:, 3:6], rtol=1e-14)
    np.testing.assert_allclose(cond[:, 6:7], want_opacity, rtol=1e-12)
    np.testing.assert_allclose(cond[:, 7:10], want_scale, rtol=1e-12)
    np.testing.assert_allclose(cond[:, 10:14], want_rot, rtol=1e-12)
    np.testing.assert_allclose(g.rgb.numpy(), np.maximum(0.5 + 0.28209479177387814 * r[:, 3:6], 0), rtol=1e-14)


def test_golden_static_vae_gaussians():
    t, meta = load_golden("static_vae")
    xyz = t["gs.out.raw_xyz"] - 0.5  # GaussianModel.get_xyz: aabb offset -0.5, scale 1
    g = Gaussians.from_raw(xyz, t["gs.out.features_dc"][:, 0], t["gs.out.raw_opacity"], t["gs.out.raw_scaling"], t["gs.out.raw_rotation"])
    tol = meta["tolerance"]["tol"] if isinstance(meta.get("tolerance"), dict) else 1e-5
    assert rel_err(g.to_condition(), t["gs.out.tensor14"]) <= tol
    assert rel_err(g.scale, t["gs.out.scaling"]) <= tol
    assert rel_err(g.opacity, t["gs.out.opacity"]) <= tol
    assert rel_err(g.rotation, t["gs.out.rotation"]) <= tol
    assert rel_err(g.xyz, t["gs.out.xyz"]) <= tol


def test_apply_delta_uses_the_delta_layout_batched_over_frames():
    canon = _random(batch=(2,), n=30)                           # (B=2, N=30)
    delta = torch.randn(2, 5, 30, 14, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 0.3
    frames = canon.apply_delta(delta)                           # (B, T, N)
    assert frames.batch_shape == (2, 5)
    d = delta.numpy()
    xyz, fdc = canon.xyz.numpy()[:, None], canon.f_dc.numpy()[:, None]
    o, s, q = canon.opacity_logit.numpy()[:, None], canon.scale_pre.numpy()[:, None], canon.quat.numpy()[:, None]
    # Published §2.4 Δ layout: xyz 0:3, scale 3:6 (pre-activation), rotation 6:10, f_dc 10:13, opacity logit 13.
    np.testing.assert_allclose(frames.xyz.numpy(), xyz + d[..., 0:3], rtol=1e-14)
    np.testing.assert_allclose(frames.scale.numpy(), np.sqrt(_softplus(s + d[..., 3:6]) ** 2 + 0.0009**2), rtol=1e-12)
    qq = q + d[..., 6:10]
    np.testing.assert_allclose(frames.rotation.numpy(), qq / np.linalg.norm(qq, axis=-1, keepdims=True), rtol=1e-12)
    np.testing.assert_allclose(frames.f_dc.numpy(), fdc + d[..., 10:13], rtol=1e-14)
    np.testing.assert_allclose(frames.opacity.numpy(), 1 / (1 + np.exp(-(o + d[..., 13:14]))), rtol=1e-12)
    # A zero Δ reproduces the canonical set in every frame.
    same = canon.apply_delta(torch.zeros(2, 3, 30, 14, dtype=torch.float64))
    assert torch.equal(same.to_condition()[:, 2], canon.to_condition())
    with pytest.raises(ValueError, match="Δ"):
        canon.apply_delta(torch.zeros(2, 3, 29, 14, dtype=torch.float64))


def test_condition_round_trip_and_shape_checks():
    g = _random(n=64)
    back = Gaussians.from_condition(g.to_condition())
    torch.testing.assert_close(back.to_condition(), g.to_condition(), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="scale_pre"):
        Gaussians(g.xyz, g.f_dc, g.opacity_logit, g.scale_pre[:, :2], g.quat)


def test_ply_round_trip_is_exact_and_uses_the_3dgs_layout(tmp_path):
    g = _random(n=200, seed=3, dtype=torch.float32)
    path = write_ply(g, tmp_path / "a.ply")
    back = read_ply(path)
    for name in ["xyz", "f_dc", "opacity_logit", "scale_pre", "quat"]:
        assert torch.equal(getattr(back, name), getattr(g, name)), name
    ply = PlyData.read(str(path))
    names = list(ply["vertex"].data.dtype.names)
    assert names[:17] == ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
                          "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    assert ply.elements[0].data.dtype["x"] == np.dtype("<f4")
    v = ply["vertex"].data
    # What a viewer computes from the standard fields: sigmoid(opacity), exp(scale), normalised rot.
    np.testing.assert_allclose(1 / (1 + np.exp(-v["opacity"])), g.opacity[:, 0].numpy(), rtol=1e-6)
    np.testing.assert_allclose(np.exp(np.stack([v[f"scale_{i}"] for i in range(3)], 1)), g.scale.numpy(), rtol=1e-5)
    with pytest.raises(FileExistsError):
        write_ply(g, path)
    write_ply(g, path, overwrite=True)


def test_reading_a_standard_3dgs_ply(tmp_path):
    # A file as other tools write it: SH degree 3 (45 f_rest), log scales, logit opacity, no extra fields.
    n = 20
    rng = np.random.default_rng(4)
    names = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"] + [f"f_rest_{i}" for i in range(45)] + \
            ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    rec = np.zeros(n, dtype=[(k, "<f4") for k in names])
    for k in names:
        rec[k] = rng.normal(size=n)
    for i in range(3):
        rec[f"scale_{i}"] = rng.uniform(-5, -2, size=n)
    path = tmp_path / "other.ply"
    PlyData([PlyElement.describe(rec, "vertex")]).write(str(path))
    with pytest.warns(UserWarning, match="f_rest"):
        g = read_ply(path)
    scales = np.exp(np.stack([rec[f"scale_{i}"] for i in range(3)], 1).astype(np.float64))
    np.testing.assert_allclose(g.scale.numpy(), scales, rtol=1e-4)
    np.testing.assert_allclose(g.opacity[:, 0].numpy(), 1 / (1 + np.exp(-rec["opacity"].astype(np.float64))), rtol=1e-6)
    quat = np.stack([rec[f"rot_{i}"] for i in range(4)], 1)
    np.testing.assert_allclose(g.rotation.numpy(), quat / np.linalg.norm(quat, axis=1, keepdims=True), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(g.xyz.numpy(), np.stack([rec["x"], rec["y"], rec["z"]], 1))


def test_bad_ply_files_name_the_file(tmp_path):
    bad = tmp_path / "bad.ply"
    bad.write_bytes(b"not a ply at all")
    with pytest.raises(ValueError, match="bad.ply"):
        read_ply(bad)
    rec = np.zeros(3, dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4")])
    PlyData([PlyElement.describe(rec, "vertex")]).write(str(tmp_path / "points.ply"))
    with pytest.raises(ValueError, match=r"points.ply.*missing fields"):
        read_ply(tmp_path / "points.ply")
    g = _random(n=5, dtype=torch.float32)
    g.xyz[0, 0] = float("nan")
    write_ply(g, tmp_path / "nan.ply")
    with pytest.raises(ValueError, match="nan.ply.*non-finite"):
        read_ply(tmp_path / "nan.ply")


def test_edited_scales_win_over_stale_exact_fields(tmp_path):
    g = _random(n=10, seed=5, dtype=torch.float32)
    path = write_ply(g, tmp_path / "e.ply")
    data = PlyData.read(str(path), mmap=False)["vertex"].data
    data["scale_0"] += 1.0  # an editor enlarged the splats but kept our extra fields
    PlyData([PlyElement.describe(data, "vertex")]).write(str(path))
    with pytest.warns(UserWarning, match="disagree"):
        back = read_ply(path)
    np.testing.assert_allclose(back.scale[:, 0].numpy(), g.scale[:, 0].numpy() * math.e, rtol=1e-4)


def test_ply_sequence(tmp_path):
    canon = _random(n=12, dtype=torch.float32)
    frames = canon.apply_delta(torch.randn(4, 12, 14) * 0.1)
    paths = write_ply_sequence(frames, tmp_path / "seq")
    assert [p.name for p in paths] == ["frame_0000.ply", "frame_0001.ply", "frame_0002.ply", "frame_0003.ply"]
    assert torch.equal(read_ply(paths[2]).xyz, frames.xyz[2])
    with pytest.raises(FileExistsError, match="frame_0000.ply"):
        write_ply_sequence(frames, tmp_path / "seq")
    with pytest.raises(ValueError, match="batch shape"):
        write_ply_sequence(canon, tmp_path / "seq2")
