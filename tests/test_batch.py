"""pipeline/batch.py: the overlapped batch (the next video read while one runs, the last one's files written meanwhile)
writes byte for byte the files of the sequential one, reports outcomes in input order, goes on past a bad input and
refuses a second input with the same output folder."""
import json

import numpy as np
import torch
from PIL import Image

from datasets import layout
from pipeline.batch import Item, run_batch
from pipeline.video_to_4d import VideoTo4D
from test_inference import DIT, VAE, world  # noqa: F401  (the tiny pack and data of the inference tests)
from utils.gaussians import Gaussians, write_ply
from utils.metrics import ImageMetrics
from utils.video import write_video

OPTIONS = {"seed": 3, "num_frames": 4, "steps": 3}  # a few frames and solver steps: the files are the point here


def _inputs(root, data):
    """Two clips (with canonical PLYs) from the two samples' view 0, one prepared sample, a path that is nothing."""
    folder = root / "batch_inputs"
    folder.mkdir(exist_ok=True)
    items = []
    for i, name in enumerate(layout.list_samples(data)):
        rgba = [np.asarray(Image.open(layout.image_path(data / name, t, 0)), dtype=np.float32) / 255 for t in range(5)]
        write_video(folder / f"clip{i}.mp4", np.stack([f[..., :3] * f[..., 3:] + 1 - f[..., 3:] for f in rgba]), fps=8,
                    overwrite=True)
        pts = torch.load(layout.static_vertices_path(data / name)).float()[::4]  # fewer: the alignment renders them 72x
        n = len(pts)
        g = Gaussians.from_activated(pts, torch.rand(n, 3, generator=torch.Generator().manual_seed(i)),
                                     torch.full((n, 1), 0.9), torch.full((n, 3), 0.02),
                                     torch.tensor([1.0, 0, 0, 0]).expand(n, 4))
        write_ply(g, folder / f"clip{i}.ply", overwrite=True)
        items.append((f"clip{i}", folder / f"clip{i}.mp4", folder / f"clip{i}.ply"))
    sample = layout.list_samples(data)[0]
    return items[:1] + [("nothing", folder / "nothing.mp4", None), (sample, data / sample, None)] + items[1:]


def _tree(folder):
    """Every file's bytes; summary.json without its timings (seconds differ from run to run)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            if p.name == "summary.json":
                s = json.loads(p.read_text())
                s.pop("seconds"), s.pop("peak_gpu_memory_gib")
                out[str(p.relative_to(folder))] = s
            else:
                out[str(p.relative_to(folder))] = p.read_bytes()
    return out


def test_overlapped_batch_writes_the_sequential_files(world, monkeypatch):  # noqa: F811
    monkeypatch.setenv("GVF_LPIPS_HUB", "off")
    root, data, pack = world
    pipe = VideoTo4D.load(pack, config=DIT, vae_config=VAE, device="cpu", orbit_frames=8)
    inputs = _inputs(root, data)
    metrics = ImageMetrics(None)
    runs = {}
    for overlap in (False, True):
        out = root / f"batch_overlap_{overlap}"
        items = [Item(n, s, out / n, c) for n, s, c in inputs]
        outcomes = list(run_batch(pipe, items, OPTIONS, metrics, overlap=overlap))
        assert [i.name for i, _, _ in outcomes] == [n for n, _, _ in inputs]      # in input order
        errors = {i.name: e for i, _, e in outcomes if e is not None}
        assert list(errors) == ["nothing"] and "nothing.mp4: does not exist" in str(errors["nothing"])
        runs[overlap] = _tree(out)
    sequential, overlapped = runs[False], runs[True]
    assert set(sequential) == set(overlapped)
    assert len([k for k in sequential if k.endswith(".ply")]) == 3 * 4   # clip0, the sample, clip1
    assert "metrics" in sequential[f"{inputs[2][0]}/summary.json"]
    for k in sequential:
        assert sequential[k] == overlapped[k], k

    # A finished folder is skipped; a second input with the same output folder is refused, the batch goes on.
    out = root / "batch_overlap_True"
    name, src, ply = inputs[0]
    again = [Item(name, src, out / name, ply), Item("x", src, out / "x", ply), Item("x", src, out / "x", ply)]
    outcomes = list(run_batch(pipe, again, OPTIONS))
    assert outcomes[0][1] == {"skipped": True} and outcomes[1][2] is None
    assert isinstance(outcomes[2][2], FileExistsError) and "earlier input" in str(outcomes[2][2])
    assert _tree(out / "x") == {k.split("/", 1)[1]: v for k, v in overlapped.items() if k.startswith(f"{name}/")}


def test_only_the_outputs_asked_for_are_rendered_and_written(world, monkeypatch):  # noqa: F811
    """--outputs npz viewer: those files and summary.json, the same bytes as in a full run; the orbit, compare and grid
    renders are not made at all."""
    import pipeline.outputs as outputs
    root, data, pack = world
    sample = data / layout.list_samples(data)[0]
    full = VideoTo4D.load(pack, config=DIT, vae_config=VAE, device="cpu", orbit_frames=8)
    some = VideoTo4D.load(pack, config=DIT, vae_config=VAE, device="cpu", orbit_frames=8, outputs=["npz", "viewer"])
    full(sample, **OPTIONS).save(root / "outputs_all" / "s", overwrite=True)
    calls = []
    for name in ("compare_frames", "grid_image", "render_views"):
        def spy(*a, _real=getattr(outputs, name), _name=name, **k):
            calls.append(_name)
            return _real(*a, **k)
        monkeypatch.setattr(outputs, name, spy)
    some(sample, **OPTIONS).save(root / "outputs_some" / "s", overwrite=True)
    assert calls == []
    got = _tree(root / "outputs_some" / "s")
    assert set(got) == {"animation.npz", "viewer.html", "summary.json"}
    want = _tree(root / "outputs_all" / "s")
    assert got["animation.npz"] == want["animation.npz"] and got["viewer.html"] == want["viewer.html"]
    assert got["summary.json"]["outputs"] == ["npz", "viewer"] and got["summary.json"]["ply_frames"] == 0
