"""Sample directory layout: the published file names, path safety, and the voxel / image-token npz files."""

import re

import numpy as np
import pytest
import torch

from datasets import layout as L


def test_published_names(tmp_path):
    root = tmp_path / "uid123"
    assert L.resolve_sample(tmp_path, "uid123") == root
    for data_root in (None, tmp_path):  # confined to the sample folder, or to the data root
        kw = dict(data_root=data_root)
        assert L.image_path(root, 3, 12, **kw) == root / "imgs" / "timestep_03_view_12.png"
        assert L.camera_path(root, 0, 7, **kw) == root / "meta_data" / "timestep_00_view_07.json"
        assert L.static_vertices_path(root, **kw) == root / "objs/mesh_data/static_frame_vertices.pt"
        assert L.frame_deltas_path(root, **kw) == root / "objs/mesh_data/moving_frame_deltas.pt"
        assert L.voxel_features_path(root, **kw) == root / "features_all_timesteps/0/dinov2_vitl14_reg.npz"
        assert L.voxel_features_path(root, 5, "patch", **kw) == root / "features_all_timesteps/5/patch.npz"
    assert L.latent_path(tmp_path, "uid123") == tmp_path / "latents/uid123/deformation_latent.pt"
    # DINOv2 keeps the published folder name; other extractors get their own folder.
    assert L.cond_features_path(tmp_path, "uid123") == tmp_path / "dinov2_cond_features/uid123.npz"
    assert L.cond_features_path(tmp_path, "uid123", "patch") == tmp_path / "patch_cond_features/uid123.npz"
    assert L.image_path(root, 100, 2).name == "timestep_100_view_02.png"


@pytest.mark.parametrize("name", ["/etc/passwd", "../other", "a/../../b", "..", "", "  ", " a", "C:\\x",
                                  "a\\..\\..\\b", "."])
def test_resolve_sample_rejects_escapes(tmp_path, name):
    with pytest.raises(ValueError):
        L.resolve_sample(tmp_path, name)
    for build in (lambda: L.latent_path(tmp_path, name), lambda: L.cond_features_path(tmp_path, name)):
        with pytest.raises(ValueError):
            build()


def test_resolve_sample_accepts_relative(tmp_path):
    assert L.resolve_sample(tmp_path, "objaverse/abc") == tmp_path / "objaverse" / "abc"
    assert L.latent_path(tmp_path, "objaverse/abc") == tmp_path / "latents/objaverse/abc/deformation_latent.pt"
    assert L.cond_features_path(tmp_path, "a.b") == tmp_path / "dinov2_cond_features/a.b.npz"


@pytest.mark.parametrize("bad", ["../x", "a/b", "", ".hidden"])
def test_bad_extractor_names(tmp_path, bad):
    with pytest.raises(ValueError):
        L.voxel_features_path(tmp_path, 0, bad)


def test_bad_indices():
    with pytest.raises(ValueError):
        L.image_path("r", -1, 0)
    with pytest.raises(ValueError):
        L.camera_path("r", 0, 1.5)


def test_voxel_features_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(64 ** 3, generator=g)[:500]
    indices = torch.stack([idx // 4096, idx // 64 % 64, idx % 64], 1)
    feats = torch.randn(500, 16, generator=g) * 3
    path = L.write_voxel_features(tmp_path / "f/features_all_timesteps/0/x.npz", indices, feats)
    with np.load(path) as raw:  # the published on-disk dtypes
        assert sorted(raw.files) == ["indices", "patchtokens"]
        assert raw["indices"].dtype == np.uint8 and raw["patchtokens"].dtype == np.float16
    coords, out = L.read_voxel_features(path)
    assert coords.dtype == torch.int32 and out.dtype == torch.float32
    assert torch.equal(coords, indices.int())
    assert torch.allclose(out, feats.half().float())
    assert [p.name for p in path.parent.iterdir()] == ["x.npz"]  # no temp file left behind

    with pytest.raises(FileExistsError):
        L.write_voxel_features(path, indices, feats)
    L.write_voxel_features(path, indices[:3], feats[:3], overwrite=True)
    assert L.read_voxel_features(path)[0].shape == (3, 3)


def _save(path, **arrays):
    np.savez(path, **arrays)
    return path


GOOD_I = np.array([[0, 1, 2], [3, 4, 5]], np.uint8)
GOOD_F = np.ones((2, 8), np.float16)


@pytest.mark.parametrize("arrays, message", [
    (dict(indices=GOOD_I), "missing key"),
    (dict(indices=GOOD_I.astype(np.float32), patchtokens=GOOD_F), "integers"),
    (dict(indices=GOOD_I, patchtokens=GOOD_F.astype(np.int16)), "floating"),
    (dict(indices=GOOD_I[:, :2], patchtokens=GOOD_F), "(N, 3)"),
    (dict(indices=GOOD_I, patchtokens=GOOD_F[:1]), "patchtokens must be"),
    (dict(indices=np.array([[0, 1, 64], [0, 0, 0]]), patchtokens=GOOD_F), "[0, 64)"),
    (dict(indices=np.array([[1, 1, 1], [1, 1, 1]], np.uint8), patchtokens=GOOD_F), "duplicate"),
    (dict(indices=GOOD_I, patchtokens=np.array([[np.inf] * 8, [0] * 8], np.float16)), "non-finite"),
    (dict(indices=np.zeros((0, 3), np.uint8), patchtokens=np.zeros((0, 8), np.float16)), "no voxels"),
])
def test_bad_voxel_files_name_the_file(tmp_path, arrays, message):
    path = _save(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError) as err:
        L.read_voxel_features(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_unreadable_files(tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"PK\x03\x04 truncated")
    npy = tmp_path / "array.npz"
    with open(npy, "wb") as f:
        np.save(f, np.zeros(3))
    pickled = _save(tmp_path / "pickled.npz", indices=np.array([{"a": 1}], dtype=object), patchtokens=GOOD_F)
    for path in (garbage, npy, pickled):
        with pytest.raises(ValueError, match="cannot read npz") as err:
            L.read_voxel_features(path)
        assert str(path) in str(err.value)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        L.read_voxel_features(tmp_path / "missing.npz")


def test_write_validates_before_writing(tmp_path):
    path = tmp_path / "v.npz"
    with pytest.raises(ValueError, match="uint8"):
        L.write_voxel_features(path, GOOD_I, GOOD_F, resolution=512)
    with pytest.raises(ValueError, match="overflow"):
        L.write_voxel_features(path, GOOD_I, np.full((2, 8), 1e6, np.float32))
    with pytest.raises(ValueError, match="range"):
        L.write_voxel_features(path, np.array([[0, 0, 70], [0, 0, 0]]), GOOD_F)
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_cond_features_round_trip(tmp_path):
    tokens = torch.randn(3, 10, 8)
    path = L.write_cond_features(L.cond_features_path(tmp_path, "obj"), tokens)
    assert path == tmp_path / "dinov2_cond_features/obj.npz"
    with np.load(path) as raw:
        assert raw.files == ["features"] and raw["features"].dtype == np.float16
    assert torch.allclose(L.read_cond_features(path), tokens.half().float())
    assert L.read_cond_features(path, torch.float16).dtype == torch.float16
    bad = _save(tmp_path / "bad.npz", features=np.zeros((3, 10), np.float16))
    with pytest.raises(ValueError, match="T, L, C") as err:
        L.read_cond_features(bad)
    assert str(bad) in str(err.value)


def test_list_files_refuse_entries_leaving_the_data_root(tmp_path):
    from datasets.layout import read_list_file

    root = tmp_path / "data"
    (root / "good").mkdir(parents=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (root / "escape").symlink_to(outside)          # a symlink inside the root that leads out
    (root / "inner").symlink_to(root / "good")     # a symlink that stays inside is fine
    listing = tmp_path / "list.txt"
    listing.write_text("# comment\ngood 0\n\ninner\n")
    assert read_list_file(listing, root) == ["good", "inner"]
    for bad in ["../elsewhere", "/etc/passwd", "escape", "good/../../elsewhere"]:
        listing.write_text(f"good\n{bad}\n")
        with pytest.raises(ValueError, match=rf"list.txt, line 2: entry '{re.escape(bad)}' refused"):
            read_list_file(listing, root)
    # A data root that is itself a symlink is allowed: the check compares real paths.
    (tmp_path / "link_root").symlink_to(root)
    listing.write_text("good\n")
    assert read_list_file(listing, tmp_path / "link_root") == ["good"]


@pytest.fixture
def confined():
    """Every test starts and ends with the default: paths confined to the data root."""
    L.allow_symlinks(False)
    yield
    L.allow_symlinks(False)


def test_a_file_symlink_leading_outside_is_refused_by_the_reader(tmp_path, confined):
    from datasets.vae_dataset import VAEDataset
    from test_vae_dataset import _make_sample
    from utils.cli import InputError, one_line

    root, outside = tmp_path / "data", tmp_path / "elsewhere"
    _make_sample(root, "a")
    _make_sample(root, "b", seed=1)
    outside.mkdir()
    secret = outside / "secret.png"
    secret.write_bytes(L.image_path(root / "a", 0, 0).read_bytes())
    make = lambda: VAEDataset(root, ["a", "b"], num_points=16, num_timesteps=4, sample_timesteps=2, num_views=3,
                              extractor="patch", voxel_resolution=64, train=False)
    # A symlink that stays inside the data root is fine: sample a's frame 1 is sample b's file.
    link = L.image_path(root / "a", 1, 0)
    link.unlink()
    link.symlink_to(L.image_path(root / "b", 1, 0))
    assert make().load(0)["views"]["image"].shape[0] == 4
    # One that leads outside: refused (not skipped), one line naming the file.
    link = L.image_path(root / "a", 0, 0)
    link.unlink()
    link.symlink_to(secret)
    for read in (lambda d: d.load(0), lambda d: d[0]):
        with pytest.raises(InputError) as err:
            read(make())
        line = one_line(err.value)
        assert "\n" not in str(err.value) and line.startswith(str(link)) and str(secret) in line
        assert "--allow-symlinks" in line
    # The sample-folder helpers without a data root confine to the sample folder.
    with pytest.raises(InputError, match="outside the sample folder"):
        L.image_path(root / "a", 0, 0)
    assert L.camera_path(root / "a", 0, 0, data_root=root) == L.camera_path(root / "a", 0, 0)
    with pytest.raises(InputError, match="outside the data root"):
        L.image_path(root / "a", 0, 0, data_root=root)
    # The opt-out follows it.
    L.allow_symlinks(True)
    assert make().load(0)["views"]["image"].shape[0] == 4


def test_a_latents_folder_leading_outside_is_refused(tmp_path, confined):
    from utils.cli import InputError

    root, outside = tmp_path / "data", tmp_path / "other_disk"
    root.mkdir()
    outside.mkdir()
    (root / "latents").symlink_to(outside)
    (root / "dinov2_cond_features").symlink_to(outside)
    for build in (lambda: L.latent_path(root, "x"), lambda: L.cond_features_path(root, "x"),
                  lambda: L.latents_dir(root)):
        with pytest.raises(InputError, match=r"outside the data root .*--allow-symlinks"):
            build()
    (root / "inside").mkdir()
    (root / "latents").unlink()
    (root / "latents").symlink_to(root / "inside")     # inside the root: fine
    assert L.latent_path(root, "x") == root / "latents/x/deformation_latent.pt"
    L.allow_symlinks(True)
    assert L.cond_features_path(root, "x") == root / "dinov2_cond_features/x.npz"
