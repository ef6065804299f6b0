"""Cube 2: Sauerbraten (Debian package cube2-data): IQM skeletal models under packages/models. A file with meshes is a
model; a file with animations is a clip source. The engine pairs them in its config scripts; here an animation
belongs to the model whose joint count equals its pose count, looked for in the animation's own folder first, then
in the whole package when exactly one model there has that many joints (the shared first-person hands). Each mesh's
texture is the image the folder's .cfg assigns to it (`iqmskin <mesh> <image>`), else an image named like its
material or mesh.
"""
from __future__ import annotations

import re
import shlex
from functools import partial
from pathlib import Path
from typing import Iterator

from data_rendering.game_assets.assemble import Part, merge_parts, read_image
from data_rendering.game_assets.catalogue import Clip, Model, Source, find_file
from data_rendering.game_assets.iqm import Iqm, read_iqm, skin
from utils.cli import InputError

BASE = "usr/share/games/cube2/packages/models"


def _skins(folder: Path) -> dict[str, str]:
    """Mesh name -> image file name, from the `iqmskin` lines of the folder's .cfg files (the first one wins)."""
    skins = {}
    for cfg in sorted(folder.glob("*.cfg")):
        for line in cfg.read_text(errors="replace").splitlines():
            try:
                words = shlex.split(line.split("//", 1)[0])
            except ValueError:  # an unbalanced quote: not a line this reader needs
                continue
            if len(words) >= 3 and words[0] == "iqmskin":
                skins.setdefault(words[1], re.sub(r"^(<[^>]*>)+", "", words[2]))  # drop "<compress:2>" options
    return skins


def _parts(model: Iqm, frames, folder: Path, root: Path, files: list[str]) -> list[Part]:
    skins, names = _skins(folder), {p.name for p in folder.iterdir()}
    uvs = None if model.uvs is None else model.uvs.copy()
    if uvs is not None:
        uvs[:, 1] = 1.0 - uvs[:, 1]  # IQM's v grows down the image, MeshSequence's up
    parts = []
    for mesh in model.meshes:
        lo, hi = mesh.first_vertex, mesh.first_vertex + mesh.num_vertices
        faces = model.triangles[mesh.first_triangle:mesh.first_triangle + mesh.num_triangles] - lo
        if len(faces) and (faces.min() < 0 or faces.max() >= mesh.num_vertices):
            raise InputError(f"{files[0]}: mesh {mesh.name!r} has triangles outside its own vertices")
        wanted = [skins.get(mesh.name), mesh.material.replace("\\", "/").rsplit("/", 1)[-1], mesh.name]
        found = next((f for f in (find_file(names, "", w) for w in wanted if w) if f), None)
        image = None
        if found and uvs is not None:
            files.append(str((folder / found).relative_to(root)))
            image = read_image((folder / found).read_bytes(), files[-1])
        parts.append(Part(frames[:, lo:hi], faces, None if image is None else uvs[lo:hi], image))
    return parts


def _clips(root: Path, path: Path, sources: list[Path]) -> Iterator[Clip]:
    rel = str(path.relative_to(root))
    model = read_iqm(path.read_bytes(), rel)
    if model.positions is None or model.blend_indices is None:
        raise InputError(f"{rel}: no positions or no blend indices / weights: not a skinned mesh")
    for source in sources:
        anim_rel = str(source.relative_to(root))
        try:
            anims = model if source == path else read_iqm(source.read_bytes(), anim_rel)
            for anim in anims.anims:
                channels = anims.channels[anim.first_frame:anim.first_frame + anim.num_frames]
                files = [rel] + ([anim_rel] if source != path else [])
                parts = _parts(model, skin(model, channels), path.parent, root, files)
                vertices, fields = merge_parts(parts)
                yield Clip(anim.name, files, vertices, fields,
                           dict(animation_file=anim_rel, anim_frames=anim.num_frames, fps=anim.framerate,
                                joints=len(model.parents)))
        except (InputError, ValueError) as e:
            yield Clip(source.stem, [rel, anim_rel], error=str(e) if anim_rel in str(e) else f"{anim_rel}: {e}")


def models(root: Path) -> Iterator[Model]:
    meshes, anims = {}, {}
    for path in sorted((root / BASE).rglob("*.iqm")):
        head = read_iqm(path.read_bytes(), str(path.relative_to(root)))  # a bad file fails the listing: say which
        if head.meshes:
            meshes[path] = len(head.parents)
        if head.anims:
            anims[path] = head.channels.shape[1]
    for path, joints in meshes.items():
        sources = []
        for anim, poses in anims.items():
            if poses != joints or not joints:
                continue
            here = [m for m, j in meshes.items() if j == poses and m.parent == anim.parent]
            anywhere = [m for m, j in meshes.items() if j == poses]
            if here == [path] or (not here and anywhere == [path]):
                sources.append(anim)
        if sources:
            yield Model(str(path.relative_to(root)), "iqm", partial(_clips, root, path, sources))


SOURCE = Source("cube2-data", "cube2", models)
