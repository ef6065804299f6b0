"""Build the diffusion dataset from a prepared VAE dataset (docs/published_system.md §7), then its four normalisation
files.

Per object, written under the same data root (datasets/layout.py):
- latents/<name>/deformation_latent.pt: the motion posterior over all frames and the canonical Gaussians' FPS sets
  (keys of published §7; `fps_sampled_gs_1024` keeps its published name although it holds the num_latents anchors);
- <prefix>_cond_features/<name>.npz: the image tokens of view 0 per frame on black, as the published training
  features (published §1.7), when not already there;
then {deformation,static}_{mean,std}.pt over every selected object (datasets/latent_dataset.compute_latent_stats).

    accelerate launch --num_processes 1 encode_latent.py --config configs/tiny/vae.yml \\
        --diffusion-config configs/tiny/diffusion.yml --data-root data/synth --vae-run runs/vae_tiny
    accelerate launch --num_processes 8 encode_latent.py --data-root data/objaverse \\
        --static-vae ema_static_vae_0.9999_200000.pt --motion-vae ema_deformation_0.9999_200000.pt

By default the canonical Gaussians come from the static posterior mean and FPS starts at the first Gaussian, so the
output is deterministic; `--stochastic` samples the static posterior as published (seeded per object). Objects whose
latents exist are skipped (`--overwrite` redoes them); a failing object is reported and the others go on. A failed
object keeps no latent that a later step could use: one from an earlier run is renamed to deformation_latent.pt.failed
(with --overwrite its image tokens too, to <name>.npz.failed), and the statistics leave it out.

The latents folder is locked while encoding (a second encode_latent.py on the same data root refuses). Every path
under the data root must resolve inside it (a `latents` symlink to another disk is refused); `--allow-symlinks`
follows such symlinks.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from tqdm import tqdm

from datasets import layout
from datasets.condition import condition_frames, fps_gaussians
from datasets.latent_dataset import compute_latent_stats
from datasets.vae_dataset import VAEDataset
from models.motion_vae import MotionVAE
from models.sparse import SparseVoxels
from models.static_vae import StaticVAE
from utils.checkpoint import load_weights, safe_load
from utils.config import load_config
from utils import cli
from utils.fileio import atomic_write, lock_folder
from utils.image_features import get_extractor
from utils.logging import report_failures
from utils.training import on_main_process, resolve_checkpoint, weights_file


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=Path("configs/vae.yml"), help="the VAE config (models, data)")
    ap.add_argument("--diffusion-config", type=Path, default=Path("configs/diffusion.yml"),
                    help="the DiT config the latents are for (static condition size, image encoder)")
    ap.add_argument("--data-root", type=Path, help="dataset root (default: data.root of the VAE config)")
    ap.add_argument("--list", type=Path, help="list file of sample names (default: data.list_file, else every sample)")
    ap.add_argument("--vae-run", type=Path, help="a main_vae.py experiment folder or checkpoint: its EMA weights")
    ap.add_argument("--static-vae", type=Path, help="static-VAE weights (ours or a published .pt)")
    ap.add_argument("--motion-vae", type=Path, help="motion-VAE weights (ours or a published .pt)")
    ap.add_argument("--weights", choices=("ema", "model"), default="ema", help="which weights of --vae-run")
    ap.add_argument("--stats-dir", type=Path, help="where the four statistics files go (default: the data root)")
    ap.add_argument("--stats-only", action="store_true", help="only recompute the statistics from existing latents")
    ap.add_argument("--stochastic", action="store_true", help="sample the static posterior (published) instead of its mean")
    ap.add_argument("--overwrite", action="store_true", help="re-encode objects whose latents exist")
    layout.add_symlink_option(ap)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="autocast dtype on a GPU")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("overrides", nargs="*", help="VAE config overrides, e.g. data.end_idx=100")
    return ap.parse_intermixed_args(argv)  # overrides may come before or after the options


def vae_weights(args) -> tuple[Path, Path]:
    if args.vae_run:
        folder = resolve_checkpoint(args.vae_run, args.vae_run)  # a checkpoint folder, or the newest under a run
        static, motion = (weights_file(folder, m, args.weights) for m in ("static_vae", "motion_vae"))
        return args.static_vae or static, args.motion_vae or motion
    if not (args.static_vae and args.motion_vae):
        raise SystemExit("encode_latent.py: give --vae-run, or both --static-vae and --motion-vae")
    return args.static_vae, args.motion_vae


def check_configs(cfg, dcfg, vae_config: Path, diffusion_config: Path) -> None:
    """The latents must fit the DiT they are for: same motion VAE, same frame count."""
    if dcfg.motion_vae.to_dict() != cfg.model.to_dict():
        raise SystemExit(f"{diffusion_config} `motion_vae` differs from {vae_config} `model`: the latents would not "
                         f"match the DiT's decoder")
    if dcfg.data.num_timesteps != cfg.data.num_timesteps:
        raise SystemExit(f"frames per object differ: {vae_config} data.num_timesteps={cfg.data.num_timesteps}, "
                         f"{diffusion_config} data.num_timesteps={dcfg.data.num_timesteps}")


class Encoder:
    def __init__(self, static_vae: StaticVAE, motion_vae: MotionVAE, extractor, num_static_cond: int,
                 stochastic: bool, seed: int, device, dtype):
        self.static_vae, self.motion_vae, self.extractor = static_vae, motion_vae, extractor
        self.num_static_cond, self.stochastic, self.seed = num_static_cond, stochastic, seed
        self.device, self.dtype = device, dtype

    @torch.no_grad()
    def latents(self, item: dict, index: int) -> dict[str, torch.Tensor]:
        dev = self.device
        voxels = SparseVoxels.from_list([item["voxel_coords"]], [item["voxel_feats"]]).to(dev, torch.float32)
        gen = torch.Generator(dev).manual_seed(self.seed * 1_000_003 + index) if self.stochastic else None
        with torch.autocast(dev.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            gaussians, raw, _ = self.static_vae(voxels, sample_posterior=self.stochastic, generator=gen)
            cond = gaussians[0].to_condition().float()[None]                                 # (1, Q, 14)
            if cond.shape[1] < self.num_static_cond:
                raise ValueError(f"{cond.shape[1]} canonical Gaussians, fewer than the {self.num_static_cond} "
                                 f"of the static condition")
            static_cond = fps_gaussians(cond, self.num_static_cond)  # the set MotionStage samples at inference
            enc = self.motion_vae.encode(item["static_pc"][None].to(dev), item["deltas"][None].to(dev), cond)
        out = {
            "latent_mean": enc.posterior.mean[0].float(),                   # (T, L, C)
            "latent_std": enc.posterior.std[0].float(),
            "fps_sampled_gs_1024": enc.anchors[0].float(),                  # (L, 14) published name, L anchors
            "fps_sampled_gs_4096": static_cond[0],                          # (S, 14)
            "static_gs_feats": raw.feats.float(),                           # (N_vox, 112) decoded, per voxel
            "static_gs_coords": raw.coords[:, 1:].to(torch.int32),          # (N_vox, 3)
        }
        bad = [k for k, v in out.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise ValueError(f"non-finite values in {bad}; not written")
        return {k: v.cpu() for k, v in out.items()}

    @torch.no_grad()
    def cond_tokens(self, sample_root: Path, num_frames: int, data_root: Path | None = None) -> torch.Tensor:
        return self.extractor(condition_frames(sample_root, num_frames, data_root=data_root)).cpu()


def encode_all(enc: Encoder, dataset: VAEDataset, data_root: Path, indices: list[int], extractor_name: str,
               overwrite: bool, show_progress: bool) -> tuple[list[tuple[str, str]], int]:
    """Encode this process's objects; returns (failures, objects skipped because done)."""
    failures, done = [], 0
    for i in tqdm(indices, desc="encode", disable=not show_progress, dynamic_ncols=True):
        name = dataset.names[i]
        try:
            path = layout.latent_path(data_root, name)
            tokens_path = layout.cond_features_path(data_root, name, extractor_name)
            if path.is_file() and tokens_path.is_file() and not overwrite:
                done += 1
                continue
            if overwrite or not path.is_file():
                latent = enc.latents(dataset.load(i), i)
                atomic_write(path, lambda tmp: torch.save(latent, tmp), overwrite=True)
            if overwrite or not tokens_path.is_file():
                tokens = enc.cond_tokens(layout.resolve_sample(data_root, name), dataset.num_timesteps, data_root)
                layout.write_cond_features(tokens_path, tokens.half(), overwrite=True)
        except Exception as e:  # one bad object must not stop the others
            stale = set_aside_stale(data_root, name, extractor_name, overwrite)
            failures.append((name, f"{type(e).__name__}: {e}{stale}"))
    return failures, done


def set_aside_stale(data_root: Path, name: str, extractor_name: str, tokens_too: bool) -> str:
    """A failed object's latent from an earlier run is renamed to `<file>.failed` (its image tokens too when they were
    due to be rewritten), so no later step (statistics, the DiT dataset) uses it. Returns what was done, for the
    failure line ("" when there was nothing)."""
    moved = []
    try:
        paths = [layout.latent_path(data_root, name)]
        if tokens_too:
            paths.append(layout.cond_features_path(data_root, name, extractor_name))
    except ValueError:  # the name or path itself was refused: nothing of it is touched
        return ""
    for path in paths:
        if path.is_file():
            aside = path.with_name(path.name + ".failed")
            path.replace(aside)
            moved.append(str(aside))
    return f"; its stale output moved to {' and '.join(moved)}" if moved else ""


def write_stats(stats_dir: Path, data_root: Path, names: list[str], posterior_draws: bool = True) -> list[str]:
    """Compute and write the statistics over the objects that have latents; returns the names left out."""
    have = [n for n in names if layout.latent_path(data_root, n).is_file()]
    if not have:
        print(f"encode_latent: no latents under {data_root / 'latents'}; no statistics written")
        return list(names)
    stats = compute_latent_stats(data_root, have, posterior_draws)
    for which, value in stats.items():
        path = layout.latent_stats_path(stats_dir, which)
        if path.is_file():
            old = safe_load(path)
            if old.shape == value.shape and torch.equal(old, value):
                continue
            backup = path.with_suffix(".pt.prev")
            path.replace(backup)  # never lost silently: a DiT trained on the old statistics needs them
            print(f"encode_latent: {path} replaced by new statistics; the previous ones are in {backup}")
        atomic_write(path, lambda tmp: torch.save(value.clone(), tmp))
    print(f"encode_latent: statistics over {len(have)} objects in {stats_dir} "
          f"(deformation std mean {stats['deformation_std'].mean():.4g}, static std mean {stats['static_std'].mean():.4g})")
    return [n for n in names if n not in have]


def main(argv=None) -> int:
    args = parse_args(argv)
    layout.allow_symlinks(args.allow_symlinks)
    cfg = load_config(args.config, args.overrides)
    dcfg = load_config(args.diffusion_config)
    check_configs(cfg, dcfg, args.config, args.diffusion_config)
    data_root = args.data_root or Path(cfg.data.root)
    stats_dir = args.stats_dir or data_root
    list_file = args.list or (cfg.data.list_file and Path(cfg.data.list_file))
    names = layout.select_samples(data_root, list_file, cfg.data.start_idx, cfg.data.end_idx)
    state = PartialState(cpu=not torch.cuda.is_available())

    failures, done, lock = [], 0, None
    if not args.stats_only:
        # Outputs inside the data root (a `latents` or tokens folder symlinked elsewhere is refused before any work),
        # and one encoder at a time: the main process locks the latents folder, every process learns a refusal.
        latents = layout.latents_dir(data_root)
        layout.confine(layout.cond_features_dir(data_root, dcfg.data.image_encoder), data_root)
        lock = on_main_process(lambda: lock_folder(latents), state.is_main_process, state.num_processes)
        static_path, motion_path = vae_weights(args)
        static_vae, motion_vae = StaticVAE.from_config(cfg.static_vae), MotionVAE(**cfg.model)
        load_weights(static_vae, static_path)
        load_weights(motion_vae, motion_path)
        dtype = torch.bfloat16 if args.precision == "bf16" and state.device.type == "cuda" else torch.float32
        encoder = Encoder(static_vae.to(state.device).eval(), motion_vae.to(state.device).eval(),
                          get_extractor(dcfg.data.image_encoder, device=state.device), dcfg.data.num_static_cond,
                          args.stochastic, args.seed, state.device, dtype)
        dataset = VAEDataset(data_root, names, num_points=cfg.data.num_points, num_timesteps=cfg.data.num_timesteps,
                             sample_timesteps=cfg.data.num_timesteps, train=False, extractor=cfg.data.image_encoder,
                             voxel_resolution=cfg.data.voxel_resolution, images=False, seed=args.seed)
        mine = list(range(state.process_index, len(names), state.num_processes))  # a disjoint shard per process
        failures, done = encode_all(encoder, dataset, data_root, mine, dcfg.data.image_encoder, args.overwrite,
                                    state.is_main_process)
        if state.num_processes > 1:
            failures = [f for part in gather_object([failures]) for f in part]
            done = sum(gather_object([done]))
        state.wait_for_everyone()

    status = 0
    if state.is_main_process:
        if not args.stats_only:
            print(f"encode_latent: {len(names) - len(failures) - done} encoded, {done} already done, "
                  f"{len(failures)} failed, under {data_root}")
        status = report_failures(failures, len(names), "objects")
        missing = write_stats(stats_dir, data_root, names, dcfg.data.get("posterior_draws", True))
        if missing and args.stats_only:
            print(f"encode_latent: {len(missing)} selected objects have no latents (first: {missing[0]})")
    state.wait_for_everyone()
    if lock is not None:
        lock.release()
    return status


if __name__ == "__main__":
    sys.exit(cli.run(main))
