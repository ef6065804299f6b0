"""Loading the golden reference files: the published modules' outputs on small configurations.

They are vendored in tests/data/golden (a copy of the team's shared reference/golden, with its README and
SHA256SUMS), so every machine, CI included, runs the golden tests.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

GOLDEN_DIR = Path(__file__).resolve().parent / "data" / "golden"


def golden_path(name: str) -> Path:
    """Path of golden file `name` (e.g. "motion_vae.io.safetensors"); a missing file fails the test."""
    path = GOLDEN_DIR / name
    if not path.is_file():
        pytest.fail(f"golden file not found: {path}")
    return path


def load_golden(case: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) of `<case>.io.safetensors`; meta is the parsed `golden` metadata JSON."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = golden_path(f"{case}.io.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["golden"])
    return load_file(str(path)), meta


def rel_err(ours: torch.Tensor, golden: torch.Tensor) -> float:
    """The README's pass measure: max|ours - golden| / max|golden|."""
    ours = ours.detach().cpu().to(golden.dtype)
    return ((ours - golden).abs().max() / golden.abs().max()).item()
