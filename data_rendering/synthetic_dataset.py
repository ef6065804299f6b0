"""A ready-to-train synthetic 4D dataset in the published layout, with no download and no Blender:

    python -m data_rendering.synthetic --out data/synth --num 200

For each object: procedural animated mesh (data_rendering/synthetic.py) -> T frames × V views of RGBA renders with the
published cameras (8 fixed views, then random ones re-drawn per frame; Blender's default field of view; radius 2) and
their camera JSON files -> 8192 corresponding surface points -> frame-0 features lifted onto 64³ voxels. Then list
files all.txt / train.txt / test.txt. Objects are written to a temporary folder and renamed when complete, so an
interrupted run resumes where it stopped.
"""
from __future__ import annotations

import argparse
import functools
import json
import multiprocessing as mp
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data_rendering.mesh import MeshSequence
from data_rendering.prepare_vae_data import prepare_sample
from data_rendering.rasterizer import render_mesh
from data_rendering.synthetic import make_object
from datasets import layout
from utils import cli
from utils.logging import report_failures
from utils.cameras import BLENDER_DEFAULT_FOV, TRAIN_RADIUS, blender_camera_json, intrinsics_from_fov, look_at, published_view_positions


def frame_cameras(num_views: int, seed: int, frame: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The published view set of one frame: the 8 fixed views, then random ones drawn for this (object, frame)."""
    gen = torch.Generator().manual_seed(seed * 100_003 + frame)
    eye = published_view_positions(num_views, TRAIN_RADIUS, generator=gen, dtype=torch.float64)
    extrinsics = look_at(eye, torch.zeros_like(eye)).float()
    intrinsics = intrinsics_from_fov(torch.full((num_views,), BLENDER_DEFAULT_FOV, dtype=torch.float64)).float()
    return extrinsics, intrinsics


def render_sample(seq: MeshSequence, root: Path, num_views: int, resolution: int, seed: int) -> None:
    """Write imgs/ and meta_data/ for every frame and view (RGBA PNG; camera JSON as Blender's writer)."""
    colors = seq.colors if seq.texture is None else None
    for t in range(seq.num_frames):
        extrinsics, intrinsics = frame_cameras(num_views, seed, t)
        out = render_mesh(seq.vertices[t], seq.faces, extrinsics.numpy(), intrinsics.numpy(), resolution, resolution,
                          vertex_colors=colors, uvs=seq.uvs, texture=seq.texture)
        rgba = (np.clip(out["rgba"], 0, 1) * 255 + 0.5).astype(np.uint8)
        for v in range(num_views):
            img_path, cam_path = layout.image_path(root, t, v), layout.camera_path(root, t, v)
            img_path.parent.mkdir(parents=True, exist_ok=True)
            cam_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rgba[v], "RGBA").save(img_path, compress_level=1)
            cam = blender_camera_json(extrinsics[v], BLENDER_DEFAULT_FOV, resolution, resolution)
            cam_path.write_text(json.dumps(cam))


@functools.lru_cache(maxsize=None)
def _extractor(name: str):
    from utils.image_features import get_extractor
    return get_extractor(name)  # once per process: DINOv2 weights are not reloaded per object


def write_sample(seq: MeshSequence, final: Path, meta: dict, args, seed: int, overwrite: bool = False) -> None:
    """Renders, points, voxel features (and with args.write_meshes the meshes) of a normalised MeshSequence, as the
    complete sample directory `final`: built in a hidden sibling folder and renamed when complete (args: views, res,
    extractor, write_meshes). Shared by this writer and data_rendering/import_animation.py."""
    tmp = final.parent / f".{final.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    render_sample(seq, tmp, args.views, args.res, seed)
    prepare_sample(tmp, _extractor(args.extractor), seq=seq, seed=seed)
    if args.write_meshes:
        for t in range(seq.num_frames):
            seq.write_obj(layout.mesh_frame_path(tmp, t), t)
    meta.update(seed=seed, frames=seq.num_frames, views=args.views, resolution=args.res, x_fov=BLENDER_DEFAULT_FOV,
                extractor=args.extractor)
    layout.render_metadata_path(tmp).write_text(json.dumps(meta, indent=1))
    if overwrite and final.exists():  # the old sample stays whole until the new one is complete
        old = final.parent / f".{final.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)


def write_object(out: Path, index: int, args) -> str:
    """One complete sample directory `obj_XXXXX`; skipped when it already exists (resume)."""
    name = f"obj_{index:05d}"
    final = out / name
    if final.exists():
        return name
    seed = args.seed * 1_000_003 + index
    seq, meta = make_object(seed, args.frames)
    meta.update(source="data_rendering.synthetic")
    write_sample(seq, final, meta, args, seed)
    return name


def _single_threaded():
    """Pool initializer: one object per process, so threads inside a process would only compete."""
    import numba

    torch.set_num_threads(1)
    numba.set_num_threads(1)


def _worker(job):
    out, index, args = job
    try:
        return write_object(out, index, args), None
    except Exception as e:  # report and go on with the other objects
        return f"obj_{index:05d}", f"{type(e).__name__}: {e}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="dataset root (sample directories and list files)")
    ap.add_argument("--num", type=int, default=200, help="number of objects")
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--views", type=int, default=16, help="views per frame (8 fixed, then random)")
    ap.add_argument("--res", type=int, default=128, help="render resolution (square)")
    ap.add_argument("--extractor", default="patch", help="image features lifted onto the voxels (patch or dinov2_vitl14_reg)")
    ap.add_argument("--test-fraction", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=max(1, min(mp.cpu_count(), 8)))
    ap.add_argument("--write-meshes", action="store_true", help="also write objs/frame{t}.obj (as the Blender renderer)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    jobs = [(args.out, i, args) for i in range(args.num)]
    names, failures = [], []
    # Fresh (spawned) workers: forking a process whose numba or torch thread pools are running can deadlock the child.
    pool = mp.get_context("spawn").Pool(args.workers, initializer=_single_threaded) if args.workers > 1 else None
    results = pool.imap(_worker, jobs) if pool else map(_worker, jobs)
    try:
        for k, (name, error) in enumerate(results):
            (failures.append((name, error)) if error else names.append(name))
            print(f"[{k + 1}/{args.num}] {name}{' FAILED ' + error if error else ''}", flush=True)
    finally:
        if pool:
            pool.close()
            pool.join()

    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(names))
    n_test = int(round(len(names) * args.test_fraction))
    test = sorted(names[i] for i in order[:n_test])
    train = sorted(names[i] for i in order[n_test:])
    for file, subset in (("all.txt", sorted(names)), ("train.txt", train), ("test.txt", test)):
        layout.write_list_file(args.out / file, subset)
    print(f"{len(names)} objects ({len(train)} train, {len(test)} test) in {args.out} in {time.perf_counter() - start:.0f} s")
    return report_failures(failures, args.num, "objects")


if __name__ == "__main__":
    sys.exit(cli.run(main))
