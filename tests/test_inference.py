"""inference_dpm_latent.py end to end on CPU with random tiny models: prepared samples and videos in, reusable assets
out, metrics against ground truth, a corrupt video reported by name."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import inference_dpm_latent as inference
import pipeline.outputs
from data_rendering.synthetic_dataset import main as make_synthetic
from datasets import layout
from datasets.condition import condition_camera
from models.dit import DiT
from models.motion_vae import MotionVAE
from models.static_vae import StaticVAE
from utils.cameras import load_blender_camera, orbit_cameras
from utils.checkpoint import save_checkpoint
from utils.config import load_config
from utils.gaussians import Gaussians, read_ply
from utils.render import rasterize
from utils.video import read_frames, write_video

VAE, DIT = "configs/tiny/vae.yml", "configs/tiny/diffusion.yml"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("inference")
    data = root / "data"
    assert make_synthetic(["--out", str(data), "--num", "2", "--frames", "8", "--views", "3", "--res", "64",
                           "--workers", "1", "--test-fraction", "0"]) == 0
    vcfg, dcfg = load_config(VAE), load_config(DIT)
    torch.manual_seed(0)
    static, motion, dit = StaticVAE.from_config(vcfg.static_vae), MotionVAE(**vcfg.model), DiT(**dcfg.model)
    with torch.no_grad():  # non-trivial outputs everywhere (the zero-initialised layers too)
        static.out_layer.weight.normal_(0, 0.02)
        motion.to_outputs.weight.normal_(0, 0.02)
        for p in dit.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    pack = root / "pack"
    pack.mkdir()
    save_checkpoint(pack / "static_vae.safetensors", static, config=vcfg.static_vae.to_dict())
    save_checkpoint(pack / "motion_vae.safetensors", motion, config=vcfg.model.to_dict())
    save_checkpoint(pack / "dit.safetensors", dit, config=dcfg.model.to_dict())
    for which in layout.LATENT_STATS:
        shape = (dcfg.model.in_channels,) if which.startswith("deformation") else (14,)
        torch.save(torch.zeros(shape) if which.endswith("mean") else torch.full(shape, 0.5),
                   layout.latent_stats_path(pack, which))
    shutil.copy(DIT, pack / "unused.yml")  # the pack's config is optional: --config is given below
    return root, data, pack


def _run(*args):
    return inference.main(["--config", DIT, "--vae-config", VAE, "--orbit-frames", "8", *map(str, args)])


def test_prepared_sample_outputs_and_metrics(world, monkeypatch):
    monkeypatch.setenv("GVF_LPIPS_HUB", "off")
    root, data, pack = world
    out = root / "out_samples"
    assert _run("--pack", pack, "--input", data, "--list", data / "all.txt", "--out", out) == 0
    name = layout.list_samples(data)[0]
    d = out / name
    summary = json.loads((d / "summary.json").read_text())
    assert summary["ply_frames"] == 8 and summary["model_evaluations"] == load_config(DIT).sampling.steps
    # The PLY sequence is canonical + Δ of animation.npz, frame by frame.
    npz = np.load(d / "animation.npz")
    canonical = Gaussians(*(torch.from_numpy(npz[k]) for k in ("xyz", "f_dc", "opacity_logit", "scale_pre", "quat")))
    frames = canonical.apply_delta(torch.from_numpy(npz["delta"]))
    plys = sorted((d / "ply").glob("*.ply"))
    assert len(plys) == 8
    for t in (0, 7):
        g = read_ply(plys[t])
        torch.testing.assert_close(g.xyz, frames.xyz[t])
        torch.testing.assert_close(g.scale_pre, frames.scale_pre[t])
    video, _ = read_frames(d / "orbit.mp4")
    assert video.shape[0] == 8 and video.shape[1] == load_config(DIT).sampling.resolution
    w, h = Image.open(d / "grid.png").size  # 8 frames x 4 views of 128², plus label bands above and to the left
    assert 0 < w - 8 * 128 < 64 and 0 < h - 4 * 128 < 64
    _check_compare(d / "compare.mp4", data / name, plys, load_config(DIT).sampling)
    # The motion block: mean |Δxyz| per frame of animation.npz, recomputed in numpy.
    disp = np.linalg.norm(npz["delta"][..., :3].astype(np.float64), axis=-1).mean(1)
    np.testing.assert_allclose(summary["motion"]["displacement_per_frame"], disp, rtol=1e-5)
    assert summary["motion"]["displacement"] == pytest.approx(disp[1:].mean(), rel=1e-5) and "epe" in summary["motion"]
    # PSNR of frame 3 recomputed here from the PLY, the ground-truth PNGs and cameras, in numpy.
    g = read_ply(plys[3])
    values = []
    for v in (1, 2):
        rgba = np.asarray(Image.open(layout.image_path(data / name, 3, v)), dtype=np.float64) / 255
        gt = rgba[..., :3] * rgba[..., 3:] + (1 - rgba[..., 3:])
        e, k = load_blender_camera(layout.camera_path(data / name, 3, v), 64, 64)
        pred = rasterize(g, e[None], k[None], 64, 64, background=1.0).rgb[0].double().numpy()
        values.append(10 * np.log10(1 / np.mean((pred - gt) ** 2)))
    assert summary["metrics"]["per_frame"][3]["psnr"] == pytest.approx(np.mean(values), abs=0.05)
    assert summary["metrics"]["views_per_frame"] == 2
    # A second run leaves finished outputs alone.
    stamp = (d / "summary.json").stat().st_mtime_ns
    assert _run("--pack", pack, "--input", data / name, "--out", out) == 0
    assert (d / "summary.json").stat().st_mtime_ns == stamp


def _check_compare(path, sample, plys, s):
    """compare.mp4: per animation frame t, [input view 0 of frame t | PLY t from view 0's camera | PLY t from the
    orbit camera at 360°·t/T], each R x R on black, labelled; every panel is rebuilt here and compared below the
    label band (the codec leaves a few levels of error; another frame or column gives far more)."""
    video, _ = read_frames(path)
    r, t = s.resolution, len(plys)
    assert video.shape == (t, r, 3 * r, 3)
    video = video.astype(np.float64) / 255
    ext, K = condition_camera(torch.device("cpu"))
    ext_o, K_o = orbit_cameras(torch.arange(t) * (360.0 / t), s.elevation_deg, s.radius, s.fov_deg)
    expected = []
    for i, ply in enumerate(plys):
        rgba = Image.open(layout.image_path(sample, i, 0)).convert("RGBA").resize((r, r), Image.BILINEAR)
        rgba = np.asarray(rgba, dtype=np.float64) / 255
        g = read_ply(ply)
        render = lambda e, k: rasterize(g, e[None], k[None], r, r, background=0.0).rgb[0].double().numpy()
        expected.append(np.concatenate([rgba[..., :3] * rgba[..., 3:], render(ext, K), render(ext_o[i], K_o[i])], 1))
    expected = np.stack(expected)
    band = 20  # the labels sit in the top rows
    for c in range(3):  # column by column: a mean over all three would hide one wrong column
        col = lambda x: x[:, band:, c * r:(c + 1) * r]
        err = lambda ref: np.abs(col(video) - col(ref)).mean()
        assert err(expected) < 0.002, (c, err(expected))
        assert err(expected[::-1]) > 2 * err(expected), c                  # frame order matters
        assert err(np.roll(expected, r, axis=2)) > 2 * err(expected), c    # column order matters
        # White label text on every frame, where the render is black background.
        assert (video[:, :band, c * r: c * r + r // 2] > 0.8).any(-1).sum((1, 2)).min() > 10, c


def test_videos_with_canonical_and_a_corrupt_one(world, capsys):
    root, data, pack = world
    videos, canon = root / "videos", root / "canonicals"
    videos.mkdir(exist_ok=True)
    canon.mkdir(exist_ok=True)
    # The object of the two whose first frame shows the most foreground (a thin object seen edge-on aligns badly).
    area = lambda n: (np.asarray(Image.open(layout.image_path(data / n, 0, 0)))[..., 3] > 127).sum()
    name = max(layout.list_samples(data), key=area)
    frames = []
    for t in range(6):  # shorter than the config's 8 frames: without --num-frames the clip's 6 are used
        rgba = np.asarray(Image.open(layout.image_path(data / name, t, 0)), dtype=np.float32) / 255
        frames.append(rgba[..., :3] * rgba[..., 3:] + (1 - rgba[..., 3:]))   # on white: threshold matting
    write_video(videos / "good.mp4", np.stack(frames), fps=8, overwrite=True)
    (videos / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    # The canonical of the good video: small opaque Gaussians on the object's frame-0 surface points, turned by
    # 90 degrees, which the alignment has to undo.
    from pipeline.alignment import rotate_z
    from utils.gaussians import write_ply
    pts = torch.load(layout.static_vertices_path(data / name)) + torch.load(layout.frame_deltas_path(data / name))[0]
    n = len(pts)
    points = Gaussians.from_activated(pts.float(), torch.full((n, 3), 0.5), torch.full((n, 1), 0.95),
                                      torch.full((n, 3), 0.02), torch.tensor([1.0, 0, 0, 0]).expand(n, 4))
    write_ply(rotate_z(points, 90.0), canon / "good.ply", overwrite=True)

    out = root / "out_videos"
    status = _run("--pack", pack, "--input", videos, "--canonical", canon, "--out", out)
    assert status == 1
    err = capsys.readouterr().err
    assert "broken" in err and "1 of 2 inputs failed" in err
    summary = json.loads((out / "good" / "summary.json").read_text())
    assert summary["frames"] == 6 and summary["matting"] == "threshold"
    az = summary["alignment"]["azimuth_deg"]
    assert abs(az - 270.0) <= 15.0 and summary["alignment"]["silhouette_iou"] > 0.6, summary["alignment"]
    assert len(list((out / "good" / "ply").glob("*.ply"))) == 6
    r = load_config(DIT).sampling.resolution
    assert read_frames(out / "good" / "compare.mp4")[0].shape == (6, r, 3 * r, 3)  # the clip's 6 frames, 3 panels
    assert "ratio" not in summary["motion"] and len(summary["motion"]["displacement_per_frame"]) == 6
    assert not (out / "broken").exists() or not (out / "broken" / "summary.json").exists()


def _tiny_trellis_release(folder):
    """A TRELLIS-layout release of tiny random networks whose occupancy grid (32³) and latent width (8) fit the tiny
    static VAE, and whose condition width (32) is the tiny DINOv2's."""
    from safetensors.torch import save_file

    from models.trellis.slat_flow import SLatFlowModel
    from models.trellis.ss_decoder import SparseStructureDecoder
    from models.trellis.ss_flow import SparseStructureFlowModel
    specs = {
        "sparse_structure_flow_model": (SparseStructureFlowModel, dict(
            resolution=8, in_channels=8, out_channels=8, model_channels=32, cond_channels=32, num_blocks=1,
            num_heads=2)),
        "sparse_structure_decoder": (SparseStructureDecoder, dict(
            out_channels=1, latent_channels=8, num_res_blocks=1, channels=[16, 8, 8], num_res_blocks_middle=1)),
        "slat_flow_model": (SLatFlowModel, dict(
            resolution=32, in_channels=8, out_channels=8, model_channels=32, cond_channels=32, num_blocks=1,
            num_heads=2, patch_size=2, num_io_res_blocks=1, io_block_channels=[16])),
    }
    (folder / "ckpts").mkdir(parents=True)
    table = {}
    torch.manual_seed(3)
    for name, (cls, args) in specs.items():
        model = cls(**args)
        if name == "sparse_structure_decoder":  # a negative logit bias: a few hundred occupied voxels keep it fast
            with torch.no_grad():
                model.out_layer[-1].bias.fill_(-0.4)
        table[name] = f"ckpts/{name}"
        (folder / f"ckpts/{name}.json").write_text(json.dumps({"name": cls.__name__, "args": args}))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / f"ckpts/{name}.safetensors")
    (folder / "pipeline.json").write_text(json.dumps({"name": "TrellisImageTo3DPipeline", "args": {
        "models": table, "slat_normalization": {"mean": [0.0] * 8, "std": [1.0] * 8}}}))


@pytest.mark.slow  # a minute on 2 cores: `make test-slow` and CI run it
def test_video_without_canonical_uses_the_image_to_3d_stage(world, tmp_path):
    from tiny_dinov2 import save_tiny_dinov2
    root, data, pack = world
    videos = tmp_path / "videos"
    videos.mkdir()
    name = layout.list_samples(data)[0]
    frames = [np.asarray(Image.open(layout.image_path(data / name, t, 0)).convert("RGB")) for t in range(8)]
    write_video(videos / "clip.mp4", np.stack(frames), fps=8)
    save_tiny_dinov2(tmp_path / "dinov2")
    out = tmp_path / "out"
    # Without the TRELLIS files: the clip fails with a message naming what is missing.
    assert _run("--pack", pack, "--input", videos, "--out", out, "--trellis", tmp_path / "no_trellis",
                "--dinov2", tmp_path / "dinov2", "--matting", "threshold") == 2  # one input, refused: bad input
    _tiny_trellis_release(tmp_path / "trellis")
    # Sampler flags: 3 SS steps all guided (2 calls each), 2 unguided SLat steps.
    status = _run("--pack", pack, "--input", videos, "--out", out, "--trellis", tmp_path / "trellis",
                  "--dinov2", tmp_path / "dinov2", "--matting", "threshold", "--ss-steps", "3", "--ss-cfg-interval",
                  "0", "1", "--slat-steps", "2", "--slat-cfg-strength", "0")
    summary = json.loads((out / "clip" / "summary.json").read_text())
    assert status == 0 and summary["canonical"] == "image-to-3D"
    stage = summary["image_to_3d"]
    assert stage["voxels"] > 0 and summary["gaussians"] == 8 * stage["voxels"]   # 8 Gaussians per occupied voxel
    assert stage["model_evaluations"] == {"ss": 6, "slat": 2} and stage["samplers"]["slat"]["steps"] == 2
    assert len(list((out / "clip" / "ply").glob("*.ply"))) == 8


def test_overwrite_replaces_an_output_folder_as_a_whole(world, monkeypatch):
    """--overwrite with fewer frames leaves exactly the new frames (no stale PLYs of the earlier run); a run that fails
    midway keeps the previous outputs byte for byte and leaves no temporary folder."""
    root, data, pack = world
    name = layout.list_samples(data)[0]
    out = root / "out_overwrite"
    assert _run("--pack", pack, "--input", data / name, "--out", out, "--no-metrics") == 0
    d = out / name
    assert sorted(p.name for p in (d / "ply").iterdir()) == [f"frame_{t:04d}.ply" for t in range(8)]
    assert _run("--pack", pack, "--input", data / name, "--out", out, "--no-metrics", "--num-frames", "4",
                "--overwrite") == 0
    assert sorted(p.name for p in (d / "ply").iterdir()) == [f"frame_{t:04d}.ply" for t in range(4)]
    assert json.loads((d / "summary.json").read_text())["ply_frames"] == 4
    assert [p.name for p in out.iterdir()] == [name]

    tree = lambda: {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}
    before = tree()
    written = []

    def failing_video(path, *args, **kwargs):  # the PLYs and animation.npz are written by then
        written.append(path)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(pipeline.outputs, "write_video", failing_video)
    assert _run("--pack", pack, "--input", data / name, "--out", out, "--no-metrics", "--num-frames", "2",
                "--overwrite") == 1
    assert written and written[0].parent != d  # it was writing into the staging folder
    assert tree() == before
    assert [p.name for p in out.iterdir()] == [name]
