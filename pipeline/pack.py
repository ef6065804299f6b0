"""The trained models inference needs, from a pretrained pack or from separate weight files.

    models = load_models(pack="assets/pack", device=torch.device("cuda"), precision="bf16")
    models = load_models(dit="ema_diffusion.pt", motion_vae="ema_deformation.pt", static_vae="ema_static_vae.pt",
                         stats_dir="stats/")            # published .pt weights: their shapes from configs/*.yml

A pack (scripts/make_pack.py writes one; assets/pack is the shipped one) is a folder of PACK_FILES, the four latent
statistics files, config.yml (the diffusion config: model, motion_vae, data, sampling) and vae.yml. Our checkpoints
carry their own model config; published weights are built from the YAML blocks.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from datasets.latent_dataset import load_latent_stats
from models.dit import DiT
from models.dpm_solver import SamplerConfig
from models.motion_vae import MotionVAE
from models.static_vae import StaticVAE
from pipeline.animate import MotionStage
from utils.checkpoint import load_state_dict_strict, read_weights
from utils.config import Config, load_config
from utils.image_features import get_extractor

PACK_FILES = {"dit": "dit.safetensors", "motion_vae": "motion_vae.safetensors", "static_vae": "static_vae.safetensors"}
# The repository's configs: the defaults for weights that carry none (an editable install keeps this path valid).
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@dataclass
class Models:
    motion: MotionStage
    static_vae: StaticVAE | None
    cfg: Config                       # the diffusion config
    extractor: object                 # image tokens of the video frames
    voxel_extractor: str              # the features the static VAE reads from a sample's voxels


def _build(make, path: Path, yaml_block):
    """make(config) -> model, from our checkpoint's embedded config, or the YAML block for published weights."""
    sd, config = read_weights(path)  # one read of the file for both
    model = make(config or yaml_block)
    load_state_dict_strict(model, sd, source=str(path))
    return model


def _pack_file(pack: Path | None, name: str) -> Path | None:
    return pack / name if pack is not None and (pack / name).is_file() else None


def load_models(pack: str | Path | None = None, *, dit=None, motion_vae=None, static_vae=None, stats_dir=None,
                config=None, vae_config=None, device: torch.device | str = "cpu", precision: str = "fp32",
                compile: bool = False, sampling: dict | None = None, dinov2=None) -> Models:
    """The models of `pack`, each file replaceable by its own argument (paths). `precision` "bf16" autocasts on a
    GPU; `compile` runs the DiT through torch.compile; `sampling` overrides SamplerConfig fields (steps, method,
    guidance_scale, ...); `dinov2` a local DINOv2 folder when the config's image encoder is DINOv2 (default: the
    hub). Raises ValueError naming what is missing."""
    pack = Path(pack) if pack is not None else None
    if pack is not None and not pack.is_dir():
        raise ValueError(f"{pack}: no such pack folder")
    paths = {"dit": dit, "motion_vae": motion_vae, "static_vae": static_vae}
    paths = {k: Path(v) if v is not None else _pack_file(pack, PACK_FILES[k]) for k, v in paths.items()}
    missing = [f"--{k.replace('_', '-')}" for k in ("dit", "motion_vae") if paths[k] is None]
    if missing:
        raise ValueError(f"no weights for {', '.join(missing)} (give them or --pack)")
    stats = Path(stats_dir) if stats_dir is not None else pack
    if stats is None:
        raise ValueError("no latent statistics: give --stats-dir or --pack")
    device = torch.device(device)
    cfg = load_config(config or _pack_file(pack, "config.yml") or CONFIGS / "diffusion.yml")
    vae_cfg = load_config(vae_config or _pack_file(pack, "vae.yml") or CONFIGS / "vae.yml")
    dit_model = _build(lambda c: DiT(**c), paths["dit"], cfg.model.to_dict()).to(device)
    motion = _build(lambda c: MotionVAE(**c), paths["motion_vae"], cfg.motion_vae.to_dict()).to(device)
    static = None
    if paths["static_vae"] is not None:
        static = _build(StaticVAE.from_config, paths["static_vae"], vae_cfg.static_vae.to_dict()).to(device).eval()
    dtype = torch.bfloat16 if precision == "bf16" and device.type == "cuda" else torch.float32
    solver = SamplerConfig.from_config(cfg.sampling)
    if sampling:
        solver = dataclasses.replace(solver, **sampling)
    stage = MotionStage(dit_model, motion, load_latent_stats(stats), solver, cfg.data.num_static_cond,
                        cfg.data.normalize_position_xyz, dtype, compile=compile)
    weights = dinov2 if cfg.data.image_encoder == "dinov2_vitl14_reg" else None
    extractor = get_extractor(cfg.data.image_encoder, device=device, weights=weights)
    return Models(stage, static, cfg, extractor, vae_cfg.data.image_encoder)
