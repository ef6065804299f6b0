"""Prepared samples from a game_assets bundle (bundle.py), on a machine without the Debian packages (CPU only):

    python -m data_rendering.game_assets.unbundle BUNDLE --out D [--frames 16 --views 12 --res 128] [--workers N]
        [--limit N] [--overwrite]

Every clip of the bundle is decoded and written by the synthetic writer (import_animation.write_prepared) as
<out>/<sample>, with the seed the bundle was made with (--seed overrides it): the same cameras as the sample the
game_assets command writes itself, whose frames differ by the quantisation (half a step, 0.5 / 65535 of the largest
extent at most) and whose texture is at most 256 px. Existing samples are skipped unless --overwrite; --limit N
writes at most N new ones. Then, as the game_assets command does: the names are appended to all.txt, train.txt and
test.txt (the split recorded in the bundle), game_assets_manifest.jsonl gets one row per sample and
game_assets_clips.csv the bundle's listing (rows of packages the bundle does not hold are kept).

--frames, when given, must be the bundle's: its clips were judged and resampled at that count. --workers N writes N
samples at a time in separate processes. A bundle entry that cannot be read fails its sample with one line naming the
entry; the others go on and the exit status is 1.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from pathlib import Path

from data_rendering.game_assets.__main__ import (CLIPS_CSV, MANIFEST, csv_rows, extend_lists, kept_rows, read_csv,
                                                 read_jsonl, write_csv, write_jsonl)
from data_rendering.game_assets.bundle import LEVELS, LISTING, MAX_TEXTURE, BundleReader
from data_rendering.import_animation import add_writer_options, refuse_below, sample_folder, write_prepared
from utils import cli
from utils.cli import InputError
from utils.logging import report_failures

_READERS: dict[Path, BundleReader] = {}  # per process: a worker opens the bundle once, not once per sample


def write_one(job: tuple[Path, str, argparse.Namespace]) -> str | None:
    """Write one sample of the bundle; None, or why it failed (one line). Runs in the --workers processes."""
    path, name, args = job
    try:
        reader = _READERS.get(path) or _READERS.setdefault(path, BundleReader(path))
        seq, meta = reader.sequence(name)
        meta["bundle"] = dict(file=path.name, quantisation_levels=LEVELS, max_texture=MAX_TEXTURE)
        write_prepared(seq, meta, sample_folder(f"{path}!clips/{name}.json", args.out, name), name, args)
        return None
    except InputError as e:
        return cli.one_line(e)
    except Exception as e:  # noqa: BLE001 -- one bad sample must not stop the batch
        return f"{type(e).__name__}: {cli.one_line(e)}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="game_assets.unbundle", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path, help="the bundle file (or a folder holding game_assets_bundle.zip)")
    add_writer_options(ap)
    ap.set_defaults(frames=None, seed=None)  # the bundle's own, unless given
    ap.add_argument("--limit", type=int, help="write at most N new samples")
    ap.add_argument("--workers", type=int, default=1, help="samples written at a time (processes)")
    args = ap.parse_args(argv)
    refuse_below(args, (("frames", 2), ("views", 1), ("res", 1), ("limit", 0), ("workers", 1)))
    reader = BundleReader(args.bundle)
    frames = reader.header.get("frames")
    if args.frames is not None and args.frames != frames:
        raise InputError(f"{reader.path}: its clips were resampled to {frames} frames, not --frames {args.frames}; "
                         f"make a bundle with --frames {args.frames}")
    args.frames, args.seed = frames, reader.header.get("seed", 0) if args.seed is None else args.seed
    args.out.mkdir(parents=True, exist_ok=True)
    _READERS[reader.path] = reader
    start, failures, kept, jobs = time.perf_counter(), [], [], []

    def fail(name: str, why: str) -> None:
        failures.append((name, why))
        print(f"{name}: failed: {why}", file=sys.stderr, flush=True)

    for name in reader.names:
        try:
            record = reader.clip(name)["record"]
            row = record if isinstance(record, dict) else {}
            if row.get("sample") != name or row.get("split") not in ("train", "test"):
                raise InputError(f"{reader.path}!clips/{name}.json: its manifest row has sample "
                                 f"{row.get('sample')!r} and split {row.get('split')!r}")
            final = sample_folder(f"{reader.path}!clips/{name}.json", args.out, name)
        except InputError as e:
            fail(name, cli.one_line(e))
            continue
        if final.exists() and not args.overwrite:
            print(f"{name}: exists, skipped (--overwrite replaces it)", flush=True)
            kept.append(record)
        elif args.limit is None or len(jobs) < args.limit:
            jobs.append(record)
    # Fresh (spawned) workers, as the synthetic writer's: forking a process whose numba or torch thread pools run can
    # deadlock the child.
    pool = None
    if args.workers > 1 and len(jobs) > 1:
        from data_rendering.synthetic_dataset import _single_threaded  # imported late: refusals need no torch

        pool = mp.get_context("spawn").Pool(min(args.workers, len(jobs)), initializer=_single_threaded)
    tasks = [(reader.path, r["sample"], args) for r in jobs]
    written = 0
    try:
        for k, (record, error) in enumerate(zip(jobs, pool.imap(write_one, tasks) if pool else map(write_one, tasks))):
            if error:
                fail(record["sample"], error)
            else:
                kept.append(record)
                written += 1
                print(f"[{k + 1}/{len(jobs)}] {record['sample']}: written", flush=True)
    finally:
        if pool:
            pool.close()
            pool.join()

    order = {n: i for i, n in enumerate(reader.names)}
    kept.sort(key=lambda r: order[r["sample"]])
    extend_lists(args.out, [r["sample"] for r in kept if r.get("split") == "train"],
                 [r["sample"] for r in kept if r.get("split") == "test"])
    packages = set(reader.header.get("packages", ()))
    write_jsonl(args.out / MANIFEST, kept_rows(args.out / MANIFEST, read_jsonl, packages) + kept)
    try:
        listing = csv_rows(reader.read(LISTING))
        write_csv(args.out / CLIPS_CSV, kept_rows(args.out / CLIPS_CSV, read_csv, packages) + listing)
    except (InputError, UnicodeDecodeError) as e:  # the listing only documents the clips: the samples stand
        fail(LISTING, cli.one_line(e))
    seconds = time.perf_counter() - start
    print(f"{len(kept)} of {len(reader.names)} samples in {args.out} ({written} written now) in {seconds:.0f} s")
    return report_failures(failures, len(reader.names), "samples")


if __name__ == "__main__":
    sys.exit(cli.run(main))
