"""Atomic file writes, the one mechanism behind every writer of the project: readers see the old file or the new one,
never half of one, and a failed write leaves no temporary file behind. No torch import (the Blender side uses it too).

- atomic_write(path, write): one file, written beside its place and renamed over it.
- atomic_folder(path, overwrite): a whole output folder, written as a hidden sibling and swapped in when complete.
- lock_folder(folder): an exclusive lock on <folder>/.lock for this process (fcntl.flock: it dies with the process).
- natural_key(path): file names in natural order (frame sequences: frame_2 before frame_10).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import time
from pathlib import Path
from typing import Callable, Iterator

from utils.cli import InputError

try:
    import fcntl
except ImportError:  # not on Windows: folders are not locked there
    fcntl = None

LOCK_NAME = ".lock"


def natural_key(path: Path) -> list:
    """Sort key of a file name in natural order (frame_2 before frame_10), case ignored."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", Path(path).name)]


def fsync_dir(folder: Path) -> None:
    """fsync a folder so that a rename inside it is durable; not every platform/filesystem allows it (best effort)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Run write(tmp) on a temporary file beside `path`, fsync it and rename it over `path`.

    The temporary name keeps the suffix (writers such as ffmpeg choose the format from it) and starts with a dot.
    An existing `path` is replaced only when `overwrite` is true (FileExistsError otherwise).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (or --overwrite) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.stem}.{os.getpid()}.{secrets.token_hex(4)}.tmp{path.suffix}"
    try:
        # os.open with 0o666 honours the umask (mkstemp would leave the file readable by its owner only).
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        mode = tmp.stat().st_mode
        write(tmp)
        os.chmod(tmp, mode)  # some writers (safetensors) replace the file with a private one of their own
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Write a folder as a whole: yields an empty hidden sibling of `path` (same parent, so the renames stay on one
    filesystem) to write everything into; when the block ends without an exception the previous `path` is renamed
    aside, the new folder renamed into place, and the previous one deleted. So `path` holds the old outputs or the
    new ones, never a mix (a run with fewer frames leaves no stale files). An exception in the block deletes the
    temporary folder and leaves `path` untouched. An existing `path` is replaced only when `overwrite` is true
    (FileExistsError otherwise).

        with atomic_folder(out / name, overwrite=args.overwrite) as tmp:
            write_ply_sequence(frames, tmp / "ply")
    """
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (or --overwrite) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    stem = f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}"
    tmp, old = path.parent / f"{stem}.tmp", path.parent / f"{stem}.old"
    tmp.mkdir()
    try:
        yield tmp
        fsync_dir(tmp)
        if path.exists() or path.is_symlink():
            os.rename(path, old)
        else:
            old = None
        try:
            os.rename(tmp, path)
        except BaseException:
            if old is not None:
                os.rename(old, path)  # put the previous outputs back
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- folder locks

_HELD: dict[str, list] = {}  # real path of a lock file -> [fd, holders in this process]


class FolderLock:
    """A held lock of lock_folder(); release() (or the end of a `with` block, or of the process) lets it go."""

    def __init__(self, key: str | None, folder: Path):
        self._key, self.folder = key, folder

    def release(self) -> None:
        key, self._key = self._key, None
        held = _HELD.get(key) if key is not None else None
        if held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            del _HELD[key]
            os.close(held[0])  # closing the descriptor drops the flock

    def __enter__(self) -> "FolderLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        try:
            self.release()
        except Exception:
            pass


def _lock_holder(path: Path) -> str:
    """"process 12345 (started 2026-12-07 02:30)" from a lock file's record, as far as it can be read."""
    try:
        info = json.loads(path.read_text())
        text = f"process {int(info['pid'])} (started {info.get('started', '?')}"
        if info.get("host") and info["host"] != socket.gethostname():
            text += f" on {info['host']}"
        return text + ")"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def lock_folder(folder: str | os.PathLike) -> FolderLock:
    """Lock `folder` (created if needed) for this process: an exclusive, non-blocking fcntl.flock on <folder>/.lock,
    which records the holder's process id and start time. The lock belongs to the open file, so it ends with the
    process however that ends (a crashed trainer never leaves a stale lock; the file itself may stay). Taken again in
    the same process it is shared (counted), so a process may build several trainers on one folder in turn. Keep the
    returned FolderLock: the lock goes with it when it is released or garbage-collected.
    Raises InputError "<folder> is in use by process <pid> (started <time>); wait for it or stop it"."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    key = os.path.realpath(path)
    if key in _HELD:
        _HELD[key][1] += 1
        return FolderLock(key, folder)
    if fcntl is None:
        return FolderLock(None, folder)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise InputError(f"{folder} is in use by {_lock_holder(path)}; wait for it or stop it") from None
    except BaseException:
        os.close(fd)
        raise
    record = json.dumps({"pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M"),
                         "host": socket.gethostname()}) + "\n"
    os.ftruncate(fd, 0)
    os.pwrite(fd, record.encode(), 0)
    _HELD[key] = [fd, 1]
    return FolderLock(key, folder)
