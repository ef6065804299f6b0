"""A user's mesh given as the canonical (GLB / glTF, OBJ with its MTL, or a PLY with faces), read into what the surface
sampler (pipeline/mesh_canonical.py) and the animated-GLB writer (pipeline/glb.py) need.

    if is_mesh_file(path):
        mesh = read_mesh(path)      # InputError naming the file for anything unusable
        mesh.surface                # MeshSequence of one frame: project axes (Z up), the file's units, colours or uvs
        mesh.pieces, mesh.linear    # where each surface vertex sits in the glTF document the GLB is written from

Axes: glTF and OBJ are Y up and are read as Blender and data_rendering read them, (x, y, z) -> (x, -z, y). A PLY is
read in the project's own axes (Z up), as the project's Gaussian PLYs are, and written to the GLB as (x, z, -y), which
Blender's glTF importer turns back into the PLY's own coordinates.

What the GLB is written from: a glTF file is copied as it is (pipeline/glb.py); an OBJ or PLY becomes a document of one
node and one mesh, whose vertices are the surface's (an OBJ is split along its texture seams, a vertex per distinct
position / texture-coordinate pair) with one primitive per OBJ material: MTL Kd as the base colour factor, map_Kd as
its texture, `v x y z r g b` colours and PLY red / green / blue as COLOR_0.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from data_rendering.gltf_import import load_animated_gltf, srgb_to_linear
from data_rendering.import_animation import obj_appearance, read_mtl, read_obj
from data_rendering.mesh import Y_UP_TO_Z_UP, MeshSequence, y_up_to_z_up
from utils.cli import InputError

MESH_SUFFIXES = (".ply", ".glb", ".gltf", ".obj")  # a .ply is a mesh when it has faces, else Gaussians


@dataclass
class Piece:
    """One primitive of one node of the document: its POSITION rows and the surface vertex each of them is."""
    node: int
    mesh: int
    primitive: int
    rows: np.ndarray        # (n,) rows of the primitive's POSITION accessor
    surface: np.ndarray     # (n,) the surface vertex at each row


@dataclass
class UserMesh:
    path: Path
    format: str                      # "gltf" | "obj" | "ply"
    surface: MeshSequence            # one frame, project axes, the file's units
    pieces: list[Piece]
    linear: np.ndarray               # (V, 3, 3) document mesh space -> surface space, per surface vertex
    built: dict | None = None        # OBJ / PLY: the document's arrays (pipeline/glb.document_from_arrays)
    info: dict = field(default_factory=dict)


def _ply_face_count(path: Path) -> int | None:
    """Faces declared by a PLY header (0 when none), or None when the file has no PLY header."""
    with open(path, "rb") as f:
        if f.readline().strip() != b"ply":
            return None
        for _ in range(10_000):  # headers are short; a file without end_header is not a PLY
            line = f.readline()
            if not line:
                return None
            words = line.split()
            if words[:2] == [b"element", b"face"] and len(words) == 3 and words[2].isdigit():
                return int(words[2])
            if words[:1] == [b"end_header"]:
                return 0
    return None


def is_mesh_file(path: str | Path) -> bool:
    """A mesh to sample, by its name (.glb, .gltf, .obj: read_mesh says when it is missing or unreadable) or, for a
    .ply, by its header: a PLY with faces is a mesh, one without faces a Gaussian PLY (utils.gaussians.read_ply)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".ply":
        return path.is_file() and bool(_ply_face_count(path))
    return suffix in MESH_SUFFIXES


def read_mesh(path: str | Path) -> UserMesh:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such mesh file")
    suffix = path.suffix.lower()
    if suffix in (".glb", ".gltf"):
        mesh = _read_gltf(path)
    elif suffix == ".obj":
        mesh = _read_obj(path)
    elif suffix == ".ply":
        mesh = _read_ply(path)
    else:
        raise InputError(f"{path}: not a mesh file (expected {', '.join(MESH_SUFFIXES)})")
    _check_surface(path, mesh.surface)
    return mesh


def _check_surface(path: Path, seq: MeshSequence) -> None:
    if len(seq.faces) == 0:
        raise InputError(f"{path}: the mesh has no faces (a Gaussian PLY needs no faces; a mesh needs triangles)")
    v = seq.vertices[0].astype(np.float64)
    a, b, c = (v[seq.faces[:, k]] for k in range(3))
    if not np.linalg.norm(np.cross(b - a, c - a), axis=1).any():
        raise InputError(f"{path}: every triangle of the mesh has zero area")


def _read_gltf(path: Path) -> UserMesh:
    try:  # the rest pose: an animation the file may hold is not the canonical's
        seq, meta = load_animated_gltf(path, times=[0.0], animation=None, require_animation=False, provenance=True)
    except ValueError as e:
        raise InputError(str(e) if str(path) in str(e) else f"{path}: {e}") from None
    prov = meta["provenance"]
    pieces = [Piece(p["node"], p["mesh"], p["primitive"], p["vertices"], p["start"] + np.arange(len(p["vertices"])))
              for p in prov["pieces"]]
    info = {k: meta[k] for k in ("format", "num_primitives", "num_morph_targets", "skinned", "color_source")}
    info["animations_dropped"] = meta["animation_names"]
    return UserMesh(path, "gltf", seq, pieces, prov["linear"], info=info)


def _image_file(path: Path, owner: Path) -> tuple[bytes, str]:
    """A texture's bytes as glTF embeds them: PNG and JPEG as they are, anything else re-encoded as PNG."""
    try:
        data = path.read_bytes()
        if data[:8] == b"\x89PNG\r\n\x1a\n":
            return data, "image/png"
        if data[:3] == b"\xff\xd8\xff":
            return data, "image/jpeg"
        out = io.BytesIO()
        with Image.open(path) as img:
            img.convert("RGBA" if "A" in img.getbands() else "RGB").save(out, format="PNG")
        return out.getvalue(), "image/png"
    except OSError as e:
        raise InputError(f"{path}: cannot read the texture of {owner} ({e})") from None


def _read_obj(path: Path) -> UserMesh:
    obj = read_obj(path)
    if len(obj["faces"]) == 0:
        raise InputError(f"{path}: the mesh has no faces")
    vertex_map, fields = obj_appearance(path, obj)
    faces = fields.pop("faces")
    has_uv = len(obj["uv_faces"]) and (obj["uv_faces"] >= 0).all()
    if has_uv and "uvs" not in fields:
        # Untextured but with texture coordinates: the document still splits along the seams so that they are kept.
        corners = np.stack([obj["faces"].ravel(), obj["uv_faces"].ravel()], axis=1)
        unique, inverse = np.unique(corners, axis=0, return_inverse=True)
        rows, doc_faces, uvs = unique[:, 0], inverse.reshape(-1, 3), obj["uvs"][unique[:, 1]]
        surface_of_row = rows  # the surface is unsplit: its vertices are the OBJ's
    else:
        rows, doc_faces = vertex_map, faces
        uvs = fields.get("uvs")
        surface_of_row = np.arange(len(vertex_map))
    positions = obj["positions"]
    seq = MeshSequence(y_up_to_z_up(positions[vertex_map])[None], faces, **fields)
    materials = read_mtl(path, obj["libs"]) if obj["libs"] else {}
    groups, names = [], list(dict.fromkeys(obj["materials"]))
    for name in names:
        chosen = np.array([m == name for m in obj["materials"]])
        spec = materials.get(name) if name is not None else None
        material = None
        if spec is not None:
            image = _image_file(spec["map_Kd"], path) if "map_Kd" in spec and uvs is not None else None
            # A map_Kd replaces Kd (as Blender's OBJ importer and data_rendering read it); Kd is display-encoded.
            factor = np.ones(3) if image is not None else srgb_to_linear(np.asarray(spec.get("Kd", [1.0, 1.0, 1.0])))
            material = {"name": name, "factor": factor, "image": image}
        groups.append((material, doc_faces[chosen]))
    colors = obj["colors"]
    if colors is not None:
        colors = np.clip(colors / (255.0 if colors.max() > 1 else 1.0), 0, 1)[rows]  # as obj_appearance reads them
    built = {"positions": positions[rows], "uvs": None if uvs is None else np.stack([uvs[:, 0], 1 - uvs[:, 1]], 1),
             "colors": colors, "groups": groups}
    pieces = [Piece(0, 0, p, np.arange(len(rows)), surface_of_row) for p in range(len(groups))]
    linear = np.broadcast_to(Y_UP_TO_Z_UP, (seq.vertices.shape[1], 3, 3))
    return UserMesh(path, "obj", seq, pieces, linear, built, {"format": "obj", "materials": len(materials)})


def _read_ply(path: Path) -> UserMesh:
    from plyfile import PlyData
    try:
        ply = PlyData.read(str(path))
        v = ply["vertex"].data
        faces = ply["face"].data if "face" in ply else []
    except Exception as e:  # plyfile raises several types for malformed files
        raise InputError(f"{path}: not a readable PLY mesh ({type(e).__name__}: {e})") from None
    if len(faces) == 0:
        raise InputError(f"{path}: the PLY has no faces (a Gaussian PLY is read as Gaussians, not as a mesh)")
    key = next((k for k in ("vertex_indices", "vertex_index") if k in faces.dtype.names), None)
    if key is None or not all(k in v.dtype.names for k in "xyz"):
        raise InputError(f"{path}: a PLY mesh needs x, y, z vertices and faces with vertex_indices")
    positions = np.stack([np.asarray(v[k], np.float64) for k in "xyz"], 1)
    polygons = faces[key]
    if all(len(f) == 3 for f in polygons):
        tris = np.stack(polygons).astype(np.int64)
    else:  # polygons as fans
        tris = np.asarray([(f[0], f[k], f[k + 1]) for f in polygons for k in range(1, len(f) - 1)], np.int64)
    tris = tris.reshape(-1, 3)
    if len(tris) and (tris.min() < 0 or tris.max() >= len(positions)):
        raise InputError(f"{path}: face indices outside the {len(positions)} vertices")
    if not np.isfinite(positions).all():
        raise InputError(f"{path}: NaN or infinite vertex positions")
    colors = None
    if all(k in v.dtype.names for k in ("red", "green", "blue")):
        raw = np.stack([np.asarray(v[k]) for k in ("red", "green", "blue")], 1)
        colors = (raw / 255.0 if raw.dtype.kind in "iu" else np.clip(raw, 0, 1)).astype(np.float32)
    seq = MeshSequence(positions[None], tris, colors=colors)
    built = {"positions": positions @ Y_UP_TO_Z_UP, "uvs": None, "colors": colors, "groups": [(None, tris)]}
    n = len(positions)
    linear = np.broadcast_to(Y_UP_TO_Z_UP, (n, 3, 3))
    return UserMesh(path, "ply", seq, [Piece(0, 0, 0, np.arange(n), np.arange(n))], linear, built, {"format": "ply"})
