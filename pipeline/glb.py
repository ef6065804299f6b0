"""animated.glb: the user's mesh with one morph target per video frame and an animation that plays them.

    write_animated_glb("out/animated.glb", mesh, displacement, fps)   # mesh: pipeline/mesh_input.UserMesh

- The document: a glTF / GLB input is copied whole (nodes, meshes, materials, textures, samplers, skins, extensions),
  its buffers merged into the GLB's one binary chunk and images stored by uri embedded, so the file stands alone
  beside the other outputs. Its own animations are dropped: the video's motion replaces them. An OBJ or PLY input
  becomes a document built here (pipeline/mesh_input.py says what it holds).
- Base positions: the input's own, untouched (the POSITION accessors are copied byte for byte).
- Morph targets: every primitive of every animated mesh gets T targets after any it already has; target t holds frame
  t's displacement of each vertex (`displacement` (T, V, 3) is given in the surface's frame, Z up, and turned into
  each vertex's mesh space, where targets live, by the inverse of its linear map: node transform, skin and axis change).
  A mesh that several nodes show is copied per node, since each instance moves on its own. Targets are named
  frame_0000, ... (mesh extras.targetNames, which Blender uses for its shape keys).
- Animation "video": per animated node one `weights` channel with T keyframes at t / fps; at key t target t has
  weight 1 and the other new targets 0 (targets the mesh already had keep their default weights). The interpolation
  is LINEAR: at the keys the pose is exactly frame t, and between two keys the vertices move on the straight line
  from one frame to the next, so a viewer running at any rate shows smooth motion (STEP would hold each frame).
"""
from __future__ import annotations

import copy
import json
import mimetypes
import struct
from pathlib import Path

import numpy as np

from data_rendering.gltf_import import read_document, srgb_to_linear
from data_rendering.mesh import Y_UP_TO_Z_UP
from utils.cli import InputError
from utils.fileio import atomic_write

INTERPOLATION = "LINEAR"
ANIMATION_NAME = "video"
GENERATOR = "GVFDiffusion pipeline/glb.py"
_FLOAT, _UINT32 = 5126, 5125
_ARRAY_BUFFER, _ELEMENT_ARRAY_BUFFER = 34962, 34963
_ALIGN = 8  # merged buffers start on 8-byte boundaries: every accessor offset inside them stays aligned


def _image_mime(data: bytes, uri: str = "") -> str | None:
    magic = {b"\x89PNG": "image/png", b"\xff\xd8\xff": "image/jpeg", b"\xabKTX": "image/ktx2"}
    for head, mime in magic.items():
        if data.startswith(head):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return mimetypes.guess_type(uri)[0] if uri and not uri.startswith("data:") else None


class Document:
    """A glTF document written as one GLB: its JSON and the one binary buffer its bufferViews point into."""

    def __init__(self, doc: dict, blob: bytes = b""):
        self.json, self.blob = doc, bytearray(blob)

    def view(self, data: bytes, target: int | None = None) -> int:
        self.blob += b"\0" * (-len(self.blob) % _ALIGN)
        view = {"buffer": 0, "byteOffset": len(self.blob), "byteLength": len(data)}
        if target is not None:
            view["target"] = target
        self.json.setdefault("bufferViews", []).append(view)
        self.blob += data
        return len(self.json["bufferViews"]) - 1

    def accessor(self, values: np.ndarray, kind: str, bounds: bool = False, target: int | None = None) -> int:
        """One accessor of float32 (or uint32 indices) `values`, (count, width) or (count,); min / max when asked
        (the spec wants them on POSITION, morph-target POSITION and animation inputs)."""
        values = np.ascontiguousarray(values, np.uint32 if kind == "SCALAR" and values.dtype.kind in "iu" else
                                      np.float32)
        acc = {"bufferView": self.view(values.tobytes(), target), "componentType":
               _UINT32 if values.dtype == np.uint32 else _FLOAT, "count": len(values), "type": kind}
        if bounds:
            flat = values.reshape(len(values), -1)
            acc["min"], acc["max"] = flat.min(0).tolist(), flat.max(0).tolist()
        self.json.setdefault("accessors", []).append(acc)
        return len(self.json["accessors"]) - 1

    def glb(self) -> bytes:
        """The GLB container: header, JSON chunk padded with spaces, BIN chunk padded with zeros."""
        blob = bytes(self.blob) + b"\0" * (-len(self.blob) % 4)
        doc = dict(self.json, buffers=[{"byteLength": len(blob)}])
        text = json.dumps(doc, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 4)
        body = struct.pack("<II", len(text), 0x4E4F534A) + text + struct.pack("<II", len(blob), 0x004E4942) + blob
        return b"glTF" + struct.pack("<II", 2, 12 + len(body)) + body


def document_from_file(path: Path) -> Document:
    """A copy of a glTF / GLB file with one buffer (module docstring)."""
    try:
        doc, buffers, images = read_document(path)
    except ValueError as e:
        raise InputError(str(e)) from None
    doc = copy.deepcopy(doc)
    blob, starts = bytearray(), []
    for data in buffers:
        blob += b"\0" * (-len(blob) % _ALIGN)
        starts.append(len(blob))
        blob += data
    out = Document(doc, bytes(blob))
    for view in doc.get("bufferViews", []):
        view["byteOffset"] = starts[view["buffer"]] + int(view.get("byteOffset", 0))
        view["buffer"] = 0
    for i, data in images.items():
        image = doc["images"][i]
        mime = _image_mime(data, image["uri"]) or image.get("mimeType")
        if mime is None:
            raise InputError(f"{path}: image {i} ({image['uri'][:40]}) is of an unknown type; a GLB needs its mimeType")
        del image["uri"]
        image.update(bufferView=out.view(data), mimeType=mime)
    doc.setdefault("asset", {})["generator"] = GENERATOR
    return out


def document_from_arrays(built: dict, name: str) -> Document:
    """The document of an OBJ or PLY input: one node, one mesh, a primitive per material group sharing the vertices
    (built: positions (n, 3) in glTF axes, uvs (n, 2) in glTF's convention or None, colors (n, 3) display-encoded or
    None, groups [(material {name, factor (linear rgb), image (bytes, mime) | None} | None, faces (F, 3))])."""
    doc = Document({"asset": {"version": "2.0", "generator": GENERATOR}, "scene": 0, "scenes": [{"nodes": [0]}],
                    "nodes": [{"mesh": 0, "name": name}], "meshes": [{"name": name, "primitives": []}]})
    attributes = {"POSITION": doc.accessor(built["positions"], "VEC3", bounds=True, target=_ARRAY_BUFFER)}
    if built["uvs"] is not None:
        attributes["TEXCOORD_0"] = doc.accessor(built["uvs"], "VEC2", target=_ARRAY_BUFFER)
    if built["colors"] is not None:  # COLOR_0 is linear; the colours read are display-encoded
        attributes["COLOR_0"] = doc.accessor(srgb_to_linear(np.asarray(built["colors"], np.float64)), "VEC3",
                                             target=_ARRAY_BUFFER)
    for material, faces in built["groups"]:
        primitive = {"attributes": dict(attributes), "mode": 4,
                     "indices": doc.accessor(np.asarray(faces).reshape(-1), "SCALAR", target=_ELEMENT_ARRAY_BUFFER)}
        if material is not None:
            pbr = {"baseColorFactor": [*map(float, material["factor"]), 1.0], "metallicFactor": 0.0,
                   "roughnessFactor": 1.0}
            if material["image"] is not None:
                data, mime = material["image"]
                doc.json.setdefault("images", []).append({"bufferView": doc.view(data), "mimeType": mime})
                doc.json.setdefault("textures", []).append({"source": len(doc.json["images"]) - 1})
                pbr["baseColorTexture"] = {"index": len(doc.json["textures"]) - 1}
            doc.json.setdefault("materials", []).append({"name": material["name"], "pbrMetallicRoughness": pbr})
            primitive["material"] = len(doc.json["materials"]) - 1
        doc.json["meshes"][0]["primitives"].append(primitive)
    return doc


def write_mesh_glb(path: str | Path, seq, frame: int = 0, overwrite: bool = False) -> Path:
    """One frame of a MeshSequence (Z up) as a static GLB (Y up): its colours as COLOR_0, or its texture as a PNG base
    colour texture with the uvs; what scripts/make_examples.py makes the demo's mesh canonical with."""
    import io

    from PIL import Image
    image = None
    if seq.texture is not None:
        out = io.BytesIO()
        Image.fromarray((np.clip(seq.texture, 0, 1) * 255 + 0.5).astype(np.uint8)).save(out, format="PNG")
        image = (out.getvalue(), "image/png")
    material = {"name": "surface", "factor": np.ones(3), "image": image}
    uvs = None if seq.uvs is None else np.stack([seq.uvs[:, 0], 1.0 - seq.uvs[:, 1]], 1)  # glTF's v runs down
    built = {"positions": seq.vertices[frame].astype(np.float64) @ Y_UP_TO_Z_UP, "uvs": uvs, "colors": seq.colors,
             "groups": [(material, seq.faces)]}
    data = document_from_arrays(built, Path(path).stem).glb()
    return atomic_write(Path(path), lambda tmp: tmp.write_bytes(data), overwrite=overwrite)


def _primitive_count(doc: dict, primitive: dict) -> int:
    """Vertices of a primitive: the count its attributes share."""
    attributes = primitive.get("attributes", {})
    key = "POSITION" if "POSITION" in attributes else next(iter(attributes))
    return int(doc["accessors"][attributes[key]]["count"])


def add_morph_animation(doc: Document, pieces, linear: np.ndarray, displacement: np.ndarray, fps: float) -> dict:
    """Morph targets and the animation of the module docstring, for `pieces` (pipeline/mesh_input.Piece) whose
    surface vertices have the linear maps `linear` (V, 3, 3) and move by `displacement` (T, V, 3). Returns what
    summary.json records."""
    j, frames = doc.json, len(displacement)
    inverse = np.linalg.pinv(np.asarray(linear, np.float64))                 # surface frame -> mesh space, per vertex
    mesh_of_node: dict[int, int] = {}
    taken: set[int] = set()
    for piece in pieces:  # a mesh shown by several nodes: the first keeps it, each other gets its own copy
        if piece.node in mesh_of_node:
            continue
        mesh = piece.mesh
        if mesh in taken:
            j["meshes"].append(copy.deepcopy(j["meshes"][mesh]))
            mesh = len(j["meshes"]) - 1
            j["nodes"][piece.node]["mesh"] = mesh
        taken.add(piece.mesh)
        mesh_of_node[piece.node] = mesh
    # Target values per (mesh, POSITION accessor): primitives sharing vertices share their targets too.
    values: dict[tuple[int, int], np.ndarray] = {}
    for piece in pieces:
        mesh = mesh_of_node[piece.node]
        primitive = j["meshes"][mesh]["primitives"][piece.primitive]
        key = (mesh, primitive["attributes"]["POSITION"])
        if key not in values:
            values[key] = np.zeros((frames, _primitive_count(j, primitive), 3))
        local = np.einsum("vij,tvj->tvi", inverse[piece.surface], displacement[:, piece.surface])
        values[key][:, piece.rows] = local
    written = {key: [doc.accessor(v[t], "VEC3", bounds=True, target=_ARRAY_BUFFER) for t in range(frames)]
               for key, v in values.items()}
    zeros: dict[int, list[int]] = {}
    names = [f"frame_{t:04d}" for t in range(frames)]
    times = doc.accessor(np.arange(frames, dtype=np.float64) / fps, "SCALAR", bounds=True)
    samplers, channels = [], []
    for node, mesh_index in mesh_of_node.items():
        mesh = j["meshes"][mesh_index]
        old = len(mesh["primitives"][0].get("targets", []))   # the spec: every primitive has the same number
        for primitive in mesh["primitives"]:
            key = (mesh_index, primitive.get("attributes", {}).get("POSITION"))
            if key not in written:  # a primitive the surface left out (points, lines): still T targets, all zero
                count = _primitive_count(j, primitive)
                if count not in zeros:
                    zeros[count] = [doc.accessor(np.zeros((count, 3)), "VEC3", bounds=True)] * frames
                written[key] = zeros[count]
            primitive["targets"] = primitive.get("targets", []) + [{"POSITION": a} for a in written[key]]
        extras = mesh.setdefault("extras", {})
        given = extras.get("targetNames", [])
        extras["targetNames"] = [*given, *(f"target_{k}" for k in range(len(given), old))][:old] + names
        fit = lambda w: [*map(float, w[:old]), *[0.0] * (old - len(w[:old]))]   # noqa: E731 -- to `old` entries
        defaults = fit(j["nodes"][node].get("weights", mesh.get("weights", [])))   # what the old targets rest at
        mesh["weights"] = fit(mesh.get("weights", [])) + [0.0] * frames
        if "weights" in j["nodes"][node]:
            j["nodes"][node]["weights"] = defaults + [0.0] * frames
        keys = np.concatenate([np.tile(defaults, (frames, 1)), np.eye(frames)], axis=1)    # (T, old + T)
        samplers.append({"input": times, "output": doc.accessor(keys.reshape(-1), "SCALAR"),
                         "interpolation": INTERPOLATION})
        channels.append({"sampler": len(samplers) - 1, "target": {"node": node, "path": "weights"}})
    j["animations"] = [{"name": ANIMATION_NAME, "samplers": samplers, "channels": channels}]
    return {"morph_targets": frames, "animated_nodes": len(mesh_of_node), "fps": float(fps),
            "interpolation": INTERPOLATION, "duration_s": (frames - 1) / fps}


def write_animated_glb(path: str | Path, mesh, displacement: np.ndarray, fps: float, overwrite: bool = False) -> dict:
    """animated.glb for `mesh` (pipeline/mesh_input.UserMesh) moving by `displacement` (T, V, 3) in its surface
    frame (Z up, the file's units) at `fps`; written atomically. Returns what summary.json records."""
    path = Path(path)
    doc = document_from_file(mesh.path) if mesh.built is None else document_from_arrays(mesh.built, mesh.path.stem)
    info = add_morph_animation(doc, mesh.pieces, mesh.linear, np.asarray(displacement, np.float64), fps)
    data = doc.glb()
    atomic_write(path, lambda tmp: tmp.write_bytes(data), overwrite=overwrite)
    return {"file": path.name, "source": str(mesh.path), **info, "bytes": len(data)}
