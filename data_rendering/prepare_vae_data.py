"""VAE training data from animated meshes (docs/published_system.md §1.3, §1.4): surface points with per-frame
correspondence, and frame 0's image features lifted onto 64³ voxels.

    python -m data_rendering.prepare_vae_data --data-root data/objaverse --list data/objaverse/all.txt --extractor dinov2_vitl14_reg

reads each sample directory's `objs/frame{t}.obj` meshes and frame-0 renders (as the Blender renderer writes them) and
writes `objs/mesh_data/*.pt` and `features_all_timesteps/0/<extractor>.npz`. Samples already prepared are skipped; a
failing sample is reported and the batch goes on (non-zero exit if any failed).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data_rendering.mesh import MeshSequence
from datasets import layout
from utils.cameras import load_blender_camera
from utils.feature_lifting import lift_features, voxelize_mesh
from utils.fileio import atomic_write
from utils import cli
from utils.logging import report_failures

NUM_POINTS = 8192


def sample_surface(vertices: np.ndarray, faces: np.ndarray, num_points: int = NUM_POINTS,
                   rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Area-weighted uniform samples on a triangle mesh: (face index (n,), barycentric weights (n, 3))."""
    rng = rng or np.random.default_rng(0)
    a, b, c = (vertices[faces[:, i]].astype(np.float64) for i in range(3))
    area = 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1)
    if area.sum() <= 0:
        raise ValueError("sample_surface: the mesh has zero area")
    face = rng.choice(len(faces), size=num_points, p=area / area.sum())
    r1, r2 = rng.random(num_points), rng.random(num_points)
    s = np.sqrt(r1)  # uniform over the triangle
    bary = np.stack([1 - s, s * (1 - r2), s * r2], axis=1)
    return face, bary


def correspondence_points(seq: MeshSequence, num_points: int = NUM_POINTS, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """8192 points sampled on frame 0 and carried to every frame by their (face, barycentric) coordinates.
    Returns static (n, 3) = frame-0 points and deltas (T, n, 3) = P_t - P_0 (so deltas[0] = 0), float32."""
    face, bary = sample_surface(seq.vertices[0], seq.faces, num_points, np.random.default_rng(seed))
    tri = seq.vertices[:, seq.faces[face]].astype(np.float64)          # (T, n, 3 corners, 3)
    points = np.einsum("tnkc,nk->tnc", tri, bary)
    static = points[0]
    return torch.from_numpy(static).float(), torch.from_numpy(points - static).float()


def write_points(sample_root: Path, static: torch.Tensor, deltas: torch.Tensor) -> None:
    for path, value in ((layout.static_vertices_path(sample_root), static), (layout.frame_deltas_path(sample_root), deltas)):
        atomic_write(path, lambda tmp, value=value: torch.save(value.contiguous(), tmp), overwrite=True)


def frame0_views(sample_root: Path, num_views: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Frame-0 renders composited on black (premultiplied, as the published feature extraction), with their cameras.
    Returns images (V, 3, H, W) in [0, 1], extrinsics (V, 4, 4), intrinsics (V, 3, 3)."""
    images, extr, intr = [], [], []
    v = 0
    while (num_views is None or v < num_views) and layout.image_path(sample_root, 0, v).exists():
        rgba = np.asarray(Image.open(layout.image_path(sample_root, 0, v)).convert("RGBA"), dtype=np.float32) / 255.0
        images.append(torch.from_numpy(rgba[..., :3] * rgba[..., 3:]).permute(2, 0, 1))
        e, k = load_blender_camera(layout.camera_path(sample_root, 0, v), rgba.shape[1], rgba.shape[0])
        extr.append(e)
        intr.append(k)
        v += 1
    if not images:
        raise FileNotFoundError(f"{sample_root}: no frame-0 renders ({layout.image_path(sample_root, 0, 0).name})")
    return torch.stack(images), torch.stack(extr), torch.stack(intr)


def voxel_features(vertices0: np.ndarray, faces: np.ndarray, images: torch.Tensor, extrinsics: torch.Tensor,
                   intrinsics: torch.Tensor, extractor, resolution: int = layout.VOXEL_RESOLUTION):
    """Voxelise frame 0 and lift the extractor's patch features of the given views onto the voxels (published §1.4)."""
    indices = voxelize_mesh(torch.from_numpy(vertices0), torch.from_numpy(faces), resolution)
    with torch.no_grad():
        grids = extractor.patch_grid(images.to(extractor.device)).float().cpu()
    feats = lift_features(grids, extrinsics, intrinsics, indices, resolution)
    return indices, feats


def read_obj_sequence(sample_root: Path) -> MeshSequence:
    """The renderer's per-frame OBJ meshes (positions and triangles; the same faces in every frame)."""
    frames, faces = [], None
    t = 0
    while layout.mesh_frame_path(sample_root, t).exists():
        path = layout.mesh_frame_path(sample_root, t)
        verts, tris = [], []
        for line in path.read_text().splitlines():
            if line.startswith("v "):
                verts.append([float(x) for x in line.split()[1:4]])
            elif line.startswith("f "):
                idx = [int(tok.split("/")[0]) - 1 for tok in line.split()[1:]]
                tris.extend([idx[0], idx[i], idx[i + 1]] for i in range(1, len(idx) - 1))  # fan-triangulate n-gons
        tris = np.asarray(tris, dtype=np.int64)
        if faces is not None and not np.array_equal(tris, faces):
            raise ValueError(f"{path}: its faces differ from frame 0's; the topology must be fixed")
        faces = tris
        frames.append(verts)
        t += 1
    if not frames:
        raise FileNotFoundError(f"{sample_root}: no per-frame meshes ({layout.mesh_frame_path(sample_root, 0).name})")
    return MeshSequence(np.asarray(frames, dtype=np.float32), faces)


def prepare_sample(sample_root: Path, extractor, num_points: int = NUM_POINTS, seed: int = 0, num_views: int | None = None,
                   seq: MeshSequence | None = None, overwrite: bool = False) -> bool:
    """Points and voxel features for one sample directory. Returns False when it was already prepared."""
    feats_path = layout.voxel_features_path(sample_root, 0, extractor.name)
    done = feats_path.exists() and layout.frame_deltas_path(sample_root).exists()
    if done and not overwrite:
        return False
    seq = seq or read_obj_sequence(sample_root)
    static, deltas = correspondence_points(seq, num_points, seed)
    images, extr, intr = frame0_views(sample_root, num_views)
    indices, feats = voxel_features(seq.vertices[0], seq.faces, images, extr, intr, extractor)
    write_points(sample_root, static, deltas)
    layout.write_voxel_features(feats_path, indices, feats, overwrite=True)
    return True


def main(argv=None) -> int:
    from utils.image_features import get_extractor

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", type=Path, required=True)
    ap.add_argument("--list", type=Path, help="list file of sample names (default: every directory with renders)")
    ap.add_argument("--extractor", default=layout.DEFAULT_EXTRACTOR, help="dinov2_vitl14_reg or patch")
    ap.add_argument("--weights", help="local folder of the extractor's weights")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--num-points", type=int, default=NUM_POINTS)
    ap.add_argument("--views", type=int, default=None, help="frame-0 views to lift from (default: all)")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    if args.list:
        names = layout.read_list_file(args.list, args.data_root)
    else:
        names = sorted(p.name for p in args.data_root.iterdir() if layout.has_renders(p))
    extractor = get_extractor(args.extractor, device=args.device, weights=args.weights)
    failures = []
    for i, name in enumerate(names):
        try:
            root = layout.resolve_sample(args.data_root, name)
            if layout.static_marker_path(root).exists():
                continue
            done = prepare_sample(root, extractor, args.num_points, seed=i, num_views=args.views, overwrite=args.overwrite)
            print(f"[{i + 1}/{len(names)}] {name}: {'prepared' if done else 'already prepared'}")
        except Exception as e:  # one bad sample must not stop the batch
            failures.append((name, f"{type(e).__name__}: {e}"))
            print(f"[{i + 1}/{len(names)}] {name}: FAILED {failures[-1][1]}", file=sys.stderr)
    return report_failures(failures, len(names), "samples")


if __name__ == "__main__":
    sys.exit(cli.run(main))
