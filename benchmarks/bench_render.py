"""Rasterizer benchmark: forward and forward+backward time per call, peak memory, and (with CUDA and gsplat) the
agreement between the torch and gsplat backends.

    python benchmarks/bench_render.py --gaussians 20000 --res 128 --views 4            # CPU
    python benchmarks/bench_render.py --gaussians 200000 --res 512 --views 8 --parity  # H100: both backends
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from timing import measure, tests_module
from utils.cameras import turntable
from utils.render import rasterize

random_scene = tests_module("render_reference").random_scene

PARAMS = ["xyz", "f_dc", "opacity_logit", "scale_pre", "quat"]


def scene(n, device, seed=0):
    return random_scene(n, seed, device=device, scale_range=(-6.0, -4.0))


def bench(backend, g, ext, k, res, repeats, device):
    def fwd():
        with torch.no_grad():
            rasterize(g, ext, k, res, res, background=1.0, backend=backend)

    leaves = [getattr(g, p).detach().requires_grad_(True) for p in PARAMS]

    def fwd_bwd():
        from utils.gaussians import Gaussians
        out = rasterize(Gaussians(*leaves), ext, k, res, res, background=1.0, backend=backend)
        (out.rgb.sum() + out.alpha.sum()).backward()

    t_f, _ = measure(fwd, repeats, device, warmup=1)
    t_fb, peak = measure(fwd_bwd, repeats, device, warmup=1)
    return t_f, t_fb, peak


def parity(g, ext, k, res):
    """PSNR between the backends' images and cosine between their gradients (per parameter)."""
    from utils.gaussians import Gaussians
    results = {}
    for backend in ("torch", "gsplat"):
        leaves = [getattr(g, p).detach().requires_grad_(True) for p in PARAMS]
        out = rasterize(Gaussians(*leaves), ext, k, res, res, background=1.0, backend=backend)
        weights = torch.rand(out.rgb.shape, generator=torch.Generator(device=out.rgb.device).manual_seed(0), device=out.rgb.device)
        (out.rgb * weights).sum().backward()
        results[backend] = (out.rgb.detach(), out.alpha.detach(), [p.grad.flatten() for p in leaves])
    (rgb_t, a_t, grads_t), (rgb_g, a_g, grads_g) = results["torch"], results["gsplat"]
    mse = ((rgb_t - rgb_g) ** 2).flatten(-3).mean(-1)               # per image
    psnr = (-10 * torch.log10(mse.clamp_min(1e-20))).flatten()
    cos = {p: torch.nn.functional.cosine_similarity(a, b, dim=0).item() for p, a, b in zip(PARAMS, grads_t, grads_g)}
    return psnr.min().item(), (a_t - a_g).abs().max().item(), cos


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gaussians", type=int, default=20000)
    ap.add_argument("--res", type=int, default=128)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backends", default=None, help="comma list; default: torch (+ gsplat on CUDA)")
    ap.add_argument("--parity", action="store_true", help="also report torch-vs-gsplat PSNR and gradient cosine")
    args = ap.parse_args()
    device = torch.device(args.device)
    backends = args.backends.split(",") if args.backends else (["torch", "gsplat"] if device.type == "cuda" else ["torch"])
    g = scene(args.gaussians, device)
    ext, k = turntable(args.views, elevation=15.0, fov=40.0)
    ext, k = ext.to(device), k.to(device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}; {args.gaussians} Gaussians, {args.res}², {args.views} views, median of {args.repeats}")
    print("| backend | forward (ms) | forward+backward (ms) | peak GPU memory (GiB) |")
    print("|---|---|---|---|")
    for b in backends:
        t_f, t_fb, peak = bench(b, g, ext, k, args.res, args.repeats, device)
        print(f"| {b} | {t_f * 1e3:.1f} | {t_fb * 1e3:.1f} | {peak:.2f} |")
    if args.parity:
        psnr, dalpha, cos = parity(g, ext, k, args.res)
        print(f"parity torch vs gsplat: min PSNR {psnr:.1f} dB, max |Δalpha| {dalpha:.2e}, gradient cosine "
              + ", ".join(f"{p} {c:.5f}" for p, c in cos.items()))


if __name__ == "__main__":
    main()
