#!/usr/bin/env python
"""Render Gaussian splats to a turntable video.

    python scripts/render_gaussians.py canonical.ply --out turntable.mp4
    python scripts/render_gaussians.py outputs/obj/ply/ --out orbit.mp4      # a frame_XXXX.ply sequence: animated orbit
    python scripts/render_gaussians.py --example --out outputs/demo/turntable.mp4   # a procedural test object

Video frame i shows animation frame i mod T from azimuth i * 360 / max(views, T).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from utils import cli
from utils.cameras import orbit_cameras
from utils.gaussians import Gaussians, read_ply, write_ply
from utils.render import rasterize
from utils.video import write_video


def example_torus(n: int = 12000, seed: int = 0) -> Gaussians:
    """A striped torus of flat splats: a quick visual check of rendering and export, not a model output."""
    g = torch.Generator().manual_seed(seed)
    u, v = torch.rand(n, generator=g) * 2 * math.pi, torch.rand(n, generator=g) * 2 * math.pi
    big, small = 0.3, 0.12
    xyz = torch.stack([(big + small * torch.cos(v)) * torch.cos(u), (big + small * torch.cos(v)) * torch.sin(u), small * torch.sin(v)], -1)
    hue = (u / (2 * math.pi) * 6).floor() / 6
    rgb = torch.stack([0.5 + 0.45 * torch.cos(2 * math.pi * (hue + k / 3)) for k in range(3)], -1)
    rgb = torch.where((torch.sin(8 * v) > 0)[:, None], rgb, rgb * 0.35)
    f_dc = (rgb - 0.5) / 0.28209479177387814
    scale = torch.full((n, 3), 0.012)
    # Orient each splat's thin axis along the surface normal: rotate z onto the normal about the axis z × normal.
    normal = torch.stack([torch.cos(v) * torch.cos(u), torch.cos(v) * torch.sin(u), torch.sin(v)], -1)
    scale[:, 2] = 0.002
    axis = torch.linalg.cross(torch.tensor([0.0, 0.0, 1.0]).expand(n, 3), normal)
    angle = torch.acos(normal[:, 2].clamp(-1, 1))
    axis = axis / axis.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    quat = torch.cat([torch.cos(angle / 2)[:, None], axis * torch.sin(angle / 2)[:, None]], -1)
    return Gaussians.from_activated(xyz, f_dc, torch.full((n, 1), 0.9), scale, quat)


def load_frames(path: Path) -> Gaussians:
    """A PLY file -> (1, N) set; a folder of *.ply (sorted) -> (T, N) sequence."""
    if path.is_dir():
        files = sorted(path.glob("*.ply"))
        if not files:
            raise SystemExit(f"{path} holds no .ply files")
        frames = [read_ply(f) for f in files]
        counts = {len(f) for f in frames}
        if len(counts) != 1:
            raise SystemExit(f"the PLY files in {path} hold different Gaussian counts {sorted(counts)}; a sequence needs one count")
        return Gaussians(**{k: torch.stack([getattr(f, k) for f in frames]) for k in ("xyz", "f_dc", "opacity_logit", "scale_pre", "quat")})
    if not path.is_file():
        raise SystemExit(f"{path} does not exist")
    try:
        return read_ply(path)[None]
    except ValueError as e:
        raise SystemExit(f"{e}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", nargs="?", type=Path, help="a .ply file or a folder of per-frame .ply files")
    ap.add_argument("--example", action="store_true", help="render a procedural test object (and save it as PLY next to the video)")
    ap.add_argument("--out", type=Path, required=True, help="output video (.mp4 or .gif)")
    ap.add_argument("--views", type=int, default=48, help="azimuth steps for one full turn")
    ap.add_argument("--elevation", type=float, default=20.0, help="degrees")
    ap.add_argument("--radius", type=float, default=2.0)
    ap.add_argument("--fov", type=float, default=30.0, help="horizontal field of view, degrees")
    ap.add_argument("--res", type=int, default=384)
    ap.add_argument("--background", type=float, nargs=3, default=(1.0, 1.0, 1.0))
    ap.add_argument("--fps", type=float, default=24.0)
    ap.add_argument("--backend", default="auto", choices=["auto", "torch", "gsplat"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--overwrite", action="store_true", help="replace existing output files")
    args = ap.parse_args(argv)
    if (args.input is None) == (not args.example):
        ap.error("give an input PLY/folder or --example (not both)")
    if args.out.exists() and not args.overwrite:
        ap.error(f"{args.out} exists; pass --overwrite to replace it")

    if args.example:
        canonical = example_torus()
        ply = write_ply(canonical, args.out.with_suffix(".ply"), overwrite=args.overwrite)
        print(f"wrote {ply}")
        frames = canonical[None]
    else:
        frames = load_frames(args.input)
    frames = frames.to(args.device)
    t = frames.batch_shape[0]
    count = max(args.views, t)
    ext, k = orbit_cameras(torch.arange(count) * (360.0 / count), args.elevation, args.radius, args.fov)
    images = []
    with torch.no_grad():
        for i in range(count):
            out = rasterize(frames[i % t], ext[i:i + 1].to(args.device), k[i:i + 1].to(args.device), args.res, args.res,
                            background=torch.tensor(args.background), backend=args.backend)
            images.append(out.rgb[0].cpu())
    path = write_video(args.out, torch.stack(images), fps=args.fps, overwrite=args.overwrite)
    print(f"wrote {path} ({count} frames, {args.res}²)")


if __name__ == "__main__":
    sys.exit(cli.run(main))
