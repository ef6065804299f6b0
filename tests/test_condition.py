"""The DiT condition of one object is the same in training and at inference (datasets/condition.py).

A tiny synthetic object is encoded by encode_latent.py (deterministic: the static posterior mean), then its condition
is taken from both sides as the DiT would receive it: the training item of main_latent.build_dataset, cast as the
trainer casts it, and the dict inference hands the solver for the prepared sample (load_models, sample_inputs,
MotionStage), caught before sampling. Both are checked against each other and against the normalisation redone here
in float64 from the stored files.

Upstream of the condition, the canonical Gaussians must be the same too: both sides reconstruct them from the pooled
voxel features rounded to float16, as VAEDataset hands them to training (with float32 means at inference the
canonicals differed by about 1e-4 and FPS picked 2 other Gaussians of 256).
"""
from pathlib import Path

import pytest
import torch

import encode_latent
import main_latent
import pipeline.animate
from data_rendering.synthetic_dataset import main as make_synthetic
from datasets import layout
from datasets.condition import CONDITION_KEYS
from models.dit import DiT
from models.motion_vae import MotionVAE
from models.static_vae import StaticVAE
from pipeline.video_to_4d import VideoTo4D
from utils.checkpoint import save_checkpoint
from utils.config import load_config

VAE, DIT = "configs/tiny/vae.yml", "configs/tiny/diffusion.yml"


class _Caught(Exception):
    """Stops inference once the condition reached the solver: what follows does not feed the condition."""


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    root = tmp_path_factory.mktemp("condition")
    data, pack = root / "data", root / "pack"
    assert make_synthetic(["--out", str(data), "--num", "1", "--frames", "8", "--views", "2", "--res", "64",
                           "--workers", "1", "--test-fraction", "0"]) == 0
    vcfg, dcfg = load_config(VAE), load_config(DIT)
    torch.manual_seed(0)
    static, motion, dit = StaticVAE.from_config(vcfg.static_vae), MotionVAE(**vcfg.model), DiT(**dcfg.model)
    with torch.no_grad():  # Gaussians that differ per voxel (the zero-initialised output layer would make them equal)
        static.out_layer.weight.normal_(0, 0.05)
    pack.mkdir()
    save_checkpoint(pack / "static_vae.safetensors", static, config=vcfg.static_vae.to_dict())
    save_checkpoint(pack / "motion_vae.safetensors", motion, config=vcfg.model.to_dict())
    save_checkpoint(pack / "dit.safetensors", dit, config=dcfg.model.to_dict())
    assert encode_latent.main(["--config", VAE, "--diffusion-config", DIT, "--data-root", str(data),
                               "--static-vae", str(pack / "static_vae.safetensors"),
                               "--motion-vae", str(pack / "motion_vae.safetensors")]) == 0
    return root, data, pack, layout.list_samples(data)[0]


def training_condition(data, name, normalize_position_xyz):
    """The item main_latent.py trains on, without CFG dropout, as its step function hands it to the DiT (batched by
    the loader, then .float())."""
    cfg = load_config(DIT, ["train.uncond_p=0", f"data.normalize_position_xyz={normalize_position_xyz}"])
    dataset = main_latent.build_dataset(cfg, data, None)
    item = dataset[dataset.names.index(name)]
    assert torch.equal(item["frame_idx"], torch.arange(8))  # all 8 frames in order, as inference takes them
    return {k: item[k][None].float() for k in CONDITION_KEYS}, item["cond_images"].dtype


def inference_condition(root, data, pack, name, normalize_position_xyz, monkeypatch):
    """The condition the inference pipeline gives the solver (and so the DiT) for the prepared sample."""
    config = root / f"diffusion_{normalize_position_xyz}.yml"  # the pack's config, with the flag under test
    config.write_text(f"base: {Path(DIT).resolve()}\ndata:\n  normalize_position_xyz: "
                      f"{str(normalize_position_xyz).lower()}\n")
    pipe = VideoTo4D.load(pack, config=config, vae_config=VAE, stats_dir=data, device="cpu")
    prepared = pipe.prepare(data / name, num_frames=8)
    caught = {}

    def catch(model_fn, x_T, cond, config, **kwargs):
        caught.update(cond)
        raise _Caught

    monkeypatch.setattr(pipeline.animate, "sample", catch)
    with pytest.raises(_Caught):
        pipe.models.motion(prepared.canonical, prepared.tokens)
    return caught


@pytest.mark.parametrize("normalize_position_xyz", [True, False])
def test_training_and_inference_give_the_dit_the_same_condition(encoded, monkeypatch, normalize_position_xyz):
    root, data, pack, name = encoded
    train, token_dtype = training_condition(data, name, normalize_position_xyz)
    infer = inference_condition(root, data, pack, name, normalize_position_xyz, monkeypatch)
    assert set(infer) == set(CONDITION_KEYS)
    assert {k: tuple(v.shape) for k, v in train.items()} == {k: tuple(v.shape) for k, v in infer.items()} == {
        "cond_images": (1, 8, 257, 32), "static_latent": (1, 256, 14), "deformation_position_xyz": (1, 64, 3)}

    # The Gaussians: bit for bit. Both sides run the same float32 operations on the same values (the stored FPS sets
    # are those MotionStage samples from the same canonical), so any tolerance would only hide a difference.
    for key in ("static_latent", "deformation_position_xyz"):
        assert infer[key].dtype == torch.float32
        assert torch.equal(train[key], infer[key]), (key, (train[key] - infer[key]).abs().max())
    # The image tokens: the training ones are stored float16 (encode_latent.py, read as such by the dataset), the
    # inference ones are the extractor's float32 output for the same images. Rounded to float16 they are identical:
    # the images and the extractor are the same; the rounding is the only difference.
    assert token_dtype == torch.float16 and infer["cond_images"].dtype == torch.float32
    assert torch.equal(train["cond_images"], infer["cond_images"].half().float())

    # The normalisation redone in float64 from the stored latent and statistics. float32 rounds a - b and then / c,
    # each to half an ulp: a relative error of at most about 2**-23 ≈ 1.2e-7 of the result; rtol 1e-6 leaves room
    # for that and nothing else (a wrong statistic or channel moves values by orders of magnitude more).
    latent = torch.load(layout.latent_path(data, name), weights_only=True)
    stats = {w: torch.load(layout.latent_stats_path(data, w), weights_only=True).double() for w in layout.LATENT_STATS}
    mean, std = stats["static_mean"], stats["static_std"]
    want_static = (latent["fps_sampled_gs_4096"].double() - mean) / std
    xyz = latent["fps_sampled_gs_1024"][:, :3].double()
    want_xyz = (xyz - mean[:3]) / std[:3] if normalize_position_xyz else xyz
    for got in (train, infer):
        torch.testing.assert_close(got["static_latent"][0].double(), want_static, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got["deformation_position_xyz"][0].double(), want_xyz, rtol=1e-6, atol=1e-7)
    # Not a vacuous comparison: the statistics are far from the identity, so unnormalised values would fail above.
    assert (std - 1).abs().max() > 0.1 or mean.abs().max() > 0.1


def test_inference_reconstructs_the_canonical_that_was_encoded(encoded, monkeypatch):
    root, data, pack, name = encoded
    train, _ = training_condition(data, name, True)
    infer = inference_condition(root, data, pack, name, True, monkeypatch)
    assert torch.equal(train["static_latent"], infer["static_latent"])


def test_one_fps_run_gives_every_count_as_separate_runs_would():
    """The anchors and the static set come from one FPS run (its prefixes); separate runs of each count pick the same
    Gaussians, duplicates and ties included (a grid of repeated points has many equal distances)."""
    from datasets.condition import fps_gaussians
    from utils.pointcloud import farthest_point_sample, gather_points
    g = torch.Generator().manual_seed(3)
    pts = torch.randn(1, 2000, 14, generator=g)
    grid = torch.stack(torch.meshgrid(*[torch.arange(6.0)] * 3, indexing="ij"), -1).view(1, -1, 3).repeat(1, 2, 1)
    pts = torch.cat([pts, torch.cat([grid, torch.zeros(1, grid.shape[1], 11)], -1)], 1)
    anchors, static = fps_gaussians(pts, 64, 700)
    assert torch.equal(anchors, gather_points(pts, farthest_point_sample(pts[..., :3], 64)))
    assert torch.equal(static, gather_points(pts, farthest_point_sample(pts[..., :3], 700)))
    assert torch.equal(fps_gaussians(pts, 64), anchors)
