"""encode_latent.py: the latent dict of docs/published_system.md §7, image tokens, statistics, skipping finished
objects, failures by name."""
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import encode_latent
from data_rendering.synthetic_dataset import main as make_synthetic
from datasets import layout
from datasets.latent_dataset import compute_latent_stats
from models.motion_vae import MotionVAE
from models.sparse import SparseVoxels
from models.static_vae import StaticVAE
from utils.checkpoint import save_checkpoint
from utils.config import load_config
from utils.image_features import get_extractor

VAE, DIT = "configs/tiny/vae.yml", "configs/tiny/diffusion.yml"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Random tiny VAEs, with a non-zero static out_layer so the Gaussians differ per voxel."""
    d = tmp_path_factory.mktemp("weights")
    cfg = load_config(VAE)
    torch.manual_seed(0)
    static, motion = StaticVAE.from_config(cfg.static_vae), MotionVAE(**cfg.model)
    torch.nn.init.normal_(static.out_layer.weight, std=0.05)
    torch.nn.init.normal_(motion.to_outputs.weight, std=0.05)
    save_checkpoint(d / "static.safetensors", static, config={})
    save_checkpoint(d / "motion.safetensors", motion, config={})
    return d, static.eval(), motion.eval()


@pytest.fixture
def data(tmp_path_factory, tmp_path):
    cached = tmp_path_factory.getbasetemp() / "encode_synth"
    if not cached.exists():
        assert make_synthetic(["--out", str(cached), "--num", "3", "--frames", "8", "--views", "2", "--res", "64",
                               "--workers", "1", "--test-fraction", "0"]) == 0
    root = tmp_path / "data"
    shutil.copytree(cached, root)
    return root


def _run(root, weights_dir, *extra):
    return encode_latent.main(["--config", VAE, "--diffusion-config", DIT, "--data-root", str(root),
                               "--static-vae", str(weights_dir / "static.safetensors"),
                               "--motion-vae", str(weights_dir / "motion.safetensors"), *extra])


def test_latents_hold_the_posterior_and_the_canonical_gaussians(data, weights):
    wdir, static, motion = weights
    assert _run(data, wdir, "data.num_points=8192") == 0  # every stored point, so a direct encode can check the latents
    names = layout.list_samples(data)
    for name in names:
        lat = torch.load(layout.latent_path(data, name), weights_only=True)
        assert {k: tuple(v.shape) for k, v in lat.items() if k != "static_gs_feats" and k != "static_gs_coords"} == {
            "latent_mean": (8, 64, 8), "latent_std": (8, 64, 8), "fps_sampled_gs_1024": (64, 14),
            "fps_sampled_gs_4096": (256, 14)}
        # The voxels are the sample's frame-0 voxels at the tiny resolution (64^3 pooled by 2).
        idx, _ = layout.read_voxel_features(layout.voxel_features_path(data / name, 0, "patch"))
        coarse = torch.unique(torch.div(idx.long(), 2, rounding_mode="floor"), dim=0)
        assert torch.equal(torch.unique(lat["static_gs_coords"].long(), dim=0), coarse)
        # static_gs_feats rebuild the canonical Gaussians; both FPS sets are distinct rows of them.
        raw = SparseVoxels(torch.cat([torch.zeros(len(coarse), 1, dtype=torch.int32), lat["static_gs_coords"]], 1),
                           lat["static_gs_feats"])
        canon = static.to_gaussians(raw)[0].to_condition()
        for key in ("fps_sampled_gs_1024", "fps_sampled_gs_4096"):
            d = (lat[key][:, None, :3] - canon[None, :, :3]).norm(dim=-1)
            rows = d.argmin(1)
            assert d.min(1).values.max() < 1e-6 and len(set(rows.tolist())) == len(rows)
            torch.testing.assert_close(lat[key], canon[rows], atol=1e-5, rtol=1e-5)
        # Deterministic by default: the posterior MEAN of the motion VAE on all 8 frames, checked against a direct
        # encode of the stored mesh points (all of them, in any order: the encoder is permutation-invariant).
        static_pc = torch.load(layout.static_vertices_path(data / name), weights_only=True).float()
        deltas = torch.load(layout.frame_deltas_path(data / name), weights_only=True).float()[:8]
        moving = static_pc[None] + deltas
        with torch.no_grad():
            enc = motion.encode(moving[0][None], (moving - moving[0])[None], canon[None])
        torch.testing.assert_close(lat["latent_mean"], enc.posterior.mean[0], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(lat["latent_std"], enc.posterior.std[0], atol=2e-5, rtol=1e-4)

        # Image tokens: view 0 of each frame composited on black, through the configured extractor.
        imgs = []
        for t in range(8):
            rgba = np.asarray(Image.open(layout.image_path(data / name, t, 0)), dtype=np.float32) / 255
            imgs.append(torch.from_numpy(rgba[..., :3] * rgba[..., 3:]).permute(2, 0, 1))
        want = get_extractor("patch")(torch.stack(imgs))
        got = layout.read_cond_features(layout.cond_features_path(data, name, "patch"))
        torch.testing.assert_close(got.float(), want, atol=2e-3, rtol=2e-3)  # stored as float16

    stats = {w: torch.load(layout.latent_stats_path(data, w), weights_only=True) for w in layout.LATENT_STATS}
    gs = torch.cat([torch.load(layout.latent_path(data, n), weights_only=True)["fps_sampled_gs_4096"] for n in names]).double()
    torch.testing.assert_close(stats["static_mean"].double(), gs.mean(0), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(stats["static_std"].double(), gs.std(0, unbiased=False), atol=1e-6, rtol=1e-5)


def test_deterministic_reruns_skip_and_failures_are_named(data, weights, capsys):
    wdir = weights[0]
    names = layout.list_samples(data)
    bad = data / "obj_bad"
    shutil.copytree(data / names[0], bad)
    layout.voxel_features_path(bad, 0, "patch").write_bytes(b"not an npz")
    assert _run(data, wdir) == 1                                       # one failure: non-zero exit
    err = capsys.readouterr().err
    assert "obj_bad" in err and "1 of 4 objects failed" in err
    paths = [layout.latent_path(data, n) for n in names]
    first = [torch.load(p, weights_only=True) for p in paths]
    stamps = [p.stat().st_mtime_ns for p in paths]

    assert _run(data, wdir, "--list", str(data / "all.txt")) == 0      # all done: nothing is re-encoded
    assert "0 encoded, 3 already done" in capsys.readouterr().out
    assert [p.stat().st_mtime_ns for p in paths] == stamps
    assert _run(data, wdir, "--list", str(data / "all.txt"), "--overwrite") == 0
    again = [torch.load(p, weights_only=True) for p in paths]
    assert all(torch.equal(a[k], b[k]) for a, b in zip(first, again) for k in a)  # bitwise deterministic

    # Stochastic encoding samples the static posterior: other canonical Gaussians, reproducible by seed.
    assert _run(data, wdir, "--list", str(data / "all.txt"), "--overwrite", "--stochastic") == 0
    s1 = torch.load(paths[0], weights_only=True)
    assert not torch.equal(s1["static_gs_feats"], first[0]["static_gs_feats"])
    # New statistics replace the old ones, which are kept beside them.
    assert layout.latent_stats_path(data, "static_mean").with_suffix(".pt.prev").is_file()


def test_latent_stats_match_sampled_latents():
    """Statistics of the draws mean + std·ε the DiT trains on, against a Monte-Carlo estimate in float64."""
    g = torch.Generator().manual_seed(0)
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        mus, sds, gss = [], [], []
        for i in range(3):
            mu = torch.randn(4, 16, 5, generator=g) * torch.arange(1, 6) + torch.arange(5)
            sd = torch.rand(4, 16, 5, generator=g) * 2
            gs = torch.randn(32, 14, generator=g) * 3 + 1
            path = layout.latent_path(d, f"o{i}")
            path.parent.mkdir(parents=True)
            torch.save({"latent_mean": mu, "latent_std": sd, "fps_sampled_gs_4096": gs}, path)
            mus.append(mu), sds.append(sd), gss.append(gs)
        stats = compute_latent_stats(d, ["o0", "o1", "o2"])
    mu, sd = torch.stack(mus).double().reshape(-1, 5), torch.stack(sds).double().reshape(-1, 5)
    draws = mu[None] + sd[None] * torch.randn(4000, *mu.shape, generator=g, dtype=torch.float64)
    draws = draws.reshape(-1, 5)
    torch.testing.assert_close(stats["deformation_mean"].double(), draws.mean(0), atol=0.02, rtol=0)
    torch.testing.assert_close(stats["deformation_std"].double(), draws.std(0), atol=0, rtol=0.01)
    gs = torch.cat(gss).double()
    torch.testing.assert_close(stats["static_std"].double(), gs.std(0, unbiased=False), atol=1e-6, rtol=1e-6)


def test_posterior_means_mode_uses_means_in_statistics_and_items(tmp_path):
    """posterior_draws=False: statistics of μ alone (population moments in float64, by hand) and items that are the
    normalised means themselves, whatever the seed; the default draws differ from them."""
    from datasets.latent_dataset import LatentDataset
    g = torch.Generator().manual_seed(1)
    mus = []
    for i in range(2):
        mu = torch.randn(6, 8, 3, generator=g) * 2 + i
        latent = {"latent_mean": mu, "latent_std": torch.full_like(mu, 5.0),  # noise far larger than the signal
                  "fps_sampled_gs_1024": torch.randn(8, 14, generator=g), "fps_sampled_gs_4096": torch.randn(16, 14, generator=g)}
        path = layout.latent_path(tmp_path, f"o{i}")
        path.parent.mkdir(parents=True)
        torch.save(latent, path)
        layout.write_cond_features(layout.cond_features_path(tmp_path, f"o{i}", "patch"),
                                   torch.randn(6, 5, 4, generator=g).half())
        mus.append(mu)
    stats = compute_latent_stats(tmp_path, ["o0", "o1"], posterior_draws=False)
    flat = torch.stack(mus).double().reshape(-1, 3).numpy()
    n = len(flat)
    mean = [sum(flat[:, c]) / n for c in range(3)]
    std = [(sum((flat[:, c] - mean[c]) ** 2) / n) ** 0.5 for c in range(3)]
    torch.testing.assert_close(stats["deformation_mean"].double(), torch.tensor(mean, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(stats["deformation_std"].double(), torch.tensor(std, dtype=torch.float64), atol=0, rtol=1e-5)

    means = LatentDataset(tmp_path, ["o0", "o1"], stats, num_frames=6, extractor="patch", uncond_p=0.0,
                          posterior_draws=False, seed=7)
    want = (mus[1] - stats["deformation_mean"]) / stats["deformation_std"]
    torch.testing.assert_close(means[1]["x"], want)
    draws = LatentDataset(tmp_path, ["o0", "o1"], stats, num_frames=6, extractor="patch", uncond_p=0.0, seed=7)
    assert (draws[1]["x"] - want).abs().mean() > 1.0  # σ = 5 against a unit-scale normalised mean


def test_mean_motion_baseline_is_the_per_frame_mean():
    """scripts/evaluate.py's mean-motion latents: per frame, the mean over objects and tokens, against a direct loop."""
    import tempfile

    from scripts.evaluate import mean_motion_latents
    g = torch.Generator().manual_seed(3)
    with tempfile.TemporaryDirectory() as d:
        mus = [torch.randn(6, 10, 4, generator=g) + i for i in range(3)]
        for i, mu in enumerate(mus):
            path = layout.latent_path(d, f"o{i}")
            path.parent.mkdir(parents=True)
            torch.save({"latent_mean": mu}, path)
        got = mean_motion_latents(d, ["o0", "o1", "o2"], frames=5)
    want = torch.zeros(5, 4, dtype=torch.float64)
    for t in range(5):
        for c in range(4):
            want[t, c] = sum(float(mu[t, k, c]) for mu in mus for k in range(10)) / 30
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=0)


def test_a_failed_object_keeps_no_stale_latent(data, weights, capsys):
    """Encode, corrupt one object's voxels, encode again with --overwrite: its latent of the first run is set aside
    (named in the failure line), and the statistics are those of the other objects."""
    wdir = weights[0]
    names = layout.list_samples(data)
    assert _run(data, wdir) == 0
    bad = names[1]
    stale = layout.latent_path(data, bad)
    assert stale.is_file()
    layout.voxel_features_path(data / bad, 0, "patch").write_bytes(b"not an npz")
    capsys.readouterr()
    assert _run(data, wdir, "--overwrite") == 1
    err = capsys.readouterr().err
    assert f"{bad}: " in err and "deformation_latent.pt.failed" in err, err
    assert not stale.exists() and stale.with_name("deformation_latent.pt.failed").is_file()
    assert not layout.cond_features_path(data, bad, "patch").exists()  # its tokens were due for rewriting too
    good = [n for n in names if n != bad]
    want = compute_latent_stats(data, good, load_config(DIT).data.get("posterior_draws", True))
    for which in layout.LATENT_STATS:
        assert torch.equal(torch.load(layout.latent_stats_path(data, which), weights_only=True), want[which]), which


def test_latents_folder_outside_the_root_and_the_lock(data, weights, tmp_path, capsys):
    from test_run_folders import _stop, hold_lock
    from utils import cli

    wdir = weights[0]
    outside = tmp_path / "other_disk"
    outside.mkdir()
    (data / "latents").symlink_to(outside)
    try:
        assert cli.run(encode_latent.main, _argv(data, wdir)) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "latents: resolves to" in err and "--allow-symlinks" in err, err
        assert list(outside.iterdir()) == []  # nothing written there, not even the lock
        # With --allow-symlinks the latents go where the symlink leads.
        assert cli.run(encode_latent.main, [*_argv(data, wdir), "--allow-symlinks"]) == 0
        assert (outside / layout.list_samples(data)[0] / "deformation_latent.pt").is_file()
    finally:
        layout.allow_symlinks(False)
    # A second encoder on the same latents folder refuses, naming the first one's process.
    (data / "latents").unlink()
    proc = hold_lock(data / "latents")
    try:
        assert cli.run(encode_latent.main, _argv(data, wdir)) == 2
        assert f"latents is in use by process {proc.pid}" in capsys.readouterr().err
    finally:
        _stop(proc)


def _argv(root, weights_dir):
    return ["--config", VAE, "--diffusion-config", DIT, "--data-root", str(root),
            "--static-vae", str(weights_dir / "static.safetensors"), "--motion-vae", str(weights_dir / "motion.safetensors")]
