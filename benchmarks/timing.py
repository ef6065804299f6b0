"""Shared by the benchmarks: median wall time per call with device synchronisation, peak GPU memory, and the tests'
reference helpers (tests/ is not a package)."""
from __future__ import annotations

import importlib.util
import statistics
import time
from pathlib import Path

import torch


def tests_module(name: str):
    """tests/<name>.py loaded from its file (the brute-force references the benchmarks compare against)."""
    path = Path(__file__).resolve().parents[1] / "tests" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure(fn, repeats: int, device: torch.device, warmup: int = 2) -> tuple[float, float]:
    """Median seconds per call over `repeats` timed calls after `warmup` untimed ones (compilation, allocator), and the
    peak GPU memory (GiB) during the timed calls (nan on the CPU)."""
    cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), (torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"))
