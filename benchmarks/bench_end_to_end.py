"""Video to 4D end to end as users run it: a folder of videos in, 4D out, one process, with random weights.

    python benchmarks/bench_end_to_end.py --root /tmp/e2e                  # paper scale on the GPU
    python benchmarks/bench_end_to_end.py --root /tmp/e2e_tiny --scale tiny  # the same path at CPU scale

Setup, once per root: random weights at the scale's configs as a pack (root/pack: DiT, motion VAE, static VAE,
statistics), a TRELLIS-layout release (root/trellis; paper: the released configs) and a DINOv2 ViT-L/14-reg
(root/dinov2; tiny: the tests' tiny ones), and --videos test clips of --frames frames (root/videos: a textured blob
walking and turning on white, 512²). Random TRELLIS weights decode an arbitrary occupancy, so at paper scale the SS
decoder's logits are replaced by a sphere shell of --voxels cells, as in bench_trellis.py (its time still counts).

Then two measured processes, each a child of this one timed from its spawn (import, weight loading, the first video
with compilation, i.e. the cold start to the first result on disk), then the batch of all videos through
pipeline/batch.run_batch (the overlapped loop inference_dpm_latent.py runs): per-video stage seconds (medians from
summary.json), videos per minute over the batch, peak GPU memory. The first child starts with an empty compile cache
(root/cache, TORCHINDUCTOR_CACHE_DIR), the second reuses it. Outputs on (PLYs, npz, mp4s, grid.png).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCALES = {"paper": ("configs/diffusion.yml", "configs/vae.yml"), "tiny": ("configs/tiny/diffusion.yml",
                                                                          "configs/tiny/vae.yml")}


# ---------------------------------------------------------------------------------------------- setup
def write_videos(folder: Path, count: int, frames: int, size: int = 512) -> None:
    """Clips of a striped ellipse that walks across and turns, on white (threshold matting finds it)."""
    import numpy as np

    from utils.video import write_video
    folder.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[:size, :size] / size
    for i in range(count):
        clip = []
        for t in range(frames):
            a = 2 * np.pi * t / frames
            cx, cy = 0.5 + 0.15 * np.sin(a + i), 0.5 + 0.05 * np.cos(2 * a)
            c, s = np.cos(a / 2), np.sin(a / 2)
            u, v = (x - cx) * c + (y - cy) * s, -(x - cx) * s + (y - cy) * c
            inside = (u / 0.18) ** 2 + (v / 0.3) ** 2 < 1
            colour = np.stack([0.5 + 0.4 * np.sin(20 * v + i), 0.3 + 0.2 * np.cos(15 * u), 0.6 * (v > 0) + 0.2], -1)
            clip.append(np.where(inside[..., None], colour, 1.0))
        write_video(folder / f"clip_{i:02d}.mp4", np.stack(clip), fps=12, overwrite=True)


def write_pack(folder: Path, scale: str) -> None:
    import torch

    from bench_models import randomise
    from datasets import layout
    from models.dit import DiT
    from models.motion_vae import MotionVAE
    from models.static_vae import StaticVAE
    from utils.checkpoint import save_checkpoint
    from utils.config import load_config, save_config
    dit_cfg, vae_cfg = (load_config(ROOT / p) for p in SCALES[scale])
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    for name, model, cfg in (("dit", DiT(**dit_cfg.model), dit_cfg.model),
                             ("motion_vae", MotionVAE(**dit_cfg.motion_vae), dit_cfg.motion_vae),
                             ("static_vae", StaticVAE.from_config(vae_cfg.static_vae), vae_cfg.static_vae)):
        save_checkpoint(folder / f"{name}.safetensors", randomise(model), config=cfg.to_dict())
    for which in layout.LATENT_STATS:
        shape = (dit_cfg.model.in_channels,) if which.startswith("deformation") else (14,)
        torch.save(torch.zeros(shape) if which.endswith("mean") else torch.ones(shape),
                   layout.latent_stats_path(folder, which))
    save_config(dit_cfg, folder / "config.yml")
    save_config(vae_cfg, folder / "vae.yml")


def write_trellis_and_dinov2(root: Path, scale: str) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    from timing import tests_module
    if scale == "tiny":
        tests_module("test_inference")._tiny_trellis_release(root / "trellis")
        tests_module("tiny_dinov2").save_tiny_dinov2(root / "dinov2")
        return
    from bench_trellis import RELEASED, released
    (root / "trellis" / "ckpts").mkdir(parents=True, exist_ok=True)
    table = {}
    for cls, manifest in RELEASED.items():
        name = {"SparseStructureFlowModel": "sparse_structure_flow_model", "SparseStructureDecoder":
                "sparse_structure_decoder", "SLatFlowModel": "slat_flow_model"}[cls.__name__]
        model = released(cls, "cpu")
        args = tests_module("reference").load_manifest(manifest)["config"]
        table[name] = f"ckpts/{name}"
        (root / "trellis" / f"ckpts/{name}.json").write_text(json.dumps({"name": cls.__name__, "args": args}))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  root / "trellis" / f"ckpts/{name}.safetensors")
    (root / "trellis" / "pipeline.json").write_text(json.dumps({"name": "TrellisImageTo3DPipeline", "args": {
        "models": table, "slat_normalization": {"mean": [0.0] * 8, "std": [1.0] * 8}}}))
    cfg = Dinov2WithRegistersConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                    intermediate_size=4096, patch_size=14, image_size=518, num_register_tokens=4)
    torch.manual_seed(0)
    Dinov2WithRegistersModel(cfg).save_pretrained(root / "dinov2")


# ---------------------------------------------------------------------------------------------- the measured child
def child(args) -> dict:
    t_start = time.time()
    import torch

    from pipeline.batch import Item, run_batch
    from pipeline.video_to_4d import VideoTo4D
    t_imported = time.time()
    cuda = torch.cuda.is_available()
    pipe = VideoTo4D.load(args.root / "pack", trellis=args.root / "trellis", dinov2=args.root / "dinov2",
                          precision="bf16" if cuda else "fp32", compile=cuda and not args.eager)
    stage = pipe.image_to_3d_stage()  # loaded here, so that its weights count as loading, not as the first video
    if args.scale == "paper":
        from bench_models import shell_voxels
        from bench_trellis import ShellOccupancy
        i3d = stage.image_to_3d
        i3d.ss_decoder = ShellOccupancy(i3d.ss_decoder, shell_voxels(args.voxels, 64, pipe.device))
    if cuda:
        torch.cuda.synchronize()
    t_loaded = time.time()
    videos = sorted((args.root / "videos").glob("*.mp4"))
    out = args.root / f"out_{args.tag}"
    shutil.rmtree(out, ignore_errors=True)
    options = {"num_frames": args.frames, "matting": "threshold"}
    run = lambda vids, sub: list(run_batch(pipe, [Item(v.stem, v, out / sub / v.stem) for v in vids], options))
    first = run(videos[:1], "first")
    t_first = time.time()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    outcomes = run(videos, "batch")
    t_batch = time.time()
    errors = [f"{i.name}: {e}" for i, _, e in first + outcomes if e is not None]
    if errors:
        raise SystemExit("bench_end_to_end: " + "; ".join(errors))
    summaries = [s for _, s, _ in outcomes]
    stages = sorted({k for s in summaries for k in s["seconds"]})
    med = {k: statistics.median(s["seconds"].get(k, 0.0) for s in summaries) for k in stages}
    return {"spawn_to_imported_s": t_imported - args.spawned_at, "python_start_s": t_start - args.spawned_at,
            "loading_s": t_loaded - t_imported, "first_video_s": t_first - t_loaded,
            "cold_s": t_first - args.spawned_at, "first_video_seconds": first[0][1]["seconds"],
            "warm_stage_median_s": med, "warm_video_median_s": statistics.median(sum(s["seconds"].values())
                                                                                  for s in summaries),
            "batch_videos": len(videos), "batch_s": t_batch - t_first,
            "videos_per_minute": 60 * len(videos) / (t_batch - t_first),
            "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "gaussians": summaries[0]["gaussians"], "frames": summaries[0]["frames"],
            "device": torch.cuda.get_device_name() if cuda else "cpu"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, required=True, help="weights, videos, compile cache and outputs")
    ap.add_argument("--scale", choices=sorted(SCALES), default="paper")
    ap.add_argument("--videos", type=int, default=8)
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--voxels", type=int, default=20000, help="paper scale: occupied voxels of the canonical")
    ap.add_argument("--eager", action="store_true", help="no torch.compile of the DiT")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tag", default="cold", help=argparse.SUPPRESS)
    ap.add_argument("--spawned-at", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    if not (args.root / "pack" / "dit.safetensors").is_file():
        t0 = time.time()
        write_pack(args.root / "pack", args.scale)
        write_trellis_and_dinov2(args.root, args.scale)
        write_videos(args.root / "videos", args.videos, args.frames)
        print(f"setup: {time.time() - t0:.0f} s", flush=True)
    cache = args.root / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    results = {}
    for tag in ("first_process", "second_process"):
        cmd = [sys.executable, __file__, "--child", "--root", str(args.root), "--scale", args.scale, "--frames",
               str(args.frames), "--voxels", str(args.voxels), "--tag", tag, "--spawned-at", str(time.time())]
        p = subprocess.run(cmd + (["--eager"] if args.eager else []), env=env, capture_output=True, text=True)
        if p.returncode != 0:
            print(p.stderr[-4000:], file=sys.stderr)
            return 1
        results[tag] = json.loads(p.stdout.strip().splitlines()[-1])
        print(tag, json.dumps(results[tag], indent=1), flush=True)
    a, b = results["first_process"], results["second_process"]
    print(f"\n{a['device']}, {args.scale} scale, {a['frames']} frames, {a['gaussians']} Gaussians\n\n"
          "| process | import (s) | weights (s) | first video (s) | cold total (s) | warm per video (s) | "
          "videos/min | peak GiB |\n|---|---|---|---|---|---|---|---|")
    for name, r in (("first (empty compile cache)", a), ("second (cache)", b)):
        peak = "–" if r["peak_gpu_gib"] is None else f"{r['peak_gpu_gib']:.2f}"
        print(f"| {name} | {r['spawn_to_imported_s']:.1f} | {r['loading_s']:.1f} | {r['first_video_s']:.1f} | "
              f"**{r['cold_s']:.1f}** | **{r['warm_video_median_s']:.2f}** | **{r['videos_per_minute']:.1f}** | "
              f"{peak} |")
    print("\nwarm stage medians (s): " + ", ".join(f"{k} {v:.3f}" for k, v in b["warm_stage_median_s"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
