"""Gather trained weights into a pretrained pack that inference_dpm_latent.py --pack reads.

    python scripts/make_pack.py --vae-run runs/pack/vae --dit-run runs/pack/dit --stats-dir data/pack \\
        --vae-config configs/tiny/vae.yml --config configs/tiny/diffusion.yml --out assets/pack

Writes static_vae / motion_vae / dit .safetensors (the EMA weights of the newest checkpoints, their configs embedded;
float32 tensors stored as float16 unless --full-precision: half the bytes, and loading casts back to the module's
float32), the four latent statistics files, and config.yml / vae.yml (the configs with every `base:` resolved).
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from datasets import layout  # noqa: E402
from inference_dpm_latent import PACK_FILES  # noqa: E402  (the names inference --pack reads)
from utils.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from utils.config import load_config  # noqa: E402
from utils.fileio import atomic_write  # noqa: E402
from utils.training import resolve_checkpoint, weights_file  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vae-run", type=Path, required=True)
    ap.add_argument("--dit-run", type=Path, required=True)
    ap.add_argument("--stats-dir", type=Path, required=True)
    ap.add_argument("--vae-config", type=Path, required=True)
    ap.add_argument("--config", type=Path, required=True, help="the diffusion config")
    ap.add_argument("--weights", choices=("ema", "model"), default="ema")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--full-precision", action="store_true", help="keep float32 weights (default: float16)")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)

    if args.out.exists() and any(args.out.iterdir()) and not args.overwrite:
        raise SystemExit(f"{args.out} is not empty; pass --overwrite to replace its files")
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
    for name, cfg in (("config.yml", args.config), ("vae.yml", args.vae_config)):
        text = f"# {cfg} with every base resolved (scripts/make_pack.py)\n" + \
            yaml.safe_dump(load_config(cfg).to_dict(), sort_keys=False)
        atomic_write(args.out / name, lambda tmp, text=text: tmp.write_text(text), overwrite=True)
    print(f"pack written to {args.out}: VAE {vae.name}, DiT {dit.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
