"""Train the motion-latent DiT (docs/published_system.md §4.2) on T frames per sample, with classifier-free-guidance
dropout, v-prediction and EMA, on the shared training loop (utils/training.py).

    accelerate launch --num_processes 1 main_latent.py --config configs/tiny/diffusion.yml --data-root data/synth \\
        --out runs/dit_tiny train.max_steps=200
    torchrun --nproc_per_node 8 main_latent.py --config configs/diffusion.yml --data-root data/objaverse --out runs/dit

Overrides `section.key=value` follow the options (see utils/config.py). `--resume latest` continues a run exactly;
an --out that holds checkpoints needs it, or `--restart` (the old run is moved to <out>.old-<date>-<time>/). The
folder is locked while training. `--allow-symlinks` follows symlinks out of the data root.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from datasets import layout
from datasets.latent_dataset import LatentDataset, load_latent_stats
from models.diffusion import GaussianDiffusion
from models.dit import DiT
from utils.checkpoint import load_weights
from utils.config import load_config
from utils import cli
from utils.training import LoopConfig, TrainLoop, check_run_folder, seed_everything, trainer_arg_parser


def parse_args(argv=None):
    ap = trainer_arg_parser(__doc__, "configs/diffusion.yml", "latent")
    ap.add_argument("--init", type=Path, help="start from these DiT weights (ours or a published .pt)")
    return ap.parse_intermixed_args(argv)  # overrides may come before or after the options


def build_dataset(cfg, data_root: Path, list_file: Path | None) -> LatentDataset:
    names = layout.select_samples(data_root, list_file, cfg.data.start_idx, cfg.data.end_idx,
                                  default=layout.encoded_samples)
    stats = load_latent_stats(cfg.data.stats_dir or data_root)
    return LatentDataset(data_root, names, stats, num_frames=cfg.train.sample_timesteps, extractor=cfg.data.image_encoder,
                         uncond_p=cfg.train.uncond_p, normalize_position_xyz=cfg.data.normalize_position_xyz,
                         posterior_draws=cfg.data.posterior_draws, seed=cfg.train.seed)


def main(argv=None) -> int:
    args = parse_args(argv)
    layout.allow_symlinks(args.allow_symlinks)
    check_run_folder(args.out, args.resume, args.restart)  # before any work; TrainLoop moves aside and locks
    cfg = load_config(args.config, args.overrides)
    data_root = args.data_root or Path(cfg.data.root)
    dataset = build_dataset(cfg, data_root, args.list or (cfg.data.list_file and Path(cfg.data.list_file)))
    seed_everything(cfg.train.seed)  # the initial weights are part of the run: same seed, same run
    model = DiT(**cfg.model)
    if args.init:
        load_weights(model, args.init)
    if cfg.train.compile and torch.cuda.is_available():
        model.compile()  # in place: the state dict keeps its names, so checkpoints and EMA are unchanged
    diffusion = GaussianDiffusion.from_config(cfg.diffusion)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)

    def step_fn(batch, loop):
        x = batch["x"]                                                     # (B, T, N, C): T frames reach the model
        t = diffusion.sample_timesteps(x.shape[0], device=x.device)
        cond = {k: batch[k].float() for k in ("cond_images", "static_latent", "deformation_position_xyz")}
        loss = diffusion.training_loss(loop.models["dit"], x, t, **cond).mean()
        return loss, {"mse": loss.detach()}

    loop = TrainLoop(models={"dit": model}, optimizers={"dit": optimizer}, dataset=dataset, step_fn=step_fn,
                     out_dir=args.out, cfg=LoopConfig.from_mapping(cfg.train, num_workers=cfg.data.num_workers), run_config=cfg.to_dict(),
                     model_configs={"dit": cfg.model.to_dict()}, resume=args.resume, restart=args.restart)
    result = loop.run()
    loop.close()
    print(f"main_latent: {result.step} steps, {result.nonfinite_steps} skipped as non-finite, "
          f"checkpoint {result.checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
