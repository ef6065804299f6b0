"""What each supported package holds: its models, and each model's clips as source frames with their appearance.

A package module (ufoai, megaglest, cube2) lists Model entries; a Model's `clips()` reads its files and yields one
Clip per animation, or raises InputError when the model itself cannot be read (the batch names it and goes on). A
Clip that could be located but not read carries `error` instead of frames.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np


@dataclass
class Clip:
    name: str
    files: list[str]                  # package paths read for it (geometry, animation, textures); "a.pk3!b" = b in a
    frames: np.ndarray | None = None  # (T, V, 3) source frames, Z up
    fields: dict | None = None        # MeshSequence fields besides vertices
    info: dict = field(default_factory=dict)  # source facts for metadata.json (frame range, fps, texture notes)
    error: str | None = None


@dataclass
class Model:
    key: str                          # package path of the model (its file, or its folder for a Glest unit)
    format: str                       # "md2", "g3d", "iqm"
    clips: Callable[[], Iterator[Clip]]


@dataclass
class Source:
    package: str
    tag: str                          # short prefix of the sample names
    models: Callable[[Path], Iterator[Model]]  # given the extracted package root


def sources() -> dict[str, Source]:
    from data_rendering.game_assets import cube2, megaglest, ufoai  # the package modules import this one

    return {s.package: s for s in (ufoai.SOURCE, megaglest.SOURCE, cube2.SOURCE)}


def find_file(names: set[str], folder: str, wanted: str, extensions=(".png", ".jpg", ".jpeg", ".tga", ".bmp")) \
        -> str | None:
    """The path among `names` of an image called `wanted` relative to `folder`, matched case-insensitively and with
    any of `extensions` when the exact name is missing (game files often name a .tga that shipped as .png)."""
    lower = {n.lower(): n for n in names}
    wanted = wanted.replace("\\", "/").lstrip("./")
    base = f"{folder}/{wanted}" if folder else wanted
    stem = base.rsplit(".", 1)[0] if "." in base.rsplit("/", 1)[-1] else base
    for candidate in [base] + [stem + e for e in extensions]:
        if candidate.lower() in lower:
            return lower[candidate.lower()]
    return None
