"""Prepared samples from the animated models of Debian game-data packages (CPU only):

    python -m data_rendering.game_assets --cache data/game_cache --out data/real [--packages ufoai-data ...]
        [--frames 16 --views 12 --res 128] [--limit N] [--dry-run]
    python -m data_rendering.game_assets --cache data/game_cache --bundle data/real_bundle [--frames 16] ...

1. Each package is downloaded with `apt-get download` into <cache>/debs (skipped when its .deb is there) and unpacked
   with `dpkg-deb -x` into <cache>/root/<package>. Its version and its copyright file
   (/usr/share/doc/<package>/copyright) are read; every clip gets the licence and holders of its files.
2. Every model x clip is read (ufoai-data: MD2 + .anm, megaglest-data: G3D, cube2-data: IQM skinned on the CPU) and
   judged by the import rules: degenerate geometry is refused by import_animation.check_geometry, then the clip is
   resampled to --frames, normalised by the box around all its frames, and must keep the synthetic objects' motion
   rules (synthetic.motion_faults: not static, not faster than MAX_SPEED / frames per frame). A clip too fast when
   its frames are spread over all of it is tried over the first 3/4, 1/2, 3/8, 1/4 of it (CLIP_FRACTIONS; the
   manifest records the share used). A clip whose source frames repeat an accepted clip exactly is a duplicate.
3. Accepted clips are written by the synthetic writer (import_animation.write_prepared) as <out>/<sample>, named
   <package tag>__<model>__<clip>; existing samples are skipped unless --overwrite. --limit N writes at most N new
   samples (existing ones are always kept and listed).
4. <out>/game_assets_clips.csv lists every model x clip with its licence and what happened to it;
   <out>/game_assets_manifest.jsonl has one line per sample (package, version, files, clip, licence, attribution,
   group, split). Rows of packages not named in this run are kept.
5. The split is by model (split.py): all.txt, train.txt and test.txt get the new names appended (lines already there
   are kept), and a name that would sit on both sides is an error.

With --bundle FILE (a folder: bundle.DEFAULT_NAME in it) instead of --out, steps 1, 2 and the split are the same,
but the accepted clips are not rendered: their frames, meshes and textures go into one compact file with their
manifest rows and the listing (bundle.py; an existing file is replaced only with --overwrite), and
`python -m data_rendering.game_assets.unbundle FILE --out D` writes the samples, lists and manifest on a machine
without the packages.

A model or clip that cannot be read is reported on one line and the batch goes on; the exit status is then 1.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

from data_rendering.game_assets import packages as debian
from data_rendering.game_assets.bundle import DEFAULT_NAME, BundleWriter, bundle_file
from data_rendering.game_assets.catalogue import Clip, Model, Source, sources
from data_rendering.game_assets.copyright import licence_of, read_copyright
from data_rendering.game_assets.split import groups, split
from data_rendering.import_animation import (add_to_list, add_writer_options, prepared_sequence, refuse_below,
                                             sample_folder, write_prepared)
from data_rendering.synthetic import motion_faults
from datasets import layout
from utils import cli
from utils.cli import InputError
from utils.logging import report_failures

DEFAULT_PACKAGES = ("ufoai-data", "megaglest-data", "cube2-data")
# The share of a clip its --frames frames are spread over: all of it, or when that breaks the speed rule a shorter
# window from its start. MD2 and G3D engines draw in-between frames by the same linear interpolation of the keyframes,
# so the denser frames are what the game shows at a higher display rate; never less than a quarter of the clip.
CLIP_FRACTIONS = (1.0, 0.75, 0.5, 0.375, 0.25)
CLIPS_CSV, MANIFEST = "game_assets_clips.csv", "game_assets_manifest.jsonl"
CSV_FIELDS = ("package", "version", "format", "model", "clip", "status", "reason", "sample", "source_frames",
              "clip_fraction", "licence", "attribution", "files")


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", text).strip("_.") or "x"


def model_label(key: str) -> str:
    """The distinctive part of a model's package path, for sample names."""
    inner = key.split("!", 1)[-1]
    for prefix in ("usr/share/games/", "megaglest/techs/megapack/factions/", "megaglest/", "cube2/packages/models/",
                   "models/"):
        inner = inner[len(prefix):] if inner.startswith(prefix) else inner
    inner = re.sub(r"/units/|/models/", "/", inner)
    return slug(inner.rsplit(".", 1)[0] if inner.endswith((".md2", ".g3d", ".iqm")) else inner)


def licences(stanzas, files: list[str]) -> tuple[str, str]:
    """(licences, holders) of the files, each distinct value once, joined by ' AND ' / ' | '. An archive member
    "a/b.pk3!c/d" is looked up as "a/c/d": the copyright file lists the archive's contents as a folder."""
    found = []
    for f in files:
        path = f.split("!", 1)[0].rsplit("/", 1)[0] + "/" + f.split("!", 1)[1] if "!" in f else f
        stanza = licence_of(stanzas, path)
        found.append(("UNKNOWN", "") if stanza is None else (stanza.licence, stanza.holders))
    unique = lambda items: list(dict.fromkeys(i for i in items if i))  # noqa: E731
    return " AND ".join(unique(l for l, _ in found)), " | ".join(unique(h for _, h in found))


def digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha1()
    for a in arrays:
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


class Run:
    """One pass over the packages: the listing rows, manifest records and failures it collects."""

    def __init__(self, args, sink):
        self.args = args
        self.sink = sink  # where accepted clips go: SampleFolders, or bundle.BundleWriter with --bundle
        self.rows: list[dict] = []
        self.records: list[dict] = []
        self.failures: list[tuple[str, str]] = []
        self.seen: dict[str, str] = {}   # frames digest -> sample of the first clip with those frames
        self.names: set[str] = set()
        self.written = 0
        self.write_seconds = 0.0

    def package(self, source: Source, prepared: tuple) -> None:
        root, version, stanzas = prepared
        base = dict(package=source.package, version=version)
        try:
            for model in source.models(root):
                self.model(source, model, stanzas, base)
        except (InputError, ValueError, OSError) as e:  # the listing itself stopped: later models are not known
            self.failures.append((source.package, f"listing stopped: {cli.one_line(e)}"))

    def model(self, source: Source, model: Model, stanzas, base: dict) -> None:
        try:
            for clip in model.clips():
                self.clip(source, model, clip, stanzas, base)
        except (InputError, ValueError, OSError) as e:  # the model's files: one line, then the next model
            why = cli.one_line(e)
            why = why if model.key.split("!")[-1] in why else f"{model.key}: {why}"
            self.fail(f"{source.tag}__{model_label(model.key)}", why)
            self.rows.append(dict(base, format=model.format, model=model.key, clip="*", status="failed", reason=why))

    def fail(self, name: str, why: str) -> None:
        self.failures.append((name, why))
        print(f"{name}: failed: {why}", file=sys.stderr, flush=True)

    def clip(self, source: Source, model: Model, clip: Clip, stanzas, base: dict) -> None:
        licence, holders = licences(stanzas, clip.files)
        row = dict(base, format=model.format, model=model.key, clip=clip.name, licence=licence,
                   attribution=holders, files=";".join(clip.files))
        self.rows.append(row)
        if clip.error:
            row.update(status="failed", reason=clip.error)
            self.fail(f"{source.tag}__{model_label(model.key)}__{slug(clip.name)}", clip.error)
            return
        row["source_frames"] = len(clip.frames)
        status, reason, sample = self.judge(source, model, clip, row)
        row.update(status=status, reason=reason, sample=sample or "")
        if sample:
            self.records.append(dict(sample=sample, package=row["package"], version=row["version"],
                                     format=model.format, model=model.key, clip=clip.name, files=clip.files,
                                     licence=licence, attribution=holders, source_frames=len(clip.frames),
                                     clip_fraction=row["clip_fraction"], frames=self.args.frames,
                                     fingerprint=row["fingerprint"]))
            print(f"{sample}: {status}{' (' + reason + ')' if reason else ''}", flush=True)

    def judge(self, source: Source, model: Model, clip: Clip, row: dict) -> tuple[str, str, str | None]:
        """(status, reason, sample name when the clip is or becomes a sample)."""
        args = self.args
        where = f"{model.key} {clip.name}"
        for fraction in CLIP_FRACTIONS:
            try:
                seq, record = prepared_sequence(where, clip.frames, clip.fields, args.frames,
                                                until=fraction * (len(clip.frames) - 1))
            except InputError as e:
                return "degenerate", cli.one_line(e).replace(where + ": ", ""), None
            faults = motion_faults(seq.vertices)
            if "speed" not in faults:  # a shorter window would only move less
                break
        if faults:
            return ("static" if "static" in faults else "too_fast"), "; ".join(faults.values()), None
        record["clip_fraction"] = fraction
        row["clip_fraction"] = fraction
        key = digest(clip.frames.astype(np.float32), seq.faces)
        if key in self.seen:
            return "duplicate", f"same frames as {self.seen[key]}", None
        name = f"{source.tag}__{model_label(model.key)}__{slug(clip.name)}"
        if name in self.names:  # two clips with one slug (names differing in punctuation only)
            name = f"{name}-{key[:6]}"
        self.seen[key], row["fingerprint"] = name, digest(seq.faces)
        self.names.add(name)
        if self.sink.has(where, name) and not args.overwrite:
            return "exists", "", name
        if args.dry_run:
            return "accepted", "--dry-run: not written", None
        if args.limit is not None and self.written >= args.limit:
            return "accepted", f"not written: --limit {args.limit} reached", None
        meta = dict(record, source=f"{row['package']} {row['version']}: {clip.files[0]}",
                    importer="data_rendering.game_assets", package=row["package"], version=row["version"],
                    format=model.format, model=model.key, clip=clip.name, files=clip.files,
                    licence=row["licence"], attribution=row["attribution"], **clip.info)
        start = time.perf_counter()
        self.sink.put(where, name, seq, meta)
        self.write_seconds += time.perf_counter() - start
        self.written += 1
        return self.sink.status, "", name


class SampleFolders:
    """Where accepted clips go without --bundle: sample folders under --out, written by the synthetic writer."""
    status = "written"

    def __init__(self, args):
        self.args = args

    def has(self, where: str, name: str) -> bool:
        return sample_folder(where, self.args.out, name).exists()

    def put(self, where: str, name: str, seq, meta: dict) -> None:
        write_prepared(seq, meta, sample_folder(where, self.args.out, name), name, self.args)


def prepare(package: str, cache: Path) -> tuple[Path, str, list]:
    """(extracted root, version, copyright paragraphs) of a package, downloaded and unpacked when needed."""
    deb = debian.fetch(package, cache)
    version = debian.version(deb)
    root = debian.extract(package, deb, cache)
    stanzas = read_copyright(root / f"usr/share/doc/{package}/copyright")
    print(f"{package} {version}: {deb.name} ({deb.stat().st_size / 1e6:.0f} MB)", flush=True)
    return root, version, stanzas


def kept_rows(path: Path, read, packages: set[str]) -> list[dict]:
    """The rows of an earlier run's file that belong to packages this run did not read (they stay listed)."""
    return [r for r in read(path) if r.get("package") not in packages] if path.exists() else []


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        try:
            rows.append(json.loads(line)) if line.strip() else None
        except json.JSONDecodeError as e:
            raise InputError(f"{path}, line {lineno}: not JSON ({e.msg}); move the file away or fix it") from None
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    tmp.replace(path)


def read_csv(path: Path) -> list[dict]:
    return csv_rows(path.read_bytes())


def csv_rows(data: bytes) -> list[dict]:
    return list(csv.DictReader(io.StringIO(data.decode(), newline="")))


def csv_text(rows: list[dict]) -> str:
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_csv(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_bytes(csv_text(rows).encode())
    tmp.replace(path)


def assign_split(records: list[dict], seed: int, fraction: float) -> tuple[list[str], list[str]]:
    """(train, test) sample names, split by model; every record gets its "group" and "split"."""
    members = {r["sample"]: (r["package"] + ":" + r["model"], r["fingerprint"]) for r in records}
    train, test = split(members, seed, fraction)
    grouped = groups(members)
    side = {s: "test" for s in test} | {s: "train" for s in train}
    for r in records:
        r.update(group=grouped[r["sample"]], split=side[r["sample"]])
    return train, test


def write_lists(out: Path, records: list[dict], seed: int, fraction: float) -> tuple[int, int]:
    """Append the samples to all.txt and, split by model, train.txt / test.txt; refuse a name on both sides."""
    train, test = assign_split(records, seed, fraction)
    extend_lists(out, train, test)
    return len(train), len(test)


def extend_lists(out: Path, train: list[str], test: list[str]) -> None:
    """Append the names to all.txt, train.txt and test.txt (lines already there are kept); a name that would then sit
    on both sides is refused. Shared with unbundle.py, which takes the sides recorded in the bundle."""
    for list_name, names in (("all", sorted(train + test)), ("train", train), ("test", test)):
        if names:
            add_to_list(out / f"{list_name}.txt", names)
    listed = {k: set(layout.read_list_file(out / f"{k}.txt", out)) if (out / f"{k}.txt").exists() else set()
              for k in ("train", "test")}
    both = sorted(listed["train"] & listed["test"])
    if both:
        raise InputError(f"{out}: {len(both)} sample(s) listed in both train.txt and test.txt (e.g. {both[0]}); "
                         f"an earlier run used another --seed or --test-fraction: remove those lines")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="game_assets", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, required=True, help="download and extraction cache")
    add_writer_options(ap, out_required=False)
    ap.add_argument("--bundle", type=Path, help=f"instead of sample folders under --out, write the accepted clips "
                    f"into this bundle file (a folder: {DEFAULT_NAME} in it), for game_assets.unbundle")
    ap.add_argument("--packages", nargs="+", default=list(DEFAULT_PACKAGES), help="Debian packages to read")
    ap.add_argument("--limit", type=int, help="write at most N new samples (with --bundle: bundle at most N clips)")
    ap.add_argument("--test-fraction", type=float, default=0.1, help="share of the models held out for test")
    ap.add_argument("--dry-run", action="store_true", help="list and judge the clips, write no samples")
    args = ap.parse_args(argv)
    refuse_below(args, (("frames", 2), ("views", 1), ("res", 1), ("limit", 0)))
    if not 0 <= args.test_fraction < 1:
        raise InputError(f"--test-fraction must be in [0, 1), got {args.test_fraction}")
    if (args.out is None) == (args.bundle is None):
        raise InputError("give either --out (prepared sample folders) or --bundle (one file to unbundle elsewhere)")
    target = args.bundle and bundle_file(args.bundle)
    if target and target.exists() and not args.overwrite and not args.dry_run:  # checked before minutes of reading
        raise InputError(f"{target}: already exists; --overwrite replaces it")
    known = sources()
    for package in args.packages:
        debian.refuse_reserved(package)
        if package not in known:
            raise InputError(f"{package}: no reader for this package (supported: {', '.join(known)})")
    sink = BundleWriter() if target else SampleFolders(args)
    start, run = time.perf_counter(), Run(args, sink)
    # every package is fetched first: a download refused (no apt, no network) stops the run before any writing
    prepared = {package: prepare(package, args.cache) for package in dict.fromkeys(args.packages)}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    for package, found in prepared.items():
        run.package(known[package], found)
    done = set(args.packages)
    counts: dict[str, int] = {}
    for r in run.rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    print(f"clips this run: {len(run.rows)} ({', '.join(f'{v} {k}' for k, v in sorted(counts.items()))})")
    if target:
        _finish_bundle(args, run, target)
    else:
        _finish_folders(args, run, done)
    print(f"done in {time.perf_counter() - start:.0f} s")
    return report_failures(run.failures, len(run.rows), "models or clips")


def _finish_folders(args, run: Run, done: set[str]) -> None:
    """The listing, lists and manifest beside the sample folders, keeping the rows of packages not read now."""
    rows = kept_rows(args.out / CLIPS_CSV, read_csv, done) + run.rows
    write_csv(args.out / CLIPS_CSV, rows)
    print(f"listing of {len(rows)} clips in {args.out / CLIPS_CSV}")
    if not args.dry_run:
        records = kept_rows(args.out / MANIFEST, read_jsonl, done) + run.records
        n_train, n_test = write_lists(args.out, records, args.seed, args.test_fraction) if records else (0, 0)
        write_jsonl(args.out / MANIFEST, records)
        models = len({(r["package"], r["model"]) for r in records})
        print(f"{len(records)} samples from {models} models ({n_train} train, {n_test} test) in {args.out}; "
              f"{run.written} written now" + (f", {run.write_seconds / run.written:.1f} s each" if run.written else ""))


def _finish_bundle(args, run: Run, target: Path) -> None:
    """The bundle: this run's clips with their split (the one write_lists would give them) and its listing."""
    if args.dry_run:
        return
    train, test = assign_split(run.records, args.seed, args.test_fraction)
    settings = dict(frames=args.frames, seed=args.seed, test_fraction=args.test_fraction,
                    packages=sorted(set(args.packages)))
    size = run.sink.finish(target, run.records, csv_text(run.rows).encode(), settings)
    models = len({(r["package"], r["model"]) for r in run.records})
    print(f"{len(run.records)} clips from {models} models ({len(train)} train, {len(test)} test) in {target}: "
          f"{size / 1e6:.1f} MB")


if __name__ == "__main__":
    sys.exit(cli.run(main))
