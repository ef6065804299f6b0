"""Gather trained weights into a pretrained pack that inference_dpm_latent.py --pack reads.

    python scripts/make_pack.py --vae-run runs/pack/vae --dit-run runs/pack/dit --stats-dir data/pack \\
        --vae-config configs/tiny/vae.yml --config configs/tiny/diffusion.yml --out assets/pack
    python scripts/make_pack.py ... --stats-dir runs/pack/stats --data-root data/pack --train-list data/pack/train.txt

Writes static_vae / motion_vae / dit .safetensors (the EMA weights of the newest checkpoints, their configs embedded;
float32 tensors stored as float16 unless --full-precision: half the bytes, and loading casts back to the module's
float32), the four latent statistics files, config.yml / vae.yml (the configs with every `base:` resolved), and
mean_latent.pt: the per-frame mean motion latent (T, C) float32, the mean over the training objects and their tokens
of the posterior means in <data-root>/latents (accumulated in float64), which scripts/evaluate.py decodes as its
"mean motion" baseline. The training objects are --train-list, by default <stats-dir>/train.txt, else
<data-root>/train.txt, else every object with latents under <data-root>/latents (--data-root defaults to --stats-dir,
where encode_latent.py writes both unless told otherwise).
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
import yaml

from datasets import layout
from pipeline.pack import PACK_FILES  # the names inference --pack reads
from utils import cli
from utils.checkpoint import load_checkpoint, safe_load, save_checkpoint
from utils.config import load_config
from utils.fileio import atomic_write
from utils.training import resolve_checkpoint, weights_file


def mean_latent(data_root: Path, names: list[str]) -> torch.Tensor:
    """(T, C) float32: per frame, the mean over the objects `names` and their tokens of the posterior means
    (`latent_mean`, (T, L, C)) in <data_root>/latents; float64 sums, each object weighing the same."""
    total, count = 0.0, 0
    for n in names:
        mu = safe_load(layout.latent_path(data_root, n))["latent_mean"].double()
        total, count = total + mu.mean(1), count + 1
    if count == 0:
        raise SystemExit(f"no training latents under {Path(data_root) / 'latents'}: run encode_latent.py first")
    return (total / count).float()


def training_names(data_root: Path, stats_dir: Path, train_list: Path | None) -> tuple[list[str], str]:
    """The objects the mean latent runs over, and where they came from (module docstring)."""
    for candidate in ([train_list] if train_list else [stats_dir / "train.txt", data_root / "train.txt"]):
        if train_list or candidate.is_file():  # an explicit --train-list must exist (FileNotFoundError otherwise)
            return layout.read_list_file(candidate, data_root), str(candidate)
    return layout.encoded_samples(data_root), f"every object with latents under {layout.latents_dir(data_root)}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vae-run", type=Path, required=True)
    ap.add_argument("--dit-run", type=Path, required=True)
    ap.add_argument("--stats-dir", type=Path, required=True)
    ap.add_argument("--data-root", type=Path, help="where latents/<name>/ are (default: --stats-dir)")
    ap.add_argument("--train-list", type=Path, help="the training objects of the mean latent (default: "
                                                    "<stats-dir>/train.txt, else <data-root>/train.txt, else all)")
    ap.add_argument("--vae-config", type=Path, required=True)
    ap.add_argument("--config", type=Path, required=True, help="the diffusion config")
    ap.add_argument("--weights", choices=("ema", "model"), default="ema")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--full-precision", action="store_true", help="keep float32 weights (default: float16)")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)

    if args.out.exists() and any(args.out.iterdir()) and not args.overwrite:
        raise SystemExit(f"{args.out} is not empty; pass --overwrite to replace its files")
    data_root = args.data_root or args.stats_dir  # the mean latent first: a bad list writes no half pack
    names, source = training_names(data_root, args.stats_dir, args.train_list)
    missing = [n for n in names if not layout.latent_path(data_root, n).is_file()]
    if missing:
        raise SystemExit(f"{layout.latent_path(data_root, missing[0])}: missing ({len(missing)} of the {len(names)} "
                         f"training objects of {source} have no latents; encode_latent.py writes them)")
    mean = mean_latent(data_root, names)
    args.out.mkdir(parents=True, exist_ok=True)
    vae, dit = resolve_checkpoint(args.vae_run, args.vae_run), resolve_checkpoint(args.dit_run, args.dit_run)
    weights = {PACK_FILES[m]: weights_file(run, m, args.weights)
               for m, run in (("static_vae", vae), ("motion_vae", vae), ("dit", dit))}
    for name, src in weights.items():
        sd, config, extra = load_checkpoint(src)
        if not args.full_precision:  # float64 buffers (the motion VAE's omega) stay as they are
            sd = {k: v.half() if v.dtype == torch.float32 else v for k, v in sd.items()}
        atomic_write(args.out / name, lambda tmp, sd=sd, config=config, extra=extra:
                     save_checkpoint(tmp, sd, config, extra, overwrite=True), overwrite=True)
    copies = {layout.latent_stats_path(".", w).name: layout.latent_stats_path(args.stats_dir, w)
              for w in layout.LATENT_STATS}
    for name, src in copies.items():
        if not src.is_file():
            raise SystemExit(f"missing {src}")
        atomic_write(args.out / name, lambda tmp, src=src: shutil.copyfile(src, tmp), overwrite=True)
    atomic_write(layout.mean_latent_path(args.out), lambda tmp: torch.save(mean, tmp), overwrite=True)
    for name, cfg in (("config.yml", args.config), ("vae.yml", args.vae_config)):
        text = f"# {cfg} with every base resolved (scripts/make_pack.py)\n" + \
            yaml.safe_dump(load_config(cfg).to_dict(), sort_keys=False)
        atomic_write(args.out / name, lambda tmp, text=text: tmp.write_text(text), overwrite=True)
    print(f"pack written to {args.out}: VAE {vae.name}, DiT {dit.name}, mean latent {tuple(mean.shape)} over "
          f"{len(names)} objects ({source})")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
