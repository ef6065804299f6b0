"""The real trainers (main_vae.py, main_latent.py: data loading, loop, optimisers, EMA) at paper scale with random
data of the paper's shapes: optimiser steps per second (median step time after warm-up) and peak GPU memory.

    python benchmarks/bench_trainers.py --steps 200                # paper scale (GPU), bf16
    python benchmarks/bench_trainers.py --tiny --steps 10          # CPU check with the tiny configs
    accelerate launch --num_processes 8 benchmarks/bench_trainers.py --data /tmp/d --json rows.json --profile 5
                                                                   # one rank per GPU (benchmarks/bench_scaling.py)

Data (written once under --data): per object 8192 surface points over 24 frames, a voxel shell of about 15k voxels at
64³ with 1024-channel features, 512² RGBA renders (4 views per frame: the loader reads one canonical and one
deformation view per sample), and for the DiT the (24, 512, 16) latents, the 4096-Gaussian condition and
(24, 1370, 1024) image tokens. Batches as the paper: 2 per process, grad_accum 2 (docs/published_system.md §4).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
import main_latent
import main_vae
from datasets import layout
from utils.cameras import BLENDER_DEFAULT_FOV, blender_camera_json, orbit_cameras
from utils.config import load_config
from utils.training import TrainLoop


def make_data(root: Path, objects: int, frames: int, views: int, res: int, points: int, voxel_channels: int,
              latent_shape: tuple, static_cond: int, tokens: tuple) -> None:
    g = np.random.default_rng(0)
    ext, _ = orbit_cameras(torch.arange(views) * (360.0 / views))
    yy, xx = np.mgrid[:res, :res] / res - 0.5
    disc = ((xx ** 2 + yy ** 2) < 0.09).astype(np.uint8) * 255
    r = np.arange(64) - 31.5
    shell = np.stack(np.meshgrid(r, r, r, indexing="ij"), -1)
    dist = np.linalg.norm(shell, axis=-1)
    for i in range(objects):
        d = root / f"obj_{i:03d}"
        static = g.uniform(-0.4, 0.4, (points, 3)).astype(np.float32)
        deltas = (g.standard_normal((frames, points, 3)) * 0.01).astype(np.float32)
        for path, value in ((layout.static_vertices_path(d), static), (layout.frame_deltas_path(d), deltas)):
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(torch.from_numpy(value), path)
        idx = np.argwhere((dist > 20) & (dist < 21.7)).astype(np.uint8)  # about 15k voxels
        layout.write_voxel_features(layout.voxel_features_path(d, 0, "patch"), idx,
                                    g.standard_normal((len(idx), voxel_channels)).astype(np.float16))
        for t in range(frames):
            for v in range(views):
                rgba = np.dstack([np.full((res, res), 40 * v + t, np.uint8)] * 3 + [disc])
                p = layout.image_path(d, t, v)
                p.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rgba, "RGBA").save(p, compress_level=1)
                c = layout.camera_path(d, t, v)
                c.parent.mkdir(parents=True, exist_ok=True)
                c.write_text(json.dumps(blender_camera_json(ext[v], BLENDER_DEFAULT_FOV, res, res)))
        lat = layout.latent_path(root, d.name)
        lat.parent.mkdir(parents=True, exist_ok=True)
        t_, n_, c_ = latent_shape
        torch.save({"latent_mean": torch.randn(t_, n_, c_), "latent_std": torch.rand(t_, n_, c_) * 0.1,
                    "fps_sampled_gs_1024": torch.randn(n_, 14), "fps_sampled_gs_4096": torch.randn(static_cond, 14)}, lat)
        layout.write_cond_features(layout.cond_features_path(root, d.name, "patch"),
                                   g.standard_normal((t_, *tokens)).astype(np.float16))
    for which in layout.LATENT_STATS:
        shape = (latent_shape[-1],) if which.startswith("deformation") else (14,)
        torch.save(torch.zeros(shape) if which.endswith("mean") else torch.ones(shape), layout.latent_stats_path(root, which))


class StepTimer:
    """Wall time of each optimiser step (device-synchronised) and peak memory, around TrainLoop._train_step; with
    `profile` steps > 0, the time in gradient all-reduce over that many steps after `warmup` (torch.profiler: the
    device time of NCCL's all-reduce kernels; GPUs only)."""

    def __init__(self, warmup: int = 0, profile: int = 0):
        self.times, self.original = [], TrainLoop._train_step
        self.warmup, self.profile, self.prof = warmup, profile, None

    def __enter__(self):
        timer = self

        def timed(loop):
            cuda = loop.device.type == "cuda"
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = timer.original(loop)
            if cuda:
                torch.cuda.synchronize()
            timer.times.append(time.perf_counter() - t0)
            if timer.prof is not None:
                timer.prof.step()
            return out

        if self.profile:
            from torch.profiler import ProfilerActivity, profile, schedule
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.prof = profile(activities=acts, schedule=schedule(wait=self.warmup, warmup=1, active=self.profile))
            self.prof.__enter__()

        TrainLoop._train_step = timed
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        TrainLoop._train_step = self.original
        if self.prof is not None:
            self.prof.__exit__(*exc)

    def allreduce_ms_per_step(self) -> float | None:
        """Mean all-reduce time per profiled step (ms), None without profiling."""
        if self.prof is None or not torch.cuda.is_available():  # gloo reduces in its own threads, unseen here
            return None
        total = sum(e.self_device_time_total for e in self.prof.key_averages()
                    if "nccl" in e.key.lower() and "allreduce" in e.key.lower().replace("_", ""))
        return total / 1e3 / self.profile

    def record(self, name: str, samples_per_step: int, warmup: int) -> dict:
        """The measurement as data (bench_scaling.py reads it): per-process batch, world size, median step."""
        times = self.times[warmup:] or self.times
        return {"case": name, "steps": len(self.times), "median_step_s": statistics.median(times),
                "samples_per_step_per_process": samples_per_step, "world_size": int(os.environ.get("WORLD_SIZE", 1)),
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
                "allreduce_ms_per_step": self.allreduce_ms_per_step()}

    def report(self, name: str, samples_per_step: int, warmup: int) -> str:
        times = self.times[warmup:] or self.times
        med = statistics.median(times)
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
        return (f"| {name} | {len(self.times)} ({warmup} warm-up) | {1 / med:.2f} | {samples_per_step / med:.1f} | "
                f"{med * 1e3:.0f} | {peak:.1f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200, help="optimiser steps per case")
    ap.add_argument("--warmup", type=int, default=10, help="steps left out of the median")
    ap.add_argument("--objects", type=int, default=8)
    ap.add_argument("--data", type=Path, help="data folder (default: a temporary one)")
    ap.add_argument("--tiny", action="store_true", help="the tiny configs (a CPU check of the benchmark itself)")
    ap.add_argument("--precision", default="bf16" if torch.cuda.is_available() else "no")
    ap.add_argument("--cases", nargs="+", default=["vae_static", "vae_joint", "dit"])
    ap.add_argument("--compile", action="store_true", help="the DiT trainer with train.compile=true (GPU)")
    ap.add_argument("--json", type=Path, help="also write the measurements here (rank 0)")
    ap.add_argument("--profile", type=int, default=0, metavar="K", help="profile K steps after the warm-up: the time "
                                                                         "in gradient all-reduce")
    args = ap.parse_args(argv)
    rank = int(os.environ.get("RANK", 0))

    vae_cfg = ROOT / ("configs/tiny/vae.yml" if args.tiny else "configs/vae.yml")
    dit_cfg = ROOT / ("configs/tiny/diffusion.yml" if args.tiny else "configs/diffusion.yml")
    vc, dc = load_config(vae_cfg), load_config(dit_cfg)
    tmp = tempfile.TemporaryDirectory()
    data = args.data or Path(tmp.name) / "data"
    if not data.exists():
        if rank != 0:
            raise SystemExit("bench_trainers: under a launcher, give --data with the data already written (one "
                             "process writes it: run once without the launcher, or use benchmarks/bench_scaling.py)")
        t0 = time.perf_counter()
        make_data(data, args.objects, vc.data.num_timesteps, 4, vc.data.image_resolution, 8192,
                  vc.static_vae.backbones.vae.args.in_channels, (dc.data.num_timesteps, dc.model.resolution,
                  dc.model.in_channels), dc.data.num_static_cond, (1370 if not args.tiny else 50,
                  dc.model.image_cond_channels))
        print(f"data: {args.objects} objects in {time.perf_counter() - t0:.0f} s under {data}")

    # Each name 50 times: epochs of hundreds of steps, as with a real dataset. With 8 names an epoch would last two
    # optimiser steps, and the loader's worker processes, which restart every epoch, would dominate the timing.
    list_file = data / "bench_list.txt"
    layout.write_list_file(list_file, [n for n in layout.list_samples(data) for _ in range(50)])
    common = [f"train.max_steps={args.steps}", f"train.log_interval={max(args.steps // 4, 1)}",
              "train.save_interval=1000000", "data.image_encoder=patch", "data.end_idx=null",
              "+train.tensorboard=false", "+train.progress=false"]
    if args.precision != "no":  # (a bare `no` would be read as YAML false)
        common.append(f"train.mixed_precision={args.precision}")
    vae_base = ["--config", str(vae_cfg), "--data-root", str(data), "--list", str(list_file), *common, "data.num_views=4", "train.image_interval=1000000"]
    cases = {
        "vae_static": ("main_vae.py phase 1 (static VAE)", main_vae.main, [*vae_base, "train.static_vae_steps=1000000"], vc),
        "vae_joint": ("main_vae.py phase 2 (static + motion VAE)", main_vae.main, [*vae_base, "train.static_vae_steps=0"], vc),
        "dit": (f"main_latent.py (DiT, T={dc.train.sample_timesteps})", main_latent.main,
                ["--config", str(dit_cfg), "--data-root", str(data), "--list", str(list_file), *common,
                 *(["train.compile=true"] if args.compile else [])], dc),
    }
    # One run folder for all ranks of a launch: beside --data when given, else in this process's temporary folder.
    runs = args.data.parent / "bench_runs" if args.data else Path(tmp.name)
    rows, records = [], []
    for key in args.cases:
        name, fn, argv_, cfg = cases[key]
        with StepTimer(args.warmup, args.profile) as timer:
            fn([*argv_, "--out", str(runs / key), "--restart"])
        rows.append(timer.report(name, cfg.train.batch_size * cfg.train.grad_accum, args.warmup))
        records.append({"key": key, **timer.record(name, cfg.train.batch_size * cfg.train.grad_accum, args.warmup)})
        print(rows[-1], flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"\n{device}, precision {args.precision}, batch {vc.train.batch_size} x grad_accum {vc.train.grad_accum} per step")
    print("| Trainer | Steps | Optimiser steps/s | Samples/s | Median step (ms) | Peak memory (GiB) |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    if args.json and rank == 0:
        args.json.write_text(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
