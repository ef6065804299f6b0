"""Evaluate a pack on held-out prepared samples: a markdown table of PSNR / SSIM (/ LPIPS) against the ground-truth
renders of the views not given to the model (all but view 0), for the frames after the first.

    python scripts/evaluate.py --pack assets/pack --data-root data/pack --list data/pack/test.txt \\
        --train-list data/pack/train.txt --out outputs/eval

Rows, all on the same canonical Gaussians (the static VAE's reconstruction of frame 0):
- generated: the DiT sampled from view 0's image tokens, decoded by the motion VAE (what inference does);
- VAE reconstruction: the motion VAE's posterior mean of the true mesh motion, decoded (an upper bound for generation);
- still: the canonical left unmoved;
- mean motion: the training set's mean latent of each frame (over objects and tokens), decoded on this canonical.
Also frame 0 alone, i.e. the static VAE's reconstruction quality.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import inference_dpm_latent as inference  # noqa: E402
from datasets import layout  # noqa: E402
from datasets.vae_dataset import VAEDataset  # noqa: E402
from models.motion_vae import pad_gaussians  # noqa: E402
from utils.fileio import atomic_write  # noqa: E402
from utils.losses import load_lpips  # noqa: E402
from utils.metrics import ImageMetrics  # noqa: E402

METHODS = ("generated", "VAE reconstruction", "still", "mean motion")


def mean_motion_latents(data_root: Path, names: list[str], frames: int) -> torch.Tensor:
    """(T, C): the mean latent of each frame over the training objects and their tokens."""
    total, count = 0.0, 0
    for n in names:
        mu = torch.load(layout.latent_path(data_root, n), map_location="cpu", weights_only=True)["latent_mean"].double()
        total, count = total + mu[:frames].mean(1), count + 1
    if count == 0:
        raise SystemExit(f"no training latents under {data_root / 'latents'}: run encode_latent.py first")
    return (total / count).float()


@torch.no_grad()
def evaluate(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    inf_args = inference.parse_args(["--input", str(args.data_root), "--out", str(args.out), "--pack", str(args.pack),
                                     *(["--config", str(args.config)] if args.config else []),
                                     *(["--vae-config", str(args.vae_config)] if args.vae_config else [])])
    models = inference.load_models(inf_args, device)
    motion = models.motion.motion_vae
    metrics = ImageMetrics(load_lpips(device=device))
    names = layout.read_list_file(args.list, args.data_root)[: args.limit]
    frames = args.num_frames or models.cfg.data.num_timesteps
    mean_latent = mean_motion_latents(args.data_root, layout.read_list_file(args.train_list, args.data_root), frames)
    geometry = VAEDataset(args.data_root, names, num_points=motion.num_inputs, num_timesteps=frames,
                          sample_timesteps=frames, train=False, extractor=models.voxel_extractor, images=False)
    rows: dict[str, list] = {m: [] for m in METHODS}
    first: list[dict] = []
    for i, name in enumerate(names):
        job = inference.Job(name, layout.resolve_sample(args.data_root, name), "sample")
        tokens, canonical, _ = inference.sample_inputs(models, job, inf_args, frames, device)
        queries, _ = pad_gaussians([canonical.to_condition().float()])
        item = geometry.load(i)
        enc = motion.encode(item["static_pc"][None].to(device), item["deltas"][None].to(device), queries)
        deltas = {
            "generated": models.motion(canonical, tokens, seed=args.seed).delta,
            "VAE reconstruction": motion.decode(enc.posterior.mean, queries)[0],
            "still": torch.zeros(frames, len(canonical), 14, device=device),
            "mean motion": motion.decode(mean_latent.to(device)[None, :, None].expand(1, frames, motion.num_latents, -1),
                                         queries)[0],
        }
        views = inference.held_out_views(job, frames, device)  # read once for the four rows
        for method, delta in deltas.items():
            m = inference.ground_truth_metrics(views, canonical, delta.float(), metrics)
            rows[method].append(m["mean_after_first"])
            if method == "still":
                first.append(m["per_frame"][0])
        print(f"[{i + 1}/{len(names)}] {name}: " + ", ".join(f"{k} {rows[k][-1]['psnr']:.2f}" for k in METHODS))
    mean = lambda entries: {k: float(np.mean([e[k] for e in entries])) for k in entries[0]}
    return {"objects": len(names), "frames": frames, "methods": {m: mean(v) for m, v in rows.items()},
            "frame0_static_vae": mean(first), "per_object": {m: v for m, v in rows.items()}}


def markdown(result: dict, command: str) -> str:
    keys = list(result["frame0_static_vae"])
    lines = [f"Held-out objects: {result['objects']}, frames 1..{result['frames'] - 1} (after the first), all views but "
             f"the conditioning one. `{command}`", "",
             "| method | " + " | ".join(k.upper() for k in keys) + " |", "|---|" + "---|" * len(keys)]
    for m, v in result["methods"].items():
        lines.append(f"| {m} | " + " | ".join(f"{v[k]:.3f}" for k in keys) + " |")
    lines.append("| frame 0: static-VAE reconstruction | " + " | ".join(
        f"{result['frame0_static_vae'][k]:.3f}" for k in keys) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pack", type=Path, required=True)
    ap.add_argument("--data-root", type=Path, required=True)
    ap.add_argument("--list", type=Path, required=True, help="held-out sample names")
    ap.add_argument("--train-list", type=Path, required=True, help="training names (their latents give the mean motion)")
    ap.add_argument("--config", type=Path)
    ap.add_argument("--vae-config", type=Path)
    ap.add_argument("--num-frames", type=int)
    ap.add_argument("--limit", type=int, help="evaluate only the first N held-out objects")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    result = evaluate(args)
    command = "python scripts/evaluate.py " + " ".join(argv if argv is not None else sys.argv[1:])
    table = markdown(result, command)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / "metrics.md", lambda tmp: tmp.write_text(table), overwrite=True)
    atomic_write(args.out / "metrics.json", lambda tmp: tmp.write_text(json.dumps(result, indent=1)), overwrite=True)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
