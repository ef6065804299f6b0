"""Bundle example inputs for the demo from held-out prepared samples.

    python scripts/make_examples.py --pack assets/pack --data-root data/pack --sample obj_00216 \\
        --video-from obj_00217 --mesh-from obj_00218 --out assets/examples

--sample: copied as a prepared sample directory (renders, cameras, points, voxel features; no OBJ meshes).
--video-from: its view-0 frames composited on white become <name>.mp4, and the pack's static-VAE reconstruction of its
frame 0 becomes <name>.ply, the canonical Gaussians that inference_dpm_latent.py --canonical reads for that video.
--mesh-from (a synthetic sample): the same <name>.mp4, and its frame-0 mesh with its texture or vertex colours as
<name>.glb, a mesh canonical (the demo writes animated.glb for it). The mesh is made again by the synthetic generator
from the seed in the sample's metadata.json (make_object is a pure function of it), and checked against that file.
Each option is optional; --pack is needed with --video-from only.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data_rendering.synthetic import make_object
from datasets import layout
from pipeline.glb import write_mesh_glb
from utils import cli
from utils.cli import InputError
from utils.gaussians import write_ply
from utils.video import write_video


def write_view0_video(sample: Path, path: Path, fps: float) -> None:
    """A sample's view-0 frames composited on white, as the video a user would film."""
    frames = []
    for t in range(layout.count_frames(sample)):
        rgba = np.asarray(Image.open(layout.image_path(sample, t, 0)), dtype=np.float32) / 255
        frames.append(rgba[..., :3] * rgba[..., 3:] + (1 - rgba[..., 3:]))
    write_video(path, np.stack(frames), fps=fps, overwrite=True)


def synthetic_mesh(sample: Path):
    """The synthetic generator's mesh of a sample, from the seed its metadata.json records, checked against it."""
    meta = json.loads(layout.render_metadata_path(sample).read_text())
    if meta.get("source") != "data_rendering.synthetic":
        raise InputError(f"{sample}: not a synthetic sample (metadata.json source {meta.get('source')!r})")
    seq, again = make_object(meta["seed"], meta["num_frames"], detail=meta["detail"])
    if (again["num_vertices"], again["num_faces"], again["shape"]) != (meta["num_vertices"], meta["num_faces"],
                                                                         meta["shape"]):
        raise InputError(f"{sample}: make_object(seed {meta['seed']}) no longer makes this sample's mesh")
    return seq


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pack", type=Path, help="the pack whose static VAE makes --video-from's canonical")
    ap.add_argument("--data-root", type=Path, required=True)
    ap.add_argument("--sample")
    ap.add_argument("--video-from")
    ap.add_argument("--mesh-from")
    ap.add_argument("--fps", type=float, default=8.0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.video_from and args.pack is None:
        raise InputError("--video-from needs --pack (its canonical is the pack's static-VAE reconstruction)")

    args.out.mkdir(parents=True, exist_ok=True)
    made = []
    if args.sample:
        src = layout.resolve_sample(args.data_root, args.sample)
        shutil.copytree(src, args.out / args.sample, ignore=shutil.ignore_patterns("frame*.obj"), dirs_exist_ok=True)
        made.append(f"sample {args.sample}")
    if args.video_from:
        from pipeline.canonical import static_reconstruction  # torch models: only for this option
        from pipeline.pack import load_models
        video = layout.resolve_sample(args.data_root, args.video_from)
        write_view0_video(video, args.out / f"{args.video_from}.mp4", args.fps)
        models = load_models(args.pack)
        canonical = static_reconstruction(models.static_vae, video, models.voxel_extractor, torch.device("cpu"))
        write_ply(canonical, args.out / f"{args.video_from}.ply", overwrite=True)
        made.append(f"video {args.video_from}.mp4 with {args.video_from}.ply")
    if args.mesh_from:
        sample = layout.resolve_sample(args.data_root, args.mesh_from)
        write_view0_video(sample, args.out / f"{args.mesh_from}.mp4", args.fps)
        write_mesh_glb(args.out / f"{args.mesh_from}.glb", synthetic_mesh(sample), overwrite=True)
        made.append(f"video {args.mesh_from}.mp4 with the mesh {args.mesh_from}.glb")
    print(f"examples in {args.out}: {', '.join(made) or 'nothing (give --sample, --video-from or --mesh-from)'}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
