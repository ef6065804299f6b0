import json

import numpy as np
import pytest
import torch
from PIL import Image

from datasets import layout
from datasets.vae_dataset import VAEDataset, collate_vae
from utils.cameras import BLENDER_DEFAULT_FOV, blender_camera_json, orbit_cameras
from utils.images import composite


def _make_sample(root, name, frames=4, views=3, points=64, res=16, seed=0):
    """A sample directory in the published layout with known contents."""
    g = torch.Generator().manual_seed(seed)
    d = root / name
    static = torch.rand(points, 3, generator=g) - 0.5
    deltas = torch.randn(frames, points, 3, generator=g) * 0.1
    deltas[0] = 0.05  # a stored frame 0 that is NOT the canonical: the loader must re-base on frame 0
    for path, value in ((layout.static_vertices_path(d), static), (layout.frame_deltas_path(d), deltas)):
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(value, path)
    idx = torch.unique(torch.randint(0, 64, (40, 3), generator=g), dim=0)
    layout.write_voxel_features(layout.voxel_features_path(d, 0, "patch"), idx, torch.randn(len(idx), 8, generator=g))
    ext, _ = orbit_cameras(torch.arange(views) * 40.0)
    for t in range(frames):
        for v in range(views):
            rgba = np.zeros((res, res, 4), np.uint8)
            rgba[..., 0] = 10 * t + v        # encodes (frame, view) in the red channel
            rgba[4:12, 4:12, 3] = 255       # an opaque square in the middle
            p = layout.image_path(d, t, v)
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rgba, "RGBA").save(p)
            c = layout.camera_path(d, t, v)
            c.parent.mkdir(parents=True, exist_ok=True)
            c.write_text(json.dumps(blender_camera_json(ext[v], BLENDER_DEFAULT_FOV)))
    return static, deltas


def test_items_follow_the_published_sampling(tmp_path):
    static, deltas = _make_sample(tmp_path, "a")
    ds = VAEDataset(tmp_path, ["a"], num_points=32, num_timesteps=4, sample_timesteps=2, load_camera=1, num_views=3,
                    extractor="patch", seed=3)
    item = ds[0]
    frames = item["frame_idx"]
    assert len(frames) == 2 and bool((frames[1:] > frames[:-1]).all())            # distinct, sorted
    moving = static[None] + deltas
    # Points are a subset of the stored ones; deltas are re-based on frame 0 (docs/published_system.md §1.1).
    match = (item["static_pc"][:, None] == moving[0][None]).all(-1)
    rows = match.float().argmax(1)
    assert bool(match.any(1).all()) and len(set(rows.tolist())) == 32
    torch.testing.assert_close(item["deltas"], moving[frames][:, rows] - moving[0, rows][None])
    assert item["voxel_coords"].dtype == torch.int32 and item["voxel_feats"].shape[1] == 8
    # The deformation view belongs to the first sampled frame: the red channel encodes (frame, view).
    red = item["views"]["image"][0, 0, 8, 8] * 255
    assert round(float(red)) // 10 == int(frames[item["view_frame"][0]])
    # Same seed and epoch: same item; another epoch: another draw.
    assert torch.equal(ds[0]["static_pc"], item["static_pc"])
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["static_pc"], item["static_pc"])


def test_eval_mode_uses_every_frame_and_the_first_views(tmp_path):
    _make_sample(tmp_path, "a")
    ds = VAEDataset(tmp_path, ["a"], num_points=16, num_timesteps=4, load_camera=2, num_views=3, train=False,
                    extractor="patch")
    item = ds[0]
    assert item["frame_idx"].tolist() == [0, 1, 2, 3]
    red = (item["views"]["image"][:, 0, 8, 8] * 255).round().long().tolist()
    assert red == [10 * t + v for t in range(4) for v in range(2)]


def test_white_background_with_blurred_alpha():
    rgb = torch.zeros(3, 5, 5)
    alpha = torch.zeros(1, 5, 5)
    alpha[0, 2, 2] = 1.0
    out = composite(rgb, alpha, background=1.0)
    # Blurred alpha at the centre is 0.5·0.5 = 0.25 (kernel [1,2,1]/4 per axis): colour 0 there gives 1 - 0.25.
    assert out[0, 2, 2].item() == pytest.approx(0.75)
    assert out[0, 2, 1].item() == pytest.approx(1 - 0.125)
    assert out[0, 0, 0].item() == pytest.approx(1.0)


def test_unreadable_samples_are_skipped_and_counted(tmp_path):
    _make_sample(tmp_path, "good")
    (tmp_path / "broken").mkdir()
    ds = VAEDataset(tmp_path, ["broken", "good"], num_points=16, num_timesteps=4, num_views=3, extractor="patch")
    with pytest.warns(UserWarning, match="broken"):
        item = ds[0]
    assert item["name"] == "good" and item["skipped"] == 1
    batch = collate_vae([item, ds[1]])
    assert batch["skipped"] == 1 and batch["static_pc"].shape == (2, 16, 3)
    assert batch["voxels"].coords[:, 0].tolist().count(1) == len(ds[1]["voxel_coords"])
    all_bad = VAEDataset(tmp_path, ["broken"], extractor="patch", max_skips=2)
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="unreadable"):
        all_bad[0]
    with pytest.raises(ValueError, match="leave the data root"):
        VAEDataset(tmp_path, ["../x"])
