"""Bundle example inputs for the demo from held-out prepared samples.

    python scripts/make_examples.py --pack assets/pack --data-root data/pack --sample obj_00216 \\
        --video-from obj_00217 --out assets/examples

--sample: copied as a prepared sample directory (renders, cameras, points, voxel features; no OBJ meshes).
--video-from: its view-0 frames composited on white become <name>.mp4, and the pack's static-VAE reconstruction of its
frame 0 becomes <name>.ply, the canonical Gaussians that inference_dpm_latent.py --canonical reads for that video.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from datasets import layout
from pipeline.canonical import static_reconstruction
from pipeline.pack import load_models
from utils import cli
from utils.gaussians import write_ply
from utils.video import write_video


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pack", type=Path, required=True)
    ap.add_argument("--data-root", type=Path, required=True)
    ap.add_argument("--sample", required=True)
    ap.add_argument("--video-from", required=True)
    ap.add_argument("--fps", type=float, default=8.0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    src = layout.resolve_sample(args.data_root, args.sample)
    shutil.copytree(src, args.out / args.sample, ignore=shutil.ignore_patterns("frame*.obj"), dirs_exist_ok=True)

    video = layout.resolve_sample(args.data_root, args.video_from)
    frames = []
    for t in range(layout.count_frames(video)):
        rgba = np.asarray(Image.open(layout.image_path(video, t, 0)), dtype=np.float32) / 255
        frames.append(rgba[..., :3] * rgba[..., 3:] + (1 - rgba[..., 3:]))
    write_video(args.out / f"{args.video_from}.mp4", np.stack(frames), fps=args.fps, overwrite=True)
    models = load_models(args.pack)
    canonical = static_reconstruction(models.static_vae, video, models.voxel_extractor, torch.device("cpu"))
    write_ply(canonical, args.out / f"{args.video_from}.ply", overwrite=True)
    print(f"examples in {args.out}: sample {args.sample}, video {args.video_from}.mp4 with {args.video_from}.ply")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
