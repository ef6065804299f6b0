"""Where the canonical Gaussians of an input come from: a user's PLY, the static VAE's reconstruction of a prepared
sample's frame 0, or the TRELLIS image-to-3D stage on a video's first frame (decoded by the same static VAE).

    canonical = static_reconstruction(static_vae, sample, "patch", device)
    stage = ImageTo3DStage.load("TRELLIS-image-large", static_vae, device)     # once; then per video:
    canonical, info = stage(first_frame_rgb, matting="auto", seed=0)
"""
from __future__ import annotations

from pathlib import Path

import torch

from datasets import layout
from models.sparse import SparseVoxels
from models.static_vae import StaticVAE
from models.trellis.flow_euler import SLAT_DEFAULTS, SS_DEFAULTS, FlowEulerSampler
from models.trellis.image_to_3d import ImageTo3D
from models.trellis.slat_flow import SLatFlowModel
from models.trellis.ss_decoder import SparseStructureDecoder
from models.trellis.ss_flow import SparseStructureFlowModel
from pipeline.matting import trellis_preprocess
from utils.checkpoint import load_trellis_models, read_trellis_pipeline
from utils.gaussians import Gaussians
from utils.image_features import get_extractor
from utils.images import pool_voxels


@torch.no_grad()
def static_reconstruction(static_vae: StaticVAE | None, sample: Path, extractor_name: str, device) -> Gaussians:
    """The static VAE's Gaussians of a prepared sample's frame-0 voxel features (`extractor_name`'s)."""
    if static_vae is None:
        raise ValueError("no canonical Gaussians: give --static-vae (or a pack with one) or --canonical")
    coords, feats = layout.read_voxel_features(layout.voxel_features_path(sample, 0, extractor_name))
    coords, feats = pool_voxels(coords, feats, layout.VOXEL_RESOLUTION // static_vae.resolution)
    # float16 as VAEDataset hands them to training and encode_latent: the same canonical the DiT was trained on
    voxels = SparseVoxels.from_list([coords], [feats.half()]).to(device, torch.float32)
    gaussians, _, _ = static_vae(voxels, sample_posterior=False)
    return gaussians[0]


class ImageTo3DStage:
    """The TRELLIS canonical stage (models/trellis/) with its DINOv2 condition, decoding with the GVF static VAE."""

    def __init__(self, image_to_3d: ImageTo3D, extractor):
        self.image_to_3d, self.extractor = image_to_3d, extractor

    @classmethod
    def load(cls, trellis: str | Path, static_vae: StaticVAE | None, device, dinov2: str | Path | None = None,
             ss_sampler: FlowEulerSampler | None = None, slat_sampler: FlowEulerSampler | None = None,
             extractor=None):
        """From a TRELLIS-image-large folder or hub repo; the samplers default to the published GVFDiffusion ones.
        `extractor`: a DINOv2 extractor already loaded (the DiT's at paper scale), else one is loaded from `dinov2`
        (a local folder; default the hub): one copy of the 300M-parameter model serves both."""
        if static_vae is None:
            raise ValueError("the image-to-3D stage decodes with the GVF static VAE: give --static-vae or a pack with one")
        registry = {c.__name__: c for c in (SparseStructureFlowModel, SparseStructureDecoder, SLatFlowModel)}
        nets = {k: m.to(device).eval() for k, m in load_trellis_models(registry, trellis).items()}
        norm = read_trellis_pipeline(trellis)["args"]["slat_normalization"]
        stage = ImageTo3D(nets["sparse_structure_flow_model"], nets["sparse_structure_decoder"],
                          nets["slat_flow_model"], static_vae, torch.tensor(norm["mean"]), torch.tensor(norm["std"]),
                          ss_sampler or FlowEulerSampler(**SS_DEFAULTS),
                          slat_sampler or FlowEulerSampler(**SLAT_DEFAULTS),
                          autocast_dtype=torch.float16)  # the released fp16 precision
        if extractor is None or extractor.name != "dinov2_vitl14_reg":
            extractor = get_extractor("dinov2_vitl14_reg", device=device, weights=dinov2)
        return cls(stage, extractor)

    @torch.no_grad()
    def __call__(self, image, matting: str = "auto", seed: int = 0) -> tuple[Gaussians, dict]:
        """Canonical Gaussians from one frame (H, W, 3|4), matted and framed as TRELLIS expects; info for
        summary.json (voxels, model evaluations, samplers, seconds, peak GPU memory so far)."""
        dev = self.image_to_3d.device
        tokens = self.extractor.trellis_condition(trellis_preprocess(image, matting=matting)[None]).to(dev)
        gaussians, info = self.image_to_3d(tokens, seed=seed)
        peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
        stage = self.image_to_3d
        samplers = {k: {"steps": v.steps, "cfg_strength": v.cfg_strength, "cfg_interval": v.cfg_interval}
                    for k, v in (("ss", stage.ss_sampler), ("slat", stage.slat_sampler))}
        return gaussians, {"voxels": info["num_voxels"], "model_evaluations": info["nfe"], "samplers": samplers,
                           "seconds": info["seconds"], "peak_gpu_memory_gib": peak}
