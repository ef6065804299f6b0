"""Train the VAEs (docs/published_system.md §3.4-3.5, §4.1) on the shared training loop (utils/training.py).

Phase 1 (optimiser steps < train.static_vae_steps): the static VAE alone, on one random canonical-frame view per
sample: L1 + 0.2·(1 − SSIM) + 0.2·LPIPS + KL + volume and opacity regularisers. Phase 2: the same static loss, plus the
motion VAE on the static VAE's canonical Gaussians (not detached): KL, the mesh-guided xyz loss and the rendering loss
of the deformed Gaussians at the sampled frames. The motion optimiser's warm-up starts with phase 2.

    accelerate launch --num_processes 1 main_vae.py --config configs/tiny/vae.yml --data-root data/synth \\
        --list data/synth/train.txt --out runs/vae_tiny
    accelerate launch --num_processes 8 main_vae.py --config configs/vae.yml --data-root data/objaverse \\
        --static-init trellis_init_vae.pt --out runs/vae

`--static-init` takes our checkpoint, a published static-VAE `.pt`, or a TRELLIS-initialised one whose 32-Gaussian
out_layer is replaced by a fresh zero one (published §3.5). Overrides `section.key=value` follow the options.
An --out that holds checkpoints needs `--resume latest` (continue) or `--restart` (the old run is moved to
<out>.old-<date>-<time>/); the folder is locked while training. `--allow-symlinks` follows symlinks out of the data root.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from datasets import layout
from datasets.vae_dataset import VAEDataset, collate_vae
from models.motion_vae import MotionVAE, pad_gaussians
from models.static_vae import StaticVAE
from utils.checkpoint import load_weights
from utils.config import load_config
from utils.gaussians import Gaussians
from utils.losses import load_lpips, mesh_guided_xyz_loss, render_loss
from utils.render import rasterize
from utils import cli
from utils.training import LoopConfig, TrainLoop, check_run_folder, seed_everything, trainer_arg_parser

# Keys of a TRELLIS SLat decoder that do not fit an 8-Gaussian model (published §3.5); dropped together when they differ.
OUT_LAYER_SWAP = ("out_layer.weight", "out_layer.bias", "MipGS_perturbation")
BACKGROUNDS = {"white": 1.0, "black": 0.0}


def parse_args(argv=None):
    ap = trainer_arg_parser(__doc__, "configs/vae.yml", "sample")
    ap.add_argument("--static-init", type=Path, help="static-VAE weights to start from (see above); default: scratch")
    ap.add_argument("--motion-init", type=Path, help="motion-VAE weights to start from (ours or a published .pt)")
    ap.add_argument("--sample_timesteps", "--sample-timesteps", type=int, help="frames per sample (train.sample_timesteps)")
    return ap.parse_intermixed_args(argv)  # overrides may come before or after the options


def build_dataset(cfg, data_root: Path, list_file: Path | None) -> VAEDataset:
    d, t = cfg.data, cfg.train
    if d.background not in BACKGROUNDS:
        raise ValueError(f"data.background must be one of {sorted(BACKGROUNDS)}, got {d.background!r}")
    names = layout.select_samples(data_root, list_file, d.start_idx, d.end_idx)
    return VAEDataset(data_root, names, num_points=d.num_points, num_timesteps=d.num_timesteps,
                      sample_timesteps=t.sample_timesteps, load_camera=t.load_camera, num_views=d.num_views,
                      extractor=d.image_encoder, voxel_resolution=d.voxel_resolution, image_size=d.image_resolution,
                      background=BACKGROUNDS[d.background], blur_alpha=d.blur_alpha, seed=t.seed)


def build_static_vae(cfg, init: Path | None) -> StaticVAE:
    model = StaticVAE.from_config(cfg.static_vae)
    torch.nn.init.zeros_(model.out_layer.weight)  # Gaussians start at the Hammersley points (published §3.2)
    torch.nn.init.zeros_(model.out_layer.bias)
    if init is not None:
        if load_weights(model, init, drop_mismatched=OUT_LAYER_SWAP):  # those keep their fresh values
            print(f"main_vae: {init}: out_layer and perturbation do not fit {model.rep['num_gaussians']} Gaussians per "
                  f"voxel; they start fresh (zero out_layer), the rest is loaded")
        if not cfg.train.finetune_encoder:  # the published freeze_encoder(): the blocks only (published §3.5, §10.10)
            model.encoder.requires_grad_(False)
    return model


def render(gaussians: Gaussians, extrinsics, intrinsics, size: int, background: float) -> torch.Tensor:
    """(V, 3, H, W) renders in float32 (outside autocast: the rasterizer's sums need the precision)."""
    with torch.autocast(extrinsics.device.type, enabled=False):
        out = rasterize(gaussians.map(lambda t: t.float()), extrinsics.float(), intrinsics.float(), size, size,
                        background=background)
    return out.rgb.movedim(-1, -3)


class VAEObjective:
    """The step function of TrainLoop: the static loss always, the motion losses from phase 2 on."""

    def __init__(self, cfg):
        fw = cfg.static_vae.framework.args
        self.t, self.fw, self.reg = cfg.train, fw, fw.regularizations.MipGS
        self.background = BACKGROUNDS[cfg.data.background]
        self.knn_k, self.beta = cfg.model.knn_k, cfg.model.beta
        self.lpips, self._lpips_loaded = None, False

    def _lpips(self, device):
        if not self._lpips_loaded:  # once, on the loop's device; None (one warning) when no weights exist
            self.lpips, self._lpips_loaded = load_lpips(device=device), True
        return self.lpips

    def __call__(self, batch, loop):
        lpips = self._lpips(loop.device)
        gaussians, _, posterior = loop.models["static_vae"](batch["voxels"].to(torch.float32))
        cam = batch["canonical"]
        size = cam["image"].shape[-1]
        pred = torch.cat([render(g, cam["extrinsics"][b:b + 1], cam["intrinsics"][b:b + 1], size, self.background)
                          for b, g in enumerate(gaussians)])
        l_img, terms = render_loss(pred, cam["image"], lpips, 1.0, self.fw.lambda_ssim, self.fw.lambda_lpips)
        every = Gaussians.cat(gaussians)
        kl = posterior.kl(dims=(0, 1))
        vol = every.scale.prod(-1).mean()
        opacity = ((every.opacity - 1) ** 2).mean()
        loss = l_img + self.fw.lamda_kl * kl + self.reg.lambda_vol * vol + self.reg.lambda_opacity * opacity
        logs = {f"static_{k}": v for k, v in terms.items()}
        logs.update(static_kl=kl.detach(), static_vol=vol.detach(), static_opacity=opacity.detach())
        images = {"static": (pred[0], cam["image"][0])}

        if loop.step >= self.t.static_vae_steps:
            motion_loss, motion_logs, motion_images = self.motion(gaussians, batch, loop, lpips)
            loss = loss + motion_loss
            logs.update(motion_logs)
            images.update(motion_images)
        self.maybe_log_images(loop, images)
        return loss, logs

    def motion(self, gaussians: list[Gaussians], batch, loop, lpips):
        t = self.t
        queries, lengths = pad_gaussians([g.to_condition() for g in gaussians])  # not detached (published §3.5)
        static_pc, deltas = batch["static_pc"], batch["deltas"]
        delta, enc = loop.models["motion_vae"](static_pc, deltas, queries, lengths)  # (B, T', Q, 14)
        kl = enc.kl().mean()
        xyz, _ = mesh_guided_xyz_loss(delta.float(), queries[..., :3].float(), lengths, static_pc,
                                      static_pc[:, None] + deltas, self.knn_k, self.beta)
        views = batch["views"]
        size = views["image"].shape[-1]
        preds = []
        for b, g in enumerate(gaussians):  # each sample's views, at the frame each was taken
            frames = g.apply_delta(delta[b, batch["view_frame"][b], : len(g)])               # batch (L,)
            preds.append(render(frames, views["extrinsics"][b][:, None], views["intrinsics"][b][:, None], size,
                                self.background)[:, 0])
        pred, gt = torch.cat(preds), views["image"].flatten(0, 1)
        l_img, terms = render_loss(pred, gt, lpips, t.l1_weight, t.ssim_weight, t.lpips_weight)
        loss = t.kl_weight * kl + t.xyz_weight * xyz + l_img
        logs = {f"motion_{k}": v for k, v in terms.items()}
        logs.update(motion_kl=kl.detach(), motion_xyz=xyz.detach())
        return loss, logs, {"motion": (pred[0], gt[0])}

    def maybe_log_images(self, loop, images) -> None:
        if loop.micro_step == 0 and loop.step % self.t.image_interval == 0:
            for name, (pred, gt) in images.items():
                loop.log_images(f"images/{name}_render_gt", torch.cat([pred, gt], dim=-1).detach())


def main(argv=None) -> int:
    args = parse_args(argv)
    layout.allow_symlinks(args.allow_symlinks)
    check_run_folder(args.out, args.resume, args.restart)  # before any work; TrainLoop moves aside and locks
    overrides = list(args.overrides)
    if args.sample_timesteps is not None:
        overrides.append(f"train.sample_timesteps={args.sample_timesteps}")
    cfg = load_config(args.config, overrides)
    data_root = args.data_root or Path(cfg.data.root)
    dataset = build_dataset(cfg, data_root, args.list or (cfg.data.list_file and Path(cfg.data.list_file)))

    seed_everything(cfg.train.seed)  # the initial weights are part of the run: same seed, same run
    static_vae = build_static_vae(cfg, args.static_init)
    motion_vae = MotionVAE(**cfg.model)
    if args.motion_init:
        load_weights(motion_vae, args.motion_init)
    t = cfg.train
    optimizers = {
        "static_vae": torch.optim.AdamW([p for p in static_vae.parameters() if p.requires_grad],
                                        lr=t.lr * t.static_lr_scale, weight_decay=t.weight_decay),
        "motion_vae": torch.optim.AdamW(motion_vae.parameters(), lr=t.lr, weight_decay=t.weight_decay),
    }
    loop = TrainLoop(models={"static_vae": static_vae, "motion_vae": motion_vae}, optimizers=optimizers,
                     dataset=dataset, collate_fn=collate_vae, step_fn=VAEObjective(cfg), out_dir=args.out,
                     cfg=LoopConfig.from_mapping(t, num_workers=cfg.data.num_workers), run_config=cfg.to_dict(),
                     model_configs={"static_vae": cfg.static_vae.to_dict(), "motion_vae": cfg.model.to_dict()},
                     resume=args.resume, restart=args.restart, warmup_start={"motion_vae": t.static_vae_steps})
    result = loop.run()
    loop.close()
    print(f"main_vae: {result.step} steps ({min(result.step, t.static_vae_steps)} static-only), "
          f"{result.nonfinite_steps} skipped as non-finite, checkpoint {result.checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
