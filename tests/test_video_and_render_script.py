import sys

import imageio.v2 as imageio
import numpy as np
import pytest
import torch

from utils.gaussians import Gaussians, write_ply, write_ply_sequence
from utils.video import write_video


def _frames():
    # Smooth gradients survive H.264 well; each frame differs so frame order is checkable.
    y, x = np.mgrid[0:48, 0:64] / 64.0
    return np.stack([np.stack([x, y, np.full_like(x, t / 5)], -1) for t in range(6)]).astype(np.float32)


def test_mp4_and_gif_round_trip(tmp_path):
    frames = _frames()
    mp4 = write_video(tmp_path / "a.mp4", torch.from_numpy(frames), fps=12)
    back = np.stack([f for f in imageio.get_reader(mp4)]).astype(np.float32) / 255
    assert back.shape == frames.shape
    assert np.abs(back - frames).mean() < 0.02
    assert np.abs(back[:, 20, 30, 2] - frames[:, 20, 30, 2]).max() < 0.05  # frame order kept
    gif = write_video(tmp_path / "a.gif", frames, fps=12)
    assert len(imageio.mimread(gif)) == 6
    with pytest.raises(FileExistsError):
        write_video(mp4, frames)
    with pytest.raises(ValueError, match="avi"):
        write_video(tmp_path / "a.avi", frames)


def test_mp4_without_imageio_ffmpeg_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # makes `import imageio_ffmpeg` raise ImportError
    with pytest.raises(RuntimeError, match=r"a\.mp4.*imageio-ffmpeg"):
        write_video(tmp_path / "a.mp4", _frames())
    assert list(tmp_path.iterdir()) == []                      # nothing half-written left behind


def _one_red_blob(n=1):
    xyz = torch.zeros(n, 3)
    f_dc = torch.tensor([[0.45, -0.5, -0.5]]).expand(n, 3) / 0.28209479177387814  # rgb (0.95, 0, 0)
    return Gaussians.from_activated(xyz, f_dc, torch.full((n, 1), 0.99), torch.full((n, 3), 0.2), torch.tensor([[1.0, 0, 0, 0]]).expand(n, 4))


def test_render_script_draws_the_splat_at_the_centre(tmp_path):
    from scripts.render_gaussians import main

    write_ply(_one_red_blob(), tmp_path / "blob.ply")
    main([str(tmp_path / "blob.ply"), "--out", str(tmp_path / "v.mp4"), "--views", "4", "--res", "32", "--backend", "torch", "--device", "cpu"])
    frames = np.stack([f for f in imageio.get_reader(tmp_path / "v.mp4")])
    assert frames.shape == (4, 32, 32, 3)
    centre, corner = frames[:, 16, 16].astype(int), frames[:, 1, 1].astype(int)
    assert (centre[:, 0] > 200).all() and (centre[:, 1:] < 60).all()   # red where the blob is
    assert (corner > 230).all()                                        # white background elsewhere
    with pytest.raises(SystemExit):
        main([str(tmp_path / "blob.ply"), "--out", str(tmp_path / "v.mp4")])  # exists, no --overwrite


def test_render_script_rejects_sequences_with_different_counts(tmp_path):
    from scripts.render_gaussians import load_frames

    write_ply_sequence(_one_red_blob(2).apply_delta(torch.zeros(2, 2, 14)), tmp_path / "seq")
    assert load_frames(tmp_path / "seq").batch_shape == (2,)
    write_ply(_one_red_blob(3), tmp_path / "seq" / "frame_0002.ply")
    with pytest.raises(SystemExit, match="different Gaussian counts"):
        load_frames(tmp_path / "seq")
