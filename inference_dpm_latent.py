"""Video to 4D on the command line: a loop over inputs through pipeline.VideoTo4D, writing reusable assets
(docs/published_system.md §6).

    python inference_dpm_latent.py --pack assets/pack --input assets/examples --out outputs/demo
    accelerate launch --num_processes 8 inference_dpm_latent.py --dit ema_diffusion_0.9999_500000.pt \\
        --motion-vae ema_deformation_0.9999_200000.pt --static-vae ema_static_vae_0.9999_200000.pt \\
        --stats-dir stats/ --input data/objaverse --list test.txt --out outputs/test

Inputs (--input, one or more): a prepared sample directory (published layout: imgs/, meta_data/, features_all_timesteps/),
a folder of them, a video (mp4, mov, mkv, webm, avi, gif) or a folder of frames, or a folder of videos.
- Prepared samples: the video is view 0 of each frame; the canonical Gaussians are the static VAE's reconstruction of
  frame 0 (or --canonical); the other views of each frame are held-out ground truth for PSNR / SSIM (/ LPIPS).
- Videos: frames are matted (alpha channel, rembg when installed with its weights, or a clean-background threshold),
  cropped to a square around the object and composited on the training background. The canonical must be given:
  --canonical FILE (one input), or a folder holding <video name>.ply (or .glb, .gltf, .obj), or made by --trellis.
  It is turned about Z to match the first frame's silhouette (one batched pass of silhouette renders).
- The canonical: Gaussians (a 3DGS PLY), or a mesh (GLB / glTF, OBJ with its MTL, or a PLY with faces) with a texture
  or vertex colours: Gaussians are sampled on its surface, and the motion is carried back to its vertices as
  animated.glb (the mesh as given, its materials kept, one morph target per frame, played at the video's rate).

Per input, under --out/<name>/: ply/frame_XXXX.ply (standard 3DGS PLY per frame), animation.npz (canonical + Δ,
reloadable with utils.gaussians), orbit.mp4, compare.mp4 (per frame: the input frame fed to the model | the 4D result
from the input camera | from a camera orbiting once over the clip), grid.png (frames × 4 views, labelled, the object
framed to fill its cells, on grey), summary.json (stage times, model evaluations, peak memory, metrics; "motion": mean
displacement per frame, and for prepared samples the end-point error against the oracle, i.e. the mesh motion
interpolated at the Gaussians, and the displacement ratio), viewer.html (the animation in a browser, offline); with a
mesh canonical also animated.glb.
Inputs are sharded over processes; a failing input is reported by name at the end (exit 1).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from tqdm import tqdm

from datasets import layout
from models.dpm_solver import SamplerConfig
from models.trellis.flow_euler import SLAT_DEFAULTS, SS_DEFAULTS, add_sampler_args, sampler_from_args
from pipeline.batch import Item, run_batch
from pipeline.mesh_canonical import DEFAULT_COUNT
from pipeline.mesh_input import MESH_SUFFIXES
from pipeline.outputs import OUTPUTS
from pipeline.video_to_4d import VideoTo4D, input_kind
from utils import cli
from utils.logging import report_failures
from utils.losses import load_lpips
from utils.metrics import ImageMetrics


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", type=Path, nargs="+", required=True, help="samples, videos, or folders of either")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--list", type=Path, help="with one folder of prepared samples: the names to run")
    ap.add_argument("--config", type=Path, help="diffusion config (sampling, cameras); default: the pack's, else "
                                                "configs/diffusion.yml")
    ap.add_argument("--vae-config", type=Path, help="VAE config for published .pt weights (default configs/vae.yml)")
    ap.add_argument("--pack", type=Path, help="folder with dit/motion_vae/static_vae.safetensors, the four "
                                              "statistics files and config.yml (e.g. assets/pack)")
    ap.add_argument("--dit", type=Path)
    ap.add_argument("--motion-vae", type=Path)
    ap.add_argument("--static-vae", type=Path, help="needed for prepared samples without --canonical")
    ap.add_argument("--stats-dir", type=Path, help="the four latent statistics files (default: the pack)")
    ap.add_argument("--canonical", type=Path, help="the canonical of the inputs: a Gaussian PLY or a mesh (.glb, .gltf, "
                                                   ".obj, .ply with faces) for one input, or a folder of <name>.ply / "
                                                   "<name>.glb / <name>.gltf / <name>.obj")
    ap.add_argument("--mesh-gaussians", type=int, default=DEFAULT_COUNT,
                    help=f"Gaussians sampled on a mesh canonical's surface (default {DEFAULT_COUNT})")
    ap.add_argument("--trellis", help="TRELLIS-image-large folder or hub repo (JeffreyXiang/TRELLIS-image-large): makes "
                                      "the canonical Gaussians of videos without a --canonical PLY from their first frame")
    ap.add_argument("--dinov2", type=Path, help="local DINOv2 ViT-L/14-reg folder, for the TRELLIS condition and the "
                                                "video tokens of a DINOv2 config (default: the hub)")
    add_sampler_args(ap, "ss", SS_DEFAULTS)      # the TRELLIS samplers; defaults = the published GVFDiffusion ones
    add_sampler_args(ap, "slat", SLAT_DEFAULTS)
    ap.add_argument("--num-frames", type=int, help="frames to animate (default sampling.num_frames, at most the input's)")
    ap.add_argument("--start", type=int, default=0, help="first video frame")
    ap.add_argument("--stride", type=int, default=1, help="video frame step")
    ap.add_argument("--matting", default="auto", choices=("auto", "alpha", "rembg", "threshold"))
    ap.add_argument("--steps", type=int, help="solver steps (multistep: model evaluations)")
    ap.add_argument("--method", choices=("multistep", "adaptive", "ddim"))
    ap.add_argument("--guidance-scale", type=float)
    ap.add_argument("--guidance-scale2", type=float)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="autocast on a GPU")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the DiT with CUDA graphs (GPU; pays off over many inputs)")
    ap.add_argument("--orbit-frames", type=int, default=48, help="frames of orbit.mp4 (one turn)")
    ap.add_argument("--outputs", nargs="+", choices=sorted(OUTPUTS), metavar="NAME",
                    help=f"write only these files (summary.json always; default all): "
                         f"{', '.join(f'{k} ({v})' for k, v in OUTPUTS.items())}; skipped ones are not rendered")
    ap.add_argument("--overwrite", action="store_true",
                    help="redo inputs whose outputs exist: each input's folder is replaced as a whole once its new "
                         "outputs are complete (a failed input keeps its previous outputs)")
    layout.add_symlink_option(ap)
    ap.add_argument("--no-metrics", action="store_true", help="no ground-truth metrics (images, motion error)")
    return ap.parse_args(argv)


# ---------------------------------------------------------------------------------------------- inputs

@dataclass
class Job:
    name: str
    path: Path
    kind: str                          # "sample" | "video" | "missing" (reported as a failure of that input)


def collect_inputs(paths: list[Path], list_file: Path | None) -> list[Job]:
    jobs = []
    for p in paths:
        if not p.exists():
            raise SystemExit(f"input {p} does not exist")
        kind = input_kind(p)
        if kind is not None:
            jobs.append(Job(p.stem if p.is_file() else p.name, p, kind))
        elif p.is_dir():
            names = layout.read_list_file(list_file, p) if list_file else sorted(c.name for c in p.iterdir())
            for n in names:
                c = layout.resolve_sample(p, n)
                kind = input_kind(c)
                if kind is not None:
                    jobs.append(Job(c.stem if c.is_file() else c.name, c, kind))
                elif list_file or c.is_dir():  # a listed name, or a folder, that is neither: a failure for that
                    jobs.append(Job(n, c, "missing"))  # input, not a silent skip (loose files such as PLYs are skipped)
        else:
            raise SystemExit(f"{p} is neither a prepared sample, a video nor a folder")
    if not jobs:
        raise SystemExit(f"no samples or videos found in {[str(p) for p in paths]}")
    return jobs


def canonical_file(args, job: Job) -> Path | None:
    """--canonical FILE, or the <job name>.<suffix> of a --canonical folder (None: the folder has none)."""
    c = args.canonical
    if c is None or not c.is_dir():
        return c
    found = [p for p in (c / f"{job.name}{s}" for s in MESH_SUFFIXES) if p.is_file()]
    if len(found) > 1:
        raise cli.InputError(f"{c}: {' and '.join(p.name for p in found)} are both canonicals of {job.name}; keep one")
    return found[0] if found else None


def load_pipeline(args, device) -> VideoTo4D:
    # The solver flags (--steps, --method, --guidance-scale, --guidance-scale2) share SamplerConfig's field names.
    sampling = {f.name: getattr(args, f.name) for f in dataclasses.fields(SamplerConfig)
                if getattr(args, f.name, None) is not None}
    try:
        return VideoTo4D.load(args.pack, dit=args.dit, motion_vae=args.motion_vae, static_vae=args.static_vae,
                              stats_dir=args.stats_dir, config=args.config, vae_config=args.vae_config, device=device,
                              precision=args.precision, compile=args.compile, sampling=sampling,
                              orbit_frames=args.orbit_frames, outputs=args.outputs, mesh_gaussians=args.mesh_gaussians,
                              trellis=args.trellis, dinov2=args.dinov2,
                              ss_sampler=sampler_from_args(args, "ss", SS_DEFAULTS),
                              slat_sampler=sampler_from_args(args, "slat", SLAT_DEFAULTS))
    except ValueError as e:  # no weights, no statistics: a refusal of the command line
        raise cli.InputError(str(e)) from None


def result_line(name: str, summary: dict, out: Path) -> str:
    """One input's outcome, printed as soon as it finishes."""
    if summary.get("skipped"):
        return f"{name}: outputs exist in {out} (--overwrite to redo)"
    line = f"{name}: {summary['frames']} frames, {summary['model_evaluations']} model evaluations, " \
           f"{sum(summary['seconds'].values()):.1f} s"
    if "animated_glb" in summary:
        line += f", animated.glb ({summary['animated_glb']['morph_targets']} morph targets)"
    if "metrics" in summary:  # the frames evaluate.py reports, named as there (as is the motion: after the first)
        m = summary["metrics"]["mean_after_first"]
        line += ", " + ", ".join(f"{k.upper()} {v:.3f}" for k, v in m.items()) + \
            f" over {summary['metrics']['frames_covered']['mean_after_first']}"
    motion = summary.get("motion", {})
    if motion.get("ratio") is not None:  # generated / true mean displacement: 1 moves as much as the object
        line += f", motion ratio {motion['ratio']:.2f} (EPE {motion['epe']:.4f})"
    elif "displacement" in motion:
        line += f", mean displacement {motion['displacement']:.4f}"
    return line + f" -> {out}"


def main(argv=None) -> int:
    args = parse_args(argv)
    layout.allow_symlinks(args.allow_symlinks)
    state = PartialState(cpu=not torch.cuda.is_available())
    device = state.device
    jobs = collect_inputs(args.input, args.list)
    pipe = load_pipeline(args, device)
    # Image metrics (and the LPIPS weights they may look for) only where there is ground truth to compare with.
    wants_metrics = not args.no_metrics and any(j.kind == "sample" for j in jobs)
    metrics = ImageMetrics(load_lpips(device=device)) if wants_metrics else None
    mine = jobs[state.process_index::state.num_processes]
    # Each input's canonical is looked up as it runs: a folder with two canonicals of one name fails that input only.
    items = [Item(j.name, j.path, args.out / j.name, lambda j=j: canonical_file(args, j)) for j in mine]
    options = {"num_frames": args.num_frames, "start": args.start, "stride": args.stride, "matting": args.matting,
               "seed": args.seed}
    failures, bad_input = [], False
    bar = tqdm(total=len(items), desc="animate", disable=not state.is_main_process, dynamic_ncols=True)
    if items:
        bar.set_postfix_str(items[0].name, refresh=True)
    # The next input is read while one runs, and the files of the last are written meanwhile (pipeline/batch.py).
    for i, (item, summary, error) in enumerate(run_batch(pipe, items, options, metrics, overwrite=args.overwrite)):
        bar.update(1)
        if i + 1 < len(items):
            bar.set_postfix_str(items[i + 1].name, refresh=True)
        if error is None:
            tqdm.write(result_line(item.name, summary, item.out))
            continue
        # Reported by name as it happens; the others go on; listed again at the end. Bad input reads as its message;
        # anything else keeps its type, which says where to look.
        bad_input = isinstance(error, cli.refusal_types() + (ValueError,))
        failures.append((item.name, cli.one_line(error) if bad_input else f"{type(error).__name__}: "
                                                                         f"{cli.one_line(error)}"))
        tqdm.write(f"{item.name}: failed: {failures[-1][1]}", file=sys.stderr)
    bar.close()
    if state.num_processes > 1:
        failures = [f for part in gather_object([failures]) for f in part]
    if not state.is_main_process:
        return 0
    if len(jobs) == 1:  # its failure line is already on screen; a refused input is bad input (2), as everywhere
        return (cli.EXIT_BAD_INPUT if bad_input else 1) if failures else 0
    return report_failures(failures, len(jobs), "inputs")  # a batch: 1 when any input failed


if __name__ == "__main__":
    sys.exit(cli.run(main))
