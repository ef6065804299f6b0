"""Batch inference on a folder of awkward inputs: each one's outcome is printed as it finishes, an empty frame folder
and a one-frame clip are named failures (not silent skips), and video-only runs never look for LPIPS weights."""
import numpy as np
import torch

import inference_dpm_latent as inference
from datasets import layout
from test_inference import _run, world  # noqa: F401  (the module's tiny pack and data, shared)
from utils.gaussians import Gaussians, write_ply
from utils.video import write_video


def test_awkward_inputs_are_named_in_order_and_lpips_is_not_loaded(world, capsys, monkeypatch):  # noqa: F811
    root, data, pack = world
    videos, canon = root / "awkward", root / "awkward_canonicals"
    (videos / "b_empty_frames").mkdir(parents=True)   # a frame folder someone forgot to fill
    canon.mkdir()
    name = layout.list_samples(data)[0]
    from PIL import Image
    rgba = [np.asarray(Image.open(layout.image_path(data / name, t, 0)), dtype=np.float32) / 255 for t in range(3)]
    frames = np.stack([f[..., :3] * f[..., 3:] + (1 - f[..., 3:]) for f in rgba])
    write_video(videos / "a_good.mp4", frames, fps=8)
    write_video(videos / "c_one_frame.mp4", frames[:1], fps=8)
    pts = torch.load(layout.static_vertices_path(data / name)).float()
    n = len(pts)
    g = Gaussians.from_activated(pts, torch.full((n, 3), 0.5), torch.full((n, 1), 0.95), torch.full((n, 3), 0.02),
                                 torch.tensor([1.0, 0, 0, 0]).expand(n, 4))
    for stem in ("a_good", "c_one_frame"):
        write_ply(g, canon / f"{stem}.ply")

    def no_lpips(*a, **k):
        raise AssertionError("LPIPS looked for in a run without ground truth")
    monkeypatch.setattr(inference, "load_lpips", no_lpips)
    printed = []
    real_write = inference.tqdm.write
    monkeypatch.setattr(inference.tqdm, "write", lambda s, file=None, **k: (printed.append(s), real_write(s, file=file)))

    assert _run("--pack", pack, "--input", videos, "--canonical", canon, "--out", root / "awkward_out") == 1
    err = capsys.readouterr().err
    # One line per input, in the order they ran (so the first result was on screen before the next input started).
    assert [p.split(":")[0] for p in printed] == ["a_good", "b_empty_frames", "c_one_frame"], printed
    assert "3 frames" in printed[0] and str(root / "awkward_out" / "a_good") in printed[0]
    assert "b_empty_frames: failed" in printed[1] and "neither frame images" in printed[1]
    assert "c_one_frame: failed" in printed[2] and "has 1 frame" in printed[2] and "at least 2" in printed[2]
    assert "2 of 3 inputs failed" in err
