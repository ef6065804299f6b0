"""Video to 4D: animate canonical Gaussians to the frames of a video (spec §6), writing reusable assets.

    python inference_dpm_latent.py --pack assets/pack --input assets/examples --out outputs/demo
    accelerate launch --num_processes 8 inference_dpm_latent.py --dit ema_diffusion_0.9999_500000.pt \\
        --motion-vae ema_deformation_0.9999_200000.pt --static-vae ema_static_vae_0.9999_200000.pt \\
        --stats-dir stats/ --input data/objaverse --list test.txt --out outputs/test

Inputs (--input, one or more): a prepared sample directory (published layout: imgs/, meta_data/, features_all_timesteps/),
a folder of them, a video (mp4, mov, mkv, webm, avi, gif) or a folder of frames, or a folder of videos.
- Prepared samples: the video is view 0 of each frame; the canonical Gaussians are the static VAE's reconstruction of
  frame 0 (or --canonical); the other views of each frame are held-out ground truth for PSNR / SSIM (/ LPIPS).
- Videos: frames are matted (alpha channel, rembg when installed with its weights, or a clean-background threshold),
  cropped to a square around the object and composited on the training background. The canonical Gaussians must be
  given: --canonical FILE.ply (one input), or a folder holding <video name>.ply. They are turned about Z to match the
  first frame's silhouette (one batched pass of silhouette renders).

Per input, under --out/<name>/: ply/frame_XXXX.ply (standard 3DGS PLY per frame), animation.npz (canonical + Δ,
reloadable with utils.gaussians), orbit.mp4, compare.mp4 (per frame: the input frame fed to the model | the 4D result
from the input camera | from a camera orbiting once over the clip), grid.png (frames × 4 views, labelled, the object
framed to fill its cells, on grey), summary.json (stage times, model evaluations, peak memory, metrics; "motion": mean
displacement per frame, and for prepared samples the end-point error against the oracle, i.e. the mesh motion
interpolated at the Gaussians, and the displacement ratio).
Inputs are sharded over processes; a failing input is reported by name at the end (exit 1).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import PartialState
from accelerate.utils import gather_object
from tqdm import tqdm

from datasets import layout
from datasets.condition import COND_BACKGROUND, COND_VIEW, condition_frames
from datasets.latent_dataset import load_latent_stats
from datasets.vae_dataset import VAEDataset
from models.dit import DiT
from models.dpm_solver import SamplerConfig
from models.motion_vae import MotionVAE
from models.sparse import SparseVoxels
from models.static_vae import StaticVAE
from models.trellis.flow_euler import SLAT_DEFAULTS, SS_DEFAULTS, add_sampler_args, sampler_from_args
from pipeline.alignment import align_to_silhouette, rotate_z
from pipeline.animate import MotionStage
from pipeline.matting import prepare_video_frames, trellis_preprocess
from utils import cli
from utils.cameras import BLENDER_DEFAULT_FOV, intrinsics_from_fov, load_blender_camera, orbit_cameras, published_views
from utils.checkpoint import load_state_dict_strict, read_weights
from utils.config import load_config
from utils.fileio import atomic_folder, atomic_write
from utils.gaussians import Gaussians, write_ply_sequence
from utils.image_features import get_extractor
from utils.images import composite, load_rgba, pool_voxels
from utils.logging import report_failures
from utils.losses import load_lpips
from utils.metrics import ImageMetrics, motion_statistics
from utils.pointcloud import interpolate_displacements
from utils.render import rasterize
from utils.video import VideoReadError, is_video_input, read_frames, to_uint8, write_video

MIN_VIDEO_FRAMES = 2  # one frame has no motion to follow
PACK_FILES = {"dit": "dit.safetensors", "motion_vae": "motion_vae.safetensors", "static_vae": "static_vae.safetensors"}


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
    ap.add_argument("--canonical", type=Path, help="canonical Gaussians: a PLY (one input) or a folder of <name>.ply")
    ap.add_argument("--trellis", help="TRELLIS-image-large folder or hub repo (JeffreyXiang/TRELLIS-image-large): makes "
                                      "the canonical Gaussians of videos without a --canonical PLY from their first frame")
    ap.add_argument("--dinov2", type=Path, help="local DINOv2 ViT-L/14-reg folder for the TRELLIS condition "
                                                "(default: the hub)")
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
    ap.add_argument("--overwrite", action="store_true",
                    help="redo inputs whose outputs exist: each input's folder is replaced as a whole once its new "
                         "outputs are complete (a failed input keeps its previous outputs)")
    layout.add_symlink_option(ap)
    ap.add_argument("--no-metrics", action="store_true", help="no ground-truth metrics (images, motion error)")
    return ap.parse_args(argv)


# ---------------------------------------------------------------------------------------------- models

@dataclass
class Models:
    motion: MotionStage
    static_vae: StaticVAE | None
    cfg: object                       # the diffusion config
    extractor: object                 # image tokens of the video frames
    voxel_extractor: str              # the features the static VAE reads from a sample's voxels
    image_to_3d: tuple | None = None  # (ImageTo3D, DINOv2 extractor), built on first use


def _resolve(args) -> dict[str, Path | None]:
    paths = {k: getattr(args, k) for k in PACK_FILES}
    stats = args.stats_dir
    if args.pack:
        for k, f in PACK_FILES.items():
            paths[k] = paths[k] or (args.pack / f if (args.pack / f).is_file() else None)
        stats = stats or args.pack
    missing = [f"--{k.replace('_', '-')}" for k in ("dit", "motion_vae") if paths[k] is None]
    if missing:
        raise SystemExit(f"no weights for {', '.join(missing)} (give them or --pack)")
    if stats is None:
        raise SystemExit("no latent statistics: give --stats-dir or --pack")
    return {**paths, "stats": stats}


def _build(make, path: Path, yaml_block):
    """make(config) -> model, from our checkpoint's embedded config, or the YAML block for published weights."""
    sd, config = read_weights(path)  # one read of the file for both
    model = make(config or yaml_block)
    load_state_dict_strict(model, sd, source=str(path))
    return model


def load_models(args, device) -> Models:
    paths = _resolve(args)
    config = args.config or (args.pack / "config.yml" if args.pack and (args.pack / "config.yml").is_file()
                             else Path("configs/diffusion.yml"))
    cfg = load_config(config)
    vae_cfg = load_config(args.vae_config or (args.pack / "vae.yml" if args.pack and (args.pack / "vae.yml").is_file()
                                              else Path("configs/vae.yml")))
    dit = _build(lambda c: DiT(**c), paths["dit"], cfg.model.to_dict()).to(device)
    motion_vae = _build(lambda c: MotionVAE(**c), paths["motion_vae"], cfg.motion_vae.to_dict()).to(device)
    static_vae = None
    if paths["static_vae"] is not None:
        static_vae = _build(StaticVAE.from_config, paths["static_vae"], vae_cfg.static_vae.to_dict()).to(device).eval()
    dtype = torch.bfloat16 if args.precision == "bf16" and device.type == "cuda" else torch.float32
    # The solver flags (--steps, --method, --guidance-scale, --guidance-scale2) share SamplerConfig's field names.
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(SamplerConfig)
             if getattr(args, f.name, None) is not None}
    sampling = dataclasses.replace(SamplerConfig.from_config(cfg.sampling), **flags)
    stage = MotionStage(dit, motion_vae, load_latent_stats(paths["stats"]), sampling, cfg.data.num_static_cond,
                        cfg.data.normalize_position_xyz, dtype, compile=args.compile)
    return Models(stage, static_vae, cfg, get_extractor(cfg.data.image_encoder, device=device), vae_cfg.data.image_encoder)


# ---------------------------------------------------------------------------------------------- inputs

@dataclass
class Job:
    name: str
    path: Path
    kind: str                          # "sample" | "video"


def collect_inputs(paths: list[Path], list_file: Path | None) -> list[Job]:
    jobs = []
    for p in paths:
        if not p.exists():
            raise SystemExit(f"input {p} does not exist")
        if layout.has_renders(p):
            jobs.append(Job(p.name, p, "sample"))
        elif is_video_input(p):
            jobs.append(Job(p.stem if p.is_file() else p.name, p, "video"))
        elif p.is_dir():
            names = layout.read_list_file(list_file, p) if list_file else sorted(c.name for c in p.iterdir())
            for n in names:
                c = layout.resolve_sample(p, n)
                if layout.has_renders(c):
                    jobs.append(Job(c.name, c, "sample"))
                elif is_video_input(c):
                    jobs.append(Job(c.stem if c.is_file() else c.name, c, "video"))
                elif list_file or c.is_dir():  # a listed name, or a folder, that is neither: a failure for that
                    jobs.append(Job(n, c, "missing"))  # input, not a silent skip (loose files such as PLYs are skipped)
        else:
            raise SystemExit(f"{p} is neither a prepared sample, a video nor a folder")
    if not jobs:
        raise SystemExit(f"no samples or videos found in {[str(p) for p in paths]}")
    return jobs


def canonical_ply(args, job: Job) -> Path | None:
    c = args.canonical
    if c is None:
        return None
    if c.is_dir():
        p = c / f"{job.name}.ply"
        return p if p.is_file() else None
    return c


def front_camera(device) -> tuple[torch.Tensor, torch.Tensor]:
    """View 0 of the training renders: the camera the video is assumed to come from (spec §1.9)."""
    ext, _ = published_views(1)
    return ext[0].to(device), intrinsics_from_fov(torch.tensor(BLENDER_DEFAULT_FOV)).to(device)


@torch.no_grad()
def static_reconstruction(models: Models, sample: Path, extractor_name: str, device) -> Gaussians:
    if models.static_vae is None:
        raise ValueError("no canonical Gaussians: give --static-vae (or a pack with one) or --canonical")
    vae = models.static_vae
    coords, feats = layout.read_voxel_features(layout.voxel_features_path(sample, 0, extractor_name))
    coords, feats = pool_voxels(coords, feats, layout.VOXEL_RESOLUTION // vae.resolution)
    # float16 as VAEDataset hands them to training and encode_latent: the same canonical the DiT was trained on
    voxels = SparseVoxels.from_list([coords], [feats.half()]).to(device, torch.float32)
    gaussians, _, _ = vae(voxels, sample_posterior=False)
    return gaussians[0]


def sample_inputs(models: Models, job: Job, args, num_frames: int, device):
    """Tokens (T, L, C), canonical, the conditioning frames (T, 3, H, W) and an info dict for a prepared sample."""
    frames, views = layout.count_frames(job.path), layout.count_views(job.path)
    if frames == 0:
        raise FileNotFoundError(f"{layout.image_path(job.path, 0, COND_VIEW)}: no renders of the conditioning view")
    t = min(num_frames, frames)
    images = condition_frames(job.path, t)  # the images encode_latent.py made the training tokens from
    tokens = models.extractor(images)
    ply = canonical_ply(args, job)
    canonical = Gaussians.load_ply(ply).to(device) if ply else \
        static_reconstruction(models, job.path, models.voxel_extractor, device)
    return tokens, canonical, images, {"frames": t, "views": views,
                                       "canonical": str(ply) if ply else "static VAE"}


def image_to_3d_stage(models: Models, args, device):
    """The TRELLIS canonical stage (models/trellis/), loaded once from --trellis; decodes with the static VAE."""
    if models.image_to_3d is None:
        from models.trellis.image_to_3d import ImageTo3D
        from models.trellis.slat_flow import SLatFlowModel
        from models.trellis.ss_decoder import SparseStructureDecoder
        from models.trellis.ss_flow import SparseStructureFlowModel
        from utils.checkpoint import load_trellis_models, read_trellis_pipeline
        if models.static_vae is None:
            raise ValueError("the image-to-3D stage decodes with the GVF static VAE: give --static-vae or a pack with one")
        registry = {c.__name__: c for c in (SparseStructureFlowModel, SparseStructureDecoder, SLatFlowModel)}
        nets = {k: m.to(device).eval() for k, m in load_trellis_models(registry, args.trellis).items()}
        norm = read_trellis_pipeline(args.trellis)["args"]["slat_normalization"]
        stage = ImageTo3D(nets["sparse_structure_flow_model"], nets["sparse_structure_decoder"],
                          nets["slat_flow_model"], models.static_vae, torch.tensor(norm["mean"]),
                          torch.tensor(norm["std"]), sampler_from_args(args, "ss", SS_DEFAULTS),
                          sampler_from_args(args, "slat", SLAT_DEFAULTS),
                          autocast_dtype=torch.float16)  # the released fp16 precision
        extractor = get_extractor("dinov2_vitl14_reg", device=device, weights=args.dinov2)
        models.image_to_3d = (stage, extractor)
    return models.image_to_3d


@torch.no_grad()
def canonical_from_frame(models: Models, job: Job, args, device) -> tuple[Gaussians, dict]:
    """Canonical Gaussians made from the clip's first frame by the image-to-3D stage."""
    stage, extractor = image_to_3d_stage(models, args, device)
    first, _ = read_frames(job.path, start=args.start, stride=1, num_frames=1)
    image = trellis_preprocess(first[0], matting=args.matting)
    tokens = extractor.trellis_condition(image[None]).to(device)
    seed = models.cfg.sampling.seed if args.seed is None else args.seed
    gaussians, info = stage(tokens, seed=seed)
    # the job's peak so far (run_job resets it at the start; only the condition tokens ran before this stage)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    samplers = {k: {"steps": v.steps, "cfg_strength": v.cfg_strength, "cfg_interval": v.cfg_interval}
                for k, v in (("ss", stage.ss_sampler), ("slat", stage.slat_sampler))}
    return gaussians, {"voxels": info["num_voxels"], "model_evaluations": info["nfe"], "samplers": samplers,
                       "seconds": info["seconds"], "peak_gpu_memory_gib": peak}


def video_inputs(models: Models, job: Job, args, num_frames: int, device):
    ply = canonical_ply(args, job)
    if ply is None and not args.trellis:
        raise ValueError(f"no canonical Gaussians for video {job.path}: give --canonical <file.ply>, a folder with "
                         f"{job.name}.ply, or --trellis <TRELLIS-image-large folder or repo> to make them")
    prepare = lambda n: prepare_video_frames(job.path, n, start=args.start, stride=args.stride,
                                             size=models.extractor.image_size, background=COND_BACKGROUND,
                                             matting=args.matting)
    try:
        video = prepare(num_frames)
    except VideoReadError:
        raise
    except ValueError:
        if args.num_frames is not None:  # the user asked for that many frames: a shorter clip is an error
            raise
        video = prepare(None)            # the default count is an upper bound: a shorter clip uses all its frames
    if len(video.images) < MIN_VIDEO_FRAMES:
        n = len(video.images)
        raise cli.InputError(f"{job.path}: has {n} frame{'' if n == 1 else 's'} from frame {args.start} (stride "
                             f"{args.stride}); a video needs at least {MIN_VIDEO_FRAMES}, its motion is what is followed")
    tokens = models.extractor(video.images)
    extra = {}
    if ply is not None:
        canonical = Gaussians.load_ply(ply).to(device)
    else:
        canonical, extra["image_to_3d"] = canonical_from_frame(models, job, args, device)
    ext, K = front_camera(device)
    a = align_to_silhouette(canonical, video.alpha[0, 0], ext, K)
    canonical = rotate_z(canonical, a.azimuth)
    return tokens, canonical, video.images, {**extra, "frames": len(video.images),
                                             "canonical": str(ply) if ply else "image-to-3D", "matting": video.matting,
                                             "fps": video.fps, "crop_box": list(video.box),
                                             "alignment": {"azimuth_deg": a.azimuth, "scale": a.scale,
                                                           "silhouette_iou": a.iou}}


# ---------------------------------------------------------------------------------------------- outputs

def render_views(frames: Gaussians, extrinsics, intrinsics, size: int, background: float) -> torch.Tensor:
    """frames (T, N) each seen by its own camera (T, 4, 4) -> (T, H, W, 3)."""
    return rasterize(frames, extrinsics[:, None], intrinsics[:, None], size, size, background=background).rgb[:, 0]


COMPARE_LABELS = ("input", "4D, input view", "4D, orbit")


def label_patch(text: str, width: int) -> np.ndarray:
    """White `text` on a black band (readable on any background), at most `width` wide: (h, w, 3) uint8."""
    from PIL import Image, ImageDraw, ImageFont
    font = ImageFont.load_default()
    _, _, right, bottom = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((3, 2), text, font=font)
    band = Image.new("RGB", (min(right + 3, width), bottom + 3))
    ImageDraw.Draw(band).text((3, 2), text, fill=(255, 255, 255), font=font)
    return np.asarray(band)


def compare_frames(frames: Gaussians, inputs: torch.Tensor, s) -> np.ndarray:
    """The frames of compare.mp4: (T, R, 3·R, 3) uint8 at the sampling resolution R = s.resolution, frame t of every
    column side by side. Columns: the input frames (T, 3, h, w) resized to R; the animation `frames` (T, N) from the
    input camera (front_camera: the video is view 0; a video's canonical is already turned to its silhouette); the
    same from an orbit camera whose azimuth advances with the frame (360°·t/T) at the config's elevation, radius and
    fov. All on the input's background, so the columns compare like with like; each column carries its label."""
    t, dev, size = len(inputs), frames.xyz.device, s.resolution
    src = F.interpolate(inputs.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    ext, K = front_camera(dev)
    front = render_views(frames, ext.expand(t, 4, 4), K.expand(t, 3, 3), size, COND_BACKGROUND)
    ext_o, K_o = orbit_cameras(torch.arange(t) * (360.0 / t), s.elevation_deg, s.radius, s.fov_deg)
    orbit = render_views(frames, ext_o.to(dev), K_o.to(dev), size, COND_BACKGROUND)
    panels = []
    for panel, text in zip((src.permute(0, 2, 3, 1), front, orbit), COMPARE_LABELS):
        panel = to_uint8(panel.cpu()).copy()   # to_uint8 passes uint8 through: copy before drawing on it
        patch = label_patch(text, size)
        panel[:, : patch.shape[0], : patch.shape[1]] = patch  # the same band on every frame: drawn once
        panels.append(panel)
    return np.concatenate(panels, axis=2)


GRID_AZIMUTHS = (0.0, 90.0, 180.0, 270.0)
GRID_BACKGROUND = 0.5  # neutral grey: pale and dark objects both stand out


def grid_image(frames: Gaussians, s, margin: float = 0.08) -> np.ndarray:
    """grid.png as (H, W, 3) uint8: rows the views at GRID_AZIMUTHS (s's elevation, radius, fov), columns the frames.
    Every cell shows the same square crop, the union of the object's silhouettes over all frames and views plus a
    `margin`, resized to R = s.resolution: the object fills its cell, and sizes and motion stay comparable between
    cells. Frame numbers label the columns, azimuths the rows."""
    t, dev, size = frames.xyz.shape[0], frames.xyz.device, s.resolution
    ext, K = orbit_cameras(torch.tensor(GRID_AZIMUTHS), s.elevation_deg, s.radius, s.fov_deg)
    out = rasterize(frames, ext.to(dev), K.to(dev), size, size, background=GRID_BACKGROUND)
    rgb = out.rgb.flatten(0, 1).movedim(-1, 1).float().cpu()                  # (T·4, 3, R, R), frame-major
    seen = (out.alpha[..., 0] > 0.05).flatten(0, 1).any(0).cpu()              # (R, R) union of the silhouettes
    if seen.any():
        ys, xs = torch.nonzero(seen, as_tuple=True)
        side = min(size, int((max(ys.max() - ys.min(), xs.max() - xs.min()) + 1) * (1 + 2 * margin)) + 1)
        y0 = int(min(max((ys.max() + ys.min() + 1) // 2 - side // 2, 0), size - side))
        x0 = int(min(max((xs.max() + xs.min() + 1) // 2 - side // 2, 0), size - side))
        rgb = F.interpolate(rgb[..., y0:y0 + side, x0:x0 + side], size=(size, size), mode="bilinear",
                            antialias=True, align_corners=False)
    cells = to_uint8(rgb.movedim(1, -1).reshape(t, len(GRID_AZIMUTHS), size, size, 3))
    body = cells.transpose(1, 2, 0, 3, 4).reshape(len(GRID_AZIMUTHS) * size, t * size, 3)   # rows views, cols frames
    tops = [label_patch(f"frame {i}", size) for i in range(t)]
    lefts = [label_patch(f"{a:g}°", size) for a in GRID_AZIMUTHS]
    top, left = max(p.shape[0] for p in tops), max(p.shape[1] for p in lefts)
    canvas = np.full((top + body.shape[0], left + body.shape[1], 3), to_uint8(torch.tensor(GRID_BACKGROUND)),
                     dtype=np.uint8)
    canvas[top:, left:] = body
    for i, p in enumerate(tops):
        canvas[:p.shape[0], left + i * size: left + i * size + p.shape[1]] = p
    for j, p in enumerate(lefts):
        canvas[top + j * size: top + j * size + p.shape[0], :p.shape[1]] = p
    return canvas


def write_outputs(out: Path, canonical: Gaussians, delta: torch.Tensor, s, fps: float, inputs: torch.Tensor) -> dict:
    """The files of one input (module docstring); `inputs` (T, 3, h, w) are the frames the model saw."""
    frames = canonical.apply_delta(delta)                                                     # (T, N)
    write_ply_sequence(frames.to("cpu"), out / "ply", overwrite=True)
    c = canonical.to("cpu")
    arrays = {"xyz": c.xyz, "f_dc": c.f_dc, "opacity_logit": c.opacity_logit, "scale_pre": c.scale_pre,
              "quat": c.quat, "delta": delta.cpu()}

    def save(tmp):
        with open(tmp, "wb") as f:  # a file object: numpy would append ".npz" to the temporary name
            np.savez_compressed(f, **{k: v.float().numpy() for k, v in arrays.items()})

    atomic_write(out / "animation.npz", save, overwrite=True)
    t = delta.shape[0]
    bg = 1.0 if s.background == "white" else 0.0
    k = s.orbit_frames
    ext, K = orbit_cameras(torch.arange(k) * (360.0 / k), s.elevation_deg, s.radius, s.fov_deg)
    idx = torch.arange(k) % t
    dev = delta.device
    orbit = torch.cat([render_views(frames.map(lambda x: x[idx[i:i + 8]]), ext[i:i + 8].to(dev), K[i:i + 8].to(dev),
                                    s.resolution, bg) for i in range(0, k, 8)])
    write_video(out / "orbit.mp4", orbit.cpu(), fps=fps, overwrite=True)
    write_video(out / "compare.mp4", compare_frames(frames, inputs, s), fps=fps, overwrite=True)
    grid = grid_image(frames, s)
    from PIL import Image
    atomic_write(out / "grid.png", lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"), overwrite=True)
    return {"ply_frames": t, "gaussians": len(canonical)}


def held_out_views(job: Job, num_frames: int, device) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per frame, the ground truth of the views not given to the model (all but view 0): images (V, 3, H, W) on
    white, extrinsics (V, 4, 4), intrinsics (V, 3, 3). Read once, scored against any number of animations."""
    out = []
    for i in range(num_frames):
        held_out = [v for v in range(layout.count_views(job.path, i)) if v != COND_VIEW]
        if not held_out:
            raise ValueError(f"{job.path}: frame {i} has no view other than the conditioning view")
        gts, exts, ks = [], [], []
        for v in held_out:
            rgb, alpha = load_rgba(layout.image_path(job.path, i, v))
            gts.append(composite(rgb, alpha, 1.0, blur=False))
            e, k = load_blender_camera(layout.camera_path(job.path, i, v), rgb.shape[2], rgb.shape[1])
            exts.append(e), ks.append(k)
        out.append((torch.stack(gts).to(device), torch.stack(exts).to(device), torch.stack(ks).to(device)))
    return out


def mesh_motion(job: Job, num_frames: int, num_points: int, extractor: str) -> dict:
    """A prepared sample's mesh points as the motion VAE trains on them (datasets/vae_dataset.py): static_pc (P, 3) at
    frame 0 and deltas (T, P, 3) from it. Drawn as for a dataset of this one object (index 0), so that evaluate.py
    and summary.json use the same points whatever list the object comes from."""
    return VAEDataset(job.path.parent, [job.path.name], num_points=num_points, num_timesteps=num_frames,
                      sample_timesteps=num_frames, train=False, extractor=extractor, images=False).load(0)


@torch.no_grad()
def oracle_delta_xyz(canonical_xyz: torch.Tensor, static_pc: torch.Tensor, deltas: torch.Tensor,
                     motion_vae) -> torch.Tensor:
    """The oracle Δxyz (T, N, 3) of canonical Gaussians at `canonical_xyz` (N, 3): the true mesh displacements
    interpolated at each centre by the mesh-guided KNN, exactly the motion VAE's xyz training target
    (utils/losses.mesh_guided_xyz_loss, with the VAE's k and beta)."""
    static_pc, deltas = static_pc.to(canonical_xyz), deltas.to(canonical_xyz)
    return interpolate_displacements(canonical_xyz[None], static_pc[None], (static_pc + deltas)[None],
                                     k=motion_vae.knn_k, beta=motion_vae.beta)[0]


def frames_covered(num_frames: int, after_first: bool) -> str:
    """How a mean over frames names the frames it covers, in summary.json, the printed line and scripts/evaluate.py
    alike: the same object's numbers compare only over the same frames (frame 0 is the canonical, already seen)."""
    if num_frames == 1:
        return "frame 0 (the only one)"
    return f"frames 1..{num_frames - 1} (after the first)" if after_first else f"all frames 0..{num_frames - 1}"


@torch.no_grad()
def ground_truth_metrics(views, canonical: Gaussians, delta: torch.Tensor, metrics: ImageMetrics) -> dict:
    """Per frame, the mean over the held-out `views` (held_out_views) of PSNR / SSIM (/ LPIPS) against the renders;
    their means over all frames ("mean") and over the frames after the first ("mean_after_first", the frames
    scripts/evaluate.py reports), each named in "frames_covered"."""
    frames = canonical.apply_delta(delta)
    per_frame = []
    for i, (gt, ext, K) in enumerate(views):
        size = gt.shape[-1]
        pred = rasterize(frames.map(lambda x: x[i]), ext, K, size, size, background=1.0).rgb.movedim(-1, -3)
        per_frame.append({k: float(v.mean()) for k, v in metrics(pred, gt).items()})
    keys = per_frame[0].keys()
    later = per_frame[1:] or per_frame
    return {"per_frame": per_frame, "mean": {k: float(np.mean([f[k] for f in per_frame])) for k in keys},
            "mean_after_first": {k: float(np.mean([f[k] for f in later])) for k in keys},
            "frames_covered": {"mean": frames_covered(len(per_frame), False),
                               "mean_after_first": frames_covered(len(per_frame), True)},
            "views_per_frame": len(views[-1][0])}


def run_job(job: Job, models: Models, args, metrics: ImageMetrics | None, device) -> dict:
    out = args.out / job.name
    if job.kind == "missing":
        raise cli.InputError(f"{job.path}: " + ("does not exist" if not job.path.exists() else
                             "a folder with neither frame images (.png/.jpg/.webp) nor a prepared sample (imgs/)"
                             if job.path.is_dir() else "neither a prepared sample nor a video"))
    if (out / "summary.json").is_file() and not args.overwrite:
        return {"skipped": True}
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out}: exists but holds no finished outputs (no summary.json); pass --overwrite to "
                              f"replace it")
    # Written into a hidden sibling and swapped in whole when complete: never a mix of two runs' files (fewer frames
    # than before leave no stale PLYs), and a failure keeps the previous outputs as they were.
    with atomic_folder(out, overwrite=True) as staging:
        return animate_job(job, models, args, metrics, device, staging)


def animate_job(job: Job, models: Models, args, metrics: ImageMetrics | None, device, out: Path) -> dict:
    """Animate one input and write all its files into `out` (run_job's staging folder); returns its summary."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    s = models.cfg.sampling
    num_frames = args.num_frames or s.num_frames
    t0 = time.perf_counter()
    get = sample_inputs if job.kind == "sample" else video_inputs
    tokens, canonical, inputs, info = get(models, job, args, num_frames, device)
    seconds = {"inputs": time.perf_counter() - t0}
    seed = s.seed if args.seed is None else args.seed
    result = models.motion(canonical, tokens, seed=seed)
    seconds.update(result.seconds)
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    s = argparse.Namespace(**{**s.to_dict(), "orbit_frames": args.orbit_frames})
    written = write_outputs(out, canonical, result.delta, s, float(info.get("fps") or 12.0), inputs)
    seconds["outputs"] = time.perf_counter() - t0
    summary = {"input": str(job.path), "kind": job.kind, **info, **written, "seed": seed, "model_evaluations": result.nfe,
               "seconds": seconds, "peak_gpu_memory_gib": (torch.cuda.max_memory_allocated(device) / 2**30
                                                          if device.type == "cuda" else None)}
    oracle = None
    if metrics is not None and job.kind == "sample":
        t0 = time.perf_counter()
        views = held_out_views(job, result.delta.shape[0], device)
        summary["metrics"] = ground_truth_metrics(views, canonical, result.delta, metrics)
        if layout.frame_deltas_path(job.path).is_file():  # a sample with renders but no mesh points has no oracle
            mesh = mesh_motion(job, result.delta.shape[0], models.motion.motion_vae.num_inputs, models.voxel_extractor)
            oracle = oracle_delta_xyz(canonical.xyz, mesh["static_pc"], mesh["deltas"], models.motion.motion_vae)
        seconds["metrics"] = time.perf_counter() - t0
    summary["motion"] = motion_statistics(result.delta[..., :3], oracle)
    atomic_write(out / "summary.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=1)), overwrite=True)
    return summary


def result_line(name: str, summary: dict, out: Path) -> str:
    """One input's outcome, printed as soon as it finishes."""
    if summary.get("skipped"):
        return f"{name}: outputs exist in {out} (--overwrite to redo)"
    line = f"{name}: {summary['ply_frames']} frames, {summary['model_evaluations']} model evaluations, " \
           f"{sum(summary['seconds'].values()):.1f} s"
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
    models = load_models(args, device)
    # Image metrics (and the LPIPS weights they may look for) only where there is ground truth to compare with.
    wants_metrics = not args.no_metrics and any(j.kind == "sample" for j in jobs)
    metrics = ImageMetrics(load_lpips(device=device)) if wants_metrics else None
    mine = jobs[state.process_index::state.num_processes]
    failures, bad_input = [], False
    bar = tqdm(mine, desc="animate", disable=not state.is_main_process, dynamic_ncols=True)
    for job in bar:
        bar.set_postfix_str(job.name, refresh=True)
        try:
            summary = run_job(job, models, args, metrics, device)
            tqdm.write(result_line(job.name, summary, args.out / job.name))
        except Exception as e:  # report by name as it happens, go on with the others, list them again at the end
            # bad input reads as its message; anything else keeps its type, which says where to look
            bad_input = isinstance(e, cli.refusal_types() + (ValueError,))
            failures.append((job.name, cli.one_line(e) if bad_input else f"{type(e).__name__}: {cli.one_line(e)}"))
            tqdm.write(f"{job.name}: failed: {failures[-1][1]}", file=sys.stderr)
    if state.num_processes > 1:
        failures = [f for part in gather_object([failures]) for f in part]
    if not state.is_main_process:
        return 0
    if len(jobs) == 1:  # its failure line is already on screen; a refused input is bad input (2), as everywhere
        return (cli.EXIT_BAD_INPUT if bad_input else 1) if failures else 0
    return report_failures(failures, len(jobs), "inputs")  # a batch: 1 when any input failed


if __name__ == "__main__":
    sys.exit(cli.run(main))
