"""MegaGlest (Debian package megaglest-data): G3D v4 models. A unit's folder (techs/*/factions/*/units/<unit>) is one
model whose models/*.g3d files are its clips (walking, attacking, dying, ...); a tileset object file
(tilesets/*/models/*.g3d) is a model with one clip. Every mesh of a file is played over the same clip time, so a mesh
with fewer keyframes is resampled to the file's largest count. Meshes flagged "custom colour" show the player colour
through the texture's alpha (assemble.TEAM_COLOR here).
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Iterator

import numpy as np

from data_rendering.game_assets.assemble import TEAM_COLOR, Part, merge_parts, read_image
from data_rendering.game_assets.catalogue import Clip, Model, Source, find_file
from data_rendering.game_assets.g3d import CUSTOM_COLOR, read_g3d
from data_rendering.import_animation import resample
from data_rendering.mesh import y_up_to_z_up
from utils.cli import InputError

BASE = "usr/share/games/megaglest"


def _part(mesh, folder: Path, root: Path, names: set[str], files: list[str]) -> tuple[Part, str | None]:
    """The mesh as an assemble.Part (its texture read when it ships), and a note when the texture is missing."""
    image = None
    if mesh.has_diffuse_map:
        found = find_file(names, "", mesh.textures[0].replace("\\", "/").rsplit("/", 1)[-1])
        if found is None:
            return Part(mesh.frames, mesh.faces, color=mesh.diffuse), f"texture {mesh.textures[0]} not found"
        path = folder / found
        files.append(str(path.relative_to(root)))
        behind = TEAM_COLOR if mesh.properties & CUSTOM_COLOR else None
        image = read_image(path.read_bytes(), str(path.relative_to(root)), behind)
    return Part(mesh.frames, mesh.faces, mesh.uvs if image is not None else None, image, mesh.diffuse), None


def _clip(root: Path, path: Path) -> Clip:
    rel = str(path.relative_to(root))
    try:
        meshes = [m for m in read_g3d(path.read_bytes(), rel) if len(m.faces)]
        if not meshes:  # a placeholder (tilesets' none.g3d): left for the degenerate-geometry check to refuse
            return Clip(path.stem, [rel], np.zeros((1, 0, 3)), dict(faces=np.zeros((0, 3), np.int64)))
        count = max(len(m.frames) for m in meshes)
        names = {p.name for p in path.parent.iterdir()}
        files, notes, parts = [rel], [], []
        for mesh in meshes:
            mesh.frames = resample(mesh.frames, count, None)[0]  # every mesh over the same clip time
            part, note = _part(mesh, path.parent, root, names, files)
            parts.append(part)
            notes += [note] if note else []
        vertices, fields = merge_parts(parts)
    except InputError as e:
        return Clip(path.stem, [rel], error=str(e))
    info = dict(meshes=len(meshes), keyframes=[len(m.frames) for m in meshes])
    if notes:
        info["texture"] = "; ".join(notes)
    return Clip(path.stem, sorted(set(files), key=files.index), y_up_to_z_up(vertices), fields, info)


def _clips(root: Path, files: list[Path]) -> Iterator[Clip]:
    for path in files:
        yield _clip(root, path)


def models(root: Path) -> Iterator[Model]:
    base = root / BASE
    for unit in sorted(base.glob("techs/*/factions/*/units/*")):
        files = sorted(unit.glob("models/*.g3d"))
        if files:
            yield Model(str(unit.relative_to(root)), "g3d", partial(_clips, root, files))
    for path in sorted(base.glob("tilesets/*/models/*.g3d")):
        yield Model(str(path.relative_to(root)), "g3d", partial(_clips, root, [path]))


SOURCE = Source("megaglest-data", "megaglest", models)
