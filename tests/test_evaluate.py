"""scripts/evaluate.py from a pack and a test set alone, and the pack's mean latent that scripts/make_pack.py writes.

On the tiny random pack and two synthetic samples of the inference tests: make_pack's mean_latent.pt against a float64
mean computed here from the latent files; evaluate without --train-list (the pack's mean latent) against evaluate with
it; per_object.csv against metrics.json; the PNG strips against the ground-truth renders; the batched scoring
(pipeline/ground_truth.py) against one render per view; a pack without a mean latent; a missing list refused in one
line."""
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datasets import layout
from pipeline.canonical import static_reconstruction
from pipeline.ground_truth import ground_truth_metrics, held_out_views, score_rows
from pipeline.pack import PACK_FILES, load_models
from scripts import evaluate, make_pack
from test_inference import DIT, VAE, world  # noqa: F401  (the tiny pack and data of the inference tests)
from utils.losses import load_lpips
from utils.metrics import ImageMetrics
from utils.render import rasterize
from utils.training import STATE_FILE

REPO = Path(__file__).resolve().parents[1]
T, L, C = 8, 64, 8  # frames, latent tokens, channels of configs/tiny


@pytest.fixture(scope="module")
def setup(world, tmp_path_factory):
    """Random training latents for the two samples (and one unlisted object), fake VAE and DiT runs holding the world
    pack's weights, and make_pack's pack from them."""
    root, data, pack = world
    tmp = tmp_path_factory.mktemp("evaluate")
    names = layout.list_samples(data)
    g = torch.Generator().manual_seed(5)
    mus = {}
    for i, n in enumerate([*names, "unlisted"]):
        mus[n] = torch.randn(T, L, C, generator=g) * (1 + i) + 0.3 * i
        path = layout.latent_path(data, n)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"latent_mean": mus[n]}, path)
    train = layout.write_list_file(tmp / "train.txt", names)
    runs = {}
    for run, models in (("vae", ("static_vae", "motion_vae")), ("dit", ("dit",))):
        ckpt = tmp / run / "checkpoints" / "step_0000001"
        ckpt.mkdir(parents=True)
        (ckpt / STATE_FILE).write_bytes(b"")
        for m in models:
            shutil.copy(pack / PACK_FILES[m], ckpt / f"ema_{m}.safetensors")
        runs[run] = ckpt
    new = tmp / "pack"
    assert make_pack.main(["--vae-run", str(runs["vae"]), "--dit-run", str(runs["dit"]), "--stats-dir", str(pack),
                           "--data-root", str(data), "--train-list", str(train), "--vae-config", VAE,
                           "--config", DIT, "--out", str(new)]) == 0
    return {"data": data, "names": names, "mus": mus, "train": train, "old_pack": pack, "pack": new, "tmp": tmp}


@pytest.fixture(scope="module")
def runs(setup):
    """evaluate.py three times: the new pack alone (2 objects, 1 strip), the same with --train-list, and the world's
    pack, which has no mean latent, alone."""
    s = setup
    base = ["--config", DIT, "--vae-config", VAE, "--data-root", str(s["data"]), "--list", str(s["data"] / "all.txt")]
    out = {k: s["tmp"] / f"eval_{k}" for k in ("pack", "train_list", "no_mean")}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GVF_LPIPS_HUB", "off")
        assert evaluate.main(["--pack", str(s["pack"]), *base, "--limit", "2", "--renders", "1",
                              "--out", str(out["pack"])]) == 0
        assert evaluate.main(["--pack", str(s["pack"]), *base, "--limit", "1", "--renders", "0",
                              "--train-list", str(s["train"]), "--out", str(out["train_list"])]) == 0
        assert evaluate.main(["--pack", str(s["old_pack"]), *base, "--limit", "1", "--renders", "0",
                              "--out", str(out["no_mean"])]) == 0
    return {k: (v, json.loads((v / "metrics.json").read_text())) for k, v in out.items()}


def test_make_pack_writes_the_float64_mean_of_the_listed_latents(setup):
    got = torch.load(layout.mean_latent_path(setup["pack"]), weights_only=True)
    assert got.dtype == torch.float32 and got.shape == (T, C)
    listed = [setup["mus"][n].double().numpy() for n in setup["names"]]
    want = np.zeros((T, C))
    for t in range(T):
        for c in range(C):
            want[t, c] = sum(mu[t, k, c] for mu in listed for k in range(L)) / (len(listed) * L)
    np.testing.assert_allclose(got.double().numpy(), want, atol=1e-6, rtol=0)
    # The unlisted object's latent is left out (with it the mean would be far off).
    everything = (want * len(listed) + setup["mus"]["unlisted"].double().numpy().mean(1)) / (len(listed) + 1)
    assert np.abs(everything - want).max() > 0.1
    for f in [*PACK_FILES.values(), "config.yml", "vae.yml"]:
        assert (setup["pack"] / f).is_file(), f


def test_make_pack_refuses_missing_training_latents(setup, tmp_path):
    bad = layout.write_list_file(tmp_path / "train.txt", [*setup["names"], "never_encoded"])
    with pytest.raises(SystemExit, match="never_encoded"):
        make_pack.main(["--vae-run", "unused", "--dit-run", "unused", "--stats-dir", str(setup["old_pack"]),
                        "--data-root", str(setup["data"]), "--train-list", str(bad), "--vae-config", VAE,
                        "--config", DIT, "--out", str(tmp_path / "pack")])
    assert not (tmp_path / "pack").exists()  # refused before anything was written


def test_the_pack_mean_latent_gives_the_train_list_row(runs):
    _, alone = runs["pack"]
    _, listed = runs["train_list"]
    assert alone["mean_motion_source"] == "the pack's mean_latent.pt"
    assert listed["mean_motion_source"].startswith("mean latent of 2 objects")
    # Same pack, same object, same seed: every row, the mean-motion one included, is the same number.
    for m in evaluate.METHODS:
        assert alone["per_object"][m][0] == listed["per_object"][m][0], m
    assert len(alone["per_object"]["mean motion"]) == 2 and alone["frames_covered"] == "frames 1..7 (after the first)"


def test_per_object_csv_holds_the_json_values(runs):
    out, result = runs["pack"]
    with open(out / "per_object.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["name"] for r in table] == result["names"] and len(table) == 2
    slug = {"generated": "generated", "VAE reconstruction": "vae_reconstruction", "oracle": "oracle",
            "still": "still", "mean motion": "mean_motion"}
    assert list(table[0]) == ["name"] + [f"{slug[m]}_{k}" for m in evaluate.METHODS for k in ("psnr", "epe")] + \
        ["frame0_static_vae_psnr"]
    for i, r in enumerate(table):
        for m in evaluate.METHODS:
            for k in ("psnr", "epe"):
                assert float(r[f"{slug[m]}_{k}"]) == result["per_object"][m][i][k], (m, k)
        assert float(r["frame0_static_vae_psnr"]) == result["per_object"]["frame0_static_vae"][i]["psnr"]


def test_render_strips(runs, setup):
    out, result = runs["pack"]
    first, second = result["names"]
    assert not (out / "renders" / f"{second}.png").exists()  # --renders 1: the first object only
    strip = np.asarray(Image.open(out / "renders" / f"{first}.png").convert("RGB")).astype(np.int32)
    cell = 128  # 64² renders doubled
    frames = [1, 3, 5, 7]
    assert strip.shape == (len(evaluate.STRIP_ROWS) * cell, len(frames) * cell, 3)
    sample = setup["data"] / first
    for j, t in enumerate(frames):
        # Row 0: the first held-out view (view 1) of frame t on white, each pixel doubled; below the label band.
        rgba = np.asarray(Image.open(layout.image_path(sample, t, 1)), dtype=np.float64) / 255
        gt = rgba[..., :3] * rgba[..., 3:] + (1 - rgba[..., 3:])
        gt = np.floor(np.clip(gt, 0, 1) * 255 + 0.5).repeat(2, 0).repeat(2, 1)
        assert np.abs(strip[cell // 2: cell, j * cell: (j + 1) * cell] - gt[cell // 2:]).max() <= 1, t
    # Row 2, still: the same cameras every frame, so the same image; row 3, the oracle, moves.
    body = lambda r, j: strip[r * cell + cell // 2: (r + 1) * cell, j * cell: (j + 1) * cell]
    assert all(np.array_equal(body(2, 0), body(2, j)) for j in range(1, 4))
    assert not np.array_equal(body(3, 0), body(3, 3))


def test_a_pack_without_mean_latent_leaves_the_row_out(runs):
    out, result = runs["no_mean"]
    assert "mean motion" not in result["methods"] and "mean motion" not in result["per_object"]
    assert result["notes"] == [result["notes"][0]] and "mean_latent.pt" in result["notes"][0]
    assert "generated_beats_mean_motion_psnr" not in result["wins"] and len(result["checks"]) == 7
    table = (out / "metrics.md").read_text()
    assert "| mean motion |" not in table and "Note: mean motion left out" in table
    assert "mean_motion_psnr" not in (out / "per_object.csv").read_text()


def test_batched_scores_equal_one_render_per_view(setup, world, monkeypatch):
    """score_rows (one render per row, the still row once, 4-pixel tiles) and ground_truth_metrics against a brute
    force: every frame and view rendered alone at the rasterizer's default tile and scored alone. The same numbers up
    to the tiles' splat tails."""
    monkeypatch.setenv("GVF_LPIPS_HUB", "off")
    root, data, pack = world
    dev = torch.device("cpu")
    models = load_models(pack, config=DIT, vae_config=VAE)
    name = setup["names"][0]
    canonical = static_reconstruction(models.static_vae, data / name, models.voxel_extractor, dev)
    views = held_out_views(data / name, T, dev)
    g = torch.Generator().manual_seed(1)
    moving = torch.randn(T, len(canonical), 14, generator=g) * 0.02
    deltas = {"generated": moving, "still": torch.zeros_like(moving)}
    metrics = ImageMetrics(load_lpips(device=dev))

    def brute(delta, t):  # {metric: mean over the held-out views of frame t}
        gt, ext, K = views[t]
        frame = canonical.apply_delta(delta[[t]]).map(lambda x: x[0])
        per_view = [metrics(rasterize(frame, ext[v:v + 1], K[v:v + 1], gt.shape[-1], gt.shape[-1],
                                      background=1.0).rgb.movedim(-1, -3), gt[v:v + 1]) for v in range(len(gt))]
        return {k: float(np.mean([float(m[k]) for m in per_view])) for k in per_view[0]}

    want = {row: [brute(d, t) for t in range(T)] for row, d in deltas.items()}
    assert abs(want["generated"][3]["psnr"] - want["still"][3]["psnr"]) > 0.1, want  # the rows are told apart
    scores, kept = score_rows(views, canonical, deltas, metrics, keep=[2], keep_view=1)
    for row in deltas:
        for k, v in scores[row]["mean_after_first"].items():
            assert v == pytest.approx(np.mean([f[k] for f in want[row][1:]]), abs=1e-3), (row, k)
        assert kept[row][0].shape == views[2][0][1].shape
    assert scores["still"]["per_frame"][0]["psnr"] == pytest.approx(want["still"][0]["psnr"], abs=1e-3)
    assert 0 not in scores["generated"]["per_frame"]  # frame 0 is not reported for the moving rows

    summary = ground_truth_metrics(views, canonical, moving, metrics)  # summary.json's: every frame
    assert summary["frames_covered"] == {"mean": "all frames 0..7", "mean_after_first": "frames 1..7 (after the first)"}
    assert [f["psnr"] for f in summary["per_frame"]] == pytest.approx([f["psnr"] for f in want["generated"]], abs=1e-3)
    assert summary["mean"]["psnr"] == pytest.approx(np.mean([f["psnr"] for f in want["generated"]]), abs=1e-3)


def test_missing_list_is_one_line(setup, tmp_path):
    missing = tmp_path / "test.txt"
    r = subprocess.run([sys.executable, "scripts/evaluate.py", "--pack", str(setup["pack"]), "--data-root",
                        str(setup["data"]), "--list", str(missing), "--out", str(tmp_path / "out")],
                       cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines() == [f"evaluate: error: {missing}: No such file or directory"], r.stderr
    assert not (tmp_path / "out").exists()
