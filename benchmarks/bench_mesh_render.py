"""CPU mesh rasterizer benchmark (data_rendering/rasterizer.py): median ms per view of a ~3k-triangle blob rendered from
16 orbit cameras, at several resolutions, as a markdown table.

    python benchmarks/bench_mesh_render.py                      # 128², 256², 512²; all numba threads
    python benchmarks/bench_mesh_render.py --res 128 --threads 1

The synthetic dataset renders 200 objects × 24 frames × 16 views = 76,800 images at 128²; the last column extrapolates
the measured time to that workload (rasterization only, no PNG writing).
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from data_rendering.rasterizer import render_mesh, silhouette
from utils.cameras import published_views

DATASET_IMAGES = 200 * 24 * 16


def blob(n_lat: int = 40, n_lon: int = 40, seed: int = 0):
    """A lumpy closed sphere (lat-long grid, radius modulated by random low-frequency waves) with per-vertex colours
    and uvs: 2·n_lon·(n_lat − 1) triangles (3120 for the defaults), about as many as a synthetic object."""
    rng = np.random.default_rng(seed)
    theta = np.linspace(0, np.pi, n_lat + 1)[1:-1]                  # rings without the poles
    phi = np.linspace(0, 2 * np.pi, n_lon, endpoint=False)
    t, p = np.meshgrid(theta, phi, indexing="ij")
    dirs = np.stack([np.sin(t) * np.cos(p), np.sin(t) * np.sin(p), np.cos(t)], -1).reshape(-1, 3)
    dirs = np.concatenate([dirs, [[0, 0, 1], [0, 0, -1]]])
    waves = rng.normal(size=(6, 3)) * 2.5
    radius = 0.4 + 0.08 * np.sin(dirs @ waves.T + rng.uniform(0, 6.3, 6)).sum(1)
    verts = (dirs * radius[:, None]).astype(np.float32)
    ring = lambda r, c: r * n_lon + c % n_lon
    faces = []
    for r in range(n_lat - 2):
        for c in range(n_lon):
            a, b, d, e = ring(r, c), ring(r, c + 1), ring(r + 1, c), ring(r + 1, c + 1)
            faces += [(a, d, b), (b, d, e)]
    top, bottom = len(dirs) - 2, len(dirs) - 1
    faces += [(top, ring(0, c + 1), ring(0, c)) for c in range(n_lon)]
    faces += [(bottom, ring(n_lat - 2, c), ring(n_lat - 2, c + 1)) for c in range(n_lon)]
    colors = (0.5 + 0.5 * dirs).astype(np.float32)
    uvs = np.stack([p.ravel() / (2 * np.pi), 1 - t.ravel() / np.pi], -1)
    uvs = np.concatenate([uvs, [[0.5, 1.0], [0.5, 0.0]]]).astype(np.float32)
    return verts, np.asarray(faces, np.int64), colors, uvs


def seconds(fn, repeats: int) -> tuple[float, float]:
    """Median and best wall time per call (the best shows the cost on a busy machine shared with other work)."""
    fn()  # compilation / warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--res", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--views", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="numba threads (default: all)")
    args = parser.parse_args()

    import numba
    if args.threads:
        numba.set_num_threads(args.threads)
    verts, faces, colors, uvs = blob()
    texture = np.random.default_rng(1).uniform(size=(256, 256, 3)).astype(np.float32)
    ext, k = published_views(args.views, generator=torch.Generator().manual_seed(0))
    ext, k = ext.numpy(), k.numpy()
    cases = {
        "lambert, vertex colours": lambda r: render_mesh(verts, faces, ext, k, r, r, vertex_colors=colors),
        "lambert, texture": lambda r: render_mesh(verts, faces, ext, k, r, r, uvs=uvs, texture=texture),
        "silhouette": lambda r: silhouette(verts, faces, ext, k, r, r),
    }
    print(f"{len(faces)} triangles, {len(verts)} vertices, {args.views} views per call, "
          f"{numba.get_num_threads()} numba threads, median of {args.repeats}\n")
    print("| mode | resolution | ms / call | ms / view | best ms / view | views / s | 76,800 views |")
    print("|---|---|---|---|---|---|---|")
    for res in args.res:
        coverage = render_mesh(verts, faces, ext, k, res, res)["rgba"][..., 3].mean()
        for name, fn in cases.items():
            sec, best = seconds(lambda: fn(res), args.repeats)
            per_view = sec / args.views
            print(f"| {name} | {res}² ({coverage:.0%} covered) | {sec * 1e3:.2f} | {per_view * 1e3:.3f} | "
                  f"{best / args.views * 1e3:.3f} | {1 / per_view:,.0f} | {per_view * DATASET_IMAGES:.0f} s |")


if __name__ == "__main__":
    main()
