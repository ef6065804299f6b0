"""scripts/train_pack.sh at the tiny scale on the CPU: interrupted in its VAE stage, rerun to the end, rerun again.
What must hold: a SIGTERM stops it with status 3 after the trainer saved; the rerun skips the finished stages, resumes
the trainer to its last step and writes a float16 pack equal to the runs' EMA weights; a third run does nothing."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from utils.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow  # a minute of end-to-end training: `make test-slow` and CI run it

REPO = Path(__file__).resolve().parents[1]
STAGES = ("data", "vae", "latents", "dit", "pack", "evaluate")


def _command(tmp: Path) -> list[str]:
    quiet = ["data.num_workers=0", "train.log_interval=1"]
    return ["bash", "scripts/train_pack.sh", "--scale", "tiny", "--data", str(tmp / "data"), "--runs", str(tmp / "runs"),
            "--num", "3", "--test-fraction", "0.34", "--workers", "1", "--python", sys.executable, "--eval-limit", "1",
            *(a for kv in ["train.max_steps=8", "train.static_vae_steps=4", "train.save_interval=1",
                           "train.image_interval=100", *quiet] for a in ("--vae-set", kv)),
            *(a for kv in ["train.max_steps=3", *quiet] for a in ("--dit-set", kv))]


def _env() -> dict:
    env = {**os.environ, "GVF_LPIPS_HUB": "off", "OMP_NUM_THREADS": "1"}
    env.pop("GVF_LPIPS_DIR", None)
    return env


def _latest_step(run: Path) -> int:
    return int((run / "checkpoints" / "latest").read_text().strip().split("_")[1])


def test_train_pack_interrupt_resume_and_skip(tmp_path):
    runs = tmp_path / "runs"
    first = subprocess.Popen(_command(tmp_path), cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    deadline = time.monotonic() + 400
    while not (runs / "vae" / "checkpoints" / "latest").exists():  # the VAE trainer's first checkpoint
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0][-3000:]
        time.sleep(0.2)
    first.send_signal(signal.SIGTERM)
    out = first.communicate(timeout=300)[0]
    assert first.returncode == 3, out[-3000:]
    assert "vae: interrupted" in out
    assert (runs / "done" / "data").is_file() and not (runs / "done" / "vae").exists()
    stopped_at = _latest_step(runs / "vae")
    assert 1 <= stopped_at < 8

    second = subprocess.run(_command(tmp_path), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-4000:]
    assert "== data: done earlier, skipped" in out and "--resume latest" in out
    assert _latest_step(runs / "vae") == 8 and _latest_step(runs / "dit") == 3
    assert all((runs / "done" / s).is_file() for s in STAGES)
    # The minutes table lists every stage once (the interrupted VAE's two runs summed) and a total.
    lines = second.stdout.splitlines()
    start = lines.index("| stage | minutes |") + 2
    table = [line.split("|")[1].strip() for line in lines[start:] if line.startswith("| ")]
    assert table == [*STAGES, "total"]

    # The pack holds the runs' EMA weights, rounded to float16 (float64 buffers kept).
    for name, run in (("static_vae", "vae"), ("motion_vae", "vae"), ("dit", "dit")):
        ckpt = runs / run / "checkpoints" / (runs / run / "checkpoints" / "latest").read_text().strip()
        ema, _, _ = load_checkpoint(ckpt / f"ema_{name}.safetensors")
        packed, _, _ = load_checkpoint(runs / "pack" / f"{name}.safetensors")
        assert packed.keys() == ema.keys()
        for k, v in ema.items():
            want = v.to(torch.float16) if v.dtype == torch.float32 else v
            assert packed[k].dtype == want.dtype and torch.equal(packed[k], want), (name, k)
    assert (runs / "eval" / "metrics.json").is_file()

    third = subprocess.run(_command(tmp_path), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    assert all(f"== {s}: done earlier, skipped" in third.stdout for s in STAGES)


def test_train_pack_with_real_animations(tmp_path):
    """--real: the prepared real samples join the data root as hard links (no copy), the trainers see the synthetic and
    the real training lists together, and the pack is evaluated on the real test split too."""
    real = tmp_path / "real"
    for name, split in (("walk_a", "train"), ("walk_b", "test")):
        r = subprocess.run([sys.executable, "-m", "data_rendering.import_animation", "assets/meshes/creature_walk.npz",
                            "--out", str(real), "--name", name, "--split", split, "--frames", "8", "--views", "8",
                            "--res", "64"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
    run = subprocess.run(_command(tmp_path) + ["--real", str(real)], cwd=REPO, env=_env(), capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    data, runs = tmp_path / "data", tmp_path / "runs"
    image = Path("imgs") / "timestep_00_view_00.png"
    assert os.path.samefile(data / "walk_a" / image, real / "walk_a" / image)   # a hard link, not a copy
    synthetic = (data / "train.txt").read_text().split()
    assert (data / "train_mixed.txt").read_text().split() == synthetic + ["walk_a"]
    assert (data / "real_test.txt").read_text().split() == ["walk_b"]
    assert (data / "latents" / "walk_a").is_dir() and not (data / "latents" / "walk_b").exists()  # trained on, or not
    assert json.loads((runs / "eval_real" / "metrics.json").read_text())["names"] == ["walk_b"]
    assert json.loads((runs / "eval" / "metrics.json").read_text())["names"][0].startswith("obj_")


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb is needed to build the test package")
def test_train_pack_with_a_real_bundle(tmp_path):
    """--real-bundle: a first stage unbundles the bundle at the scale's frames, views and resolution into DATA_real,
    which then joins the data root as --real's folder does, with the split the bundle recorded."""
    from test_game_assets import write_deb
    from test_game_assets_bundle import _seed

    write_deb(tmp_path, tmp_path / "cache", corrupt=False, textured=True)
    bundle = tmp_path / "b.zip"
    made = subprocess.run([sys.executable, "-m", "data_rendering.game_assets", "--cache", str(tmp_path / "cache"),
                           "--packages", "megaglest-data", "--bundle", str(bundle), "--frames", "8",
                           "--test-fraction", "0.5", "--seed", str(_seed())], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-2000:]
    run = subprocess.run(_command(tmp_path) + ["--real-bundle", str(bundle)], cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    data, real, runs = tmp_path / "data", tmp_path / "data_real", tmp_path / "runs"
    assert "== unbundle:" in run.stdout and (runs / "done" / "unbundle").is_file()
    test = (real / "test.txt").read_text().split()
    assert [n.split("__")[1] for n in test] == ["f_v", "f_v"]  # the seed put unit v on the test side
    assert (data / "real_test.txt").read_text().split() == test
    assert (data / "train_mixed.txt").read_text().split()[-1] == "megaglest__f_u__u_walking"
    sample = real / "megaglest__f_u__u_walking"
    meta = json.loads((sample / "metadata.json").read_text())
    assert (meta["frames"], meta["views"], meta["resolution"]) == (8, 8, 64)  # configs/tiny's
    image = Path("imgs") / "timestep_07_view_07.png"
    assert os.path.samefile(data / sample.name / image, sample / image)
