"""utils/training.py: the shared training loop. Expectations come from first principles (the analytic warm-up ramp,
an uninterrupted run, one process on the combined batch), never from the loop's own bookkeeping.

Toy model, data and loop factory: tests/_train_worker.py (also the script of the subprocess tests).
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import utils.training as training
from _train_worker import DIST, ToyMLP, make_loop, reset_accelerate
from utils.checkpoint import CheckpointError, load_checkpoint
from utils.training import (EMA, LoopConfig, NonFiniteLossError, ResumableSampler, TrainLoop, list_checkpoints,
                            resolve_checkpoint, warmup_factor)

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "_train_worker.py"


@pytest.fixture(autouse=True)
def _fresh_accelerate():
    yield
    reset_accelerate()


def weights(loop) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in loop.raw_models["mlp"].state_dict().items()}


def optimizer_tensors(loop) -> dict[str, torch.Tensor]:
    sd = loop.optimizers["mlp"].state_dict()
    return {f"{pid}.{k}": v.clone() for pid, s in sd["state"].items() for k, v in s.items()}


def assert_bitwise(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{what}: {k} differs"


# ---------------------------------------------------------------------------------------------- pure pieces

def test_warmup_factor_is_the_linear_ramp():
    assert [warmup_factor(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0 and warmup_factor(7, 1) == 1.0


def test_sampler_shards_are_disjoint_equal_and_cover_the_epoch():
    n, world = 20, 4
    shards = [ResumableSampler(n, num_replicas=world, rank=r, seed=3) for r in range(world)]
    lists = [list(s) for s in shards]
    assert all(len(x) == 5 for x in lists)
    assert sorted(i for x in lists for i in x) == list(range(n))
    # Strided: position k of every rank together is one contiguous slice of the single-process order.
    single = list(ResumableSampler(n, seed=3))
    assert single != list(range(n))  # shuffled
    for k in range(5):
        assert {x[k] for x in lists} == set(single[k * world:(k + 1) * world])
    # Same (seed, epoch) -> same order; another epoch -> another order.
    assert list(ResumableSampler(n, num_replicas=world, rank=1, seed=3)) == lists[1]
    shards[1].set_epoch(1)
    assert list(shards[1]) != lists[1]


def test_sampler_pads_or_truncates_to_equal_counts():
    padded = [list(ResumableSampler(10, num_replicas=3, rank=r)) for r in range(3)]
    assert [len(x) for x in padded] == [4, 4, 4]
    assert set(i for x in padded for i in x) == set(range(10))
    dropped = [list(ResumableSampler(10, num_replicas=3, rank=r, drop_last=True)) for r in range(3)]
    assert [len(x) for x in dropped] == [3, 3, 3]
    assert len(set(i for x in dropped for i in x)) == 9


def test_sampler_resumes_at_the_exact_position():
    s = ResumableSampler(12, num_replicas=2, rank=1, seed=5)
    s.set_epoch(2)
    full = list(s)
    s.consumed = 4
    state = s.state_dict()
    t = ResumableSampler(12, num_replicas=2, rank=1, seed=5)
    t.load_state_dict(state)
    assert (t.epoch, len(t)) == (2, 2) and list(t) == full[4:]
    # Half the processes: the same global position (4 samples x 2 ranks = 8 of the epoch's order).
    one = ResumableSampler(12, num_replicas=1, rank=0, seed=5)
    one.load_state_dict(state)
    whole = ResumableSampler(12, seed=5)
    whole.set_epoch(2)
    assert one.consumed == 8 and list(one) == list(whole)[8:]


def test_ema_averages_parameters_copies_buffers_and_swaps_back():
    torch.manual_seed(0)
    model = ToyMLP(dropout=0.0)
    w0 = model.net[0].weight.detach().clone()
    ema = EMA(model, rate=0.75)
    with torch.no_grad():
        model.net[0].weight.add_(4.0)
        model.seen.fill_(7.0)
    ema.update(model)
    # 0.75 * w0 + 0.25 * (w0 + 4) = w0 + 1
    torch.testing.assert_close(ema.shadow["net.0.weight"], w0 + 1.0)
    assert float(ema.shadow["seen"]) == 7.0  # a buffer is copied, not averaged
    live = model.net[0].weight.detach().clone()
    with ema.applied_to(model):
        torch.testing.assert_close(model.net[0].weight, w0 + 1.0)
    assert torch.equal(model.net[0].weight, live)


# ---------------------------------------------------------------------------------------------- exact resume

def test_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    # 18 samples, 4 per optimiser step: epochs end in the middle of step 4; step 4 is mid-warm-up (5 steps).
    straight, rec_a = make_loop(tmp_path / "a", tensorboard=True)
    assert straight.run().step == 8

    class Killed(Exception):
        pass

    def die_after_checkpoint(loss, pred, loop):
        if loop.step == 5:  # step 5 runs partly (data, RNG, a forward) after the step-4 checkpoint, then dies
            raise Killed
        return loss

    first, _ = make_loop(tmp_path / "b", step_fn=die_after_checkpoint)
    with pytest.raises(Killed):
        first.run()
    assert (tmp_path / "b/checkpoints/latest").read_text().strip() == "step_0000004"

    # A new process: other initial weights, which the resume must overwrite.
    resumed, rec_b = make_loop(tmp_path / "b", init_seed=99, resume="latest")
    assert resumed.step == 4 and resumed.epoch == 0 and resumed.sampler.consumed == 16
    assert resumed.run().step == 8

    assert_bitwise(weights(straight), weights(resumed), "live weights")
    assert_bitwise(straight.emas["mlp"].state_dict(), resumed.emas["mlp"].state_dict(), "EMA weights")
    assert_bitwise(optimizer_tensors(straight), optimizer_tensors(resumed), "optimiser state")
    assert [x for x in rec_a["indices"] if x[0] >= 4] == rec_b["indices"]  # the same samples in the same order
    assert [x for x in rec_a["lrs"] if x[0] >= 4] == rec_b["lrs"]
    # The two step-8 checkpoints hold the same live and EMA weights.
    for f in ("model_mlp.safetensors", "ema_mlp.safetensors"):
        sd_a, cfg_a, extra_a = load_checkpoint(tmp_path / "a/checkpoints/step_0000008" / f)
        sd_b, cfg_b, extra_b = load_checkpoint(tmp_path / "b/checkpoints/step_0000008" / f)
        assert_bitwise(sd_a, sd_b, f)
        assert cfg_a == {"hidden": 16, "dropout": 0.2} and extra_a["step"] == 8
    # EMA and live weights are different things: the resumed live weights were not taken from the EMA.
    assert not torch.equal(weights(resumed)["net.0.weight"], resumed.emas["mlp"].shadow["net.0.weight"])
    assert list((tmp_path / "a/tensorboard").glob("events.*"))

    # The comparison can fail: with another loop seed (dropout masks, augmentation, data order) weights differ.
    other, _ = make_loop(tmp_path / "c", seed=1, max_steps=4)
    other.run()
    reference, _ = make_loop(tmp_path / "d", max_steps=4)
    reference.run()
    assert not torch.equal(weights(other)["net.0.weight"], weights(reference)["net.0.weight"])


def test_resume_validates_and_reports(tmp_path):
    loop, _ = make_loop(tmp_path / "x", max_steps=4)
    loop.run()
    folder = tmp_path / "x/checkpoints/step_0000004"
    # A checkpoint folder, the checkpoints folder or the experiment folder all name it.
    for where in (folder, tmp_path / "x/checkpoints", tmp_path / "x"):
        assert resolve_checkpoint(where, tmp_path / "elsewhere") == folder
    # Another model configuration: refused, naming the file and the key.
    with pytest.raises(CheckpointError, match=r"(?s)model_mlp\.safetensors.*hidden: 16 -> 32"):
        make_loop(tmp_path / "x", resume="latest", model_config={"hidden": 32, "dropout": 0.2})
    # A missing file is listed.
    (folder / "ema_mlp.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing.*ema_mlp.safetensors"):
        make_loop(tmp_path / "x", resume=folder)
    # An explicit path that is no checkpoint is an error; "latest" with none yet starts at step 0.
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        make_loop(tmp_path / "y", resume=tmp_path / "nothing")
    fresh, _ = make_loop(tmp_path / "z", resume="latest")
    assert fresh.step == 0


def test_keep_last_and_no_checkpoint_at_step_zero(tmp_path):
    loop, _ = make_loop(tmp_path, max_steps=7, save_interval=1, keep_last=2)
    loop.run(max_steps=0)
    assert not (tmp_path / "checkpoints").exists()  # nothing trained, nothing saved
    loop.run()
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [6, 7]
    assert resolve_checkpoint("latest", tmp_path / "checkpoints").name == "step_0000007"


# ---------------------------------------------------------------------------------------------- atomic checkpoints

def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    loop, _ = make_loop(tmp_path, max_steps=8, save_interval=4)
    loop.run(max_steps=4)
    ckpts = tmp_path / "checkpoints"
    before = weights(loop)

    real = training.save_checkpoint
    calls = []

    def failing(path, *args, **kwargs):  # the model file is written, then the EMA file "crashes"
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(training, "save_checkpoint", failing)
    with pytest.raises(OSError, match="simulated"):
        loop.run(max_steps=8)
    assert len(calls) == 2
    assert (ckpts / "latest").read_text().strip() == "step_0000004"
    assert [p.name for p in ckpts.iterdir() if p.is_dir()] == ["step_0000004"]  # the partial folder was removed

    # A crash that cannot clean up (kill -9 in the middle of a save): the half-written folder stays behind.
    calls.clear()
    monkeypatch.setattr(training.shutil, "rmtree", lambda *a, **k: None)
    with pytest.raises(OSError, match="simulated"):
        loop.save()
    monkeypatch.undo()
    leftovers = [p for p in ckpts.iterdir() if p.is_dir() and p.name != "step_0000004"]
    assert len(leftovers) == 1 and (leftovers[0] / "model_mlp.safetensors").is_file()  # really half-written
    assert (ckpts / "latest").read_text().strip() == "step_0000004"
    (ckpts / "latest").unlink()  # even without the pointer, the half-written folder is never taken
    assert [s for s, _ in list_checkpoints(ckpts)] == [4]
    again, _ = make_loop(tmp_path, resume="latest")
    assert again.step == 4
    assert_bitwise(before, weights(again), "weights of the step-4 checkpoint")


def test_a_non_finite_model_is_never_saved(tmp_path):
    loop, _ = make_loop(tmp_path, max_steps=2, save_interval=2)
    loop.run()
    with torch.no_grad():
        loop.raw_models["mlp"].net[3].bias.fill_(float("nan"))
    loop.step = 3
    with pytest.raises(CheckpointError, match="non-finite"):
        loop.save()
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [2]
    assert (tmp_path / "checkpoints/latest").read_text().strip() == "step_0000002"


# ---------------------------------------------------------------------------------------------- non-finite steps

def test_a_non_finite_loss_or_gradient_skips_the_step(tmp_path):
    def poison(loss, pred, loop):
        if loop.step == 2 and loop.micro_step == 1:
            return loss * float("nan")  # NaN loss on one micro-step: the whole optimiser step goes
        if loop.step == 3 and loop.micro_step == 0:
            # finite loss (0 * sqrt(0) = 0) whose gradient is NaN (0 * inf)
            return loss + 0.0 * torch.sqrt((pred - pred.detach()).abs().sum())
        return loss

    loop, rec = make_loop(tmp_path, step_fn=poison, max_steps=6)
    loop.run(max_steps=2)
    w, ema, opt = weights(loop), dict(loop.emas["mlp"].shadow), optimizer_tensors(loop)
    ema = {k: v.clone() for k, v in ema.items()}
    loop.run(max_steps=4)
    assert loop.nonfinite_total == 2 and loop.nonfinite_in_a_row == 2
    params = {k: v for k, v in weights(loop).items() if k != "seen"}  # the buffer counts forwards, fine
    assert_bitwise({k: w[k] for k in params}, params, "weights across skipped steps")
    assert_bitwise({k: v for k, v in ema.items() if k != "seen"},
                   {k: v for k, v in loop.emas["mlp"].shadow.items() if k != "seen"}, "EMA across skipped steps")
    assert_bitwise(opt, optimizer_tensors(loop), "optimiser state across skipped steps")
    assert all(p.grad is None for p in loop.raw_models["mlp"].parameters())
    result = loop.run()
    assert result.step == 6 and result.nonfinite_steps == 2 and loop.nonfinite_in_a_row == 0
    assert not torch.equal(weights(loop)["net.0.weight"], w["net.0.weight"])  # training went on
    assert len({tuple(i) for _, _, i in rec["indices"]}) > 4  # and the data moved on through the skips


def test_too_many_non_finite_steps_in_a_row_stop_training(tmp_path):
    loop, _ = make_loop(tmp_path, step_fn=lambda loss, pred, loop: loss * float("inf"), max_nonfinite_in_a_row=2)
    w = weights(loop)
    with pytest.raises(NonFiniteLossError, match="3 optimiser steps in a row"):
        loop.run()
    assert loop.step == 2
    assert torch.equal(w["net.0.weight"], weights(loop)["net.0.weight"])


# ---------------------------------------------------------------------------------------------- warm-up

def test_lr_follows_the_analytic_ramp_per_optimiser_step(tmp_path):
    lr, warm = 0.1, 5
    expected = [lr * min(1.0, (s + 1) / warm) for s in range(7)]
    for accum, batch in ((1, 4), (2, 2), (4, 1)):
        loop, rec = make_loop(tmp_path / f"a{accum}", lr=lr, warmup_steps=warm, max_steps=7, grad_accum=accum,
                              batch_size=batch, save_interval=None)
        loop.run()
        per_step = {}
        for step, micro, value in rec["lrs"]:
            per_step.setdefault(step, set()).add(value)  # constant over the micro-steps of a step
        assert [per_step[s] for s in range(7)] == [{e} for e in expected], f"grad_accum {accum}"


# ---------------------------------------------------------------------------------------------- two processes

@pytest.mark.parametrize("backend", ["gloo", pytest.param("nccl", marks=pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"))])
def test_two_processes_equal_one_process_on_the_combined_batch(tmp_path, backend):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKER), "dist", str(tmp_path)] + (["gpu"] if backend == "nccl" else [])
    # Its own session, so that a hung run is ended with all of its processes (and only those).
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert {r["distributed_type"] for r in ranks} == {"DistributedType.MULTI_CPU" if backend == "gloo"
                                                      else "DistributedType.MULTI_GPU"}

    # Each rank saw a disjoint shard; together one whole epoch (4 steps x 4 samples = 16).
    seen = [[i for _, _, idx in r["indices"] for i in idx] for r in ranks]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(16))

    # One process, 4 samples per step, no accumulation.
    single, rec = make_loop(tmp_path / "single", batch_size=4, grad_accum=1, **DIST)
    single.run()
    for step in range(4):
        together = {i for r in ranks for s, _, idx in r["indices"] if s == step for i in idx}
        assert together == {i for s, _, idx in rec["indices"] if s == step for i in idx}
    lrs = [[v for s, m, v in r["lrs"] if m == 0] for r in ranks]
    assert lrs[0] == lrs[1] == [v for _, _, v in rec["lrs"]] == [0.01 * min(1, (s + 1) / 3) for s in range(4)]

    final = torch.load(tmp_path / "final.pt", weights_only=True)
    for k, v in single.raw_models["mlp"].named_parameters():
        torch.testing.assert_close(final["model"][k], v.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(final["ema"][k], single.emas["mlp"].shadow[k], rtol=1e-5, atol=1e-6)
    assert not torch.equal(final["model"]["net.0.weight"], ToyMLP(dropout=0.0).net[0].weight)

    # The 2-process checkpoint holds both ranks' RNG states, and both ranks resumed at the saved position.
    state = torch.load(tmp_path / "run/checkpoints/step_0000004/training_state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    assert [(r["resumed_step"], r["resumed_consumed"], r["after_resume"]) for r in ranks] == [(4, 8, 5)] * 2


# ---------------------------------------------------------------------------------------------- signals

def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, str(WORKER), "sigterm", str(tmp_path)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "started").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the worker never started training"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["stopped_by_signal"] is True and 3 <= result["step"] < 100_000
    name = f"step_{result['step']:07d}"
    assert (tmp_path / "run/checkpoints/latest").read_text().strip() == name
    loop, _ = make_loop(tmp_path / "run", resume="latest")
    assert loop.step == result["step"]


# ---------------------------------------------------------------------------------------------- logging

def test_scalars_and_images_reach_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def with_images(loss, pred, loop):
        if loop.step == 1 and loop.micro_step == 0:
            loop.log_images("train/chw", torch.rand(3, 8, 8))
            loop.log_images("train/hwc_uint8", torch.randint(0, 255, (8, 8, 3), dtype=torch.uint8))
        return loss

    loop, _ = make_loop(tmp_path, step_fn=with_images, max_steps=4, tensorboard=True)
    loop.run()
    loop.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0, "scalars": 0}).Reload()
    assert set(events.Tags()["images"]) == {"train/chw", "train/hwc_uint8"}
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4]  # every log_interval optimiser steps
    assert [e.value for e in events.Scalars("lr/mlp")] == pytest.approx([0.01 * 2 / 5, 0.01 * 4 / 5])
    assert {"train/mse", "train/samples_per_s", "grad_norm/mlp", "train/nonfinite_steps"} <= set(events.Tags()["scalars"])


# ---------------------------------------------------------------------------------------------- precision

@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_fp32_and_bf16_run_on_cpu_without_a_scaler(tmp_path, monkeypatch, precision):
    def no_scaler(*args, **kwargs):
        raise AssertionError("a GradScaler was created")

    monkeypatch.setattr(torch.amp.GradScaler, "__init__", no_scaler)
    loop, rec = make_loop(tmp_path, mixed_precision=precision, max_steps=3, save_interval=3)
    w = weights(loop)
    result = loop.run()
    assert loop.accelerator.scaler is None and result.step == 3 and result.nonfinite_steps == 0
    assert all(torch.isfinite(v).all() for v in weights(loop).values())
    assert not torch.equal(w["net.0.weight"], weights(loop)["net.0.weight"])
    enabled = {e for e, _ in rec["autocast"]}
    assert enabled == {precision == "bf16"}
    if precision == "bf16":
        assert {d for _, d in rec["autocast"]} == {torch.bfloat16}
    state = torch.load(tmp_path / "checkpoints/step_0000003/training_state.pt", weights_only=True)
    assert state["scaler"] is None


def test_fp16_on_cpu_is_refused_clearly(tmp_path):
    with pytest.raises(ValueError, match="fp16.*GPU"):
        make_loop(tmp_path, mixed_precision="fp16")


def test_loop_config_takes_its_keys_from_a_train_block():
    cfg = LoopConfig.from_mapping({"batch_size": 2, "grad_accum": 2, "lr": 5e-5, "warmup_steps": 1000,
                                   "max_steps": 10, "ema_rate": 0.9999, "grad_clip": 1.0, "save_interval": 5})
    assert (cfg.batch_size, cfg.grad_accum, cfg.warmup_steps, cfg.ema_rate, cfg.save_interval) == \
        (2, 2, 1000, 0.9999, 5)
    # The shipped configs' train blocks feed it directly (tiny VAE: batch 1, warm-up 10, 200 steps, save every 100).
    from utils.config import load_config
    tiny = LoopConfig.from_mapping(load_config(ROOT / "configs/tiny/vae.yml").train)
    assert (tiny.batch_size, tiny.warmup_steps, tiny.max_steps, tiny.save_interval) == (1, 10, 200, 100)
    with pytest.raises(ValueError, match="grad_accum"):
        LoopConfig(max_steps=1, grad_accum=0)
    assert math.isclose(warmup_factor(499, 1000), 0.5)


# ---------------------------------------------------------------------------------------------- GPU precisions

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def two_model_loop(out, precision, overflow_step=None):
    """Two models with their own optimisers (AdamW and plain SGD); SGD's update shows any unscaling error."""
    from _train_worker import ToyData
    reset_accelerate()
    torch.manual_seed(0)
    models = {"a": ToyMLP(dropout=0.0), "b": ToyMLP(dropout=0.0)}
    optimizers = {"a": torch.optim.AdamW(models["a"].parameters(), lr=1e-3),
                  "b": torch.optim.SGD(models["b"].parameters(), lr=1e-3)}

    def step_fn(batch, loop):
        # x 1e-3: fp16 gradients at the initial scale 65536 must not overflow on ordinary steps
        loss = 1e-3 * sum(((loop.models[n](batch["x"]).float() - batch["y"]) ** 2).mean() for n in ("a", "b"))
        if loop.step == overflow_step:
            loss = loss * 1e30  # finite in fp32, but its fp16 gradients overflow
        return loss, {}

    cfg = LoopConfig(max_steps=4, batch_size=4, grad_accum=2, mixed_precision=precision, ema_rate=0.9,
                     save_interval=4, progress=False, tensorboard=False)
    loop = TrainLoop(models=models, optimizers=optimizers, dataset=ToyData(32), step_fn=step_fn, out_dir=out,
                     cfg=cfg, cpu=False)
    return loop


@cuda
def test_fp16_scaler_with_two_optimisers_on_gpu(tmp_path):
    ref = two_model_loop(tmp_path / "fp32", "no")
    b0 = ref.raw_models["b"].net[0].weight.detach().clone()
    ref.run(max_steps=1)
    sgd_step_fp32 = ref.raw_models["b"].net[0].weight.detach() - b0

    loop = two_model_loop(tmp_path / "fp16", "fp16", overflow_step=2)
    assert loop.accelerator.scaler is not None
    loop.run(max_steps=1)
    # One SGD step in fp16 equals the fp32 one up to fp16 rounding: the gradients were unscaled exactly once.
    sgd_step_fp16 = loop.raw_models["b"].net[0].weight.detach() - b0
    torch.testing.assert_close(sgd_step_fp16, sgd_step_fp32, rtol=0.05, atol=1e-7)
    loop.run(max_steps=2)
    before = {n: {k: v.clone() for k, v in m.state_dict().items() if k != "seen"} for n, m in loop.raw_models.items()}
    ema_before = {n: e.shadow["net.0.weight"].clone() for n, e in loop.emas.items()}
    scale = loop.accelerator.scaler.get_scale()
    loop.run(max_steps=3)  # the overflow: the scaler skips the step and lowers the scale; not a "non-finite loss"
    assert loop.accelerator.scaler.get_scale() < scale and loop.nonfinite_total == 0
    for n, m in loop.raw_models.items():
        assert_bitwise(before[n], {k: v for k, v in m.state_dict().items() if k != "seen"}, f"model {n}")
        assert torch.equal(ema_before[n], loop.emas[n].shadow["net.0.weight"])  # no EMA update on a skipped step
    result = loop.run()
    assert result.step == 4
    state = torch.load(tmp_path / "fp16/checkpoints/step_0000004/training_state.pt", weights_only=True)
    assert state["scaler"]["scale"] == loop.accelerator.scaler.get_scale()
    assert state["rng"][0]["cuda"] is not None
    resumed = two_model_loop(tmp_path / "fp16", "fp16")
    resumed.load(tmp_path / "fp16/checkpoints/step_0000004")
    assert resumed.accelerator.scaler.get_scale() == loop.accelerator.scaler.get_scale()


@cuda
def test_bf16_on_gpu_needs_no_scaler(tmp_path):
    loop = two_model_loop(tmp_path, "bf16")
    w = loop.raw_models["a"].net[0].weight.detach().clone()
    result = loop.run()
    assert loop.accelerator.scaler is None and result.nonfinite_steps == 0
    assert not torch.equal(w, loop.raw_models["a"].net[0].weight)
