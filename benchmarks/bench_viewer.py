"""viewer.html benchmark: time per frame (decode + depth sort in the worker, upload, draw, read back) in headless
Chromium with software WebGL (SwiftShader), while orbiting and changing animation frame every step; also the size of
the file, the time to write it and the time until the first frame is on screen.

    python benchmarks/bench_viewer.py                                   # 200k Gaussians, 8 frames, 256² and 512²
    python benchmarks/bench_viewer.py --gaussians 50000 --res 512 --steps 20

The page's own `?bench=N` mode does the timing (pipeline/viewer.py): N steps after one warm-up step, each step a new
azimuth (360°/N apart) and the next animation frame, so every step decodes a frame and sorts; medians per stage.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from timing import tests_module
from pipeline.viewer import READY_JS, write_viewer
from utils import headless_chromium as chromium

render_reference = tests_module("render_reference")


def scene(n: int, frames: int, seed: int = 0):
    """bench_render's random scene (Gaussians in the unit cube) and small random Δ in all 14 channels."""
    g = render_reference.random_scene(n, seed, scale_range=(-6.0, -4.0))
    delta = torch.randn(frames, n, 14, generator=torch.Generator().manual_seed(seed + 1)) * 0.01
    return g, delta


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gaussians", type=int, default=200_000)
    ap.add_argument("--frames", type=int, default=8, help="animation frames in the file")
    ap.add_argument("--res", type=int, nargs="+", default=[256, 512], help="square canvas sizes")
    ap.add_argument("--steps", type=int, default=20, help="timed frames per size")
    args = ap.parse_args(argv)
    binary = chromium.find_chromium()
    if binary is None:
        raise SystemExit("no Chromium found (Debian: apt-get install chromium)")

    g, delta = scene(args.gaussians, args.frames)
    with tempfile.TemporaryDirectory() as tmp, chromium.HeadlessChromium(binary, timeout=900) as browser:
        folder = Path(tmp)
        t0 = time.perf_counter()
        write_viewer(folder, g, delta, fps=12.0)
        written = time.perf_counter() - t0
        size = (folder / "viewer.html").stat().st_size / 2**20
        print(f"{args.gaussians} Gaussians, {args.frames} frames: viewer.html {size:.1f} MiB, written in {written:.1f} s")
        print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        print("| canvas | first frame on screen (s) | frame (ms) | decode (ms) | sort (ms) | upload + draw + read back (ms) |")
        print("|---|---|---|---|---|---|")
        for res in args.res:
            url = f"{(folder / 'viewer.html').as_uri()}?bench={args.steps}&w={res}&h={res}&el=15&radius=2&fov=40"
            t0 = time.perf_counter()
            page = browser.open(url, res + 300, res)
            page.wait_for(READY_JS, timeout=900)
            first = time.perf_counter() - t0
            report = json.loads(page.wait_for("document.documentElement.dataset.bench", timeout=1800))
            errors = page.errors()
            if errors:
                raise SystemExit(f"the page reported errors: {errors}")
            print(f"| {res}² | {first:.1f} | {report['frame_ms']:.0f} | {report['decode_ms']:.1f} | {report['sort_ms']:.1f} "
                  f"| {report['draw_ms']:.0f} |", flush=True)
            page.close()
        print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
