"""Checkpoints: the published `.pt` state dicts in, our safetensors + JSON config format in and out.

    sd = load_published("ema_diffusion_0.9999_500000.pt")         # torch.load(weights_only=True) only, `module.` stripped
    load_state_dict_strict(model, sd, source="ema_diffusion...")  # every key used, shapes equal, readable report otherwise
    save_checkpoint("dit.safetensors", model, config=cfg.model, extra={"step": 500000})
    sd, config, extra = load_checkpoint("dit.safetensors")
    release = read_trellis_release("JeffreyXiang/TRELLIS-image-large")  # or a local copy of that folder
    model = build_trellis_model(*release["slat_flow_model"], registry={"SLatFlowModel": SLatFlowModel})
    save_published("dit.pt", sd, module_prefix=True)               # back to the published layout

Everything here is module-agnostic: it works on any nn.Module and any flat {name: tensor} state dict. Our modules use
the published parameter names, so no key mapping is needed. Every error is a CheckpointError that names the file.
Writes are atomic (temp file in the same folder, fsync, rename) and a state dict with a non-finite value is never written.
"""
from __future__ import annotations

import collections
import json
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from utils.fileio import atomic_write

__all__ = ["CheckpointError", "load_published", "save_published", "save_checkpoint", "load_checkpoint",
           "load_state_dict_strict", "check_state_dict", "mismatch_report", "summarize", "map_trellis_slat",
           "read_weights", "load_weights", "read_trellis_pipeline", "read_trellis_release", "build_trellis_model",
           "load_trellis_models", "hub_file", "TRELLIS_REPO", "TRELLIS_GS_MODELS"]

FORMAT = "gvfdiffusion-checkpoint"
FORMAT_VERSION = "1"
# Wrappers a published-style file may plausibly use around its state dict. The released GVFDiffusion files are bare
# state dicts (docs/published_system.md §4); "state_dict" (Lightning and many trainers), "model" and "ema" (trainer
# snapshots) cover the common re-saves. A file holding several of them is ambiguous and must name one with `key=`.
WRAPPER_KEYS = ("state_dict", "model", "ema")
MAX_LISTED = 20  # per group in a mismatch report; the counts are always complete


class CheckpointError(ValueError):
    """A checkpoint cannot be read, written or loaded; the message names the file and what was wrong."""


# ---------------------------------------------------------------------------------------------- published .pt files

def safe_load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """`torch.load(path, weights_only=True)` with one-line refusals (CheckpointError naming the file): the owner of
    every read of a `.pt` file (published weights, latents, statistics, training states).

    A file whose unpickling would need anything beyond tensors and plain containers is refused and never re-read with
    full pickle; torch's advice to retry with weights_only=False is deliberately not passed on.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found" + (" (it is a directory)" if path.is_dir() else ""))
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols before refusing them anyway
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:  # the weights-only unpickler stopped before running anything
        blocked = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if blocked:
            raise CheckpointError(
                f"{path}: refused: not plain tensors, and unpickling it could execute code (it needs the Python global "
                f"{blocked.group(1)}); it was not loaded. Re-save it as plain tensors from code you trust.") from None
        raise CheckpointError(f"{path}: refused: corrupt pickle data, or pickle features plain tensor files do not "
                              f"use ({_unpickler_detail(str(exc))}); nothing in it was executed.") from None
    except Exception as exc:  # zip/stream errors of truncated files, EOFError of empty ones, KeyError of junk, OSError
        raise CheckpointError(f"{path}: corrupt, truncated or not a PyTorch file "
                              f"({type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]})") from None


def load_published(path: str | os.PathLike, map_location: Any = "cpu", key: str | None = None) -> dict[str, torch.Tensor]:
    """Read a published `.pt` state dict through safe_load; return {name: tensor}, `module.` stripped.

    A bare state dict or one wrapper of WRAPPER_KEYS is accepted (`key` picks one).
    """
    path = Path(path)
    if path.is_file() and _looks_like_safetensors(path):
        raise CheckpointError(f"{path}: this is a safetensors file (our format), not a published .pt state dict; "
                              f"read it with load_checkpoint (or convert_checkpoint.py --reverse)")
    obj = safe_load(path, map_location)
    return _as_state_dict(obj, path, key)


def _looks_like_safetensors(path: Path) -> bool:
    # safetensors: 8-byte little-endian header length, then a JSON header starting with "{".
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 100_000_000


def _unpickler_detail(text: str) -> str:
    """The reason in torch's weights-only error, without its boilerplate (which advises weights_only=False)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("Unsupported") or "Unsupported global" in ln:
            return ln[:200]
    for i, ln in enumerate(lines):
        if "WeightsUnpickler error:" in ln:
            rest = ln.split("WeightsUnpickler error:", 1)[1].strip() or (lines[i + 1] if i + 1 < len(lines) else "")
            if rest and "weights_only" not in rest:
                return rest[:200]
    return "unreadable pickle"


def _as_state_dict(obj: Any, path: Path, key: str | None) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict (a mapping of names to tensors), found {type(obj).__name__}")
    if key is not None:
        if key not in obj:
            raise CheckpointError(f"{path}: no entry {key!r} to take the state dict from (top-level keys: {_first(obj)})")
        obj = obj[key]
    elif obj and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        wrappers = [k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)]
        if len(wrappers) > 1:
            raise CheckpointError(f"{path}: ambiguous checkpoint: it holds several state dicts {wrappers}; pick one with key=")
        if wrappers:
            obj = obj[wrappers[0]]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: entry {key!r} is a {type(obj).__name__}, not a state dict")
    if not obj:
        raise CheckpointError(f"{path}: the state dict is empty")
    out: dict[str, torch.Tensor] = {}
    for name, value in obj.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor: not a plain state dict "
                                  f"(top-level keys: {_first(obj)})")
        stripped = name[len("module."):] if name.startswith("module.") else name  # DDP wrapper prefix
        if stripped in out:
            raise CheckpointError(f"{path}: keys {name!r} and {stripped!r} collide once the `module.` prefix is stripped")
        out[stripped] = value.detach()  # nn.Parameter -> plain tensor, same storage
    return out


def save_published(path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor] | nn.Module,
                   module_prefix: bool = False, *, overwrite: bool = False) -> Path:
    """Write a plain `torch.save` state dict in the published layout (optionally `module.`-prefixed), atomically.

    torch.save is given a file object, so the zip's inner folder is always "archive" and the bytes depend only on
    the state dict (not on the file name): saving the same state dict twice gives identical files.
    """
    path = Path(path)
    tensors = _plain_tensors(state_dict, path)
    if module_prefix:
        tensors = {(k if k.startswith("module.") else "module." + k): v for k, v in tensors.items()}
    packed = collections.OrderedDict(tensors)  # what nn.Module.state_dict() returns, as in the released files

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            torch.save(packed, f)

    return _atomic_write(path, write, overwrite)


# ---------------------------------------------------------------------------------------------- our format

def save_checkpoint(path: str | os.PathLike, module_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
                    config: Mapping, extra: Mapping | None = None, *, overwrite: bool = False) -> Path:
    """Write the state dict as safetensors with `config` (and small JSON-able `extra`) in its metadata, atomically.

    Refuses non-finite values (naming the first bad key) and an existing file unless overwrite=True. Tensors are
    made contiguous on the CPU; tensors sharing storage (tied weights, views) are cloned, as safetensors requires.
    The key order is recorded so that load_checkpoint returns the keys in the order given here.
    """
    path = Path(path)
    tensors = _plain_tensors(module_or_state_dict, path)
    if not isinstance(config, Mapping):
        raise CheckpointError(f"{path}: config must be a mapping, got {type(config).__name__}")
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": _to_json(config, path, "config"),
        "extra": _to_json(dict(extra or {}), path, "extra"),
        "keys": json.dumps(list(tensors)),
    }
    return _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata), overwrite)


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict, dict]:
    """Read a file written by save_checkpoint: (state_dict in the saved key order, config, extra)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found" + (" (it is a directory)" if path.is_dir() else ""))
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path), device=str(device))
    except Exception as exc:  # safetensors raises its own error types for bad headers and short files
        raise CheckpointError(f"{path}: corrupt, truncated or not a safetensors file "
                              f"({type(exc).__name__}: {str(exc).strip()[:200]})") from exc
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path}: a safetensors file without our metadata (format {metadata.get('format')!r}, "
                              f"expected {FORMAT!r}); it has no embedded config. Published .pt files go through load_published.")
    try:
        config, extra, order = (json.loads(metadata[k]) for k in ("config", "extra", "keys"))
    except (KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: damaged checkpoint metadata ({type(exc).__name__}: {exc})") from exc
    if sorted(order) != sorted(tensors):
        raise CheckpointError(f"{path}: damaged checkpoint: the recorded key list does not match the stored tensors")
    return {k: tensors[k] for k in order}, config, extra


# ---------------------------------------------------------------------------------------------- strict loading

def mismatch_report(expected: Mapping[str, torch.Tensor | Sequence[int]], state_dict: Mapping[str, torch.Tensor],
                    max_listed: int = MAX_LISTED) -> str:
    """Missing, unexpected and wrong-shape keys of `state_dict` against `expected` (tensors or shapes); "" if they match."""
    want = {k: _shape(v) for k, v in expected.items()}
    got = {k: _shape(v) for k, v in state_dict.items()}
    missing = [k for k in want if k not in got]
    unexpected = [k for k in got if k not in want]
    wrong = [k for k in want if k in got and want[k] != got[k]]
    groups = [
        ("missing", missing, lambda k: f"{k}  expected {want[k]}"),
        ("unexpected", unexpected, lambda k: f"{k}  {got[k]}"),
        ("wrong shape", wrong, lambda k: f"{k}: expected {want[k]} got {got[k]}"),
    ]
    lines = []
    for title, keys, fmt in groups:
        if keys:
            lines.append(f"  {title} ({len(keys)}):")
            lines += [f"    {fmt(k)}" for k in keys[:max_listed]]
            if len(keys) > max_listed:
                lines.append(f"    ... and {len(keys) - max_listed} more")
    return "\n".join(lines)


def check_state_dict(expected: Mapping[str, torch.Tensor | Sequence[int]], state_dict: Mapping[str, torch.Tensor],
                     source: str = "state dict", target: str = "the model") -> None:
    """Raise CheckpointError with a readable report unless the keys and shapes match exactly."""
    report = mismatch_report(expected, state_dict)
    if report:
        raise CheckpointError(f"{source}: does not match {target} ({len(expected)} keys expected, "
                              f"{len(state_dict)} in the checkpoint):\n{report}")


def load_state_dict_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "state dict") -> nn.Module:
    """Load strictly (every key used, every shape equal), copying values into the module's own tensors.

    Parameters and buffers keep the module's dtype and device (load_state_dict semantics), with one exception: a buffer
    stored as float64 (the motion VAE's `position_encoding.0.omega`) stays float64, since rounding it changes the
    published model's outputs.
    """
    expected = module.state_dict()
    check_state_dict(expected, state_dict, source, target=type(module).__name__)
    buffers = dict(module.named_buffers())
    for name, value in state_dict.items():
        buf = buffers.get(name)
        if buf is not None and value.dtype == torch.float64 and buf.dtype != torch.float64 and buf.is_floating_point():
            owner, _, leaf = name.rpartition(".")
            module.get_submodule(owner)._buffers[leaf] = buf.to(torch.float64)
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:  # keys and shapes matched, so this is a value that cannot be copied (e.g. a dtype)
        raise CheckpointError(f"{source}: could not be loaded into {type(module).__name__}: {exc}") from exc
    return module


def map_trellis_slat(state_dict: Mapping[str, torch.Tensor], part: str) -> dict[str, torch.Tensor]:
    """TRELLIS structured-latent VAE names -> our static-VAE names (published §6.4 step 1, §9.3).

    part "decoder" (slat_dec_gs_*): input_layer -> from_latent, blocks.N -> decoder.N, out_layer kept (a 32-Gaussian
    decoder's 448-channel out_layer will not fit our 112 and must be dropped by the caller), offset_perturbation ->
    MipGS_perturbation. part "encoder" (slat_enc_*): input_layer kept, blocks.N -> encoder.N, out_layer -> to_latent.
    """
    rules = {"decoder": (("input_layer.", "from_latent."), ("blocks.", "decoder."), ("out_layer.", "out_layer."),
                         ("offset_perturbation", "MipGS_perturbation")),
             "encoder": (("input_layer.", "input_layer."), ("blocks.", "encoder."), ("out_layer.", "to_latent."))}
    if part not in rules:
        raise ValueError(f"map_trellis_slat: part must be 'decoder' or 'encoder', got {part!r}")
    out = {}
    for key, value in state_dict.items():
        for old, new in rules[part]:
            if key.startswith(old):
                out[new + key[len(old):]] = value
                break
        else:
            raise CheckpointError(f"TRELLIS SLat {part}: unexpected key {key!r} (expected input_layer, blocks.N, out_layer"
                                  + (", offset_perturbation)" if part == "decoder" else ")"))
    return out


def read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(state dict, embedded model config) from either format: our safetensors checkpoint (any model_*/ema_* file of
    a training run) or a published `.pt` (weights only, `module.` stripped; no config: None)."""
    path = Path(path)
    if path.is_file() and _looks_like_safetensors(path):
        sd, config, _ = load_checkpoint(path)
        return sd, config
    return load_published(path), None


def load_weights(module: nn.Module, path: str | os.PathLike, drop_mismatched: Sequence[str] = ()) -> list[str]:
    """Load weights of either format strictly into `module`; returns the keys that were left at their initial values.

    `drop_mismatched` names keys that may be skipped when their shape differs from the module's (all of them together:
    if any one differs, every listed key is dropped). This is the static-VAE initialisation of published §3.5: a TRELLIS
    SLat decoder has a 448-channel (32 Gaussians) out_layer and its own perturbation, which our 8-Gaussian model
    replaces by a fresh zero-initialised 112-channel out_layer and its own Hammersley offsets.
    """
    sd, _ = read_weights(path)
    own = module.state_dict()
    dropped: list[str] = []
    if drop_mismatched and any(k in sd and k in own and sd[k].shape != own[k].shape for k in drop_mismatched):
        dropped = [k for k in drop_mismatched if k in own]
        sd = {k: v for k, v in sd.items() if k not in drop_mismatched}
        sd.update({k: own[k] for k in dropped})
    load_state_dict_strict(module, sd, source=str(path))
    return dropped


# ---------------------------------------------------------------------------------------------- TRELLIS release

TRELLIS_REPO = "JeffreyXiang/TRELLIS-image-large"
# The models GVFDiffusion uses from the release (published §6.4 step 1): the GS decoder is replaced by the GVF static VAE
# and the mesh/RF decoders produce nothing that is used, so their files are never read or downloaded.
TRELLIS_GS_MODELS = ("sparse_structure_flow_model", "sparse_structure_decoder", "slat_flow_model")
# The released pipeline.json's paths (docs/trellis.md §1); used only to name the files in an error when pipeline.json
# itself cannot be had, so the user knows exactly what to fetch.
_TRELLIS_KNOWN_CKPTS = {"sparse_structure_flow_model": "ckpts/ss_flow_img_dit_L_16l8_fp16",
                        "sparse_structure_decoder": "ckpts/ss_dec_conv3d_16l8_fp16",
                        "slat_flow_model": "ckpts/slat_flow_img_dit_L_64l8p2_fp16"}
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def hub_file(repo_id: str, filename: str) -> str:
    """Local path of a hub file: huggingface_hub's cache first, then a download if the hub answers (every hub file
    the project reads comes through here). Modules call it through their own name so tests can replace it."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, hf_hub_download
    try:
        return hf_hub_download(repo_id=repo_id, filename=filename, local_files_only=True)
    except Exception:
        pass
    # One quick connection attempt first: offline, huggingface_hub retries for about 20 s before giving up.
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=3).close()
    except OSError as e:
        raise OSError(f"{url.hostname} unreachable ({e})") from None
    return hf_hub_download(repo_id=repo_id, filename=filename)


class _Release:
    """Where the release files come from: a local folder (only), or a hub repo (only); never a mix of both."""

    def __init__(self, folder_or_repo: str | os.PathLike, hub: bool):
        self.name = str(folder_or_repo)
        self.folder = Path(folder_or_repo) if Path(folder_or_repo).is_dir() else None
        if self.folder is None and not (hub and _REPO_ID.match(self.name)):
            why = "hub=False" if _REPO_ID.match(self.name) else "it is not a hub repo id (owner/name) either"
            raise CheckpointError(f"{self.name}: TRELLIS release folder not found ({why}); pass a folder holding "
                                  f"pipeline.json and ckpts/ (a copy of {TRELLIS_REPO}) or, with the hub reachable, "
                                  f"the repo id {TRELLIS_REPO!r}")

    def fetch(self, files: Sequence[str]) -> tuple[dict[str, Path], list[str]]:
        """({relative name: local path} of the files found, ["name (why)"] of the rest)."""
        found, missing = {}, []
        for rel in files:
            if self.folder is not None:
                path = self.folder / rel
                if path.is_file():
                    found[rel] = path
                else:
                    missing.append(f"{path} (not found)")
                continue
            try:
                found[rel] = Path(hub_file(self.name, rel))
            except Exception as e:  # offline, unknown repo, missing file: all mean "not from the hub"
                missing.append(f"{self.name}/{rel} (hub: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
        return found, missing

    def fail(self, missing: list[str], wanted: Sequence[str]) -> CheckpointError:
        where = (f"put them in {self.folder}" if self.folder is not None else
                 f"make the hub reachable, or download them (huggingface-cli download {self.name} {' '.join(wanted)} "
                 f"--local-dir DIR) and pass that folder instead of the repo id")
        return CheckpointError(f"TRELLIS release {self.name}: missing file(s): {'; '.join(missing)}. To provide them, "
                               f"{where}.")


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable JSON ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def read_trellis_pipeline(folder_or_repo: str | os.PathLike = TRELLIS_REPO, hub: bool = True) -> dict:
    """pipeline.json of a TRELLIS release (samplers, slat_normalization, models), from a folder or the hub."""
    return _read_pipeline(_Release(folder_or_repo, hub), TRELLIS_GS_MODELS)[0]


def _read_pipeline(src: _Release, models: Sequence[str]) -> tuple[dict, dict[str, str]]:
    found, missing = src.fetch(["pipeline.json"])
    if missing:
        # Without pipeline.json the ckpt names are unknown; name those of the official release as a guide.
        known = [f"{_TRELLIS_KNOWN_CKPTS[m]}{ext}" for m in models if m in _TRELLIS_KNOWN_CKPTS
                 for ext in (".json", ".safetensors")]
        raise src.fail(missing + ([f"and the ckpts it names ({TRELLIS_REPO}: {', '.join(known)})"] if known else []),
                       ["pipeline.json"] + known)
    path = found["pipeline.json"]
    pipeline = _read_json(path)
    table = pipeline.get("args", {}).get("models") if isinstance(pipeline.get("args"), dict) else None
    if not isinstance(table, dict):
        raise CheckpointError(f"{path}: no args.models mapping (model name -> ckpts/<name>) in this pipeline.json")
    absent = [m for m in models if m not in table]
    if absent:
        raise CheckpointError(f"{path}: args.models has no {absent} (it names {sorted(table)})")
    ckpts = {}
    for m in models:
        rel = table[m]
        # Paths stay inside the release: no absolute paths or "..", which would read outside the folder/repo.
        if not isinstance(rel, str) or rel.startswith("/") or ".." in Path(rel).parts:
            raise CheckpointError(f"{path}: args.models[{m!r}] = {rel!r} is not a relative path inside the release")
        ckpts[m] = rel
    return pipeline, ckpts


def read_trellis_release(folder_or_repo: str | os.PathLike = TRELLIS_REPO, models: Sequence[str] = TRELLIS_GS_MODELS,
                         hub: bool = True) -> dict[str, tuple[str, dict, dict[str, torch.Tensor]]]:
    """{model name: (class name, constructor args, state dict)} of a released TRELLIS pipeline (trellis §1).

    pipeline.json's args.models maps each name to `ckpts/<ckpt>`; `ckpts/<ckpt>.json` is {"name": class, "args": {...}}
    and `ckpts/<ckpt>.safetensors` the weights (float16 torsos, the rest float32; read as stored). `folder_or_repo` is
    a local folder (read from there only) or, when no such folder exists and hub=True, a hub repo id (only the files
    of `models` are downloaded). Any missing file is a CheckpointError naming all of them and how to provide them.
    """
    return {m: entry[:3] for m, entry in _read_release(folder_or_repo, models, hub).items()}


def _read_release(folder_or_repo, models, hub) -> dict[str, tuple[str, dict, dict[str, torch.Tensor], Path]]:
    src = _Release(folder_or_repo, hub)
    _, ckpts = _read_pipeline(src, models)
    wanted = [ckpts[m] + ext for m in models for ext in (".json", ".safetensors")]
    found, missing = src.fetch(wanted)
    if missing:
        raise src.fail(missing, wanted)
    out = {}
    for m in models:
        cfg_path, st_path = found[ckpts[m] + ".json"], found[ckpts[m] + ".safetensors"]
        cfg = _read_json(cfg_path)
        if not isinstance(cfg.get("name"), str) or not isinstance(cfg.get("args", {}), dict):
            raise CheckpointError(f"{cfg_path}: expected {{\"name\": <class name>, \"args\": {{...}}}}, found keys "
                                  f"{sorted(cfg)}")
        out[m] = (cfg["name"], dict(cfg.get("args", {})), _read_safetensors(st_path), st_path)
    return out


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    # safetensors only: a pickle (.pt) renamed to .safetensors is refused here rather than ever being unpickled.
    try:
        ok = _looks_like_safetensors(path)
        tensors = load_file(str(path)) if ok else None
    except Exception as exc:
        raise CheckpointError(f"{path}: corrupt, truncated or not a safetensors file "
                              f"({type(exc).__name__}: {str(exc).strip()[:200]})") from exc
    if not ok:
        raise CheckpointError(f"{path}: not a safetensors file (TRELLIS weights are read as safetensors only)")
    if not tensors:
        raise CheckpointError(f"{path}: the state dict is empty")
    return tensors


def build_trellis_model(class_name: str, args: Mapping, state_dict: Mapping[str, torch.Tensor],
                        registry: Mapping[str, Callable[..., nn.Module]], source: str = "TRELLIS checkpoint") -> nn.Module:
    """`registry[class_name](**args)` loaded strictly (load_state_dict_strict: values copied into the module's own
    dtypes, so float16 files load into float32 modules). The caller supplies the registry, keeping this module free of
    model imports. `source` (the ckpt's name or path) is named in every error."""
    if class_name not in registry:
        raise CheckpointError(f"{source}: unknown model class {class_name!r} (the registry has {sorted(registry)})")
    try:
        module = registry[class_name](**args)
    except (TypeError, ValueError, NotImplementedError) as exc:  # args the class does not take or support
        raise CheckpointError(f"{source}: cannot build {class_name}(**{dict(args)}): {exc}") from exc
    return load_state_dict_strict(module, state_dict, source=source)


def load_trellis_models(registry: Mapping[str, Callable[..., nn.Module]], folder_or_repo: str | os.PathLike = TRELLIS_REPO,
                        models: Sequence[str] = TRELLIS_GS_MODELS, hub: bool = True) -> dict[str, nn.Module]:
    """read_trellis_release + build_trellis_model for each model; build errors name the ckpt file and the model."""
    release = _read_release(folder_or_repo, models, hub)
    return {m: build_trellis_model(name, args, sd, registry, source=f"{path} ({m})")
            for m, (name, args, sd, path) in release.items()}


# ---------------------------------------------------------------------------------------------- helpers

def summarize(state_dict: Mapping[str, torch.Tensor]) -> str:
    """One line: key count, value count and dtype counts, e.g. '121 keys, 125,206,318 values (float32 x120, float64 x1)'."""
    dtypes = collections.Counter(str(v.dtype).removeprefix("torch.") for v in state_dict.values())
    numel = sum(v.numel() for v in state_dict.values())
    counts = ", ".join(f"{d} x{n}" for d, n in sorted(dtypes.items()))
    return f"{len(state_dict)} keys, {numel:,} values ({counts})"


def _shape(v: torch.Tensor | Sequence[int]) -> tuple[int, ...]:
    return tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(int(d) for d in v)


def _first(obj: Mapping, n: int = 8) -> str:
    keys = [repr(k) for k in list(obj)[:n]]
    return "[" + ", ".join(keys) + (", ..." if len(obj) > n else "") + "]"


def _plain_tensors(module_or_state_dict: nn.Module | Mapping[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors that own their storage; refuses non-tensors and non-finite values."""
    sd = module_or_state_dict.state_dict() if isinstance(module_or_state_dict, nn.Module) else module_or_state_dict
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{path}: expected an nn.Module or a state dict, got {type(sd).__name__}")
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, value in sd.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: not saved: entry {name!r} is a {type(value).__name__}, not a tensor")
        if (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise CheckpointError(f"{path}: not saved: {name!r} has {bad} non-finite value(s) of {value.numel()} "
                                  f"(a non-finite model is never saved)")
        t = value.detach().cpu().contiguous()
        storage = t.untyped_storage()
        # A view of a larger storage, or a storage already used by another key, gets its own copy.
        if storage.nbytes() != t.numel() * t.element_size() or storage.data_ptr() in seen:
            t = t.clone()
        if t.numel():
            seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    if not out:
        raise CheckpointError(f"{path}: not saved: the state dict is empty")
    return out


def _to_json(value: Any, path: Path, what: str) -> str:
    try:
        return json.dumps(value, allow_nan=False)  # strict JSON so any reader can parse the metadata
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: not saved: {what} is not plain JSON data ({exc})") from exc


def _atomic_write(path: Path, write: Callable[[str], None], overwrite: bool) -> Path:
    """utils.fileio.atomic_write with the checkpoint module's own errors."""
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path}: already exists; not overwritten (pass overwrite=True / --overwrite)")
    return atomic_write(path, lambda tmp: write(str(tmp)), overwrite=True)
