"""The whole motion stage at paper scale with random weights (budget of docs/architecture.md §5: ≤ 1 s and ≤ 8 GB
on an H100): conditions (FPS anchors and static condition), DPM-Solver++ sampling, motion-VAE decoding of every
Gaussian, and rendering every frame at 512² (one orbit view per frame).

    python benchmarks/bench_inference.py                       # 32 frames, 25 evaluations, 160k Gaussians, bf16
    python benchmarks/bench_inference.py --compile             # the DiT through torch.compile
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
from bench_models import randomise
from models.dit import DiT
from models.dpm_solver import SamplerConfig
from models.motion_vae import MotionVAE
from pipeline.animate import MotionStage
from utils.cameras import orbit_cameras
from utils.config import load_config
from utils.gaussians import Gaussians
from utils.render import rasterize


def canonical_shell(n: int, device) -> Gaussians:
    """n Gaussians on a noisy sphere shell of radius 0.4 with small scales, roughly what the static VAE produces."""
    g = torch.Generator(device=device).manual_seed(0)
    d = torch.nn.functional.normalize(torch.randn(n, 3, generator=g, device=device), dim=-1)
    xyz = d * (0.4 + 0.01 * torch.randn(n, 1, generator=g, device=device))
    return Gaussians(xyz, torch.rand(n, 3, generator=g, device=device), torch.zeros(n, 1, device=device),
                     torch.full((n, 3), -4.5, device=device), torch.randn(n, 4, generator=g, device=device))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--gaussians", type=int, default=160_000)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = load_config(ROOT / "configs/diffusion.yml")
    dit, vae = randomise(DiT(**cfg.model)).to(device), randomise(MotionVAE(**cfg.motion_vae)).to(device)
    stats = {"deformation_mean": torch.zeros(16), "deformation_std": torch.ones(16) * 0.1,
             "static_mean": torch.zeros(14), "static_std": torch.ones(14)}
    sampling = dataclasses.replace(SamplerConfig.from_config(cfg.sampling), method="multistep", steps=args.steps)
    stage = MotionStage(dit, vae, stats, sampling,
                        cfg.data.num_static_cond, dtype=torch.bfloat16 if args.precision == "bf16" else torch.float32,
                        compile=args.compile)
    canonical = canonical_shell(args.gaussians, device)
    tokens = torch.randn(args.frames, 1370, cfg.model.image_cond_channels, device=device)
    s = cfg.sampling
    ext, K = orbit_cameras(torch.arange(args.frames) * (360.0 / args.frames), s.elevation_deg, s.radius, s.fov_deg)
    ext, K = ext.to(device)[:, None], K.to(device)[:, None]

    def run():
        result = stage(canonical, tokens, seed=0)
        t0 = time.perf_counter()
        frames = canonical.apply_delta(result.delta)
        rgb = rasterize(frames, ext, K, args.resolution, args.resolution, background=1.0).rgb
        if device.type == "cuda":
            torch.cuda.synchronize()
        return result, time.perf_counter() - t0, rgb

    for _ in range(2):  # warm-up: kernels, compilation, allocator
        run()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    totals, parts = [], []
    for _ in range(args.repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        result, render_s, rgb = run()
        totals.append(time.perf_counter() - t0)
        parts.append({**result.seconds, "rendering": render_s})
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{name}, {args.precision}{', compiled DiT' if args.compile else ''}: {args.frames} frames, "
          f"{result.nfe} model evaluations, {args.gaussians} Gaussians, {args.resolution}² renders "
          f"(output {tuple(rgb.shape)})")
    print(f"motion stage: median {statistics.median(totals) * 1e3:.0f} ms over {args.repeats}, peak {peak:.2f} GiB")
    for k in parts[0]:
        print(f"  {k}: {statistics.median(p[k] for p in parts) * 1e3:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
