"""Many inputs through one VideoTo4D, overlapped: while input i runs on the model's device, a reader thread decodes and
mattes input i+1's video and a writer thread writes input i-1's files (PLY, npz, video encoding). The files are those
of one input after another (tests/test_batch.py); `overlap=False` runs them so.

    for item, summary, error in run_batch(pipe, items, options={"num_frames": 32}):
        print(item.name, "failed" if error else "done")

Outcomes come in the order of `items`, each as soon as its files are written. A failing input is an outcome, not an
exception: the others go on. Output folders follow inference_dpm_latent.py's rules: a folder holding summary.json is
finished and skipped (unless `overwrite`); one without it is not replaced unless `overwrite`; each is written as a whole
(Result.write). Two inputs with the same output folder: the second is refused (it would replace the first's files).
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from pipeline.video_to_4d import VideoTo4D, input_kind
from utils.metrics import ImageMetrics

READ_OPTIONS = ("num_frames", "start", "stride", "matting")  # the options read_video takes of a call's options


@dataclass
class Item:
    name: str
    source: Path
    out: Path                      # the output folder
    # The canonical's path, or a function that finds it: its error is then this input's failure, not the batch's.
    canonical: Path | Callable[[], Path | None] | None = None


def _now(fn, *args) -> Future:
    """fn(*args) run here, as a finished Future (the sequential path shares the overlapped one's code)."""
    f = Future()
    try:
        f.set_result(fn(*args))
    except BaseException as e:  # noqa: BLE001  (re-raised by .result(), where the overlapped path raises it)
        f.set_exception(e)
    return f


def run_batch(pipe: VideoTo4D, items: list[Item], options: dict | None = None, metrics: ImageMetrics | None = None,
              overwrite: bool = False,
              overlap: bool = True) -> Iterator[tuple[Item, dict | None, BaseException | None]]:
    """Yields (item, summary, None) or (item, None, error) per item, in order; summary {"skipped": True} for a
    finished folder. `options` are VideoTo4D.__call__'s keywords; `metrics` scores prepared samples."""
    options = dict(options or {})
    read_options = {k: v for k, v in options.items() if k in READ_OPTIONS}
    with ExitStack() as stack:
        reader = stack.enter_context(ThreadPoolExecutor(1, "read")) if overlap else None
        writer = stack.enter_context(ThreadPoolExecutor(1, "write")) if overlap else None
        submit = lambda pool, fn, *args: pool.submit(fn, *args) if pool is not None else _now(fn, *args)

        done = lambda item: (item.out / "summary.json").is_file() and not overwrite  # finished: skipped

        def read(item: Item):  # videos only (a prepared sample's renders are read with its other files), and only
            # those that will run: a rerun over a half-done folder decodes none of the finished ones
            return pipe.read_video(item.source, **read_options) \
                if input_kind(item.source) == "video" and not done(item) else None

        def finished(item: Item) -> bool:
            if done(item):
                return True
            if item.out.exists() and not overwrite:
                raise FileExistsError(f"{item.out}: exists but holds no finished outputs (no summary.json); pass "
                                      f"--overwrite to replace it")
            return False

        def run(item: Item, video) -> Future:
            canonical = item.canonical() if callable(item.canonical) else item.canonical
            result = pipe(item.source, canonical=canonical, name=item.name, video=video, **options)
            if metrics is not None and result.kind == "sample":
                pipe.score(result, metrics)
            rendered = result.render()  # on the device, here; the CPU writes in the writer thread

            def write() -> dict:
                result.write(item.out, rendered, overwrite=True)
                return result.summary
            return submit(writer, write)

        seen: set[Path] = set()
        nxt = submit(reader, read, items[0]) if items else None
        pending: tuple[Item, Future] | None = None
        for i, item in enumerate(items):
            video, nxt = nxt, (submit(reader, read, items[i + 1]) if i + 1 < len(items) else None)
            try:
                if item.out.resolve() in seen:
                    raise FileExistsError(f"{item.out}: the output folder of an earlier input of this run (same name "
                                          f"{item.name!r}); rename one of them")
                seen.add(item.out.resolve())
                if input_kind(item.source) is None:
                    pipe.prepare(item.source)  # raises the InputError that says what the path is
                outcome = _now(lambda: {"skipped": True}) if finished(item) else run(item, video.result())
            except Exception as e:  # this input's failure; the batch goes on
                outcome = _now(_raise, e)
            if pending is not None:
                yield _outcome(*pending)
            pending = (item, outcome)
        if pending is not None:
            yield _outcome(*pending)


def _raise(e: BaseException):
    raise e


def _outcome(item: Item, f: Future) -> tuple[Item, dict | None, BaseException | None]:
    try:
        return item, f.result(), None
    except Exception as e:
        return item, None, e
