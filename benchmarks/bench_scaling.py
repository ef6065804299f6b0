"""Scaling over the GPUs of one host: the trainers and sharded inference with 1, 2, 4, 8 processes.

    python benchmarks/bench_scaling.py --procs 1 2 4 8                         # paper scale, one process per GPU
    python benchmarks/bench_scaling.py --procs 1 2 --cpu --tiny --steps 6      # gloo on the CPU: the benchmark itself

Trainers: `accelerate launch --num_processes N benchmarks/bench_trainers.py` (torchrun with --cpu) on data of the paper's shapes written
once (bench_trainers.make_data), at the paper's per-process batch; samples/s = N x per-process batch / median
optimiser step, efficiency = samples/s at N over N x samples/s at 1, peak memory per GPU, and at the largest N the
time spent in gradient all-reduce per step (torch.profiler). Inference: `accelerate launch --num_processes N
inference_dpm_latent.py` over the clips of a benchmarks/bench_end_to_end.py root (--e2e-root; skipped without one),
with a random canonical of --gaussians per clip: videos per minute from launch to exit, and the outputs of each clip
compared with the 1-process run's (they must be identical files: the same inputs, seeds and weights on each shard).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def launch(n: int, cpu: bool, script: str, args: list[str]) -> list[str]:
    """N processes of one host: accelerate's launcher on GPUs; torchrun on the CPU (accelerate launch --cpu starts
    one process whatever --num_processes says)."""
    if cpu:
        return [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", str(n), script,
                *args]
    accelerate = Path(sys.executable).with_name("accelerate")
    return [str(accelerate), "launch", "--num_processes", str(n), "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", *(["--multi_gpu"] if n > 1 else []), script, *args]


def trainers(args) -> list[dict]:
    data = args.work / "data"
    if not data.exists():  # written once by one process (bench_trainers refuses to write it under a launcher)
        subprocess.run([sys.executable, "benchmarks/bench_trainers.py", "--data", str(data), "--steps", "1",
                        "--warmup", "0", "--cases", "dit", *(["--tiny"] if args.tiny else [])], cwd=ROOT, check=True)
    rows = []
    for n in args.procs:
        for case in args.cases:  # one launch per trainer: a process group lives as long as its processes
            out = args.work / f"trainers_{n}_{case}.json"
            profile = ["--profile", "3"] if n == max(args.procs) and n > 1 else []
            cmd = launch(n, args.cpu, "benchmarks/bench_trainers.py",
                         ["--data", str(data), "--steps", str(args.steps), "--warmup", str(args.warmup), "--cases", case,
                          "--json", str(out), *profile, *(["--tiny"] if args.tiny else []),
                          *(["--precision", "no"] if args.cpu else [])])
            subprocess.run(cmd, cwd=ROOT, check=True)
            for r in json.loads(out.read_text()):
                rows.append({**r, "procs": n,
                             "samples_per_s": n * r["samples_per_step_per_process"] / r["median_step_s"]})
    return rows


def digest(folder: Path) -> dict[str, str]:
    """Per file of a result folder (summary.json left out: it holds timings), its SHA-256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "summary.json"}


def canonicals(root: Path, folder: Path, count: int) -> Path:
    """A random canonical PLY per clip (a shell of `count` small Gaussians): the motion stage at a fixed size, without
    the image-to-3D stage, whose random weights would decode an arbitrary occupancy."""
    import torch

    from utils.gaussians import Gaussians, write_ply
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for clip in sorted((root / "videos").glob("*.mp4")):
        if not (folder / f"{clip.stem}.ply").is_file():
            xyz = torch.nn.functional.normalize(torch.randn(count, 3, generator=g), dim=-1) * 0.35
            rgb, quat = torch.rand(count, 3, generator=g), torch.tensor([1.0, 0, 0, 0]).expand(count, 4)
            g_ = Gaussians.from_activated(xyz, rgb, torch.full((count, 1), 0.9), torch.full((count, 3), 0.01), quat)
            write_ply(g_, folder / f"{clip.stem}.ply")
    return folder


def inference(args) -> list[dict]:
    root = args.e2e_root
    canon = canonicals(root, args.work / "canonicals", args.gaussians)
    rows, reference = [], None
    for n in args.procs:
        out = args.work / f"inference_{n}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = launch(n, args.cpu, "inference_dpm_latent.py",
                     ["--pack", str(root / "pack"), "--input", str(root / "videos"), "--canonical", str(canon),
                      "--dinov2", str(root / "dinov2"), "--matting", "threshold", "--out", str(out),
                      *([] if args.cpu else ["--precision", "bf16", "--compile"])])
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True)
        wall = time.perf_counter() - t0
        clips = sorted(p.name for p in out.iterdir() if (p / "summary.json").is_file())
        files = {c: digest(out / c) for c in clips}
        reference = reference or files
        rows.append({"procs": n, "videos": len(clips), "wall_s": wall, "videos_per_minute": 60 * len(clips) / wall,
                     "identical_to_one_process": files == reference})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_scaling"), help="data, runs and outputs")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--tiny", action="store_true", help="the tiny configs")
    ap.add_argument("--cases", nargs="+", default=["vae_static", "vae_joint", "dit"], help="bench_trainers.py cases")
    ap.add_argument("--cpu", action="store_true", help="CPU processes talking over gloo")
    ap.add_argument("--e2e-root", type=Path, help="a bench_end_to_end.py root: also time sharded inference on it")
    ap.add_argument("--gaussians", type=int, default=160_000, help="inference: Gaussians of each clip's canonical")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    rows = trainers(args)
    one = {r["key"]: r["samples_per_s"] for r in rows if r["procs"] == 1}
    print("\n| trainer | processes | samples/s | scaling efficiency | median step (ms) | peak GiB per GPU | "
          "all-reduce ms/step |\n|---|---|---|---|---|---|---|")
    for r in rows:
        eff = r["samples_per_s"] / (r["procs"] * one[r["key"]]) if r["key"] in one else float("nan")
        peak = "–" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        ar = "–" if r["allreduce_ms_per_step"] is None else f"{r['allreduce_ms_per_step']:.1f}"
        print(f"| {r['case']} | {r['procs']} | {r['samples_per_s']:.2f} | {eff:.0%} | {r['median_step_s'] * 1e3:.0f} | "
              f"{peak} | {ar} |")
    if args.e2e_root:
        inf = inference(args)
        base = inf[0]["videos_per_minute"]
        print("\n| inference processes | videos | videos/min | speed-up | files equal to 1 process |\n"
              "|---|---|---|---|---|")
        for r in inf:
            print(f"| {r['procs']} | {r['videos']} | {r['videos_per_minute']:.1f} | "
                  f"{r['videos_per_minute'] / base:.2f}x | {r['identical_to_one_process']} |")
    (args.work / "results.json").write_text(json.dumps({"trainers": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
