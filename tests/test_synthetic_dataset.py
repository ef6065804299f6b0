"""The synthetic dataset command end to end: published layout, cameras that agree with the images, exact correspondence."""
import numpy as np
import pytest
import torch
from PIL import Image

from data_rendering.prepare_vae_data import prepare_sample, read_obj_sequence
from data_rendering.rasterizer import silhouette
from data_rendering.synthetic import make_object
from data_rendering.synthetic_dataset import main, render_sample
from datasets import layout
from datasets.vae_dataset import VAEDataset, collate_vae
from utils.cameras import load_blender_camera
from utils.image_features import get_extractor


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    assert main(["--out", str(root), "--num", "3", "--frames", "4", "--views", "10", "--res", "64", "--workers", "1",
                 "--write-meshes", "--test-fraction", "0.34"]) == 0
    return root


def test_layout_lists_and_loading(dataset):
    names = layout.read_list_file(dataset / "all.txt", dataset)
    assert names == ["obj_00000", "obj_00001", "obj_00002"]
    train, test = (layout.read_list_file(dataset / f, dataset) for f in ("train.txt", "test.txt"))
    assert sorted(train + test) == names and len(test) == 1
    root = dataset / names[0]
    assert layout.image_path(root, 3, 9).exists() and layout.camera_path(root, 3, 9).exists()
    ds = VAEDataset.from_list(dataset, dataset / "all.txt", num_points=1024, num_timesteps=4, sample_timesteps=2,
                              num_views=10, extractor="patch")
    batch = collate_vae([ds[i] for i in range(len(ds))])
    assert batch["static_pc"].shape == (3, 1024, 3) and batch["deltas"].shape == (3, 2, 1024, 3)
    assert batch["canonical"]["image"].shape == (3, 3, 64, 64) and batch["skipped"] == 0
    assert batch["voxels"].feats.shape[1] == get_extractor("patch").channels
    # The voxels lie on the frame-0 surface: every surface point falls in (or next to) an occupied voxel.
    coords = batch["voxels"].coords[batch["voxels"].coords[:, 0] == 0, 1:].long()
    occupied = torch.zeros(64, 64, 64, dtype=torch.bool)
    occupied[coords[:, 0], coords[:, 1], coords[:, 2]] = True
    pts = torch.floor((batch["static_pc"][0] + 0.5) * 64).long().clamp(0, 63)
    assert occupied[pts[:, 0], pts[:, 1], pts[:, 2]].float().mean() > 0.98


def test_stored_cameras_agree_with_the_stored_images(dataset):
    """Acceptance: the ground-truth mesh projected with the stored cameras covers the object's pixels (IoU >= 0.9)."""
    ious = []
    for name in layout.read_list_file(dataset / "all.txt", dataset):
        root = dataset / name
        seq = read_obj_sequence(root)
        for t in (0, 3):
            for v in (0, 4, 9):
                alpha = np.asarray(Image.open(layout.image_path(root, t, v)))[..., 3] > 127
                ext, k = load_blender_camera(layout.camera_path(root, t, v), 64, 64)
                sil = silhouette(seq.vertices[t], seq.faces, ext[None].numpy(), k[None].numpy(), 64, 64)[0] > 0.5
                ious.append((alpha & sil).sum() / max((alpha | sil).sum(), 1))
    assert min(ious) >= 0.9, ious


def test_rigid_object_deltas_equal_the_known_motion(tmp_path):
    """Acceptance: for a rigidly moving object the stored deltas equal the known motion of the sampled points (1e-5)."""
    seq, meta = make_object(7, 6, motion="rigid")
    root = tmp_path / "rigid"
    render_sample(seq, root, 2, 32, seed=7)
    prepare_sample(root, get_extractor("patch"), seq=seq, seed=7)
    static = torch.load(layout.static_vertices_path(root), weights_only=True).double()
    deltas = torch.load(layout.frame_deltas_path(root), weights_only=True).double()
    transforms = torch.tensor(meta["rigid_transforms"], dtype=torch.float64)        # (T, 4, 4), frame 0 = identity
    moved = torch.einsum("tij,nj->tni", transforms[:, :3, :3], static) + transforms[:, None, :3, 3]
    torch.testing.assert_close(static[None] + deltas, moved, rtol=0, atol=1e-5)
    assert torch.equal(deltas[0], torch.zeros_like(deltas[0]))
    # The points lie on the frame-0 surface (sampled by area, not at the vertices).
    assert len(torch.unique(static, dim=0)) == len(static) == 8192


def test_synthetic_does_not_import_the_dataset_module_but_still_runs_it(tmp_path):
    """The dependency is one-way (synthetic_dataset -> synthetic); `python -m data_rendering.synthetic` still works."""
    import ast
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    tree = ast.parse((repo / "data_rendering/synthetic.py").read_text())
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names]
    assert not [m for m in imported if "synthetic_dataset" in m], imported
    proc = subprocess.run([sys.executable, "-m", "data_rendering.synthetic", "--help"], cwd=repo, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "--out" in proc.stdout and "--num" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "data_rendering.synthetic"], cwd=repo, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode != 0 and "--out" in bad.stderr       # the dataset command's own argument check
    # Spawned workers must find the dataset module's functions (they are pickled by reference to __main__).
    run = subprocess.run([sys.executable, "-m", "data_rendering.synthetic", "--out", str(tmp_path / "d"), "--num", "2",
                          "--frames", "2", "--views", "2", "--res", "32", "--workers", "2"], cwd=repo,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert layout.read_list_file(tmp_path / "d/all.txt", tmp_path / "d") == ["obj_00000", "obj_00001"]
