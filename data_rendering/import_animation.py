"""Import animated meshes made elsewhere as prepared samples, on the CPU and without Blender:

    python -m data_rendering.import_animation <file or folder> --out <data root> [--frames 24 --views 16 --res 128]

Inputs (one sample each):
- a glTF / GLB file with an animation (data_rendering/gltf_import.py);
- a folder of per-frame Wavefront OBJ files of one topology (natural order: frame_2 before frame_10); `v`, `vt`, `f`
  (v, v/vt, v//vn, v/vt/vn; polygons fan-triangulated), per-vertex colours `v x y z r g b`, and `mtllib`/`usemtl`
  materials (map_Kd texture, else Kd colours), taken from the first frame;
- an `.npz` with `vertices` (T, V, 3), `faces` (F, 3) and optionally `colors` (V, 3) in [0, 1], or `uv` (V, 2, v up as
  in OBJ) with `texture` (H, W, 3) uint8.
A folder holding `.obj` files is one sequence; any other folder is a batch: each glTF / GLB / npz file and each
subfolder of OBJ files in it is one input, a bad one is reported and the others go on (exit status 1).

Frames: `--frames N` (default 24, the synthetic writer's). glTF: N times spread over the clip, or with `--fps` /
`--stride` consecutive frames from the first key (Blender's 24 fps when only --stride is given). OBJ / npz: N frames
spread over the whole sequence (linear interpolation between source frames), or with `--stride k` every k-th source
frame from the first (the last one held if the sequence ends early).
Axes: the project's world is Z up; glTF and OBJ files are read as Y up (as Blender's importers do), npz arrays as Z up;
`--up-axis` overrides. Size: centred and scaled to largest extent 1 by the bounding box of ALL frames, so every frame
stays inside the unit cube of the voxel grid and one transform keeps the motion intact (metadata.json records it).
Then the synthetic writer's own steps (synthetic_dataset.write_sample): renders with the published cameras, surface
points with per-frame correspondence, frame-0 voxel features; the name is appended to <out>/all.txt (and with
`--split`, train.txt or test.txt). Existing samples are skipped unless `--overwrite`.
"""
from __future__ import annotations

import argparse
import re
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from data_rendering.mesh import MeshSequence, y_up_to_z_up
from datasets import layout
from utils import cli
from utils.cli import InputError
from utils.fileio import natural_key
from utils.logging import report_failures

DEFAULT_FRAMES = 24          # the synthetic writer's --frames and the configs' num_timesteps
BLENDER_FPS = 24.0
STATIC_THRESHOLD = 0.01      # the published renderer's "is it moving" test (normalised units)
_COMPANIONS = {".bin", ".png", ".jpg", ".jpeg", ".webp", ".mtl", ".txt", ".json", ".md"}  # files that go with inputs


# ----------------------------------------------------------------------------------------------- OBJ
def _obj_index(token: str, count: int) -> int:
    i = int(token)
    if i == 0:
        raise ValueError("index 0 (OBJ indices start at 1)")
    return i - 1 if i > 0 else count + i  # negative: relative to the elements defined so far


def read_obj(path: Path) -> dict:
    """positions (V, 3), colors (V, 3) or None, uvs (K, 2), faces (F, 3), uv_faces (F, 3) (-1: none), materials
    (per face) and mtllib names of one OBJ file."""
    pos, cols, uvs, faces, uv_faces, mats, libs = [], [], [], [], [], [], []
    material = None
    for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        parts = line.split("#", 1)[0].split()
        if not parts:
            continue
        try:
            if parts[0] == "v":
                x = [float(p) for p in parts[1:]]
                if len(x) < 3:
                    raise ValueError("fewer than 3 coordinates")
                pos.append(x[:3])
                cols.append(x[3:6] if len(x) >= 6 else None)
            elif parts[0] == "vt":
                uvs.append([float(p) for p in (parts[1:3] + ["0"])[:2]])
            elif parts[0] == "f":
                corners = [c.split("/") for c in parts[1:]]
                if len(corners) < 3:
                    raise ValueError("a face needs at least 3 corners")
                vi = [_obj_index(c[0], len(pos)) for c in corners]
                ti = [_obj_index(c[1], len(uvs)) if len(c) > 1 and c[1] else -1 for c in corners]
                for k in range(1, len(vi) - 1):
                    faces.append((vi[0], vi[k], vi[k + 1]))
                    uv_faces.append((ti[0], ti[k], ti[k + 1]))
                    mats.append(material)
            elif parts[0] == "usemtl":
                material = " ".join(parts[1:]) or None
            elif parts[0] == "mtllib":
                libs.append(" ".join(parts[1:]))
        except ValueError as e:
            raise InputError(f"{path}, line {lineno}: cannot read {line.strip()[:60]!r} ({e})") from None
    faces = np.asarray(faces, dtype=np.int64).reshape(-1, 3)
    if len(faces) and (faces.min() < 0 or faces.max() >= len(pos)):
        raise InputError(f"{path}: face indices outside the {len(pos)} vertices "
                         f"(found {faces.min() + 1}..{faces.max() + 1})")
    uv_faces = np.asarray(uv_faces, dtype=np.int64).reshape(-1, 3)
    if (uv_faces >= len(uvs)).any() or (uv_faces < -1).any():
        raise InputError(f"{path}: texture coordinate indices outside the {len(uvs)} vt entries")
    colors = np.asarray(cols, np.float32) if cols and all(c is not None for c in cols) else None
    return dict(positions=np.asarray(pos, np.float64).reshape(-1, 3), colors=colors,
                uvs=np.asarray(uvs, np.float64).reshape(-1, 2), faces=faces, uv_faces=uv_faces, materials=mats,
                libs=libs)


def read_mtl(obj_path: Path, libs: list[str]) -> dict[str, dict]:
    """Material name -> {"Kd": rgb, "map_Kd": Path}; missing libraries are ignored (then the mesh is grey)."""
    materials, current = {}, None
    for lib in libs:
        path = obj_path.parent / lib
        if not path.is_file():
            print(f"warning: {obj_path}: material library {lib} not found", file=sys.stderr)
            continue
        for line in path.read_text(errors="replace").splitlines():
            parts = line.split("#", 1)[0].split()
            if len(parts) >= 2 and parts[0] == "newmtl":
                current = materials.setdefault(" ".join(parts[1:]), {})
            elif current is not None and len(parts) >= 4 and parts[0] == "Kd":
                current["Kd"] = np.clip([float(p) for p in parts[1:4]], 0, 1)
            elif current is not None and len(parts) >= 2 and parts[0] == "map_Kd":
                current["map_Kd"] = path.parent / parts[-1]  # the file name comes after any options
    return materials


def weld_corners(faces: np.ndarray, uv_faces: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One vertex per distinct (position, texture coordinate) pair of the triangle corners, for files that index the
    two separately (OBJ, MD2): (position index per vertex, texture coordinate index per vertex, faces (F, 3) into the
    new vertices). Vertices repeat along uv seams."""
    corners = np.stack([faces.ravel(), uv_faces.ravel()], axis=1)
    unique, inverse = np.unique(corners, axis=0, return_inverse=True)
    return unique[:, 0], unique[:, 1], inverse.reshape(-1, 3)


def obj_appearance(path: Path, obj: dict) -> tuple[np.ndarray, dict]:
    """(vertex map into the OBJ's positions, MeshSequence colour fields): a texture splits vertices along uv seams."""
    faces, n = obj["faces"], len(obj["positions"])
    materials = read_mtl(path, obj["libs"]) if obj["libs"] else {}
    used = [materials.get(m, {}) for m in obj["materials"]]
    textured = [m["map_Kd"] for m in used if "map_Kd" in m]
    if textured and (obj["uv_faces"] >= 0).all():
        try:
            texture = np.asarray(Image.open(textured[0]).convert("RGB"), np.float32) / 255.0
        except OSError as e:
            raise InputError(f"{textured[0]}: cannot read the texture of {path} ({e})") from None
        vertex_map, uv_map, faces = weld_corners(faces, obj["uv_faces"])
        return vertex_map, dict(faces=faces, uvs=obj["uvs"][uv_map].astype(np.float32), texture=texture)
    if any("Kd" in m for m in used):
        colors = np.full((n, 3), 0.7, np.float32)
        for k in range(3):  # a vertex shared by several materials takes one of them
            colors[faces[:, k]] = [m.get("Kd", 0.7) for m in used]
        return np.arange(n), dict(faces=faces, colors=colors)
    if obj["colors"] is not None:
        colors = obj["colors"] / (255.0 if obj["colors"].max() > 1 else 1.0)  # some exporters write 0..255
        return np.arange(n), dict(faces=faces, colors=np.clip(colors, 0, 1))
    return np.arange(n), dict(faces=faces)


def load_obj_sequence(folder: Path) -> tuple[np.ndarray, dict, dict]:
    """(vertices (T, V, 3) as stored, MeshSequence fields besides vertices, metadata)."""
    files = sorted((p for p in folder.iterdir() if p.suffix.lower() == ".obj" and p.is_file()), key=natural_key)
    first = read_obj(files[0])
    vertex_map, fields = obj_appearance(files[0], first)
    frames = [first["positions"]]
    for path in files[1:]:
        obj = read_obj(path)
        if len(obj["positions"]) != len(first["positions"]):
            raise InputError(f"{path}: {len(obj['positions'])} vertices, but {files[0].name} has "
                             f"{len(first['positions'])}; an OBJ sequence needs the same vertices in every frame")
        if not np.array_equal(obj["faces"], first["faces"]):
            raise InputError(f"{path}: its faces differ from {files[0].name}'s; an OBJ sequence needs one topology")
        frames.append(obj["positions"])
    return np.stack(frames)[:, vertex_map], fields, dict(files=[p.name for p in files])


# ----------------------------------------------------------------------------------------------- npz
def load_npz(path: Path) -> tuple[np.ndarray, dict, dict]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files}
    except Exception as e:  # not a zip, truncated, pickled objects, a bare .npy
        raise InputError(f"{path}: cannot read npz ({type(e).__name__}: {e})") from None
    missing = [k for k in ("vertices", "faces") if k not in data]
    if missing:
        raise InputError(f"{path}: missing array(s) {missing} (found {sorted(data)})")
    vertices, faces = data["vertices"], data["faces"]
    if vertices.ndim != 3 or vertices.shape[-1] != 3 or vertices.dtype.kind not in "fiu":
        raise InputError(f"{path}: vertices must be numeric (T, V, 3), found {vertices.dtype} {vertices.shape}")
    if faces.ndim != 2 or faces.shape[-1] != 3 or faces.dtype.kind not in "iu":
        raise InputError(f"{path}: faces must be integer (F, 3) triangles, found {faces.dtype} {faces.shape}")
    fields, num_v = dict(faces=faces.astype(np.int64)), vertices.shape[1]
    if "colors" in data:
        colors = data["colors"]
        if colors.shape != (num_v, 3) or not np.isfinite(colors).all() or colors.min() < 0 or colors.max() > 1:
            raise InputError(f"{path}: colors must be (V={num_v}, 3) in [0, 1], found {colors.dtype} {colors.shape}")
        fields["colors"] = colors.astype(np.float32)
    elif "uv" in data or "texture" in data:
        uv, texture = data.get("uv"), data.get("texture")
        if uv is None or texture is None:
            raise InputError(f"{path}: uv and texture come together")
        if uv.shape != (num_v, 2) or not np.isfinite(uv).all():
            raise InputError(f"{path}: uv must be finite (V={num_v}, 2), found {uv.shape}")
        if texture.dtype != np.uint8 or texture.ndim != 3 or texture.shape[-1] not in (3, 4):
            raise InputError(f"{path}: texture must be uint8 (H, W, 3), found {texture.dtype} {texture.shape}")
        fields.update(uvs=uv.astype(np.float32), texture=texture[..., :3].astype(np.float32) / 255.0)
    return vertices.astype(np.float64), fields, {}


# ----------------------------------------------------------------------------------------------- common
def resample(vertices: np.ndarray, frames: int, stride: int | None, until: float | None = None) \
        -> tuple[np.ndarray, np.ndarray]:
    """(frames, V, 3) at source positions spread over the sequence (or over [0, until]), or every stride-th (held at
    the end)."""
    last = len(vertices) - 1
    end = last if until is None else min(until, last)
    where = np.minimum(np.arange(frames) * stride, last) if stride else np.linspace(0, end, frames)
    lo = np.floor(where).astype(int)
    hi, w = np.minimum(lo + 1, last), (where - lo)[:, None, None]
    return (1 - w) * vertices[lo] + w * vertices[hi], where


def check_geometry(path: Path, vertices: np.ndarray, faces: np.ndarray) -> None:
    """The refusals every format shares, worded for the user (MeshSequence's own would not name the file)."""
    if len(vertices) < 2:
        raise InputError(f"{path}: {len(vertices)} frame(s); an animation needs at least 2")
    if vertices.shape[1] == 0 or len(faces) == 0:
        raise InputError(f"{path}: no {'vertices' if vertices.shape[1] == 0 else 'faces'}")
    bad = ~np.isfinite(vertices).all(axis=(1, 2))
    if bad.any():
        raise InputError(f"{path}: NaN or infinite vertex positions in frame(s) {np.flatnonzero(bad)[:5].tolist()}")
    if faces.min() < 0 or faces.max() >= vertices.shape[1]:
        raise InputError(f"{path}: face indices outside [0, {vertices.shape[1]}) (found {faces.min()}..{faces.max()})")
    a, b, c = (vertices[0][faces[:, k]] for k in range(3))
    if not np.linalg.norm(np.cross(b - a, c - a), axis=1).any():
        raise InputError(f"{path}: every triangle of the first frame has zero area")


def normalize(vertices: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Centred, largest extent 1, by the box around all frames: one transform, so the motion is only scaled."""
    lo, hi = vertices.min(axis=(0, 1)), vertices.max(axis=(0, 1))
    centre, extent = (lo + hi) / 2, float((hi - lo).max())
    return (vertices - centre) / extent, centre, extent


def input_kind(path: Path) -> str:
    kind = "obj" if path.is_dir() else path.suffix.lower().lstrip(".")
    if kind not in ("obj", "npz", "gltf", "glb"):
        raise InputError(f"{path}: unknown file type (expected .gltf, .glb, .npz or a folder of .obj files)")
    return kind


def load_input(path: Path, args) -> tuple[MeshSequence, dict]:
    """The normalised MeshSequence of one input and what metadata.json records about its source."""
    kind = input_kind(path)
    up = args.up_axis or ("z" if kind == "npz" else "y")
    if kind in ("gltf", "glb"):
        from data_rendering.gltf_import import load_animated_gltf

        fps = args.fps or (BLENDER_FPS if args.stride else None)
        try:  # gltf_import's "up_axis" names the axis it leaves up: "z" converts a Y-up file, "y" keeps the axes
            seq, meta = load_animated_gltf(path, num_frames=args.frames, step=(args.stride or 1) / fps if fps else None,
                                           up_axis="z" if up == "y" else "y")
        except ValueError as e:
            raise InputError(str(e) if str(path) in str(e) else f"{path}: {e}") from None
        vertices, fields = seq.vertices.astype(np.float64), dict(faces=seq.faces, colors=seq.colors, uvs=seq.uvs,
                                                                  texture=seq.texture)
        source = {k: meta[k] for k in ("format", "animation_name", "times", "color_source", "warnings")}
        source["frame_times"] = source.pop("times")
    else:
        if args.fps:
            raise InputError(f"{path}: --fps applies to glTF clips only; use --stride for frame sequences")
        vertices, fields, source = load_obj_sequence(path) if kind == "obj" else load_npz(path)
        if up == "y":
            vertices = y_up_to_z_up(vertices)
    seq, prepared = prepared_sequence(path, vertices, fields, None if kind in ("gltf", "glb") else args.frames,
                                      args.stride)
    motion = prepared["mean_displacement"]
    if motion < STATIC_THRESHOLD:
        print(f"warning: {path}: nearly static (mean displacement {motion:.4f} < {STATIC_THRESHOLD})", file=sys.stderr)
    source.update(source=str(path), importer="data_rendering.import_animation", input_format=kind, up_axis=up,
                  **prepared)
    return seq, source


def prepared_sequence(where, vertices: np.ndarray, fields: dict, frames: int | None = None,
                      stride: int | None = None, until: float | None = None) -> tuple[MeshSequence, dict]:
    """The normalised MeshSequence of source frames (T, V, 3) already Z up, after the refusals of check_geometry,
    resampled to `frames` (None: kept as they are; see resample for stride and until), and what metadata.json records
    about it. Shared with data_rendering/game_assets."""
    check_geometry(where, vertices, fields["faces"])
    record = {}
    if frames is not None:
        record["source_frames"] = len(vertices)
        vertices, positions = resample(vertices, frames, stride, until)
        record["frame_positions"] = [round(float(x), 6) for x in positions]
    vertices, centre, extent = normalize(vertices)
    seq = MeshSequence(vertices, **fields)
    record.update(mean_displacement=float(np.linalg.norm(seq.vertices - seq.vertices[:1], axis=-1).mean()),
                  normalization={"centre": centre.tolist(), "extent": extent,
                                 "note": "sample = (input, after the up-axis change, - centre) / extent"})
    return seq, record


def find_inputs(path: Path) -> tuple[list[Path], bool]:
    """(inputs, batch): a file or an OBJ folder is one input; any other folder is a batch of inputs."""
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    has_obj = lambda d: any(p.suffix.lower() == ".obj" for p in d.iterdir())  # noqa: E731
    if path.is_file() or has_obj(path):
        return [path], False
    items = [p for p in sorted(path.iterdir(), key=natural_key) if not p.name.startswith(".")
             and (p.is_dir() and has_obj(p) or p.is_file() and p.suffix.lower() not in _COMPANIONS)]
    if not items:
        raise InputError(f"{path}: no glTF / GLB / npz files or folders of .obj files in it")
    return items, True


def add_to_list(path: Path, names: list[str]) -> None:
    """Append the names not yet listed; the existing lines (comments, extra fields) stay as they are."""
    lines = path.read_text().splitlines() if path.exists() else []
    listed = {line.split("#", 1)[0].split()[0] for line in lines if line.split("#", 1)[0].strip()}
    new = [n for n in dict.fromkeys(names) if n not in listed]
    if new:
        layout.write_list_file(path, lines + new)


def sample_folder(where, out: Path, name: str) -> Path:
    """out / name, for a name that stays inside `out` and fits on a list-file line (InputError naming `where`)."""
    try:
        final = layout.resolve_sample(out, name)
        if re.search(r"[\s#]", name):
            raise ValueError("whitespace or '#' would break the list files")
    except ValueError as e:
        raise InputError(f"{where}: bad sample name {name!r}: {e}") from None
    return final


def write_prepared(seq: MeshSequence, meta: dict, final: Path, name: str, args) -> str:
    """The synthetic writer's sample folder for a normalised sequence (args: seed, views, res, extractor,
    write_meshes, overwrite); the random views are drawn from the seed and the sample name."""
    from data_rendering.synthetic_dataset import write_sample  # imported late: refusals and --help need no torch

    seed = args.seed * 1_000_003 + zlib.crc32(name.encode()) % 1_000_003  # different random views per sample
    write_sample(seq, final, meta, args, seed, overwrite=args.overwrite)
    return f"{seq.num_frames} frames, {seq.vertices.shape[1]} vertices, {len(seq.faces)} faces"


def import_one(path: Path, name: str, args) -> str:
    input_kind(path)
    final = sample_folder(path, args.out, name)
    if final.exists() and not args.overwrite:
        return "exists, skipped (--overwrite replaces it)"
    seq, meta = load_input(path, args)
    return write_prepared(seq, meta, final, name, args)


def add_writer_options(ap: argparse.ArgumentParser, out_required: bool = True) -> None:
    """--out and the options of the written sample folders (shared with data_rendering/game_assets, whose --bundle
    may stand in for --out)."""
    ap.add_argument("--out", type=Path, required=out_required, help="data root (sample folders and list files)")
    ap.add_argument("--frames", type=int, default=DEFAULT_FRAMES)
    ap.add_argument("--views", type=int, default=16, help="views per frame (8 fixed, then random)")
    ap.add_argument("--res", type=int, default=128, help="render resolution (square)")
    ap.add_argument("--extractor", default="patch", help="features lifted onto the voxels (patch, dinov2_vitl14_reg)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write-meshes", action="store_true", help="also write objs/frame{t}.obj (normalised)")
    ap.add_argument("--overwrite", action="store_true", help="replace existing samples")


def refuse_below(args, limits) -> None:
    """InputError for the first (option, least value) whose given value is below its least (None: not given)."""
    for option, least in limits:
        if getattr(args, option) is not None and not getattr(args, option) >= least:
            raise InputError(f"--{option} must be {'positive' if 0 < least < 1 else f'at least {least}'}, "
                             f"got {getattr(args, option)}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="import_animation", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", type=Path, help="glTF / GLB / npz file, folder of .obj frames, or a folder of those")
    add_writer_options(ap)
    ap.add_argument("--name", help="sample name (one input only; default the file or folder stem)")
    ap.add_argument("--fps", type=float, help="glTF: consecutive frames at this rate from the first key")
    ap.add_argument("--stride", type=int, help="every k-th frame (glTF: of --fps, default 24)")
    ap.add_argument("--up-axis", choices=("y", "z"), help="the input's up axis (default y for glTF / OBJ, z for npz)")
    ap.add_argument("--split", choices=("train", "test"), help="also list the samples in train.txt or test.txt")
    args = ap.parse_args(argv)
    refuse_below(args, (("frames", 2), ("views", 1), ("res", 1), ("stride", 1), ("fps", 1e-9)))
    inputs, batch = find_inputs(args.input)
    if args.name and batch:
        raise InputError(f"{args.input}: --name needs a single input, the folder holds {len(inputs)}")
    args.out.mkdir(parents=True, exist_ok=True)

    names, failures, seen = [], [], {}
    for k, path in enumerate(inputs):
        name = args.name or re.sub(r"[\s#]+", "_", path.name if path.is_dir() else path.stem)
        try:
            if name in seen:
                raise InputError(f"{path}: sample name {name!r} is already taken by {seen[name].name}")
            seen[name] = path
            print(f"[{k + 1}/{len(inputs)}] {name}: {import_one(path, name, args)}", flush=True)
            names.append(name)
        except Exception as e:  # noqa: BLE001 -- one bad input must not stop the batch
            if not batch:
                raise
            why = cli.one_line(e) if isinstance(e, InputError) else f"{type(e).__name__}: {cli.one_line(e)}"
            failures.append((name, why))
            print(f"[{k + 1}/{len(inputs)}] {name}: FAILED {why}", file=sys.stderr, flush=True)
    for list_name in ("all", args.split):
        if list_name and names:
            add_to_list(args.out / f"{list_name}.txt", names)
    return report_failures(failures, len(inputs), "inputs")


if __name__ == "__main__":
    sys.exit(cli.run(main))
