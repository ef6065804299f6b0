"""Training machinery shared by main_vae.py, encode_latent.py and main_latent.py: one loop, one checkpoint layout.

    loop = TrainLoop(models={"dit": dit}, optimizers={"dit": torch.optim.AdamW(dit.parameters(), lr=cfg.train.lr)},
                     dataset=dataset, collate_fn=collate, step_fn=step_fn, out_dir=exp_dir,
                     cfg=LoopConfig.from_mapping(cfg.train), run_config=cfg, model_configs={"dit": cfg.model},
                     resume=args.resume)                       # None, "latest", or a checkpoint folder
    result = loop.run()                                       # TrainResult(step, stopped_by_signal, ...)
    loop.close()                                              # TensorBoard flushed, process group ended
    with loop.emas["dit"].applied_to(loop.raw_models["dit"]): # EMA weights in, for evaluation; live ones back after
        ...

    def step_fn(batch, loop):                                 # one micro-batch; the trainer decides the losses
        loss = ...                                            # forward through loop.models[name] (DDP-aware)
        return loss, {"mse": loss.detach()}

The step_fn contract:
- `batch` is what collate_fn returned, moved to `loop.device`. It runs under `accelerator.autocast()`.
- `loop` is this TrainLoop: read `loop.step` (optimiser steps already completed), `loop.micro_step`, `loop.epoch`,
  `loop.models[name]` (call these: under DDP the wrapper syncs gradients), `loop.raw_models[name]`, `loop.device`;
  call `loop.log_images(name, grid)` / `loop.log_scalars({...})`.
- It returns `(loss, logs)`: `loss` a scalar tensor attached to the graph (the mean over the micro-batch); `logs`
  {name: float or scalar tensor}, averaged over micro-steps and log_interval and written as `train/<name>`.
- It never calls backward, optimiser steps or zero_grad, and every rank runs the same forwards (DDP).

What the loop owns, fixing the published trainers (docs/published_system.md §10.8-9):
- `step` counts optimiser steps: one step = grad_accum micro-batches per process. Warm-up, EMA, logging and
  checkpoints are functions of it, never of micro-steps or of the process count. An optimiser whose parameters get no
  gradient in a step (a model a training phase does not use) is not stepped; `warmup_start={name: step}` starts its
  warm-up when its phase begins.
- Data goes through a ResumableSampler: seeded shuffling, a disjoint shard per rank, an exact position on resume.
- A non-finite loss (or gradient norm, outside fp16) on any rank skips the whole optimiser step on every rank: no
  update, no EMA, gradients dropped. The step still counts (its data is consumed) and is counted in
  `nonfinite_total`; more than max_nonfinite_in_a_row in a row raise NonFiniteLossError.
- Checkpoints: <out>/checkpoints/step_XXXXXXX/{model_<name>,ema_<name>}.safetensors + training_state.pt, written
  in a temporary folder and renamed; <out>/checkpoints/latest names the newest complete one. Resume restores live
  weights (never the EMA), EMA, optimisers, scaler, counters, data position and every RNG, so a resumed CPU run
  is bitwise equal to an uninterrupted one.
- SIGTERM/SIGINT set a flag; the loop finishes the current step, saves, and returns stopped_by_signal=True.
- The run folder: a folder that holds checkpoints is continued (`resume="latest"`) or moved aside and started afresh
  (`restart=True`: its contents go to `<out>.old-<date>-<time>/`, never deleted); neither is refused (InputError),
  so a run is never silently started over at step 0. While a loop lives, <out>/.lock (utils/fileio.lock_folder)
  keeps a second trainer out of the folder. The main process moves and locks; the others learn its refusal.

Processes: one, or N through `torchrun --nproc_per_node N` (DDP; gloo on CPUs, NCCL on GPUs). On a machine without
CUDA the loop passes cpu=True, which accelerate needs to see a torchrun launch as multi-CPU. `accelerate launch
--cpu --num_processes N` starts a single process (accelerate's multi-CPU launch goes through mpirun).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import re
import secrets
import shutil
import signal
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, gather_object, send_to_device
from torch import nn
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from utils.checkpoint import (CheckpointError, check_state_dict, load_checkpoint, load_state_dict_strict, safe_load,
                              save_checkpoint)
from utils.cli import EXIT_BAD_INPUT, InputError
from utils.fileio import LOCK_NAME, fsync_dir, lock_folder

__all__ = ["LoopConfig", "TrainLoop", "TrainResult", "ResumableSampler", "EMA", "NonFiniteLossError",
           "warmup_factor", "seed_everything", "resolve_checkpoint", "list_checkpoints", "weights_file",
           "check_run_folder", "prepare_run_folder", "on_main_process"]

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_FILE = "training_state.pt"
STATE_FORMAT = "gvfdiffusion-training-state"
STEP_DIR = re.compile(r"^step_(\d+)$")


class NonFiniteLossError(RuntimeError):
    """Too many optimiser steps in a row had a non-finite loss; training stops instead of spinning."""


# ---------------------------------------------------------------------------------------------- small pure pieces

def trainer_arg_parser(description: str, config: str, listed: str) -> argparse.ArgumentParser:
    """The options main_vae.py and main_latent.py share (config, data, experiment folder, --resume / --restart,
    --allow-symlinks, config overrides); each adds its own. `listed` names what is trained on when no list file is
    given ("sample", "latent")."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=Path(config))
    ap.add_argument("--data-root", type=Path, help="dataset root (default: data.root of the config)")
    ap.add_argument("--list", type=Path,
                    help=f"list file of sample names (default: data.list_file, else every {listed})")
    ap.add_argument("--out", type=Path, required=True,
                    help="experiment folder (checkpoints, TensorBoard); locked while the trainer runs")
    ap.add_argument("--resume", help='"latest" or a checkpoint folder; a folder that already holds checkpoints needs '
                                     '--resume latest (continue) or --restart')
    ap.add_argument("--restart", action="store_true",
                    help="start again at step 0 in an --out that holds an earlier run: its contents are moved to "
                         "<out>.old-<date>-<time>/ (never deleted)")
    from datasets import layout  # the data-root confinement switch lives with the layout
    layout.add_symlink_option(ap)
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. train.lr=1e-4")
    return ap


def _has_checkpoints(out_dir: Path) -> Path | None:
    """The checkpoint that marks `out_dir` as an earlier run's folder (the newest, or the `latest` pointer)."""
    ckpt_dir = Path(out_dir) / CHECKPOINTS
    found = list_checkpoints(ckpt_dir)
    if found:
        return found[-1][1]
    return ckpt_dir / LATEST if (ckpt_dir / LATEST).is_file() else None


def check_run_folder(out_dir: str | os.PathLike, resume: str | os.PathLike | None, restart: bool = False) -> None:
    """Refuse (InputError, one line) to train into a folder holding an earlier run's checkpoints without `resume` or
    `restart`, and the two together. Read-only, so every process may call it before any work: the trainers do, at
    their start; TrainLoop checks again (and moves the old run aside for `restart`) on the main process. In a
    launched process other than rank 0 a refusal is a silent exit with status 2: rank 0 prints the line."""
    error = None
    if restart and resume is not None:
        error = f"{out_dir}: --restart starts over at step 0 and --resume continues a run; give one of them"
    found = None if restart or resume is not None else _has_checkpoints(Path(out_dir))
    if found is not None:
        error = (f"{out_dir}: holds checkpoints of an earlier run ({found.name}); pass --resume latest to continue it "
                 f"or --restart to move it aside and start again at step 0")
    if error is not None:
        if int(os.environ.get("RANK", "0")) > 0:
            raise SystemExit(EXIT_BAD_INPUT)
        raise InputError(error)


def prepare_run_folder(out_dir: str | os.PathLike, resume: str | os.PathLike | None,
                       restart: bool = False) -> Path | None:
    """check_run_folder, then for `restart` move everything in `out_dir` but its lock into a new sibling folder
    `<out>.old-<YYYYmmdd-HHMMSS>` (a suffix -2, -3, ... when that exists). Returns that folder, or None when nothing
    was moved. Called on the main process only, with the folder's lock held."""
    check_run_folder(out_dir, resume, restart)
    out_dir = Path(os.path.abspath(out_dir))
    if not restart or not out_dir.is_dir():
        return None
    entries = sorted(p for p in out_dir.iterdir() if p.name != LOCK_NAME)
    if not entries:
        return None
    base = out_dir.with_name(f"{out_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    aside, n = base, 1
    while True:
        try:
            aside.mkdir()
            break
        except FileExistsError:
            n += 1
            aside = base.with_name(f"{base.name}-{n}")
    for entry in entries:
        shutil.move(str(entry), str(aside / entry.name))  # a rename; a copy only across filesystems
    fsync_dir(out_dir)
    return aside


def on_main_process(fn: Callable[[], Any], is_main: bool, num_processes: int) -> Any:
    """Run fn() on the main process only (moving, locking) and let every process share its refusal: an InputError
    there is raised again on the main process, and the others end with exit status 2 without a line of their own
    (the main process prints it). A collective when num_processes > 1: every process must call it. Returns fn()'s
    result on the main process, None elsewhere."""
    result, error = None, None
    if is_main:
        try:
            result = fn()
        except InputError as exc:
            error = exc
    if num_processes > 1:
        from accelerate.utils import broadcast_object_list
        shared = broadcast_object_list([None if error is None else str(error)])
        if shared[0] is not None and not is_main:
            raise SystemExit(EXIT_BAD_INPUT)
    if error is not None:
        raise error
    return result


def warmup_factor(step: int, warmup_steps: int) -> float:
    """LR multiplier of optimiser step `step` (0-based): (step + 1) / warmup_steps, capped at 1.

    A plain function of the optimiser step, so the ramp is the same at any process count or accumulation (the
    published scheduler ticked num_processes times per step, published §10.9). The first update already uses a non-zero LR.
    """
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _mixed_seed(*parts: int) -> int:
    # A well-mixed 64-bit seed from small integers: (seed, epoch) and (seed, epoch, rank) never collide.
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0])


def _per_name(value: Any, name: str) -> Any:
    """A LoopConfig field is one value for every model/optimiser, or a mapping {name: value} (absent: None)."""
    return value.get(name) if isinstance(value, Mapping) else value


def _plain(value: Any) -> Any:
    """Plain JSON-like data (dicts, lists, numbers, strings): what checkpoints store and compare."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping) and value:
        out = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: value}


def _config_diff(old: Mapping, new: Mapping, limit: int = 20) -> list[str]:
    a, b = _flat(old), _flat(new)
    lines = [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
             for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")]
    return lines[:limit] + ([f"... and {len(lines) - limit} more"] if len(lines) > limit else [])


def _rng_state() -> dict:
    # numpy's state holds an ndarray, which torch.load(weights_only=True) refuses: store the keys as a tensor.
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None}


def _set_rng_state(state: Mapping) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------------------------------------- data order

class ResumableSampler(Sampler[int]):
    """Shuffled, sharded and resumable: the sampler of every training DataLoader.

    Epoch e is a permutation of range(dataset_len) drawn from a generator seeded by (seed, e), so every rank computes
    the same one without communication. It is padded by wrapping around (or truncated, drop_last) to a multiple of
    num_replicas, and rank r takes positions r, r + R, r + 2R, ... Strided shards make the global order independent
    of R: micro-batch k of all ranks together holds exactly the samples of batch k of one process with an R times
    larger batch. `consumed` (samples of this epoch this rank has trained on) is advanced by the loop, which knows
    what was used; prefetching workers run ahead of it. `__iter__` starts at `consumed`, so a resumed run continues
    at the exact sample.
    """

    def __init__(self, dataset_len: int, *, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = False):
        if dataset_len < 1:
            raise ValueError("ResumableSampler: the dataset is empty")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"ResumableSampler: rank {rank} is outside 0..{num_replicas - 1}")
        if drop_last and dataset_len < num_replicas:
            raise ValueError(f"ResumableSampler: {dataset_len} samples cannot give each of {num_replicas} ranks one")
        self.dataset_len, self.num_replicas, self.rank = dataset_len, num_replicas, rank
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.epoch = 0
        self.consumed = 0

    @property
    def num_samples(self) -> int:
        """Samples per rank per epoch (equal on every rank)."""
        div = self.dataset_len // self.num_replicas if self.drop_last else -(-self.dataset_len // self.num_replicas)
        return div

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's whole shard of `epoch`, in order."""
        if self.shuffle:
            gen = torch.Generator().manual_seed(_mixed_seed(self.seed, epoch))
            order = torch.randperm(self.dataset_len, generator=gen).tolist()
        else:
            order = list(range(self.dataset_len))
        total = self.num_samples * self.num_replicas
        order = (order * -(-total // self.dataset_len))[:total]  # wrap-around padding, or truncation
        return order[self.rank:total:self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices(self.epoch)[self.consumed:])

    def __len__(self) -> int:
        return self.num_samples - self.consumed

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.consumed = epoch, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed,
                "num_replicas": self.num_replicas, "dataset_len": self.dataset_len}

    def load_state_dict(self, state: Mapping) -> None:
        self.epoch, consumed = int(state["epoch"]), int(state["consumed"])
        if state["dataset_len"] != self.dataset_len or state["seed"] != self.seed:
            # Another order altogether: a position in it means nothing, so the saved epoch starts over.
            print(f"ResumableSampler: dataset size or seed changed ({state['dataset_len']}, seed {state['seed']} -> "
                  f"{self.dataset_len}, seed {self.seed}); epoch {self.epoch} restarts from its beginning")
            consumed = 0
        elif state["num_replicas"] != self.num_replicas:
            # Same global order; continue at the same global position, rounded down.
            consumed = consumed * state["num_replicas"] // self.num_replicas
        self.consumed = min(consumed, self.num_samples)


# ---------------------------------------------------------------------------------------------- EMA

class EMA:
    """Exponential moving average of a module's weights, updated once per optimiser step:
    ema = rate * ema + (1 - rate) * live (the published update_ema formula).

    It holds a full state dict: trainable floating-point parameters are averaged, everything else (buffers, frozen
    parameters) is copied, so an EMA file is a complete set of weights that inference loads like any model.
    """

    def __init__(self, model: nn.Module, rate: float):
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"EMA rate must be in [0, 1), got {rate}")
        self.rate = rate
        trainable = {name for name, p in model.named_parameters() if p.requires_grad and p.is_floating_point()}
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.averaged = [k for k in self.shadow if k in trainable]
        self.copied = [k for k in self.shadow if k not in trainable]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        live = model.state_dict()
        ema = [self.shadow[k] for k in self.averaged]
        # foreach: a few kernels for the whole model instead of two per tensor
        torch._foreach_mul_(ema, self.rate)
        torch._foreach_add_(ema, [live[k] for k in self.averaged], alpha=1.0 - self.rate)
        for k in self.copied:
            self.shadow[k].copy_(live[k])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], source: str = "EMA state dict") -> None:
        check_state_dict(self.shadow, state_dict, source, target="the EMA of the model")
        with torch.no_grad():
            for k, v in state_dict.items():
                self.shadow[k].copy_(v)

    @contextlib.contextmanager
    def applied_to(self, model: nn.Module):
        """Temporarily put the EMA weights into `model` (evaluation, sample images); the live weights come back."""
        live = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.shadow)
        try:
            yield model
        finally:
            model.load_state_dict(live)


# ---------------------------------------------------------------------------------------------- configuration

@dataclass
class LoopConfig:
    """The loop's knobs; the names match the `train:` block of configs/*.yml (trainer-only keys such as lr are
    ignored by from_mapping). warmup_steps, grad_clip and ema_rate are one value for all, or {name: value}."""
    max_steps: int
    batch_size: int = 1                   # per process and micro-step
    grad_accum: int = 1                   # micro-steps per optimiser step
    warmup_steps: Any = 0                 # per optimiser
    grad_clip: Any = None                 # max global grad norm per optimiser; None: no clipping
    ema_rate: Any = None                  # per model; None or 0: no EMA
    mixed_precision: str | None = None    # "no" | "bf16" | "fp16"; None: what `accelerate launch` configured
    seed: int = 0
    log_interval: int = 100
    save_interval: int | None = 5000      # None: only at the end (and on a signal)
    keep_last: int | None = 3             # checkpoints kept; None: all
    max_nonfinite_in_a_row: int = 20
    num_workers: int = 0
    progress: bool = True                 # tqdm bar on the main process
    tensorboard: bool = True

    @classmethod
    def from_mapping(cls, train: Mapping, **overrides: Any) -> "LoopConfig":
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in dict(train).items() if k in names}
        values.update(overrides)
        return cls(**values)

    def __post_init__(self):
        for name in ("batch_size", "grad_accum", "log_interval"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"LoopConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps < 0:
            raise ValueError(f"LoopConfig.max_steps must be >= 0, got {self.max_steps}")
        if self.save_interval is not None and self.save_interval < 1:
            raise ValueError(f"LoopConfig.save_interval must be >= 1 or None, got {self.save_interval}")
        if self.keep_last is not None and self.keep_last < 1:
            raise ValueError(f"LoopConfig.keep_last must be >= 1 or None, got {self.keep_last}")
        if self.mixed_precision not in (None, "no", "bf16", "fp16"):
            raise ValueError(f"LoopConfig.mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}")


@dataclass
class TrainResult:
    step: int                       # optimiser steps completed
    epoch: int
    stopped_by_signal: bool         # SIGTERM/SIGINT: a checkpoint was saved, the caller should exit 0
    nonfinite_steps: int            # optimiser steps skipped for a non-finite loss or gradient
    checkpoint: Path | None         # the last checkpoint written by this process's loop


# ---------------------------------------------------------------------------------------------- checkpoint folders

def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoint folders, oldest first. Temporary folders (".step_*.tmp-*") never match."""
    ckpt_dir = Path(ckpt_dir)
    found = []
    if ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            m = STEP_DIR.match(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), p))
    return sorted(found)


def weights_file(folder: str | os.PathLike, name: str, kind: str = "ema") -> Path:
    """The weights of model `name` in a checkpoint folder: kind "model" (live) or "ema"."""
    if kind not in ("model", "ema"):
        raise ValueError(f"weights kind must be 'model' or 'ema', got {kind!r}")
    return Path(folder) / f"{kind}_{name}.safetensors"


def resolve_checkpoint(where: str | os.PathLike, ckpt_dir: str | os.PathLike) -> Path | None:
    """"latest" -> the folder named by <ckpt_dir>/latest (None when there is no checkpoint yet); a path -> a
    checkpoint folder, or the newest one under an experiment or checkpoints folder. Raises CheckpointError."""
    if str(where) == LATEST:
        ckpt_dir = Path(ckpt_dir)
        pointer = ckpt_dir / LATEST
        if pointer.is_file():
            folder = ckpt_dir / pointer.read_text().strip()
            if not folder.is_dir():
                raise CheckpointError(f"{pointer}: names {folder.name!r}, which does not exist")
            return folder
        existing = list_checkpoints(ckpt_dir)
        if existing:  # the pointer was removed by hand; the newest complete folder is the best guess
            print(f"resume: {pointer} is missing; using the newest checkpoint {existing[-1][1]}")
            return existing[-1][1]
        return None
    path = Path(where)
    if (path / STATE_FILE).is_file():
        return path
    for sub in (path, path / CHECKPOINTS):
        if (sub / LATEST).is_file() or list_checkpoints(sub):
            return resolve_checkpoint(LATEST, sub)
    raise CheckpointError(f"{path}: not a checkpoint folder (no {STATE_FILE}) and no checkpoints under it")


def _write_synced(path: Path, write: Callable[[Any], None]) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------- the loop

class TrainLoop:
    """Owns the accelerator, data order, optimiser steps, EMA, logging, checkpoints and resume (see module doc)."""

    def __init__(self, *, models: Mapping[str, nn.Module], optimizers: Mapping[str, torch.optim.Optimizer],
                 dataset, step_fn: Callable, out_dir: str | os.PathLike, cfg: LoopConfig,
                 run_config: Mapping | None = None, model_configs: Mapping[str, Mapping] | None = None,
                 collate_fn: Callable | None = None, resume: str | os.PathLike | None = None,
                 cpu: bool | None = None, find_unused_parameters: bool = False,
                 warmup_start: Mapping[str, int] | None = None, restart: bool = False):
        if not models or not optimizers:
            raise ValueError("TrainLoop: needs at least one model and one optimiser")
        for name in [*models, *optimizers]:  # names become file names and TensorBoard tags
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
                raise ValueError(f"TrainLoop: name {name!r} must be letters, digits, '_', '.', '-'")
        self.cfg, self.step_fn = cfg, step_fn
        self.warmup_start = dict(warmup_start or {})  # {optimiser: step its warm-up starts at} for phased training
        self.out_dir = Path(out_dir)
        self.ckpt_dir = self.out_dir / CHECKPOINTS
        self.run_config = _plain(run_config or {})
        # Embedded in each model file so it can be rebuilt; without model_configs the whole run config goes in.
        self.model_configs = {n: _plain((model_configs or {}).get(n, self.run_config)) for n in models}

        self.accelerator = acc = Accelerator(
            mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
            # accelerate treats a CPU-only torchrun/`accelerate launch` as multi-process (gloo) only with cpu=True
            cpu=(not torch.cuda.is_available()) if cpu is None else cpu,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)])
        if acc.mixed_precision == "fp16" and acc.device.type == "cpu":
            raise ValueError("mixed_precision 'fp16' needs a GPU (accelerate would silently run fp32 on the CPU); "
                             "use 'bf16' or 'no'")
        if int(os.environ.get("WORLD_SIZE", "1")) != acc.num_processes:
            raise RuntimeError(f"launched as {os.environ['WORLD_SIZE']} processes but accelerate runs "
                               f"{acc.num_processes}: on a CPU-only machine pass cpu=True (accelerate launch --cpu)")
        if (acc.num_processes == 1 and "MASTER_PORT" in os.environ and "WORLD_SIZE" not in os.environ
                and os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true"):
            # The signature of `accelerate launch --cpu --num_processes N` (N > 1) without --mpirun_hostfile.
            print("warning: `accelerate launch --cpu --num_processes N` starts ONE process (multi-CPU needs mpirun); "
                  "for N CPU processes use `torchrun --nproc_per_node N` (the loop passes cpu=True itself)")
        self.device, self.rank, self.world_size = acc.device, acc.process_index, acc.num_processes
        self.is_main = acc.is_main_process
        # The run folder, before any work: locked by the main process for the loop's life; an earlier run's
        # checkpoints need `resume` or `restart` (the latter moves them aside). Every process learns a refusal.
        self._lock = None

        def claim():
            self._lock = lock_folder(self.out_dir)
            try:
                return prepare_run_folder(self.out_dir, resume, restart)
            except BaseException:
                self._lock.release()
                raise

        moved = on_main_process(claim, self.is_main, self.world_size)
        if moved is not None:
            self._print(f"restart: the earlier run in {self.out_dir} was moved to {moved}; starting at step 0")
        seed_everything(cfg.seed + self.rank)  # dropout/augmentation differ per rank; DDP keeps weights equal

        # Models with trainable parameters are prepared (DDP-wrapped when distributed); frozen ones only moved.
        self.raw_models = dict(models)
        self.trainable = [n for n, m in models.items() if any(p.requires_grad for p in m.parameters())]
        self.models = {n: acc.prepare_model(m) if n in self.trainable else m.to(self.device) for n, m in models.items()}
        self.optimizers = {name: acc.prepare_optimizer(opt) for name, opt in optimizers.items()}
        # The trainer's LRs (multipliers included) are the base of the schedule; a resumed optimiser state does not
        # override them, so an LR changed in the config takes effect on resume.
        self.base_lrs = {name: [float(g["lr"]) for g in opt.param_groups] for name, opt in self.optimizers.items()}
        self.emas = {n: EMA(self.raw_models[n], _per_name(cfg.ema_rate, n)) for n in self.trainable
                     if _per_name(cfg.ema_rate, n)}

        self.sampler = ResumableSampler(len(dataset), num_replicas=self.world_size, rank=self.rank, seed=cfg.seed)
        if self.sampler.num_samples < cfg.batch_size:
            raise ValueError(f"the dataset gives each of {self.world_size} process(es) {self.sampler.num_samples} "
                             f"samples per epoch, fewer than batch_size {cfg.batch_size}")
        # Own generator: iter(DataLoader) otherwise draws its worker seed from the global RNG, which would make the
        # dropout masks depend on where epochs (and resumes) start. Non-persistent workers so each epoch's
        # reseeded generator reaches them. drop_last: every step has the same batch size on every rank.
        self._loader_gen = torch.Generator()
        self.loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=self.sampler, collate_fn=collate_fn,
                                 num_workers=cfg.num_workers, drop_last=True, generator=self._loader_gen,
                                 pin_memory=self.device.type == "cuda")
        self._batches: Iterator | None = None

        self.step = 0                 # optimiser steps completed
        self.micro_step = 0
        self.nonfinite_total = 0
        self.nonfinite_in_a_row = 0
        self.last_checkpoint: Path | None = None
        self._saved_step = 0          # never save at step 0
        self._signal: int | None = None
        self._reset_window()
        self._norms: dict[str, torch.Tensor] = {}

        if resume is not None:
            folder = resolve_checkpoint(resume, self.ckpt_dir)
            if folder is None:
                self._print(f"resume: no checkpoint in {self.ckpt_dir} yet; starting from step 0")
            else:
                self.load(folder)
        self.writer = None
        if self.is_main and cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # slow import, main process only
            # purge_step drops events a crashed run logged after the checkpoint we resume from
            self.writer = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=self.step or None)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    # ------------------------------------------------------------------------------------------ running

    def run(self, max_steps: int | None = None) -> TrainResult:
        """Train until `max_steps` optimiser steps (cfg.max_steps by default) or a signal; save at the end."""
        max_steps = self.cfg.max_steps if max_steps is None else max_steps
        for name in self.trainable:
            self.raw_models[name].train()
        bar = tqdm(total=max_steps, initial=min(self.step, max_steps), dynamic_ncols=True, desc="train",
                   disable=not (self.is_main and self.cfg.progress))
        stopped = False
        with self._signals_caught():
            while self.step < max_steps and not stopped:
                stopped = self._train_step()
                bar.update(1)
                if self.step % self.cfg.log_interval == 0 or self.step == max_steps or stopped:
                    self._log(bar)
                if self.cfg.save_interval and self.step % self.cfg.save_interval == 0:
                    self.save()
            if self.step != self._saved_step:  # the end of training, or a signal
                self.save()
        bar.close()
        if self.writer is not None:
            self.writer.flush()
        if stopped:
            self._print(f"stopped by {signal.Signals(self._signal).name} at step {self.step}; checkpoint saved in "
                        f"{self.last_checkpoint} (continue with --resume latest)")
        return TrainResult(self.step, self.epoch, stopped, self.nonfinite_total, self.last_checkpoint)

    def lr_factor(self, name: str, step: int) -> float:
        """LR multiplier of optimiser `name` at optimiser step `step`; override for another schedule."""
        step = max(step - self.warmup_start.get(name, 0), 0)
        return warmup_factor(step, int(_per_name(self.cfg.warmup_steps, name) or 0))

    def _next_batch(self):
        while True:
            if self._batches is None:
                self._loader_gen.manual_seed(_mixed_seed(self.cfg.seed, self.epoch, self.rank))
                if hasattr(self.loader.dataset, "set_epoch"):  # datasets drawing per-(epoch, index) randomness
                    self.loader.dataset.set_epoch(self.epoch)
                self._batches = iter(self.loader)
            try:
                batch = next(self._batches)
            except StopIteration:
                self._batches = None
                self.sampler.set_epoch(self.epoch + 1)
                continue
            self.sampler.consumed += self.cfg.batch_size
            return send_to_device(batch, self.device)

    def _train_step(self) -> bool:
        """One optimiser step (grad_accum micro-batches). Returns True when a signal asks every rank to stop."""
        acc, cfg = self.accelerator, self.cfg
        for name, opt in self.optimizers.items():
            factor = self.lr_factor(name, self.step)
            for group, base in zip(opt.param_groups, self.base_lrs[name]):
                group["lr"] = base * factor

        acc.step = 0  # accelerate's micro-step counter: the last of our grad_accum micro-steps is the syncing one
        bad = torch.zeros((), dtype=torch.bool, device=self.device)
        loss_sum = torch.zeros((), device=self.device)
        for self.micro_step in range(cfg.grad_accum):
            batch = self._next_batch()
            with acc.accumulate(*(self.models[n] for n in self.trainable)):
                with acc.autocast():
                    loss, logs = self.step_fn(batch, self)
                if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
                    raise TypeError(f"step_fn must return (scalar loss tensor, logs dict), got {type(loss).__name__}")
                loss = loss.reshape(())
                finite = torch.isfinite(loss.detach())
                bad |= ~finite
                loss_sum += torch.where(finite, loss.detach().float(), 0.0)
                # Always backward, even a NaN: under DDP every rank must join the gradient all-reduce.
                acc.backward(loss)
            self._accumulate_logs(logs)
        if not acc.sync_gradients:
            raise RuntimeError("internal: the last micro-step did not synchronise gradients")

        # fp16: inf/NaN gradients are the GradScaler's business (it skips the step and lowers the scale), so only
        # the loss counts as non-finite there. Otherwise a non-finite gradient norm also skips the step.
        scaler = acc.scaler  # a GradScaler only for fp16 on a GPU; never touched otherwise
        if scaler is None:
            self._norms = self._clip_gradients()
            for norm in self._norms.values():
                bad |= ~torch.isfinite(norm)
        # One all-reduce per step: every rank takes the same skip and stop decisions.
        stop_here = torch.tensor(self._signal is not None, device=self.device)
        flags = acc.reduce(torch.stack([bad, stop_here]).float(), "sum")
        skip, stop = (bool(v > 0) for v in flags.tolist())

        if skip:
            self.nonfinite_total += 1
            self.nonfinite_in_a_row += 1
            self._print(f"step {self.step}: non-finite loss or gradient; optimiser step skipped "
                        f"({self.nonfinite_in_a_row} in a row, {self.nonfinite_total} in all)")
            if self.nonfinite_in_a_row > cfg.max_nonfinite_in_a_row:
                self._zero_grad()
                raise NonFiniteLossError(f"{self.nonfinite_in_a_row} optimiser steps in a row had a non-finite loss "
                                         f"(limit max_nonfinite_in_a_row={cfg.max_nonfinite_in_a_row}); stopping at "
                                         f"step {self.step}. The last checkpoint is {self.last_checkpoint}.")
        else:
            self.nonfinite_in_a_row = 0
            stepped = [opt for opt in self.optimizers.values() if _has_grads(opt)]  # a phase may not train some
            applied = True
            if scaler is None:
                for opt in stepped:
                    opt.step()
            elif stepped:
                acc.unscale_gradients()
                self._norms = self._clip_gradients()
                # One scaler.update() for all optimisers (AcceleratedOptimizer.step would update after each, so the
                # next optimiser's gradients would be unscaled with a changed scale).
                scale = scaler.get_scale()
                for opt in stepped:
                    scaler.step(opt.optimizer)
                scaler.update()
                applied = scaler.get_scale() >= scale  # the scale only drops when an overflow skipped the step
            if applied:
                for name, ema in self.emas.items():
                    ema.update(self.raw_models[name])
                self._window["loss"] += loss_sum / cfg.grad_accum
                self._window["applied"] += 1
        self._zero_grad()
        self.step += 1
        return stop

    def _clip_gradients(self) -> dict[str, torch.Tensor]:
        """Clip each optimiser's parameters to its own max norm; returns the norms before clipping."""
        norms = {}
        for name, opt in self.optimizers.items():
            params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
            if params:
                max_norm = _per_name(self.cfg.grad_clip, name)
                # max_norm inf: the norm is computed and the gradients multiplied by exactly 1.0
                norms[name] = torch.nn.utils.clip_grad_norm_(params, float(max_norm) if max_norm else math.inf)
        return norms

    def _zero_grad(self) -> None:
        for opt in self.optimizers.values():
            opt.optimizer.zero_grad(set_to_none=True)  # the inner one: accelerate's skips it off sync steps
        for model in self.raw_models.values():
            model.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------------------------------ logging

    def _accumulate_logs(self, logs: Mapping | None) -> None:
        for k, v in (logs or {}).items():
            total, count = self._window["logs"].get(k, (0.0, 0))
            v = v.detach().float().mean() if isinstance(v, torch.Tensor) else float(v)
            self._window["logs"][k] = (total + v, count + 1)  # tensors stay on the device: no sync per micro-step

    def _log(self, bar: tqdm) -> None:
        w = self._window
        # A collective on every rank (log steps are the same everywhere): the loss averaged over processes.
        loss = float("nan")  # no step of the window was applied (the same on every rank: skips are agreed)
        if w["applied"]:
            loss = self.accelerator.reduce(torch.as_tensor(w["loss"], dtype=torch.float32, device=self.device)
                                           / w["applied"], "mean").item()
        elapsed = max(time.perf_counter() - w["time"], 1e-9)
        samples = (self.step - w["start_step"]) * self.cfg.batch_size * self.cfg.grad_accum * self.world_size
        scalars = {"train/loss": loss, "train/samples_per_s": samples / elapsed, "train/epoch": self.epoch,
                   "train/nonfinite_steps": self.nonfinite_total}
        scalars.update({f"lr/{n}": opt.param_groups[0]["lr"] for n, opt in self.optimizers.items()})
        scalars.update({f"grad_norm/{n}": float(norm) for n, norm in self._norms.items()})
        scalars.update({f"train/{k}": float(total) / count for k, (total, count) in w["logs"].items()})
        self.log_scalars(scalars)
        bar.set_postfix(loss=f"{loss:.4g}", samples_s=f"{samples / elapsed:.1f}", refresh=False)
        self._print(f"step {self.step}: " + ", ".join(f"{k.split('/', 1)[1] if k.startswith('train/') else k} {v:.4g}"
                                                      for k, v in scalars.items()))
        self._reset_window()

    def _reset_window(self) -> None:
        self._window = {"loss": 0.0, "applied": 0, "logs": {}, "start_step": self.step, "time": time.perf_counter()}

    def log_scalars(self, scalars: Mapping[str, float], step: int | None = None) -> None:
        """TensorBoard scalars at `step` (default: the current optimiser step); main process only."""
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, float(v), self.step if step is None else step)

    def log_images(self, name: str, grid: torch.Tensor, step: int | None = None) -> None:
        """An image grid to TensorBoard: (3|1, H, W) or (H, W, 3|1) or (H, W), float in [0, 1] or uint8; main only."""
        if self.writer is None:
            return
        img = torch.as_tensor(grid).detach().cpu()
        img = img.float() / 255.0 if img.dtype == torch.uint8 else img.float().clamp(0, 1)
        fmt = "HW" if img.ndim == 2 else ("CHW" if img.shape[0] in (1, 3, 4) else "HWC")
        self.writer.add_image(name, img, self.step if step is None else step, dataformats=fmt)

    def _print(self, text: str) -> None:
        if self.is_main:
            tqdm.write(text)

    # ------------------------------------------------------------------------------------------ signals

    @contextlib.contextmanager
    def _signals_caught(self):
        """SIGTERM/SIGINT only set a flag; the step in flight finishes, then the loop saves and returns.
        A second SIGINT interrupts at once."""
        if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
            yield
            return

        def handler(signum, frame):
            if self._signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self._signal = signum

        previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    # ------------------------------------------------------------------------------------------ checkpoints

    def save(self) -> Path:
        """Write checkpoints/step_XXXXXXX/ atomically, point `latest` at it, keep the newest keep_last.
        Called on every rank (it gathers each rank's RNG state); only the main process writes."""
        name = f"step_{self.step:07d}"
        # Every rank checks (the weights are equal everywhere), so all refuse together and nothing is written.
        weights = {f"model_{n}": m.state_dict() for n, m in self.raw_models.items()}
        weights.update({f"ema_{n}": e.shadow for n, e in self.emas.items()})
        for what, sd in weights.items():
            for key, t in sd.items():
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise CheckpointError(f"{self.ckpt_dir / name}: not saved: {what} has non-finite values in "
                                          f"{key!r} (a non-finite model is never saved)")
        rng = gather_object([_rng_state()])  # one entry per rank, in rank order
        final = self.ckpt_dir / name
        if self.is_main:
            self._write_checkpoint(final, weights, rng)
        self.accelerator.wait_for_everyone()
        self._saved_step, self.last_checkpoint = self.step, final
        return final

    def _write_checkpoint(self, final: Path, weights: dict, rng: list) -> None:
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.ckpt_dir / f".{final.name}.tmp-{os.getpid()}-{secrets.token_hex(3)}"
        tmp.mkdir()
        old = None
        try:
            for what, sd in weights.items():
                kind, _, model = what.partition("_")
                extra = {"step": self.step, "weights": kind}
                if kind == "ema":
                    extra["ema_rate"] = self.emas[model].rate
                save_checkpoint(weights_file(tmp, model, kind), sd, config=self.model_configs[model], extra=extra)
            state = {
                "format": STATE_FORMAT, "version": 1, "step": self.step, "epoch": self.epoch,
                "sampler": self.sampler.state_dict(), "world_size": self.world_size,
                "nonfinite_total": self.nonfinite_total, "nonfinite_in_a_row": self.nonfinite_in_a_row,
                "models": sorted(self.raw_models), "emas": sorted(self.emas),
                "optimizers": {n: opt.state_dict() for n, opt in self.optimizers.items()},
                "scaler": self.accelerator.scaler.state_dict() if self.accelerator.scaler is not None else None,
                "rng": rng, "config": self.run_config,
            }
            _write_synced(tmp / STATE_FILE, lambda f: torch.save(state, f))
            fsync_dir(tmp)
            if final.exists():  # re-saving a step (resumed from an older checkpoint): swap, then drop the old one
                old = final.with_name(f".{final.name}.old-{secrets.token_hex(3)}")
                os.rename(final, old)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(self.ckpt_dir)
        pointer_tmp = self.ckpt_dir / f".{LATEST}.tmp-{os.getpid()}"
        _write_synced(pointer_tmp, lambda f: f.write((final.name + "\n").encode()))
        os.replace(pointer_tmp, self.ckpt_dir / LATEST)  # `latest` moves only once the folder is complete
        fsync_dir(self.ckpt_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self._prune(keep=final)

    def _prune(self, keep: Path) -> None:
        for p in self.ckpt_dir.iterdir():  # temporary or replaced folders left behind by a crash during a save
            if p.is_dir() and p.name.startswith(".step_"):
                shutil.rmtree(p, ignore_errors=True)
        if self.cfg.keep_last:
            for _, folder in list_checkpoints(self.ckpt_dir)[:-self.cfg.keep_last]:
                if folder != keep:
                    shutil.rmtree(folder, ignore_errors=True)

    def load(self, folder: str | os.PathLike) -> None:
        """Restore everything from a checkpoint folder: live weights (never the EMA), EMA, optimisers, scaler,
        counters, data position and RNG. Raises CheckpointError naming what is missing or does not match."""
        folder = Path(folder)
        needed = [STATE_FILE] + [weights_file(".", n, "model").name for n in self.raw_models] + \
                 [weights_file(".", n, "ema").name for n in self.emas]
        missing = [f for f in needed if not (folder / f).is_file()]
        if missing:
            raise CheckpointError(f"{folder}: incomplete or not a checkpoint of these models; missing {missing}")
        state = safe_load(folder / STATE_FILE)  # plain data and tensors only: nothing in the file can execute code
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise CheckpointError(f"{folder / STATE_FILE}: not a training state written by utils/training.py")
        for what, saved, ours in (("models", state["models"], sorted(self.raw_models)),
                                  ("optimisers", sorted(state["optimizers"]), sorted(self.optimizers)),
                                  ("EMAs", state["emas"], sorted(self.emas))):
            if saved != ours:
                raise CheckpointError(f"{folder}: the checkpoint has {what} {saved}, this run has {ours}")
        changed = _config_diff(state["config"], self.run_config)
        if changed:
            self._print("resume: the run config differs from the checkpoint's (the current values apply):\n  "
                        + "\n  ".join(changed))

        for name, model in self.raw_models.items():
            path = weights_file(folder, name, "model")
            sd, config, _ = load_checkpoint(path)
            diff = _config_diff(config, json.loads(json.dumps(self.model_configs[name])))
            if diff:
                raise CheckpointError(f"{path}: the model config differs from this run's:\n  " + "\n  ".join(diff))
            load_state_dict_strict(model, sd, source=str(path))
        for name, ema in self.emas.items():
            path = weights_file(folder, name, "ema")
            ema.load_state_dict(load_checkpoint(path)[0], source=str(path))
        for name, opt in self.optimizers.items():
            try:
                opt.load_state_dict(state["optimizers"][name])
            except (ValueError, KeyError, RuntimeError) as exc:
                raise CheckpointError(f"{folder / STATE_FILE}: optimiser {name!r} does not fit this run's "
                                      f"parameters: {exc}") from exc
        scaler = self.accelerator.scaler
        if scaler is not None and state["scaler"] is not None:
            scaler.load_state_dict(state["scaler"])

        self.step = self._saved_step = int(state["step"])
        self.nonfinite_total = int(state["nonfinite_total"])
        self.nonfinite_in_a_row = int(state["nonfinite_in_a_row"])
        self.sampler.load_state_dict(state["sampler"])
        self._batches = None
        if state["world_size"] == self.world_size:
            _set_rng_state(state["rng"][self.rank])
        else:  # the per-rank streams cannot be mapped; stay deterministic at least
            self._print(f"resume: saved with {state['world_size']} processes, now {self.world_size}: "
                        f"RNG streams are reseeded, the data position is converted")
            seed_everything(_mixed_seed(self.cfg.seed, self.step, self.rank) % 2**63)
        self.last_checkpoint = folder
        self._reset_window()
        self._print(f"resumed from {folder} at step {self.step} (epoch {self.epoch}, "
                    f"{self.sampler.consumed} samples into it per process)")

    def close(self) -> None:
        """Call once at the end of the script: flushes TensorBoard and ends the process group (a process that exits
        with gloo/NCCL threads still running can abort in its C++ teardown and report a failure)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self._lock is not None:
            self._lock.release()
        # Quiesce before the process group goes: every rank past its last collective, and the DDP wrappers (whose
        # reducers also hold the group) released. Otherwise gloo's worker thread may still be freeing the last
        # collective's tensors, which needs the GIL, while the group's destructor joins it holding the GIL.
        self.accelerator.wait_for_everyone()
        self.models = dict(self.raw_models)
        self.accelerator.free_memory()  # drops accelerate's own references to the wrappers, then collects
        self.accelerator.end_training()


def _has_grads(opt) -> bool:
    return any(p.grad is not None for g in opt.param_groups for p in g["params"])
