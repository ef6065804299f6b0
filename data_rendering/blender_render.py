r"""Render one animated asset (glTF / GLB / FBX) into a sample directory with Blender as a Python module (bpy).

Runs inside the Blender venv made by ``./setup.sh --render``::

    .venv-render/bin/python data_rendering/blender_render.py --input obj.glb --out data/renders/<name> \
        [--frames 24] [--views 16] [--resolution 512] [--engine CYCLES] [--samples 16] [--seed 0]

(``blender -b -P data_rendering/blender_render.py -- --input ...`` works too.) Nothing here imports torch or the
project's torch modules: the helpers above ``render`` use only numpy and the standard library, so the main venv
(tests, ``render_dataset.py``) can import this file without bpy; bpy is imported inside ``render``.

What it does (the published renderer's recipe, docs/published_system.md §1.9, with the fixes of published §10.4):

1. Imports the asset into an empty scene; imported cameras and lights are removed; geometry hidden from rendering
   (e.g. the glTF importer's bone-shape collection) is ignored.
2. Frames: ``T`` (default 24) consecutive native frames from the first keyframe, clamped at the last one. No keyframes,
   or fewer than ``--min-frames`` (12) native frames → ``static.txt``. If the mean vertex displacement from frame 0
   (normalised units, over frames and vertices) is below ``--static-threshold`` (0.01), the frames are re-drawn
   uniformly over the whole range; still below → ``static.txt``.
3. Normalisation by frame 0's bounding box: centred at the origin, largest extent 1, Z up (the importers convert to
   Blender's Z-up). Later frames may leave the unit cube.
4. Views per frame: the 8 fixed views (front (0, −2, 0), back, left, right, front_right, front_left, back_left,
   back_right), then random views, azimuth U[0°, 360°) and polar angle U[75°, 135°], re-drawn for every
   (frame, view) from ``--seed``; radius 2, looking at the origin with Z up, Blender's default camera (50 mm lens,
   36 mm sensor: x_fov ≈ 0.6911 rad).
5. Per frame t and view v: ``imgs/timestep_TT_view_VV.png`` (RGBA, transparent film, straight alpha, "Standard"
   view transform) and ``meta_data/timestep_TT_view_VV.json`` (the published camera record); per frame
   ``objs/frame{t}.obj``: the evaluated (deformed, world-space, normalised) geometry, **triangulated once** at
   frame 0 so every frame has the same faces; ``metadata.json`` (source, frames, views, fov, engine, ...).

Everything is written into ``.<name>.partial`` beside the output folder and renamed when complete, so an output
folder that exists is finished: it holds ``metadata.json`` (rendered) or ``static.txt`` (skipped as static).
Exit status: 0 rendered, static or already done; 1 failed; 2 bad arguments.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from datasets.layout import camera_path, image_path, mesh_frame_path, render_metadata_path, static_marker_path
from utils.camera_rig import (LENS_MM, POLAR_RANGE_DEG, PUBLISHED_DIRECTIONS, PUBLISHED_VIEW_NAMES, SENSOR_MM,
                              TRAIN_RADIUS)

SUPPORTED_SUFFIXES = (".glb", ".gltf", ".fbx")


def partial_dir(out) -> Path:
    """Work folder of a render in progress: a hidden sibling of the output folder (same file system → atomic rename)."""
    out = Path(out)
    return out.parent / f".{out.name}.partial"


def sample_status(out) -> str | None:
    """'complete' (metadata.json), 'static' (static.txt) or None (not rendered, or not by a finished run)."""
    out = Path(out)
    if render_metadata_path(out).is_file():
        return "complete"
    if static_marker_path(out).is_file():
        return "static"
    return None


# ----------------------------------------------------------------------------------------------- cameras
# Conventions of utils/cameras.py: world Z up; Blender camera-to-world ``matrix_world`` has columns right, up, back
# (the camera looks along −Z); OpenCV axes are right, down, forward.
# The rig itself (radius, lens, fixed views, polar range) is utils/camera_rig.py's, shared with the CPU renderer.
FIXED_VIEW_DIRECTIONS = np.array(PUBLISHED_DIRECTIONS, dtype=np.float64)


def view_positions(num_views: int, rng: np.random.Generator, radius: float = TRAIN_RADIUS) -> np.ndarray:
    """Camera positions (num_views, 3) for one frame: the fixed views first, then random ones drawn from ``rng``
    (azimuth U[0, 360°) with 0 = front (0, −r, 0) and 90° = right (r, 0, 0); polar angle from +Z U[75°, 135°])."""
    fixed = FIXED_VIEW_DIRECTIONS[:num_views] * radius
    draws = rng.random((max(num_views - len(FIXED_VIEW_DIRECTIONS), 0), 2))
    azimuth = np.deg2rad(360.0 * draws[:, 0])
    lo, hi = POLAR_RANGE_DEG
    polar = np.deg2rad(lo + (hi - lo) * draws[:, 1])
    random = radius * np.stack([np.sin(polar) * np.sin(azimuth), -np.sin(polar) * np.cos(azimuth),
                                np.cos(polar)], axis=-1)
    return np.concatenate([fixed, random]).reshape(num_views, 3)


def look_at_matrix_world(eye, target=(0.0, 0.0, 0.0), up=(0.0, 0.0, 1.0)) -> np.ndarray:
    """Blender camera-to-world 4×4 of a camera at ``eye`` looking at ``target`` with ``up`` upward in the image."""
    eye, target, up = (np.asarray(x, dtype=np.float64) for x in (eye, target, up))
    forward = target - eye
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, up)
    if np.linalg.norm(right) < 1e-9:  # looking straight along ±up: any horizontal right will do; keep it stable
        right = np.cross(forward, np.array([0.0, 1.0, 0.0]) * -np.sign(forward @ up))
    right /= np.linalg.norm(right)
    cam_up = np.cross(right, forward)
    m = np.eye(4)
    m[:3, 0], m[:3, 1], m[:3, 2], m[:3, 3] = right, cam_up, -forward, eye
    return m


def camera_record(matrix_world, x_fov: float, aspect: float = 1.0, bbox=None) -> dict:
    """The published camera JSON (published §1.2; same fields and order as utils.cameras.blender_camera_json):
    ``matrix_world`` (Blender camera-to-world rows), ``format_version`` 6, ``max_depth`` 5.0, ``bbox``
    ([[min xyz], [max xyz]], when given), ``origin`` (camera centre), ``x_fov``, ``y_fov`` (radians) and ``x``, ``y``,
    ``z``: the OpenCV right / down / forward axes in world."""
    m = np.asarray(matrix_world, dtype=np.float64)
    if m.shape != (4, 4):
        raise ValueError(f"camera_record: matrix_world must be 4x4, got {m.shape}")
    x_fov = float(x_fov)
    record = {"matrix_world": m.tolist(), "format_version": 6, "max_depth": 5.0}
    if bbox is not None:
        record["bbox"] = [[float(v) for v in corner] for corner in bbox]
    record.update(origin=m[:3, 3].tolist(), x_fov=x_fov, y_fov=2.0 * math.atan(math.tan(x_fov / 2.0) / aspect),
                  x=m[:3, 0].tolist(), y=(-m[:3, 1]).tolist(), z=(-m[:3, 2]).tolist())
    return record


# ----------------------------------------------------------------------------------------------- frames
def native_frame_count(first: float, last: float) -> int:
    """Whole native frames in [first, last]."""
    return int(math.floor(last + 1e-6) - math.ceil(first - 1e-6) + 1) if last >= first else 0


def consecutive_frames(first: float, last: float, num_frames: int) -> list[float]:
    """Published choice: ``first + t`` for t < num_frames, clamped at the last keyframe."""
    return [float(min(first + t, last)) for t in range(num_frames)]


def uniform_frames(first: float, last: float, num_frames: int) -> list[float]:
    """Fallback for slow motion: ``num_frames`` frames spread evenly over [first, last] (subframes allowed)."""
    return [float(f) for f in np.linspace(first, last, num_frames)]


def mean_displacement(vertices: np.ndarray) -> float:
    """Mean distance of every vertex from its frame-0 position, over frames 1.. and vertices; vertices (T, V, 3)."""
    vertices = np.asarray(vertices, dtype=np.float64)
    if vertices.shape[0] < 2 or vertices.shape[1] == 0:
        return 0.0
    return float(np.linalg.norm(vertices[1:] - vertices[:1], axis=-1).mean())


# ----------------------------------------------------------------------------------------------- files
def write_obj(path, vertices: np.ndarray, faces: np.ndarray) -> None:
    """Triangle mesh as Wavefront OBJ: ``v x y z`` lines, then 1-based ``f a b c`` lines."""
    vertices = np.asarray(vertices, dtype=np.float64).reshape(-1, 3)
    faces = np.asarray(faces, dtype=np.int64).reshape(-1, 3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        np.savetxt(f, vertices, fmt="v %.6f %.6f %.6f")
        np.savetxt(f, faces + 1, fmt="f %d %d %d")


def write_json(path, data) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def finish(work: Path, out: Path, overwrite: bool) -> None:
    """Move a finished work folder into place (replacing ``out`` only when ``overwrite``)."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    elif out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} appeared while rendering (another renderer?); pass --overwrite to replace it")
        if out.is_dir():
            shutil.rmtree(out)
        else:
            out.unlink()
    os.replace(work, out)


# ----------------------------------------------------------------------------------------------- arguments
def parse_args(argv=None) -> argparse.Namespace:
    if argv is None:
        argv = sys.argv[1:]
        if "--" in argv:  # `blender -b -P blender_render.py -- args`
            argv = argv[argv.index("--") + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", required=True, help="animated asset: .glb, .gltf or .fbx")
    p.add_argument("--out", required=True, help="sample directory to create (e.g. <data_root>/<uid>)")
    p.add_argument("--frames", type=int, default=24, help="frames T per object")
    p.add_argument("--views", type=int, default=16, help="views per frame (8 fixed, the rest random; published: 100)")
    p.add_argument("--resolution", type=int, default=512, help="square image size in pixels")
    p.add_argument("--engine", default="CYCLES", choices=("CYCLES", "WORKBENCH", "EEVEE"),
                   help="CYCLES: path tracing (CPU or GPU). WORKBENCH: fast OpenGL preview shading (needs EGL). "
                        "EEVEE: rasteriser (very slow on software OpenGL)")
    p.add_argument("--device", default="AUTO", choices=("AUTO", "CPU", "GPU"),
                   help="Cycles device; AUTO takes a GPU (OptiX/CUDA/HIP/oneAPI/Metal) when Blender finds one")
    p.add_argument("--samples", type=int, default=16,
                   help="Cycles samples per pixel (published: 32 with denoising; 16 keeps CPU renders affordable)")
    p.add_argument("--denoise", action="store_true", help="Cycles denoising (OpenImageDenoise)")
    p.add_argument("--threads", type=int, default=0, help="render threads (0: all cores)")
    p.add_argument("--light", default="world", choices=("world", "area"),
                   help="world: uniform white environment (every side lit evenly); area: one large area light above "
                        "the object (the published rig)")
    p.add_argument("--light-strength", type=float, default=1.0, help="scale of the light")
    p.add_argument("--seed", type=int, default=0, help="seed of the random views")
    p.add_argument("--radius", type=float, default=TRAIN_RADIUS, help="camera distance")
    p.add_argument("--min-frames", type=int, default=12, help="shorter animations are static")
    p.add_argument("--static-threshold", type=float, default=0.01,
                   help="mean vertex displacement (normalised units) below which an object is static")
    p.add_argument("--overwrite", action="store_true", help="render again even if --out is finished")
    p.add_argument("--verbose", action="store_true", help="keep Blender's own per-render output")
    args = p.parse_args(argv)
    for name, low in (("frames", 1), ("views", 1), ("resolution", 8), ("samples", 1), ("min_frames", 1)):
        if getattr(args, name) < low:
            p.error(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    if args.radius <= 0 or args.static_threshold < 0 or args.light_strength <= 0:
        p.error("--radius and --light-strength must be > 0, --static-threshold >= 0")
    return args


# ----------------------------------------------------------------------------------------------- Blender part
GEOMETRY_TYPES = {"MESH", "CURVE", "SURFACE", "FONT", "META"}


@contextlib.contextmanager
def _quiet_stdout(enabled: bool):
    """Send C-level stdout to /dev/null (Blender prints a line per render tile and sample)."""
    if not enabled:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def _import_asset(bpy, path: Path) -> None:
    suffix = path.suffix.lower()
    if suffix in (".glb", ".gltf"):
        result = bpy.ops.import_scene.gltf(filepath=str(path))
    elif suffix == ".fbx":
        result = bpy.ops.import_scene.fbx(filepath=str(path), use_anim=True)
    else:
        raise ValueError(f"{path}: unsupported file type {suffix!r} (expected one of {SUPPORTED_SUFFIXES})")
    if "FINISHED" not in result:
        raise RuntimeError(f"{path}: Blender's importer returned {sorted(result)}")


def _renders(obj) -> bool:
    """True when an object takes part in the final render (its own and its collections' render switches)."""
    if obj.hide_render or not obj.visible_get():
        return False
    return not any(c.hide_render for c in obj.users_collection)


def _prepare_scene(bpy, scene) -> list:
    """Drop imported cameras and lights, keep render and viewport evaluation identical, and return the geometry
    objects that render."""
    for obj in list(scene.objects):
        if obj.type in ("CAMERA", "LIGHT", "LIGHT_PROBE"):
            bpy.data.objects.remove(obj, do_unlink=True)
    geometry = []
    for obj in scene.objects:
        for mod in getattr(obj, "modifiers", ()):
            # The OBJ files come from the viewport evaluation: make the render evaluate the same way.
            mod.show_render = mod.show_viewport
            if mod.type in ("SUBSURF", "MULTIRES"):
                mod.render_levels = mod.levels
        if obj.type in GEOMETRY_TYPES:
            if _renders(obj):
                geometry.append(obj)
            else:
                obj.hide_render = True  # hidden helpers (e.g. glTF bone shapes) stay out of images and meshes
    return geometry


def _fix_invisible_materials(bpy) -> list[str]:
    """Make materials with a constant alpha of 0 opaque (returns their names). Such materials draw nothing at all; the
    FBX importer produces them from exporters that write transparency the other way round."""
    fixed = []
    for material in bpy.data.materials:
        if not material.use_nodes or material.node_tree is None:
            continue
        for node in material.node_tree.nodes:
            alpha = node.inputs.get("Alpha") if node.type == "BSDF_PRINCIPLED" else None
            if alpha is not None and not alpha.is_linked and alpha.default_value <= 0.0:
                alpha.default_value = 1.0
                fixed.append(material.name)
    return fixed


def _keyframe_range(scene) -> tuple[float, float] | None:
    """(first, last) keyframe over the actions and unmuted NLA strips that animate the scene, or None."""
    first, last = math.inf, -math.inf

    def action_keys(action):
        nonlocal first, last
        for fcurve in action.fcurves:
            n = len(fcurve.keyframe_points)
            if n:
                co = np.empty(2 * n, dtype=np.float64)
                fcurve.keyframe_points.foreach_get("co", co)
                first, last = min(first, co[0::2].min()), max(last, co[0::2].max())

    owners = []
    for obj in scene.objects:
        owners += [obj, obj.data, getattr(obj.data, "shape_keys", None)]
    for owner in owners:
        anim = getattr(owner, "animation_data", None) if owner is not None else None
        if anim is None:
            continue
        if anim.action is not None:
            action_keys(anim.action)
        for track in anim.nla_tracks:
            if track.mute:
                continue
            for strip in track.strips:
                if not strip.mute and strip.action is not None and any(len(fc.keyframe_points)
                                                                       for fc in strip.action.fcurves):
                    first, last = min(first, strip.frame_start), max(last, strip.frame_end)
    return (float(first), float(last)) if first <= last else None


def _set_frame(scene, frame: float) -> None:
    whole = math.floor(frame)
    scene.frame_set(int(whole), subframe=float(frame - whole))


def _from_evaluated_meshes(bpy, geometry, read) -> list[np.ndarray]:
    """`read(evaluated object, its temporary mesh)` for each geometry object at the current frame."""
    depsgraph = bpy.context.evaluated_depsgraph_get()
    out = []
    for obj in geometry:
        evaluated = obj.evaluated_get(depsgraph)
        mesh = evaluated.to_mesh()
        try:
            out.append(read(evaluated, mesh))
        finally:
            evaluated.to_mesh_clear()
    return out


def _evaluated_vertices(bpy, geometry) -> list[np.ndarray]:
    """World-space vertex positions (V_i, 3) of each geometry object at the current frame."""
    def read(evaluated, mesh):
        co = np.empty(3 * len(mesh.vertices), dtype=np.float64)
        mesh.vertices.foreach_get("co", co)
        m = np.array(evaluated.matrix_world, dtype=np.float64)
        return co.reshape(-1, 3) @ m[:3, :3].T + m[:3, 3]
    return _from_evaluated_meshes(bpy, geometry, read)


def _triangles(bpy, geometry) -> list[np.ndarray]:
    """Triangles (F_i, 3) of each geometry object's evaluated mesh at the current frame (Blender's tessellation)."""
    def read(evaluated, mesh):
        mesh.calc_loop_triangles()
        tris = np.empty(3 * len(mesh.loop_triangles), dtype=np.int64)
        mesh.loop_triangles.foreach_get("vertices", tris)
        return tris.reshape(-1, 3)
    return _from_evaluated_meshes(bpy, geometry, read)


def _sample_geometry(bpy, scene, geometry, frames, counts) -> np.ndarray:
    """(T, V, 3) world vertices of all geometry at each frame; the per-object vertex counts must stay ``counts``."""
    frames_vertices = []
    for frame in frames:
        _set_frame(scene, frame)
        per_object = _evaluated_vertices(bpy, geometry)
        found = [len(v) for v in per_object]
        if found != counts:
            changed = [obj.name for obj, a, b in zip(geometry, counts, found) if a != b]
            raise RuntimeError(f"the topology changes over the animation (vertex counts of {changed} differ at "
                               f"frame {frame} from the first frame); fixed-topology meshes are required")
        frames_vertices.append(np.concatenate(per_object) if per_object else np.zeros((0, 3)))
    return np.stack(frames_vertices)


def _normalise(bpy, scene, geometry, frame0: float) -> tuple[np.ndarray, float]:
    """Parent every root object to one empty that maps frame 0's bounding box to a centred cube of largest extent 1.
    Returns (centre in the asset's coordinates, scale)."""
    _set_frame(scene, frame0)
    vertices = np.concatenate(_evaluated_vertices(bpy, geometry))
    lo, hi = vertices.min(0), vertices.max(0)
    extent = float((hi - lo).max())
    if not np.isfinite(extent) or extent <= 0:
        raise RuntimeError(f"degenerate geometry at frame {frame0}: bounding box {lo.tolist()}..{hi.tolist()}")
    centre = (lo + hi) / 2
    scale = 1.0 / extent
    root = bpy.data.objects.new("gvf_normalise", None)
    scene.collection.objects.link(root)
    for obj in scene.objects:
        if obj.parent is None and obj is not root:
            world = obj.matrix_world.copy()
            obj.parent = root
            obj.matrix_world = world  # root is still the identity here, so nothing moves yet
    root.scale = (scale, scale, scale)
    root.location = tuple(-centre * scale)
    bpy.context.view_layer.update()
    return centre, scale


def _setup_lighting(bpy, scene, kind: str, strength: float) -> None:
    world = bpy.data.worlds.new("gvf_world")
    scene.world = world
    world.use_nodes = True
    background = world.node_tree.nodes["Background"]
    if scene.render.engine == "BLENDER_WORKBENCH":
        return  # Workbench has its own lighting (set in _setup_render)
    if kind == "world":
        # A uniform white environment: a convex diffuse surface then shows its albedo, crevices darken a little.
        background.inputs["Color"].default_value = (1.0, 1.0, 1.0, 1.0)
        background.inputs["Strength"].default_value = strength
        return
    background.inputs["Strength"].default_value = 0.0
    light = bpy.data.lights.new("gvf_area", type="AREA")
    light.size = 100.0
    light.energy = 30000.0 * strength  # radiance ≈ 1 over a 100 × 100 m emitter
    obj = bpy.data.objects.new("gvf_area", light)
    obj.location = (0.0, 0.0, 4.0)  # above every camera (highest: elevation 45° at radius 2 → z ≈ 1.41), facing down
    obj.visible_camera = False
    scene.collection.objects.link(obj)


def _cycles_device(bpy, scene, request: str) -> str:
    """Pick the Cycles device; returns the backend used ('CPU', 'OPTIX', 'CUDA', ...)."""
    scene.cycles.device = "CPU"
    if request == "CPU":
        return "CPU"
    prefs = bpy.context.preferences.addons["cycles"].preferences
    for backend in ("OPTIX", "CUDA", "HIP", "ONEAPI", "METAL"):
        try:
            prefs.compute_device_type = backend
        except TypeError:  # backend not compiled into this Blender
            continue
        prefs.get_devices()
        devices = [d for d in prefs.devices if d.type == backend]
        if devices:
            for d in prefs.devices:
                d.use = d.type == backend
            scene.cycles.device = "GPU"
            return backend
    if request == "GPU":
        raise RuntimeError("--device GPU: Blender found no GPU backend (OptiX, CUDA, HIP, oneAPI, Metal)")
    return "CPU"


def _setup_render(bpy, scene, args) -> dict:
    render = scene.render
    render.resolution_x = render.resolution_y = args.resolution
    render.resolution_percentage = 100
    render.film_transparent = True
    render.image_settings.file_format = "PNG"
    render.image_settings.color_mode = "RGBA"
    render.image_settings.color_depth = "8"
    scene.view_settings.view_transform = "Standard"  # texture colours stay as authored (no Filmic/AgX tone curve)
    scene.view_settings.look = "None"
    if args.threads > 0:
        render.threads_mode, render.threads = "FIXED", args.threads
    info = {"engine": args.engine}
    if args.engine == "CYCLES":
        render.engine = "CYCLES"
        info["device"] = _cycles_device(bpy, scene, args.device)
        cycles = scene.cycles
        cycles.samples = args.samples
        cycles.use_adaptive_sampling = True
        cycles.use_denoising = bool(args.denoise)
        cycles.max_bounces, cycles.diffuse_bounces, cycles.glossy_bounces = 4, 1, 1
        cycles.transmission_bounces, cycles.transparent_max_bounces, cycles.volume_bounces = 2, 8, 0
        render.use_persistent_data = True  # keep the scene between renders that differ only by the camera
        info.update(samples=args.samples, denoise=bool(args.denoise))
    elif args.engine == "WORKBENCH":
        render.engine = "BLENDER_WORKBENCH"
        shading = scene.display.shading
        # Unlit albedo under the uniform "world" light, Blender's studio light for "area".
        shading.light = "FLAT" if args.light == "world" else "STUDIO"
        shading.color_type = "TEXTURE"
    else:
        engines = {e.identifier for e in render.bl_rna.properties["engine"].enum_items}
        render.engine = "BLENDER_EEVEE_NEXT" if "BLENDER_EEVEE_NEXT" in engines else "BLENDER_EEVEE"
    info["blender_engine"] = render.engine
    return info


def _make_camera(bpy, scene):
    data = bpy.data.cameras.new("gvf_camera")
    data.lens, data.sensor_width, data.sensor_fit = LENS_MM, SENSOR_MM, "AUTO"
    data.clip_start, data.clip_end = 0.01, 100.0
    camera = bpy.data.objects.new("gvf_camera", data)
    scene.collection.objects.link(camera)
    scene.camera = camera
    return camera


def render(args) -> str:
    """Render ``args.input`` into ``args.out``; returns 'complete', 'static' or 'done' (finished before)."""
    import bpy
    from mathutils import Matrix

    source, out = Path(args.input).resolve(), Path(args.out).resolve()
    if not source.is_file():
        raise FileNotFoundError(f"--input {source}: no such file")
    if source.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise ValueError(f"--input {source}: expected one of {SUPPORTED_SUFFIXES}, found {source.suffix!r}")
    if sample_status(out) and not args.overwrite:
        print(f"{out}: already finished ({sample_status(out)}); pass --overwrite to render again")
        return "done"
    if out.exists() and not args.overwrite and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {out} exists but is not a finished sample (no {render_metadata_path(out).name} or {static_marker_path(out).name}); "
                              "pass --overwrite to replace it")
    work = partial_dir(out)
    if work.exists():  # left over from an interrupted run
        shutil.rmtree(work)
    work.mkdir(parents=True)
    started = time.time()

    try:
        bpy.ops.wm.read_factory_settings(use_empty=True)
        scene = bpy.context.scene
        with _quiet_stdout(not args.verbose):
            _import_asset(bpy, source)
        geometry = _prepare_scene(bpy, scene)
        if not geometry:
            raise RuntimeError(f"{source}: no renderable geometry after import")
        record = {"source": str(source), "source_sha256": file_sha256(source)}
        made_opaque = _fix_invisible_materials(bpy)
        if made_opaque:
            print(f"{source}: materials with alpha 0 made opaque: {made_opaque}")

        def static(reason: str) -> str:
            static_marker_path(work).write_text(reason + "\n" + json.dumps(record) + "\n")
            finish(work, out, args.overwrite)
            print(f"{out}: static ({reason})")
            return "static"

        key_range = _keyframe_range(scene)
        if key_range is None:
            return static("no keyframes")
        first, last = key_range
        if native_frame_count(first, last) < args.min_frames:
            return static(f"animation range {first:g}..{last:g} is shorter than {args.min_frames} frames")

        frames = consecutive_frames(first, last, args.frames)
        centre, scale = _normalise(bpy, scene, geometry, frames[0])
        _set_frame(scene, frames[0])
        faces_per_object = _triangles(bpy, geometry)
        counts = [len(v) for v in _evaluated_vertices(bpy, geometry)]
        offsets = np.cumsum([0] + counts[:-1])
        faces = np.concatenate([f + o for f, o in zip(faces_per_object, offsets)]) if faces_per_object else None
        if faces is None or len(faces) == 0:
            raise RuntimeError(f"{source}: the geometry has no faces")
        vertices = _sample_geometry(bpy, scene, geometry, frames, counts)
        motion, resampled = mean_displacement(vertices), False
        if motion < args.static_threshold:
            frames, resampled = uniform_frames(first, last, args.frames), True
            vertices = _sample_geometry(bpy, scene, geometry, frames, counts)
            motion = mean_displacement(vertices)
            if motion < args.static_threshold:
                return static(f"mean vertex displacement {motion:.4g} < {args.static_threshold:g}")

        engine_info = _setup_render(bpy, scene, args)
        _setup_lighting(bpy, scene, args.light, args.light_strength)
        camera = _make_camera(bpy, scene)
        rng = np.random.default_rng(args.seed)
        x_fov = float(camera.data.angle_x)
        render_time = 0.0
        for t, frame in enumerate(frames):
            _set_frame(scene, frame)
            write_obj(mesh_frame_path(work, t), vertices[t], faces)
            bbox = [vertices[t].min(0), vertices[t].max(0)]
            for v, eye in enumerate(view_positions(args.views, rng, args.radius)):
                camera.matrix_world = Matrix(look_at_matrix_world(eye).tolist())
                bpy.context.view_layer.update()
                scene.render.filepath = str(image_path(work, t, v))
                image_path(work, t, v).parent.mkdir(parents=True, exist_ok=True)
                tic = time.time()
                with _quiet_stdout(not args.verbose):
                    bpy.ops.render.render(write_still=True)
                render_time += time.time() - tic
                if not image_path(work, t, v).is_file():
                    raise RuntimeError(f"Blender did not write {image_path(work, t, v)}")
                # The record is read back from Blender's camera, so it describes exactly what was rendered.
                write_json(camera_path(work, t, v),
                           camera_record(np.array(camera.matrix_world), x_fov, bbox=bbox))
        num_renders = len(frames) * args.views
        write_json(render_metadata_path(work), {
            **record,
            "frames": frames, "num_frames": len(frames), "keyframe_range": [first, last],
            "frames_resampled_uniformly": resampled, "mean_displacement": motion,
            "views": args.views, "fixed_views": list(PUBLISHED_VIEW_NAMES[:args.views]),
            "random_polar_deg": list(POLAR_RANGE_DEG), "radius": args.radius, "seed": args.seed,
            "x_fov": x_fov, "lens_mm": LENS_MM, "sensor_mm": SENSOR_MM, "resolution": args.resolution,
            **engine_info, "light": args.light, "light_strength": args.light_strength,
            "view_transform": "Standard", "normalisation": {"centre": centre.tolist(), "scale": scale},
            "materials_made_opaque": made_opaque, "num_vertices": int(vertices.shape[1]), "num_faces": int(len(faces)),
            "fps": scene.render.fps / scene.render.fps_base, "blender": bpy.app.version_string,
            "render_seconds": round(render_time, 3), "seconds_per_image": round(render_time / num_renders, 4),
            "total_seconds": round(time.time() - started, 3), "host": platform.node(),
        })
        finish(work, out, args.overwrite)
        print(f"{out}: {len(frames)} frames x {args.views} views in {time.time() - started:.1f} s "
              f"({render_time / num_renders:.3f} s per image, {engine_info.get('blender_engine')})")
        return "complete"
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        render(args)
    except Exception as err:  # one line naming the file and the problem; the runner lists it
        print(f"blender_render: {args.input}: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
