"""The team's reference material for tests: golden outputs of the published modules and the published
state-dict manifests (statedict_*.json).

They are read from a folder `shared/reference` beside the checkout when there is one (the team's working copy);
any other checkout uses the copy vendored in tests/data/reference, so every machine runs these tests.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

_SHARED = Path(__file__).resolve().parents[2] / "shared" / "reference"
_VENDORED = Path(__file__).resolve().parent / "data" / "reference"
REFERENCE_DIR = _SHARED if (_SHARED / "golden").is_dir() else _VENDORED
GOLDEN_DIR = REFERENCE_DIR / "golden"


def reference_path(name: str) -> Path:
    """Path of a reference file (e.g. "statedict_dit.json" or "golden/dit.io.safetensors"); missing fails the test."""
    path = REFERENCE_DIR / name
    if not path.is_file():
        pytest.fail(f"reference file not found: {path}")
    return path


def golden_path(name: str) -> Path:
    return reference_path(f"golden/{name}")


def load_golden(case: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) of `<case>.io.safetensors`; meta is the parsed `golden` metadata JSON."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = golden_path(f"{case}.io.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["golden"])
    return load_file(str(path)), meta


def load_golden_weights(case: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(golden_path(f"{case}.weights.safetensors")))


def load_manifest(name: str) -> dict:
    """statedict_<name>.json: keys, shapes, dtypes and counts of a published checkpoint."""
    return json.loads(reference_path(f"statedict_{name}.json").read_text())


def assert_matches_manifest(model: torch.nn.Module, manifest: dict, dtypes: bool) -> None:
    """A model (built on the meta device) against a released manifest: the same keys and shapes, entry and parameter
    counts, in total and per top-level module; with `dtypes`, float16 exactly at the manifest's non-float32 entries
    and float32 elsewhere. Ends with a strict load of meta tensors of the manifest's shapes."""
    sd = model.state_dict()
    assert {k: list(v.shape) for k, v in sd.items()} == {k: list(s) for k, s in manifest["state_dict"].items()}
    assert len(sd) == manifest["num_state_dict_entries"]
    assert sum(p.numel() for p in model.parameters()) == manifest["num_params"]
    for name, n in manifest["numel_by_top_level_module"].items():  # state-dict entries: buffers such as pos_emb count
        assert sum(v.numel() for k, v in sd.items() if k.split(".")[0] == name) == n, name
    if dtypes:
        half = {k: "float16" for k, v in sd.items() if v.dtype == torch.float16}
        assert half == manifest["non_float32_entries"]
        assert all(v.dtype == torch.float32 for k, v in sd.items() if k not in half)
    model.load_state_dict({k: torch.empty(s, device="meta") for k, s in manifest["state_dict"].items()}, strict=True,
                          assign=True)


def rel_err(ours: torch.Tensor, golden: torch.Tensor) -> float:
    """The golden README's pass measure: max|ours - golden| / max|golden|."""
    ours = ours.detach().cpu().to(golden.dtype)
    return ((ours - golden).abs().max() / golden.abs().max()).item()
