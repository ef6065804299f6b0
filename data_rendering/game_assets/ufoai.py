"""UFO: Alien Invasion (Debian package ufoai-data): MD2 models inside base/0models.pk3 (a zip), each animated model
with an .anm clip table of the same stem. A clip is a frame range of its model; the skin named in the MD2 (".body"
= body.png next to the model) is its texture. Characters' heads are separate models attached at run time through
.tag files and are not added: the bodies are imported alone.
"""
from __future__ import annotations

import zipfile
from functools import partial
from pathlib import Path
from typing import Iterator

from data_rendering.game_assets.assemble import Part, merge_parts, read_image
from data_rendering.game_assets.catalogue import Clip, Model, Source, find_file
from data_rendering.game_assets.md2 import read_anm, read_md2
from data_rendering.import_animation import weld_corners

ARCHIVE = "usr/share/games/ufoai/base/0models.pk3"


def _clips(archive: Path, md2: str, anm: str) -> Iterator[Clip]:
    where = f"{ARCHIVE}!{md2}"
    with zipfile.ZipFile(archive) as pk3:
        model = read_md2(pk3.read(md2), where)
        table = read_anm(pk3.read(anm).decode("latin-1"), f"{ARCHIVE}!{anm}", len(model.frames))
        folder, stem = md2.rsplit("/", 1)[0], md2.rsplit("/", 1)[1][:-4]
        names = set(pk3.namelist())
        # the skins the model names, else an image named as the model (some name a skin that did not ship)
        found = (find_file(names, folder, s.rsplit("/", 1)[-1]) for s in model.skins + [stem])
        skin = next((f for f in found if f), None)
        image = read_image(pk3.read(skin), f"{ARCHIVE}!{skin}") if skin else None
    vertex_map, uv_map, faces = weld_corners(model.faces, model.st_faces)
    files = [where, f"{ARCHIVE}!{anm}"] + ([f"{ARCHIVE}!{skin}"] if skin else [])
    note = {} if skin else {"texture": f"none of the skins {model.skins} found; plain grey"}
    for clip in table:
        frames = model.frames[clip.first:clip.last + 1, vertex_map]
        part = Part(frames, faces, model.uvs()[uv_map], image)
        vertices, fields = merge_parts([part])
        yield Clip(clip.name, files, vertices, fields,
                   dict(first_frame=clip.first, last_frame=clip.last, fps=clip.fps, **note))


def models(root: Path) -> Iterator[Model]:
    archive = root / ARCHIVE
    with zipfile.ZipFile(archive) as pk3:
        names = set(pk3.namelist())
    for anm in sorted(n for n in names if n.endswith(".anm")):
        md2 = anm[:-4] + ".md2"
        if md2 in names:
            yield Model(f"{ARCHIVE}!{md2}", "md2", partial(_clips, archive, md2, anm))


SOURCE = Source("ufoai-data", "ufoai", models)
