"""Motion statistics against brute-force float64 numpy, and the oracle motion of scripts/evaluate.py and of
inference's summary.json against an oracle recomputed here from the mesh points (numpy KNN)."""
import json

import numpy as np
import pytest
import torch

from datasets import layout
from pipeline.canonical import static_reconstruction
from pipeline.pack import load_models
from scripts import evaluate
from test_inference import DIT, VAE, _run, world  # noqa: F401  (the tiny pack and data of the inference tests)
from utils.metrics import motion_statistics


def brute_force(pred: np.ndarray, oracle: np.ndarray) -> dict:
    """One Gaussian and frame at a time, frames after the first, float64."""
    epe, disp, true, wcos, wsum = [], [], [], 0.0, 0.0
    for t in range(1, len(pred)):
        for p, o in zip(pred[t], oracle[t]):
            epe.append(np.sqrt(np.sum((p - o) ** 2)))
            disp.append(np.sqrt(p @ p))
            true.append(np.sqrt(o @ o))
            cos = 0.0 if not p.any() else (p @ o) / (np.sqrt(p @ p) * np.sqrt(o @ o) + 1e-300)
            wcos, wsum = wcos + np.sqrt(o @ o) * cos, wsum + np.sqrt(o @ o)
    return {"epe": np.mean(epe), "displacement": np.mean(disp), "true_displacement": np.mean(true),
            "ratio": np.mean(disp) / np.mean(true), "cosine": wcos / wsum}


def test_motion_statistics_on_random_data():
    rng = np.random.default_rng(0)
    pred, oracle = rng.normal(size=(5, 40, 3)), rng.normal(size=(5, 40, 3)) * rng.uniform(0, 2, size=(1, 40, 1))
    pred[2, :7] = 0.0    # zero predictions: cosine 0
    oracle[3, 7:9] = 0.0  # still Gaussians: no weight in the cosine
    got = motion_statistics(torch.from_numpy(pred).float(), torch.from_numpy(oracle).float())
    for k, v in brute_force(pred.astype(np.float32).astype(np.float64),
                            oracle.astype(np.float32).astype(np.float64)).items():
        assert got[k] == pytest.approx(v, rel=1e-9), k
    per_frame = [np.mean([np.linalg.norm(p) for p in pred[t].astype(np.float32)]) for t in range(5)]
    np.testing.assert_allclose(got["displacement_per_frame"], per_frame, rtol=1e-6)


def test_motion_statistics_of_a_rigid_translation():
    shift = np.array([0.3, -0.4, 1.2])                                           # |shift| = 1.3
    oracle = np.zeros((4, 10, 3))
    oracle[1:] = shift                                                            # frame 0 is the canonical
    o = torch.from_numpy(oracle)
    still = motion_statistics(torch.zeros_like(o), o)
    assert still["epe"] == pytest.approx(1.3) and still["true_displacement"] == pytest.approx(1.3)
    assert still["displacement"] == 0 and still["ratio"] == 0 and still["cosine"] == 0
    exact = motion_statistics(o, o)
    assert exact["epe"] == 0 and exact["ratio"] == pytest.approx(1) and exact["cosine"] == pytest.approx(1)
    double = motion_statistics(2 * o, o)
    assert double["epe"] == pytest.approx(1.3) and double["ratio"] == pytest.approx(2)
    assert double["cosine"] == pytest.approx(1)
    assert motion_statistics(-o, o)["cosine"] == pytest.approx(-1)
    # Frame 0 is left out: a prediction wrong only there scores exactly.
    wrong_first = o.clone()
    wrong_first[0] = 5.0
    assert motion_statistics(wrong_first, o)["epe"] == 0
    # No oracle motion: ratio and cosine are undefined; no oracle: only displacements.
    none = motion_statistics(o, torch.zeros_like(o))
    assert none["ratio"] is None and none["cosine"] is None and none["epe"] == pytest.approx(1.3)
    assert set(motion_statistics(o)) == {"displacement_per_frame", "displacement"}


def oracle_numpy(sample, canonical_xyz: np.ndarray, num_points: int, frames: int, k: int, beta: float) -> np.ndarray:
    """The mesh-guided KNN interpolation (docs/published_system.md §2.2 step 3) written out in float64 numpy: (T, N, 3)."""
    static = torch.load(layout.static_vertices_path(sample)).double().numpy()
    moving = static[None] + torch.load(layout.frame_deltas_path(sample)).double().numpy()[:frames]
    # The motion VAE's training points: VAEDataset draws num_points of them with default_rng([seed, epoch, index])
    # = [0, 0, 0] for an object evaluated on its own, re-based on frame 0.
    pts = np.random.default_rng([0, 0, 0]).permutation(len(static))[:num_points]
    base, disp = moving[0, pts], moving[:, pts] - moving[:1, pts]
    d2 = ((canonical_xyz[:, None] - base[None]) ** 2).sum(-1)                    # (N, P)
    idx = np.argsort(d2, axis=1, kind="stable")[:, :k]
    dk = np.take_along_axis(d2, idx, 1)
    r2 = (np.sqrt(dk.mean(1, keepdims=True)) + 1e-6) ** 2
    w = np.exp(-beta * dk / r2) * (dk <= r2)
    w /= w.sum(1, keepdims=True) + 1e-8
    return np.einsum("nk,tnkc->tnc", w, disp[:, idx])


@pytest.fixture(scope="module")
def oracle_of_first(world):
    """The first sample's name, its canonical (the static VAE reconstruction), and its numpy oracle Δxyz."""
    root, data, pack = world
    models = load_models(pack, config=DIT, vae_config=VAE)
    name = layout.list_samples(data)[0]
    canonical = static_reconstruction(models.static_vae, data / name, models.voxel_extractor, torch.device("cpu"))
    mv = models.motion.motion_vae
    oracle = oracle_numpy(data / name, canonical.xyz.double().numpy(), mv.num_inputs, 8, mv.knn_k, mv.beta)
    return name, oracle


def test_evaluate_oracle_and_still_rows(world, oracle_of_first, tmp_path, monkeypatch):
    monkeypatch.setenv("GVF_LPIPS_HUB", "off")
    root, data, pack = world
    name, oracle = oracle_of_first
    for n in layout.list_samples(data):  # the mean-motion row reads training latents: zeros do here
        path = layout.latent_path(data, n)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"latent_mean": torch.zeros(8, 64, 8)}, path)
    out = tmp_path / "eval"
    assert evaluate.main(["--pack", str(pack), "--config", DIT, "--vae-config", VAE, "--data-root", str(data),
                          "--list", str(data / "all.txt"), "--train-list", str(data / "all.txt"), "--out", str(out),
                          "--limit", "1"]) == 0
    result = json.loads((out / "metrics.json").read_text())
    assert result["names"] == [name]
    true = np.linalg.norm(oracle[1:], axis=-1).mean()
    assert true > 1e-3  # the object moves: the checks below mean something
    m = result["methods"]
    assert m["oracle"]["epe"] == pytest.approx(0, abs=1e-7) and m["oracle"]["ratio"] == pytest.approx(1, rel=1e-6)
    assert m["oracle"]["true_displacement"] == pytest.approx(true, rel=1e-4)
    assert m["still"]["epe"] == pytest.approx(true, rel=1e-4) and m["still"]["displacement"] == 0
    # The oracle moves the canonical towards the ground truth: better images than standing still.
    assert m["oracle"]["psnr"] > m["still"]["psnr"]
    per = result["per_object"]
    assert result["wins"]["generated_beats_still_psnr"] == int(per["generated"][0]["psnr"] > per["still"][0]["psnr"])
    frame0 = result["frame0_static_vae"]["psnr"]
    assert result["checks"][0]["value"] == frame0 and result["checks"][0]["pass"] == (frame0 >= 26)
    table = (out / "metrics.md").read_text()
    assert "| oracle | " in table and "| still | " in table and table.count("PASS") + table.count("FAIL") == 8


def test_inference_summary_motion_against_the_oracle(world, oracle_of_first, tmp_path, monkeypatch):
    monkeypatch.setenv("GVF_LPIPS_HUB", "off")
    root, data, pack = world
    name, oracle = oracle_of_first
    assert _run("--pack", pack, "--input", data / name, "--out", tmp_path) == 0
    motion = json.loads((tmp_path / name / "summary.json").read_text())["motion"]
    pred = np.load(tmp_path / name / "animation.npz")["delta"][..., :3].astype(np.float64)
    true = np.linalg.norm(oracle[1:], axis=-1).mean()
    disp = np.linalg.norm(pred, axis=-1)
    np.testing.assert_allclose(motion["displacement_per_frame"], disp.mean(1), rtol=1e-5)
    assert motion["displacement"] == pytest.approx(disp[1:].mean(), rel=1e-5)
    assert motion["true_displacement"] == pytest.approx(true, rel=1e-4)
    assert motion["epe"] == pytest.approx(np.linalg.norm(pred[1:] - oracle[1:], axis=-1).mean(), rel=1e-4)
    assert motion["ratio"] == pytest.approx(disp[1:].mean() / true, rel=1e-4)
