"""The three training entry points end to end on CPU with the tiny configs and synthetic data, launched the way users
launch them: `accelerate launch --num_processes 1` for each, and encode_latent.py sharded over two processes."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_rendering.synthetic_dataset import main as make_synthetic
from datasets import layout
from models.dit import DiT
from models.motion_vae import MotionVAE
from models.static_vae import StaticVAE
from utils.checkpoint import load_checkpoint
from utils.config import load_config

REPO = Path(__file__).resolve().parents[1]
VAE, DIT = "configs/tiny/vae.yml", "configs/tiny/diffusion.yml"
pytestmark = pytest.mark.slow  # three launched trainers: `make test-slow` and CI run it


def _launch(*args, torchrun=False):
    env = {**os.environ, "GVF_LPIPS_HUB": "off", "OMP_NUM_THREADS": "1"}
    env.pop("GVF_LPIPS_DIR", None)
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/cpu.yaml",
               "--num_processes", "1"]
    proc = subprocess.run([*cmd, *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _latest(run: Path) -> Path:
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()


def test_vae_encode_dit_pipeline(tmp_path):
    data = tmp_path / "data"
    assert make_synthetic(["--out", str(data), "--num", "3", "--frames", "8", "--views", "4", "--res", "64",
                           "--workers", "1", "--test-fraction", "0"]) == 0
    quiet = ["train.log_interval=2", "train.image_interval=2", "data.num_workers=0"]

    vae_run = tmp_path / "vae"
    _launch("main_vae.py", "--config", VAE, "--data-root", data, "--out", vae_run, "train.max_steps=4",
            "train.static_vae_steps=2", *quiet)
    ckpt = _latest(vae_run)
    assert ckpt.name == "step_0000004"
    cfg = load_config(VAE)
    StaticVAE.from_config(cfg.static_vae).load_state_dict(load_checkpoint(ckpt / "ema_static_vae.safetensors")[0])
    MotionVAE(**cfg.model).load_state_dict(load_checkpoint(ckpt / "ema_motion_vae.safetensors")[0])
    assert any(p.name.startswith("events") for p in (vae_run / "tensorboard").iterdir())

    _launch("encode_latent.py", "--config", VAE, "--diffusion-config", DIT, "--data-root", data, "--vae-run", vae_run)
    names = layout.list_samples(data)
    one = {n: torch.load(layout.latent_path(data, n), weights_only=True) for n in names}
    assert all(layout.latent_stats_path(data, w).is_file() for w in layout.LATENT_STATS)

    # Two processes, each its own shard, write exactly what one process wrote.
    proc = _launch("encode_latent.py", "--config", VAE, "--diffusion-config", DIT, "--data-root", data,
                   "--vae-run", vae_run, "--overwrite", torchrun=True)
    assert "3 encoded" in proc.stdout
    for n in names:
        two = torch.load(layout.latent_path(data, n), weights_only=True)
        assert all(torch.equal(one[n][k], two[k]) for k in two), n

    dit_run = tmp_path / "dit"
    _launch("main_latent.py", "--config", DIT, "--data-root", data, "--out", dit_run, "train.max_steps=4",
            "train.save_interval=2", *quiet[:1], "data.num_workers=0")
    weights = load_checkpoint(_latest(dit_run) / "ema_dit.safetensors")[0]
    DiT(**load_config(DIT).model).load_state_dict(weights)
    assert _latest(dit_run).name == "step_0000004"


def test_sigterm_to_the_command_saves_says_where_and_exits_0(tmp_path):
    """`python main_latent.py ...` as the README starts it: SIGTERM mid-run -> a checkpoint, one line naming it, 0."""
    import signal
    import time
    data = tmp_path / "data"
    assert make_synthetic(["--out", str(data), "--num", "2", "--frames", "8", "--views", "2", "--res", "32",
                           "--workers", "1", "--test-fraction", "0"]) == 0
    _launch("encode_latent.py", "--config", VAE, "--diffusion-config", DIT, "--data-root", data, "--vae-run",
            _vae_run_for(tmp_path, data))
    env = {**os.environ, "GVF_LPIPS_HUB": "off", "OMP_NUM_THREADS": "1"}
    run = tmp_path / "dit"
    proc = subprocess.Popen([sys.executable, "main_latent.py", "--config", DIT, "--data-root", str(data), "--out",
                             str(run), "train.max_steps=100000", "train.log_interval=1", "data.num_workers=0"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / "tensorboard").exists():  # the trainer is set up
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        time.sleep(3)  # a few steps in
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    step = _latest(run).name
    lines = [ln for ln in (out + err).replace("\r", "\n").splitlines() if ln.startswith("stopped by SIGTERM")]
    assert len(lines) == 1 and str(run / "checkpoints" / step) in lines[0] and "--resume latest" in lines[0], lines
    assert lines[0].startswith(f"stopped by SIGTERM at step {int(step.split('_')[1])};")


def _vae_run_for(tmp_path, data) -> Path:
    vae_run = tmp_path / "vae"
    _launch("main_vae.py", "--config", VAE, "--data-root", data, "--out", vae_run, "train.max_steps=1",
            "train.static_vae_steps=1", "data.num_workers=0")
    return vae_run
