r"""Render a set of animated assets into sample directories, one Blender process per object.

    python data_rendering/render_dataset.py assets/ list.txt one.glb --out data/renders \
        [--shard 0 --num-shards 8 | --start 0 --end 1000] [--jobs 1] [--timeout 3600] \
        [--frames 24 --views 100 --resolution 512 --engine CYCLES --samples 32] [-- more blender_render.py options]

Inputs: asset files (.glb, .gltf, .fbx), folders (searched recursively for those) and list files (one asset per line,
``path`` or ``name<TAB>path``; relative paths are relative to the list file; ``#`` starts a comment). An object's
sample name is its file stem (an Objaverse uid) unless the list names it; its sample directory is ``<out>/<name>``.

Resumable: objects whose sample directory is finished (``metadata.json``, or ``static.txt`` for static objects) are
skipped, and a renderer writes into a hidden ``.<name>.partial`` folder that it renames only when done. Shardable:
``--start/--end`` select an index range of the input order, ``--shard i --num-shards n`` the i-th of n contiguous
chunks (after --start/--end). Each object gets ``--timeout`` seconds and its own log in ``<out>/.logs/``; failures do
not stop the run, they are listed at the end (and in ``--failures``), and the exit status is 1 if any.

Needs no torch: runs with the main venv or any Python 3.9+. The renderer is ``.venv-render/bin/python
data_rendering/blender_render.py`` (``./setup.sh --render``); ``--renderer`` replaces that command.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from data_rendering import blender_render as br
from utils import cli
from utils.logging import report_failures

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RENDER_PYTHON = REPO / ".venv-render" / "bin" / "python"
RENDER_SCRIPT = Path(br.__file__).resolve()


@dataclass(frozen=True)
class Asset:
    name: str
    path: Path


# ----------------------------------------------------------------------------------------------- inputs
def check_name(name: str, where: str) -> str:
    """A sample name must stay inside the output root and must not look like a work folder."""
    parts = PurePosixPath(name).parts
    if (not name or name != name.strip() or "\\" in name or "\x00" in name or PurePosixPath(name).is_absolute()
            or any(p in (".", "..") or p.startswith(".") for p in parts)):
        raise ValueError(f"{where}: bad sample name {name!r} (relative, no '..', no part starting with '.')")
    return name


def _from_list(list_file: Path) -> list[Asset]:
    assets = []
    for number, raw in enumerate(list_file.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{list_file}:{number}"
        name, _, path = line.partition("\t") if "\t" in line else ("", "", line)
        path = Path(path.strip()).expanduser()
        path = path if path.is_absolute() else list_file.parent / path
        assets.append(Asset(check_name(name.strip() or path.stem, where), path))
    return assets


def collect_assets(inputs) -> list[Asset]:
    """Assets from files, folders and list files, in input order, duplicates (same name and file) dropped.
    Raises ValueError for a missing input or two different files under one sample name."""
    found: list[Asset] = []
    for item in inputs:
        item = Path(item).expanduser()
        if item.is_dir():
            files = sorted(p for p in item.rglob("*") if p.suffix.lower() in br.SUPPORTED_SUFFIXES and p.is_file()
                           and not any(part.startswith(".") for part in p.relative_to(item).parts))
            found += [Asset(check_name(p.stem, str(p)), p) for p in files]
        elif item.is_file() and item.suffix.lower() in br.SUPPORTED_SUFFIXES:
            found.append(Asset(check_name(item.stem, str(item)), item))
        elif item.is_file():
            found += _from_list(item)
        else:
            raise ValueError(f"input {item}: no such file or folder")
    unique, by_name = [], {}
    for asset in found:
        seen = by_name.get(asset.name)
        if seen is None:
            by_name[asset.name] = asset
            unique.append(asset)
        elif seen.path.resolve() != asset.path.resolve():
            raise ValueError(f"two assets share the sample name {asset.name!r}: {seen.path} and {asset.path}; "
                             "name them in a list file (name<TAB>path)")
    return unique


def select_shard(items: list, start: int = 0, end: int | None = None, shard: int = 0, num_shards: int = 1) -> list:
    """items[start:end], then its shard-th of num_shards contiguous chunks (sizes differ by at most one)."""
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise ValueError(f"--shard must lie in [0, --num-shards={num_shards}), got {shard}")
    if start < 0 or (end is not None and end < start):
        raise ValueError(f"bad index range --start {start} --end {end}")
    items = items[start:end]
    n = len(items)
    return items[shard * n // num_shards:(shard + 1) * n // num_shards]


def object_seed(base: int, name: str) -> int:
    """Per-object seed: reproducible, and different objects get different random views."""
    return (base + zlib.crc32(name.encode())) % (2 ** 31)


# ----------------------------------------------------------------------------------------------- running
class Runner:
    def __init__(self, out: Path, command: list[str], render_args: list[str], timeout: float, seed: int,
                 force: bool, verbose: bool = True):
        self.out, self.command, self.render_args = out, command, render_args
        self.timeout, self.seed, self.force, self.verbose = timeout, seed, force, verbose
        self.logs = out / ".logs"
        self._running: set[subprocess.Popen] = set()
        self._lock = threading.Lock()
        self.stopping = False

    def log_path(self, asset: Asset) -> Path:
        return self.logs / (asset.name.replace("/", "__") + ".log")

    def run_one(self, asset: Asset) -> tuple[str, str]:
        """Returns (status, detail): status 'skipped', 'complete', 'static' or 'failed'."""
        sample = self.out / asset.name
        status = br.sample_status(sample)
        if status and not self.force:
            return "skipped", status
        if self.stopping:
            return "failed", "interrupted before it started"
        if not asset.path.is_file():
            return "failed", f"asset {asset.path} does not exist"
        cmd = [*self.command, "--input", str(asset.path), "--out", str(sample),
               "--seed", str(object_seed(self.seed, asset.name)), *self.render_args]
        if self.force:
            cmd.append("--overwrite")
        log = self.log_path(asset)
        log.parent.mkdir(parents=True, exist_ok=True)
        sample.parent.mkdir(parents=True, exist_ok=True)
        started = time.time()
        with open(log, "w") as f:
            f.write("$ " + shlex.join(cmd) + "\n")
            f.flush()
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)  # own process group: a timeout kills all of it
            with self._lock:
                self._running.add(proc)
            try:
                code = proc.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                self._kill(proc)
                code = None
            finally:
                with self._lock:
                    self._running.discard(proc)
        seconds = time.time() - started
        if code is None:
            shutil.rmtree(br.partial_dir(sample), ignore_errors=True)
            return "failed", f"timed out after {self.timeout:g} s (log {log})"
        if code != 0:
            shutil.rmtree(br.partial_dir(sample), ignore_errors=True)
            return "failed", f"exit status {code}: {_last_line(log)} (log {log})"
        status = br.sample_status(sample)
        if status is None:
            shutil.rmtree(br.partial_dir(sample), ignore_errors=True)
            return "failed", f"the renderer exited 0 but {sample} is not finished (log {log})"
        return status, f"{seconds:.1f} s"

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()

    def stop(self) -> None:
        self.stopping = True
        with self._lock:
            running = list(self._running)
        for proc in running:
            self._kill(proc)


def _last_line(log: Path) -> str:
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    return lines[-1][:300] if len(lines) > 1 else "(no output)"


# ----------------------------------------------------------------------------------------------- command line
def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        extra, argv = argv[argv.index("--") + 1:], argv[:argv.index("--")]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("inputs", nargs="+", help="asset files, folders and list files")
    p.add_argument("--out", required=True, type=Path, help="output root; one sample directory per object")
    p.add_argument("--start", type=int, default=0, help="first index (input order) to render")
    p.add_argument("--end", type=int, default=None, help="index after the last one to render")
    p.add_argument("--shard", type=int, default=0, help="which shard this process renders")
    p.add_argument("--num-shards", type=int, default=1, help="number of shards")
    p.add_argument("--jobs", type=int, default=1, help="objects rendered at the same time")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per object before it is killed")
    p.add_argument("--force", action="store_true", help="render finished objects again")
    p.add_argument("--failures", type=Path, default=None, help="also write the failed objects to this file")
    p.add_argument("--dry-run", action="store_true", help="list what would be rendered, render nothing")
    p.add_argument("--python", type=Path, default=DEFAULT_RENDER_PYTHON, help="Python of the Blender venv")
    p.add_argument("--renderer", default=None,
                   help="renderer command replacing '<--python> blender_render.py' (shell words)")
    p.add_argument("--seed", type=int, default=0, help="base seed; each object adds a hash of its name")
    for flag, kind in (("--frames", int), ("--views", int), ("--resolution", int), ("--engine", str),
                       ("--device", str), ("--samples", int), ("--threads", int), ("--light", str)):
        p.add_argument(flag, type=kind, default=None, help="passed to blender_render.py (its default when omitted)")
    args = p.parse_args(argv)
    args.extra = extra
    if args.jobs < 1 or args.timeout <= 0:
        p.error("--jobs must be >= 1 and --timeout > 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        assets = collect_assets(args.inputs)
        todo = select_shard(assets, args.start, args.end, args.shard, args.num_shards)
    except (ValueError, OSError) as err:
        print(f"render_dataset: {err}", file=sys.stderr)
        return 2
    if args.renderer:
        command = shlex.split(args.renderer)
    else:
        if not args.python.is_file():
            print(f"render_dataset: Blender venv python {args.python} not found; run ./setup.sh --render "
                  "(or pass --python / --renderer)", file=sys.stderr)
            return 2
        command = [str(args.python), str(RENDER_SCRIPT)]
    render_args = []
    for key in ("frames", "views", "resolution", "engine", "device", "samples", "threads", "light"):
        value = getattr(args, key)
        if value is not None:
            render_args += [f"--{key}", str(value)]
    render_args += args.extra
    print(f"render_dataset: {len(todo)} of {len(assets)} objects in this shard -> {args.out}")
    if args.dry_run:
        for asset in todo:
            print(f"{br.sample_status(args.out / asset.name) or 'todo':9s} {asset.name}\t{asset.path}")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    runner = Runner(args.out, command, render_args, args.timeout, args.seed, args.force)
    counts = {"complete": 0, "static": 0, "skipped": 0, "failed": 0}
    failures = []
    lock = threading.Lock()
    started = time.time()

    def one(index_asset):
        index, asset = index_asset
        status, detail = runner.run_one(asset)
        with lock:
            counts[status] += 1
            if status == "failed":
                failures.append((asset, detail))
            print(f"[{index + 1}/{len(todo)}] {asset.name}: {status} ({detail})", flush=True)

    def on_term(signum, frame):  # the renderers run in their own sessions: stop them before leaving
        raise KeyboardInterrupt

    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_term) if in_main else None
    pool = ThreadPoolExecutor(max_workers=args.jobs)
    try:
        list(pool.map(one, enumerate(todo)))
    except KeyboardInterrupt:
        runner.stop()
        pool.shutdown(wait=True, cancel_futures=True)
        print("render_dataset: interrupted; finished objects are kept and the run can be resumed", file=sys.stderr)
        return 130
    finally:
        pool.shutdown(wait=True)
        if in_main:
            signal.signal(signal.SIGTERM, previous)
    print(f"render_dataset: {counts['complete']} rendered, {counts['static']} static, {counts['skipped']} already "
          f"finished, {counts['failed']} failed in {time.time() - started:.0f} s")
    if args.failures:
        args.failures.parent.mkdir(parents=True, exist_ok=True)
        args.failures.write_text("".join(f"{a.name}\t{a.path}\t{d}\n" for a, d in failures))
    return report_failures([(f"{a.name}\t{a.path}", d) for a, d in failures], len(todo), "assets")


if __name__ == "__main__":
    sys.exit(cli.run(main))
