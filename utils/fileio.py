"""Atomic file writes, the one mechanism behind every writer of the project: readers see the old file or the new one,
never half of one, and a failed write leaves no temporary file behind. No torch import (the Blender side uses it too)."""
from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Callable


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
