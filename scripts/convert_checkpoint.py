#!/usr/bin/env python
"""Convert a published GVFDiffusion checkpoint (.pt state dict) to ours (safetensors + embedded config), or back.

    python scripts/convert_checkpoint.py ema_diffusion_0.9999_500000.pt dit.safetensors --kind dit
    python scripts/convert_checkpoint.py ema_deformation_0.9999_200000.pt motion_vae.safetensors --kind motion_vae
    python scripts/convert_checkpoint.py ema_static_vae_0.9999_200000.pt static_vae.safetensors --kind static_vae
    python scripts/convert_checkpoint.py dit.safetensors dit.pt --reverse [--module-prefix]

The published file is read with torch.load(weights_only=True) only. The embedded config is one section of a config
file: dit -> configs/diffusion.yml `model`, motion_vae -> configs/diffusion.yml `motion_vae`, static_vae ->
configs/vae.yml `static_vae`. When our model class can be imported, it is built on the meta device (no memory) from
that section and the checkpoint's keys and shapes must match it exactly; otherwise the file is converted unchecked,
with a warning. With --reverse the config embedded in the input is used for the check.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
from utils.checkpoint import (CheckpointError, check_state_dict, load_checkpoint, load_published,
                              save_checkpoint, save_published, summarize)
from utils import cli
from utils.config import ConfigError, load_config

# kind -> (default config file, section, model module, class, constructor kwargs from the section).
# The model modules and class names are the planned ones; a missing one only disables the check.
KINDS: dict[str, tuple[str, str, str, str, Callable[[dict], dict]]] = {
    "dit": ("configs/diffusion.yml", "model", "models.dit", "DiT", lambda c: c),
    "motion_vae": ("configs/diffusion.yml", "motion_vae", "models.motion_vae", "MotionVAE", lambda c: c),
    "static_vae": ("configs/vae.yml", "static_vae", "models.static_vae", "StaticVAE",
                   lambda c: c["backbones"]["vae"]["args"]),
}


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


def build_reference_module(kind: str, section: dict) -> tuple[nn.Module | None, str]:
    """Our model for `kind`, built from its config section on the meta device; (None, why) when it cannot be built."""
    _, _, module_name, class_name, kwargs_of = KINDS[kind]
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        return None, f"{module_name}.{class_name} is not available ({type(exc).__name__}: {exc})"
    try:
        kwargs = dict(kwargs_of(section))
    except (KeyError, TypeError) as exc:
        return None, f"the config section does not give {class_name}'s arguments ({type(exc).__name__}: {exc})"
    for device in ("meta", "cpu"):  # meta: shapes only, no memory; cpu if the constructor needs real values
        try:
            with torch.device(device):
                return cls(**kwargs), f"{module_name}.{class_name}"
        except Exception as exc:  # noqa: BLE001 - any failure to build only disables the check
            error = exc
    return None, f"{module_name}.{class_name} could not be built from the config ({type(error).__name__}: {error})"


def validate(kind: str, section: dict, state_dict: dict, source: str) -> str:
    """Check keys and shapes against our model; returns what was checked against (or why nothing was)."""
    module, what = build_reference_module(kind, section)
    if module is None:
        warn(f"{what}; converting without checking keys and shapes")
        return "not checked"
    check_state_dict(module.state_dict(), state_dict, source=source, target=what)
    return f"checked against {what}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("input", type=Path, help="published .pt state dict (or ours with --reverse)")
    p.add_argument("output", type=Path, help="our .safetensors (or a published-layout .pt with --reverse)")
    p.add_argument("--kind", choices=sorted(KINDS), help="which model the weights belong to (required unless --reverse)")
    p.add_argument("--config", type=Path, help="config file holding the kind's section (default: per kind, see above)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument("--reverse", action="store_true", help="ours -> published layout")
    p.add_argument("--module-prefix", action="store_true", help="with --reverse: prefix keys with `module.` (DDP layout)")
    p.add_argument("--no-validate", action="store_true", help="skip the key/shape check against our model")
    args = p.parse_args(argv)
    if not args.reverse and args.kind is None:
        p.error("--kind is required (dit, motion_vae or static_vae)")
    if args.reverse and args.config is not None:
        p.error("--config does not apply to --reverse: the input carries its own config")
    if args.module_prefix and not args.reverse:
        p.error("--module-prefix applies to --reverse only (our format never has the prefix)")
    return args


def forward(args: argparse.Namespace) -> str:
    config_file, section_name = (args.config or ROOT / KINDS[args.kind][0]), KINDS[args.kind][1]
    cfg = load_config(config_file)
    if section_name not in cfg:
        raise ConfigError(f"{config_file}: no `{section_name}` section (needed for --kind {args.kind})")
    section = cfg[section_name].to_dict()
    state_dict = load_published(args.input)
    checked = "not checked" if args.no_validate else validate(args.kind, section, state_dict, str(args.input))
    extra = {"kind": args.kind, "source": args.input.name, "config_file": str(config_file), "config_section": section_name}
    save_checkpoint(args.output, state_dict, config=section, extra=extra, overwrite=args.overwrite)
    return f"{args.output}: {summarize(state_dict)}, kind {args.kind}, {checked}"


def reverse(args: argparse.Namespace) -> str:
    state_dict, config, extra = load_checkpoint(args.input)
    kind = extra.get("kind")
    if args.kind is not None and kind is not None and args.kind != kind:
        raise CheckpointError(f"{args.input}: holds kind {kind!r}, but --kind {args.kind} was given")
    kind = args.kind or kind
    if args.no_validate:
        checked = "not checked"
    elif kind in KINDS:
        checked = validate(kind, config, state_dict, str(args.input))
    else:
        warn(f"{args.input}: no known kind recorded ({kind!r}); converting without checking keys and shapes")
        checked = "not checked"
    save_published(args.output, state_dict, module_prefix=args.module_prefix, overwrite=args.overwrite)
    return f"{args.output}: {summarize(state_dict)}, kind {kind}, {checked}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(reverse(args) if args.reverse else forward(args))  # refusals: one line and status 2 through cli.run
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
