"""Select animated Objaverse 1.0 objects and download their GLB files (needs internet and ``pip install objaverse``).

    python data_rendering/download_objaverse.py --out data/objaverse [--max 1000] [--uids my_uids.txt] [--seed 0]
    python data_rendering/render_dataset.py data/objaverse/animated.txt --out data/renders

Selection (the Diffusion4D / GVFDiffusion recipe, docs/paper.md §7): ``objaverse.load_annotations`` and keep the objects
whose ``animationCount`` is at least ``--min-animations`` (1). ``--uids`` restricts the candidates to a list of uids
(and then only the annotation shards holding them are fetched); ``--license`` keeps only the given licences. The
kept uids are sorted, shuffled with ``--seed`` and cut to ``--max``, so a seed and a max always give the same subset.

Download: ``objaverse.load_objects`` into ``<out>/hf-objaverse-v1/glbs/...`` (annotations into
``<out>/hf-objaverse-v1/metadata``), in chunks spread over ``--threads`` threads. Output: ``<out>/animated.txt`` (or ``--list``),
one ``uid<TAB>path`` line per downloaded object, paths relative to the list file, the format ``render_dataset.py``
reads; ``<out>/selected_annotations.json`` with name, licence and author of each selected object (for attribution).
Objects that fail to download are listed at the end and make the exit status 1.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ATTRIBUTION_KEYS = ("name", "license", "animationCount", "viewerUrl", "uri")


def animation_count(annotation) -> int:
    """``animationCount`` of one annotation as an int (missing, null or malformed → 0)."""
    try:
        return int(annotation.get("animationCount") or 0)
    except (AttributeError, TypeError, ValueError):
        return 0


def select_animated(annotations: Mapping[str, Mapping], min_animations: int = 1, uids: Sequence[str] | None = None,
                    licenses: Sequence[str] | None = None, max_count: int | None = None, seed: int = 0) -> list[str]:
    """uids whose annotation has ``animationCount >= min_animations`` (and a licence in ``licenses`` when given),
    among ``uids`` when given (else all annotated objects); sorted, shuffled by ``seed``, then the first
    ``max_count``. uids without an annotation are dropped."""
    if min_animations < 1:
        raise ValueError(f"min_animations must be >= 1, got {min_animations}")
    if max_count is not None and max_count < 0:
        raise ValueError(f"max_count must be >= 0, got {max_count}")
    pool = annotations.keys() if uids is None else uids
    allowed = None if licenses is None else set(licenses)
    keep = sorted({uid for uid in pool if uid in annotations
                   and animation_count(annotations[uid]) >= min_animations
                   and (allowed is None or annotations[uid].get("license") in allowed)})
    random.Random(seed).shuffle(keep)
    return keep if max_count is None else keep[:max_count]


def read_uids(path) -> list[str]:
    """One uid per line (blank lines and ``#`` comments ignored; a ``uid<TAB>...`` line gives its first field)."""
    uids = []
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            uids.append(line.split("\t")[0].strip())
    return uids


def attribution(annotation: Mapping) -> dict:
    record = {key: annotation.get(key) for key in ATTRIBUTION_KEYS if key in annotation}
    user = annotation.get("user")
    if isinstance(user, Mapping):
        record["author"] = user.get("username") or user.get("displayName")
    return record


def write_list(list_path: Path, paths: Mapping[str, str], order: Sequence[str]) -> None:
    """``uid<TAB>path`` lines in selection order; paths relative to the list's folder when inside it."""
    base = list_path.parent.resolve()
    lines = []
    for uid in order:
        if uid in paths:
            path = Path(paths[uid]).resolve()
            try:
                path = path.relative_to(base)
            except ValueError:
                pass
            lines.append(f"{uid}\t{path.as_posix()}\n")
    list_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = list_path.with_name(list_path.name + ".tmp")
    tmp.write_text("".join(lines))
    os.replace(tmp, list_path)


def _objaverse(out: Path):
    try:
        import objaverse
    except ImportError as err:
        raise SystemExit("download_objaverse: needs the objaverse package (pip install objaverse)") from err
    # Downloads and annotations land under <out>; objaverse reads this module global at call time. Downloads run in
    # threads of this process (not objaverse's process pool), so the setting holds for all of them.
    objaverse.BASE_PATH = str(out)
    objaverse._VERSIONED_PATH = str(out / "hf-objaverse-v1")
    return objaverse


def download(objaverse, uids: list[str], threads: int, chunk_size: int = 100) -> dict[str, str]:
    """{uid: local path} for the uids that downloaded: ``load_objects`` on chunks of ``chunk_size`` uids, ``threads``
    chunks at a time."""
    if hasattr(objaverse, "_load_object_paths"):
        objaverse._load_object_paths()  # fetch the uid → file index once, before the threads would race for it
    chunks = [uids[i:i + chunk_size] for i in range(0, len(uids), chunk_size)]
    paths: dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for result in pool.map(lambda chunk: _load_chunk(objaverse, chunk), chunks):
            paths.update(result)
    return paths


def _load_chunk(objaverse, chunk):
    try:
        return objaverse.load_objects(uids=list(chunk), download_processes=1)
    except Exception as err:  # one bad chunk must not lose the others: retry its objects one by one
        print(f"download_objaverse: chunk of {len(chunk)} failed ({err}); retrying one by one", file=sys.stderr)
        found = {}
        for uid in chunk:
            try:
                found.update(objaverse.load_objects(uids=[uid], download_processes=1))
            except Exception as one_err:
                print(f"download_objaverse: {uid}: {one_err}", file=sys.stderr)
        return found


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="download folder")
    p.add_argument("--list", type=Path, default=None, help="list file to write (default <out>/animated.txt)")
    p.add_argument("--uids", type=Path, default=None, help="file of candidate uids (one per line)")
    p.add_argument("--max", type=int, default=None, help="keep at most this many objects")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed of the selection")
    p.add_argument("--min-animations", type=int, default=1, help="minimum animationCount")
    p.add_argument("--license", action="append", default=None,
                   help="keep only this licence (repeatable; e.g. by, by-sa, cc0)")
    p.add_argument("--threads", type=int, default=8, help="parallel downloads")
    p.add_argument("--select-only", action="store_true", help="write the selected uids, download nothing")
    args = p.parse_args(argv)
    if args.threads < 1 or (args.max is not None and args.max < 0) or args.min_animations < 1:
        p.error("--threads and --min-animations must be >= 1, --max >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    list_path = args.list or out / "animated.txt"
    candidates = read_uids(args.uids) if args.uids else None
    objaverse = _objaverse(out)
    annotations = objaverse.load_annotations(candidates)
    selected = select_animated(annotations, args.min_animations, candidates, args.license, args.max, args.seed)
    print(f"download_objaverse: {len(selected)} animated objects selected out of {len(annotations)} annotated")
    (out / "selected_annotations.json").write_text(
        json.dumps({uid: attribution(annotations[uid]) for uid in selected}, indent=1))
    if args.select_only:
        uid_file = list_path.with_name(list_path.stem + "_uids.txt")
        uid_file.write_text("".join(f"{uid}\n" for uid in selected))
        print(f"download_objaverse: uids in {uid_file}")
        return 0
    paths = download(objaverse, selected, args.threads)
    paths = {uid: path for uid, path in paths.items() if path and Path(path).is_file()}
    write_list(list_path, paths, selected)
    missing = [uid for uid in selected if uid not in paths]
    print(f"download_objaverse: {len(paths)} objects in {list_path}")
    if missing:
        print(f"download_objaverse: {len(missing)} failed to download: {' '.join(missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
