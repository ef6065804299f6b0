"""Video to 4D as a Python API: canonical Gaussians animated to the frames of a video (docs/published_system.md §6).

    from pipeline import VideoTo4D
    pipe = VideoTo4D.from_pack("assets/pack")                         # device: a GPU when there is one
    result = pipe("assets/examples/obj_00023.mp4", canonical="assets/examples/obj_00023.ply")
    result.save("outputs/obj_00023")                                  # PLYs, animation.npz, mp4s, grid.png, summary
    frames = result.frames                                            # Gaussians (T, N): canonical + Δ of each frame

Inputs (`source`): a video file (mp4, mov, mkv, webm, avi, gif), a folder of frame images, or a prepared sample
(published layout: imgs/, meta_data/, features_all_timesteps/).
- Videos: frames are matted (alpha channel, rembg when installed with its weights, or a clean-background threshold),
  cropped to a square around the object and composited on the training background. The canonical Gaussians are
  `canonical` (a Gaussian PLY path, Gaussians, or a mesh path: below), or made from the first frame by the TRELLIS
  image-to-3D stage when the pipeline was loaded with `trellis=`. They are turned about Z to match the first frame's
  silhouette.
- A mesh as `canonical` (.glb / .gltf, .obj, or a .ply with faces; pipeline/mesh_input.py): Gaussians are sampled on
  its surface (pipeline/mesh_canonical.py), normalised into the models' frame (bounding box centred, largest side 1)
  and animated like any canonical; the motion is then carried back to the mesh's vertices (pipeline/vertex_motion.py)
  and result.save also writes animated.glb (pipeline/glb.py): the mesh as given, with one morph target per frame
  played at the video's rate. Its base positions are the input's own coordinates: the motion is turned back from the
  alignment's turn and scaled back to the mesh's units (summary.json "canonical_mesh" records the transform).
- Prepared samples: the video is view 0 of each frame; the canonical is the static VAE's reconstruction of frame 0
  (or `canonical`); `pipe.score(result)` adds PSNR / SSIM (/ LPIPS) on the other views and the motion error against
  the oracle (the mesh motion interpolated at the Gaussians).
inference_dpm_latent.py is the command line over this class (a loop over inputs, sharded over processes).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from datasets import layout
from datasets.condition import COND_BACKGROUND, COND_VIEW, condition_camera, condition_frames
from models.trellis.flow_euler import FlowEulerSampler
from pipeline.alignment import align_to_silhouette, rotate_z
from pipeline.canonical import ImageTo3DStage, static_reconstruction
from pipeline.glb import write_animated_glb
from pipeline.ground_truth import ground_truth_metrics, held_out_views, mesh_motion, oracle_delta_xyz
from pipeline.matting import VideoFrames, prepare_video_frames
from pipeline.mesh_canonical import DEFAULT_COUNT, MeshCanonical, mesh_canonical
from pipeline.mesh_input import UserMesh, is_mesh_file, read_mesh
from pipeline.outputs import Rendered, Views, render_outputs, write_rendered
from pipeline.pack import Models, load_models
from pipeline.vertex_motion import mesh_displacement
from utils.cli import InputError
from utils.fileio import atomic_folder, atomic_write
from utils.gaussians import Gaussians
from utils.metrics import ImageMetrics, motion_statistics
from utils.video import VideoReadError, is_video_input, read_frames

MIN_VIDEO_FRAMES = 2  # one frame has no motion to follow
DEFAULT_FPS = 12.0    # prepared samples and frame folders carry no rate


def input_kind(path: Path) -> str | None:
    """"sample" (a prepared sample), "video" (a video file or a folder of frames) or None (neither)."""
    if layout.has_renders(path):
        return "sample"
    return "video" if is_video_input(path) else None


@dataclass
class CanonicalMesh:
    """A mesh given as the canonical: the file read, the Gaussians sampled on it, and the turn about Z (degrees) that
    the alignment gave them, which the motion is turned back from."""
    mesh: UserMesh
    sampled: MeshCanonical
    azimuth_deg: float = 0.0

    def summary(self) -> dict:
        s = self.sampled
        return {"file": str(self.mesh.path), **self.mesh.info, "vertices": int(self.mesh.surface.vertices.shape[1]),
                "faces": int(len(self.mesh.surface.faces)), "gaussians": len(s.gaussians),
                "normalisation": {"centre": s.centre.tolist(), "extent": s.extent, "azimuth_deg": self.azimuth_deg,
                                  "note": "models' frame = Rz(azimuth_deg) (mesh - centre) / extent, the mesh in the "
                                          "project's axes (Z up; glTF / OBJ read Y up); animated.glb keeps the "
                                          "mesh's own coordinates"}}


@dataclass
class Prepared:
    """What the motion stage needs of one input: tokens (T, L, C), the canonical, the frames the model sees
    (T, 3, H, W) and what summary.json records of them."""
    name: str
    source: Path
    kind: str
    tokens: torch.Tensor
    canonical: Gaussians
    inputs: torch.Tensor
    info: dict
    mesh: CanonicalMesh | None = None


@dataclass
class Result:
    """One input animated: canonical (N Gaussians) + delta (T, N, 14) per frame; `summary` is summary.json's content."""
    name: str
    source: Path
    kind: str
    canonical: Gaussians
    delta: torch.Tensor
    inputs: torch.Tensor
    views: Views
    summary: dict = field(default_factory=dict)
    mesh: CanonicalMesh | None = None   # the canonical came from a mesh: save() also writes animated.glb

    @property
    def frames(self) -> Gaussians:
        """The Gaussians of every frame (T, N)."""
        return self.canonical.apply_delta(self.delta)

    @property
    def fps(self) -> float:
        return float(self.summary.get("fps") or DEFAULT_FPS)

    def mesh_displacement(self):
        """With a mesh canonical: the displacement (T, V, 3) of each vertex of mesh.surface (project axes, the
        mesh's units) per frame, the Gaussians' Δxyz carried back to the vertices (pipeline/vertex_motion.py)."""
        if self.mesh is None:
            raise ValueError(f"{self.source}: the canonical was not a mesh")
        m = self.mesh
        return mesh_displacement(m.sampled, m.azimuth_deg, self.canonical.xyz, self.delta[..., :3],
                                 m.mesh.surface.vertices[0])

    def save(self, folder: str | Path, overwrite: bool = False) -> Path:
        """Write the result's files (pipeline/outputs.py) and summary.json into `folder`, as a whole: an existing
        folder is replaced only with `overwrite`, and only once everything is written (FileExistsError otherwise)."""
        return self.write(folder, self.render(), overwrite)

    def render(self) -> Rendered:
        """save's first half, on the model's device: the images of the files, handed to the CPU."""
        t0 = time.perf_counter()
        rendered = render_outputs(self.canonical, self.delta, self.views, self.fps, self.inputs)
        self.summary["seconds"]["rendering"] = time.perf_counter() - t0
        dev = self.delta.device
        self.summary["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30 \
            if dev.type == "cuda" else None
        return rendered

    def write(self, folder: str | Path, rendered: Rendered, overwrite: bool = False) -> Path:
        """save's second half, CPU only (safe in a thread beside the next input's GPU work)."""
        folder = Path(folder)
        with atomic_folder(folder, overwrite=overwrite) as staging:
            t0 = time.perf_counter()
            self.summary.update(write_rendered(staging, rendered))
            if self.mesh is not None:
                self.summary["animated_glb"] = write_animated_glb(staging / "animated.glb", self.mesh.mesh,
                                                                  self.mesh_displacement(), self.fps)
            self.summary["seconds"]["writing"] = time.perf_counter() - t0
            text = json.dumps(self.summary, indent=1)
            atomic_write(staging / "summary.json", lambda tmp: tmp.write_text(text))
        return folder


class VideoTo4D:
    """The inference pipeline (module docstring). Build it with `from_pack` (or `load` for separate weights)."""

    def __init__(self, models: Models, views: Views | None = None, image_to_3d: dict | None = None,
                 mesh_gaussians: int = DEFAULT_COUNT):
        self.models = models
        self.mesh_gaussians = mesh_gaussians   # Gaussians sampled on a mesh canonical
        self.views = views or Views.from_sampling(models.cfg.sampling)
        self._image_to_3d_args, self._image_to_3d = image_to_3d, None  # the TRELLIS stage is loaded on first use

    @classmethod
    def load(cls, pack: str | Path | None = None, *, device: torch.device | str | None = None,
             trellis: str | Path | None = None, dinov2: str | Path | None = None,
             ss_sampler: FlowEulerSampler | None = None, slat_sampler: FlowEulerSampler | None = None,
             orbit_frames: int = 48, outputs=None, mesh_gaussians: int = DEFAULT_COUNT, **weights) -> VideoTo4D:
        """`pack` and/or weights (pipeline/pack.load_models's keywords: dit, motion_vae, static_vae, stats_dir, config,
        vae_config, precision, compile, sampling); `trellis` (a TRELLIS-image-large folder or hub repo) makes the
        canonical of videos given none; `dinov2` a local DINOv2 folder for its condition and, at paper scale, the
        DiT's image tokens; `outputs` the files save() writes (pipeline/outputs.OUTPUTS names; default all);
        `mesh_gaussians` how many Gaussians a mesh canonical is sampled into."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        models = load_models(pack, device=device, dinov2=dinov2, **weights)
        views = Views.from_sampling(models.cfg.sampling, orbit_frames=orbit_frames, outputs=frozenset(outputs or ()))
        stage = None if trellis is None else {"trellis": trellis, "dinov2": dinov2, "ss_sampler": ss_sampler,
                                              "slat_sampler": slat_sampler}
        return cls(models, views, stage, mesh_gaussians)

    from_pack = load  # VideoTo4D.from_pack("assets/pack"): the usual spelling

    @property
    def device(self) -> torch.device:
        return self.models.motion.device

    def __call__(self, source: str | Path, canonical: str | Path | Gaussians | None = None, *,
                 num_frames: int | None = None, start: int = 0, stride: int = 1, matting: str = "auto",
                 seed: int | None = None, name: str | None = None, video: VideoFrames | None = None,
                 **sampling) -> Result:
        """Animate `source` (module docstring). `num_frames` frames (default: the config's, at most the video's),
        from frame `start` every `stride`; `matting` "auto" | "alpha" | "rembg" | "threshold"; `sampling` overrides
        solver options (steps, method, guidance_scale, ...) for this call; `video` the frames read_video already
        read for these options (pipeline/batch.py reads the next input while this one runs)."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        prepared = self.prepare(source, canonical, num_frames=num_frames, start=start, stride=stride,
                                matting=matting, seed=seed, name=name, video=video)
        return self.animate(prepared, seed=seed, **sampling)

    # --------------------------------------------------------------------------------------------- stages
    def prepare(self, source: str | Path, canonical: str | Path | Gaussians | None = None, *,
                num_frames: int | None = None, start: int = 0, stride: int = 1, matting: str = "auto",
                seed: int | None = None, name: str | None = None, video: VideoFrames | None = None) -> Prepared:
        """Tokens, canonical and model-ready frames of one input (its stage times in info["seconds"])."""
        source = Path(source)
        kind = input_kind(source)
        if kind is None:
            what = "does not exist" if not source.exists() else \
                "a folder with neither frame images (.png/.jpg/.webp) nor a prepared sample (imgs/)" \
                if source.is_dir() else "neither a prepared sample nor a video"
            raise InputError(f"{source}: {what}")
        name = name or (source.stem if source.is_file() else source.name)
        t0 = time.perf_counter()
        canonical, origin, mesh = self._canonical(canonical)
        count = num_frames or self.models.cfg.sampling.num_frames
        if kind == "sample":
            p = self._sample(source, canonical, origin, count)
        else:
            if canonical is None and self._image_to_3d_args is None:
                raise ValueError(f"no canonical Gaussians for video {source}: give a canonical PLY or mesh "
                                 f"(--canonical FILE.ply / .glb / .gltf / .obj, or a folder with {name}.ply, "
                                 f"{name}.glb, ...) or the image-to-3D stage (--trellis <TRELLIS-image-large folder "
                                 f"or repo>)")
            if video is None:
                video = self.read_video(source, num_frames, start=start, stride=stride, matting=matting)
            p = self._video(source, video, canonical, origin, start=start, matting=matting, seed=seed)
        tokens, canonical, inputs, info = p
        if mesh is not None:  # a video's canonical was turned to its first frame; the motion is turned back
            mesh.azimuth_deg = info.get("alignment", {}).get("azimuth_deg", 0.0)
            info["canonical_mesh"] = mesh.summary()
        info["seconds"] = {"inputs": time.perf_counter() - t0}
        return Prepared(name, source, kind, tokens, canonical, inputs, info, mesh)

    def _canonical(self, canonical) -> tuple[Gaussians | None, str | None, CanonicalMesh | None]:
        """The given canonical on the device, where it came from (summary.json), and the mesh when it is one."""
        if canonical is None or isinstance(canonical, Gaussians):
            return (None, None, None) if canonical is None else (canonical.to(self.device), "given", None)
        path = Path(canonical)
        if is_mesh_file(path):
            user_mesh = read_mesh(path)
            mesh = CanonicalMesh(user_mesh, mesh_canonical(user_mesh.surface, self.mesh_gaussians))
            return mesh.sampled.gaussians.to(self.device), f"mesh {path}", mesh
        try:
            return Gaussians.load_ply(path).to(self.device), str(path), None
        except ValueError as e:  # a PLY with neither Gaussian fields nor faces: say that both were looked for
            raise InputError(f"{e}; nor is it a mesh (it has no faces)" if path.is_file() else str(e)) from None

    def animate(self, p: Prepared, seed: int | None = None, **sampling) -> Result:
        """The motion stage on a prepared input; the result's summary records the stage times and motion."""
        seed = self.models.cfg.sampling.seed if seed is None else seed
        motion = self.models.motion(p.canonical, p.tokens, seed=seed, **sampling)
        summary = {"input": str(p.source), "kind": p.kind, **p.info, "seed": seed, "model_evaluations": motion.nfe,
                   "seconds": {**p.info["seconds"], **motion.seconds},
                   "motion": motion_statistics(motion.delta[..., :3], None)}
        return Result(p.name, p.source, p.kind, p.canonical, motion.delta, p.inputs, self.views, summary, p.mesh)

    @torch.no_grad()
    def score(self, result: Result, metrics: ImageMetrics) -> dict:
        """For a prepared sample: summary["metrics"] against the held-out views, and summary["motion"] against the
        oracle motion where the sample has mesh points. Returns the summary."""
        if result.kind != "sample":
            raise ValueError(f"{result.source}: ground truth exists for prepared samples only, not a {result.kind}")
        t0 = time.perf_counter()
        frames = result.delta.shape[0]
        views = held_out_views(result.source, frames, self.device)
        result.summary["metrics"] = ground_truth_metrics(views, result.canonical, result.delta, metrics)
        if layout.frame_deltas_path(result.source).is_file():  # a sample with renders but no mesh points: no oracle
            motion_vae = self.models.motion.motion_vae
            mesh = mesh_motion(result.source, frames, motion_vae.num_inputs, self.models.voxel_extractor)
            oracle = oracle_delta_xyz(result.canonical.xyz, mesh["static_pc"], mesh["deltas"], motion_vae)
            result.summary["motion"] = motion_statistics(result.delta[..., :3], oracle)
        result.summary["seconds"]["metrics"] = time.perf_counter() - t0
        return result.summary

    # --------------------------------------------------------------------------------------------- inputs
    def _sample(self, sample: Path, canonical: Gaussians | None, origin: str | None, num_frames: int):
        frames, views = layout.count_frames(sample), layout.count_views(sample)
        if frames == 0:
            raise FileNotFoundError(f"{layout.image_path(sample, 0, COND_VIEW)}: no renders of the conditioning view")
        t = min(num_frames, frames)
        images = condition_frames(sample, t)  # the images encode_latent.py made the training tokens from
        tokens = self.models.extractor(images)
        if canonical is None:
            canonical = static_reconstruction(self.models.static_vae, sample, self.models.voxel_extractor, self.device)
        return tokens, canonical, images, {"frames": t, "views": views, "canonical": origin or "static VAE"}

    def read_video(self, source: str | Path, num_frames: int | None = None, start: int = 0, stride: int = 1,
                   matting: str = "auto") -> VideoFrames:
        """A video's frames decoded, matted, cropped and composited as the model takes them (CPU only: safe in a
        thread beside the device's work). `num_frames` None: the config's count, or all frames of a shorter clip."""
        path = Path(source)
        read = lambda n: prepare_video_frames(path, n, start=start, stride=stride,
                                              size=self.models.extractor.image_size, background=COND_BACKGROUND,
                                              matting=matting)
        try:
            video = read(num_frames or self.models.cfg.sampling.num_frames)
        except VideoReadError:
            raise
        except ValueError:
            if num_frames is not None:  # the user asked for that many frames: a shorter clip is an error
                raise
            video = read(None)  # the default count is an upper bound: a shorter clip uses all its frames
        if len(video.images) < MIN_VIDEO_FRAMES:
            n = len(video.images)
            raise InputError(f"{path}: has {n} frame{'' if n == 1 else 's'} from frame {start} (stride {stride}); a "
                             f"video needs at least {MIN_VIDEO_FRAMES}, its motion is what is followed")
        return video

    def _video(self, path: Path, video: VideoFrames, canonical: Gaussians | None, origin: str | None, start: int,
               matting: str, seed: int | None):
        tokens = self.models.extractor(video.images)
        extra = {}
        if canonical is None:
            first, _ = read_frames(path, start=start, stride=1, num_frames=1)
            seed = self.models.cfg.sampling.seed if seed is None else seed
            canonical, extra["image_to_3d"] = self.image_to_3d_stage()(first[0], matting=matting, seed=seed)
            origin = "image-to-3D"
        ext, K = condition_camera(self.device)
        a = align_to_silhouette(canonical, video.alpha[0, 0], ext, K)
        canonical = rotate_z(canonical, a.azimuth)
        return tokens, canonical, video.images, {
            **extra, "frames": len(video.images), "canonical": origin, "matting": video.matting, "fps": video.fps,
            "crop_box": list(video.box),
            "alignment": {"azimuth_deg": a.azimuth, "scale": a.scale, "silhouette_iou": a.iou}}

    def image_to_3d_stage(self) -> ImageTo3DStage:
        if self._image_to_3d is None:
            if self._image_to_3d_args is None:
                raise ValueError("the pipeline was loaded without the image-to-3D stage (trellis=)")
            self._image_to_3d = ImageTo3DStage.load(static_vae=self.models.static_vae, device=self.device,
                                                    extractor=self.models.extractor, **self._image_to_3d_args)
        return self._image_to_3d
