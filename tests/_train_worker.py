"""Toy model, data and loop factory for tests/test_training.py, and the script its subprocess tests run.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_train_worker.py dist OUT [gpu]
    python tests/_train_worker.py sigterm OUT
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from utils.training import LoopConfig, TrainLoop  # noqa: E402

DIM = 4


class ToyData(Dataset):
    """Fixed inputs and targets of a noisy linear map; `noise` adds per-access jitter from the global torch RNG."""

    def __init__(self, n: int = 18, noise: float = 0.0):
        gen = torch.Generator().manual_seed(123)
        self.x = torch.randn(n, DIM, generator=gen)
        self.y = self.x @ torch.randn(DIM, generator=gen) + 0.1 * torch.randn(n, generator=gen)
        self.noise = noise

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        x = self.x[i] + self.noise * torch.randn(DIM) if self.noise else self.x[i]
        return {"index": i, "x": x, "y": self.y[i]}


class ToyMLP(nn.Module):
    def __init__(self, hidden: int = 16, dropout: float = 0.2):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(DIM, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 1))
        self.register_buffer("seen", torch.zeros(()))  # a buffer: the EMA must copy it, not average it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.seen += x.shape[0]
        return self.net(x).squeeze(-1)


def reset_accelerate() -> None:
    """accelerate keeps process-wide singletons; tests build several loops (and precisions) in one process."""
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def make_loop(out, *, n=18, noise=0.1, dropout=0.2, init_seed=0, lr=1e-2, step_fn=None, reset=True,
              run_config=None, model_config=None, cpu=True, **cfg):
    """A TrainLoop over ToyMLP/ToyData. Returns (loop, record): record holds per-micro-step data indices and LRs."""
    if reset:
        reset_accelerate()
    torch.manual_seed(init_seed)
    model = ToyMLP(dropout=dropout)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    record = {"indices": [], "lrs": [], "autocast": []}

    def mse_step(batch, loop):
        record["indices"].append((loop.step, loop.micro_step, batch["index"].tolist()))
        record["lrs"].append((loop.step, loop.micro_step, loop.optimizers["mlp"].param_groups[0]["lr"]))
        record["autocast"].append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        pred = loop.models["mlp"](batch["x"])
        loss = ((pred.float() - batch["y"]) ** 2).mean()
        if step_fn is not None:
            loss = step_fn(loss, pred, loop)
        return loss, {"mse": loss.detach()}

    resume = cfg.pop("resume", None)
    settings = dict(max_steps=8, batch_size=2, grad_accum=2, warmup_steps=5, grad_clip=1.0, ema_rate=0.9,
                    mixed_precision="no", seed=0, log_interval=2, save_interval=4, keep_last=3, progress=False,
                    tensorboard=False)
    settings.update(cfg)
    loop = TrainLoop(models={"mlp": model}, optimizers={"mlp": opt}, dataset=ToyData(n, noise), step_fn=mse_step,
                     out_dir=out, cfg=LoopConfig(**settings),
                     run_config=run_config or {"train": {"lr": lr}, "model": {"hidden": 16}},
                     model_configs={"mlp": model_config or {"hidden": 16, "dropout": dropout}},
                     resume=resume, cpu=cpu)
    return loop, record


# The two-process run: 16 samples, 1 per rank per micro-step, 2 micro-steps, 2 ranks = 4 samples per step,
# so 4 steps are exactly one epoch. test_training.py compares it with one process taking 4 samples per step.
DIST = dict(n=16, noise=0.0, dropout=0.0, init_seed=0, lr=1e-2, max_steps=4, warmup_steps=3, grad_clip=0.5,
            ema_rate=0.9, save_interval=2)


def run_dist(out: Path, cpu: bool = True) -> None:
    settings = dict(DIST, batch_size=1, grad_accum=2, cpu=cpu)
    loop, record = make_loop(out / "run", reset=False, **settings)
    loop.run()
    rank = loop.rank
    result = {"rank": rank, "world_size": loop.world_size, "indices": record["indices"], "lrs": record["lrs"],
              "distributed_type": str(loop.accelerator.distributed_type)}
    if rank == 0:
        torch.save({"model": {k: v.cpu() for k, v in loop.raw_models["mlp"].state_dict().items()},
                    "ema": {k: v.cpu() for k, v in loop.emas["mlp"].state_dict().items()}}, out / "final.pt")
    # Resume in the same processes: every rank restores its own RNG state and data position, then trains on.
    loop2, _ = make_loop(out / "run", reset=False, resume="latest", **dict(settings, max_steps=5))
    result["resumed_step"] = loop2.step
    result["resumed_consumed"] = loop2.sampler.consumed
    result["after_resume"] = loop2.run().step
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    loop2.close()


def run_sigterm(out: Path) -> None:
    started = out / "started"

    def slow(loss, pred, loop):
        time.sleep(0.02)
        if loop.step >= 3:
            started.touch()
        return loss

    loop, _ = make_loop(out / "run", step_fn=slow, max_steps=100_000, save_interval=1_000_000, log_interval=1000)
    result = loop.run()
    loop.close()
    print(json.dumps({"stopped_by_signal": result.stopped_by_signal, "step": result.step,
                      "checkpoint": str(result.checkpoint)}), flush=True)


if __name__ == "__main__":
    mode, out = sys.argv[1], Path(sys.argv[2])
    if mode == "dist":
        run_dist(out, cpu=sys.argv[3:] != ["gpu"])  # gpu: one GPU per process, NCCL
    else:
        run_sigterm(out)
