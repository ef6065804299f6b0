"""Video input: reading videos, gifs and frame folders, matting, the square crop and the inference-ready frames,
checked against synthetic clips whose answers are known (a disc of radius R moving 4 px per frame)."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.matting import crop_square, matte, prepare_video_frames, square_box
from utils.video import VideoReadError, is_video_input, read_frames, write_video

H, W, R = 64, 96, 12  # at R = 10 the 4:2:0 chroma halo of H.264 (about 1 px) already costs 10% IoU
BG, FG = np.array([30, 60, 200], np.uint8), np.array([250, 200, 40], np.uint8)


def centre(i):
    return 20.0 + 4 * i, 30.0  # frame index encoded in the disc position


def disc(i, cx=None, cy=None, r=R):
    x, y = centre(i)
    cx, cy = x if cx is None else cx, y if cy is None else cy
    yy, xx = np.mgrid[0:H, 0:W] + 0.5
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def clip(n=12):
    masks = np.stack([disc(i) for i in range(n)])
    return np.where(masks[..., None], FG, BG).astype(np.uint8), masks


def iou(a, b):
    return (a & b).sum() / (a | b).sum()


def centroid_x(mask):
    return np.argwhere(mask)[:, 1].mean() + 0.5


def rgba_folder(folder, n=12, empty=()):
    """Frames named 1.png ... n.png (no zero padding); a soft ring of alpha 128 around each disc; frames in `empty` clear."""
    folder.mkdir()
    for i in range(n):
        a = np.where(disc(i), 255, np.where(disc(i, r=R + 2), 128, 0)).astype(np.uint8) * (i not in empty)
        rgb = np.where(disc(i, r=R + 2)[..., None], FG, BG)
        Image.fromarray(np.dstack([rgb, a]).astype(np.uint8), "RGBA").save(folder / f"{i + 1}.png")
    return folder


def test_mp4_frame_selection_fps_and_threshold_matte(tmp_path):
    frames, masks = clip()
    mp4 = write_video(tmp_path / "disc.mp4", frames, fps=12)
    got, fps = read_frames(mp4, start=2, stride=3, num_frames=3)
    assert got.shape == (3, H, W, 3) and got.dtype == np.uint8 and fps == pytest.approx(4.0)
    alpha = matte(got, "threshold").numpy()
    assert alpha.shape == (3, H, W) and alpha.min() >= 0 and alpha.max() <= 1
    for a, i in zip(alpha, (2, 5, 8)):
        assert iou(a > 0.5, masks[i]) > 0.9  # lossy H.264, still the disc
        assert abs(centroid_x(a > 0.5) - centre(i)[0]) < 1.0  # and the right frame (frames are 4 px apart)
    rest, _ = read_frames(mp4, start=2, stride=3)  # to the end: 2, 5, 8, 11
    assert len(rest) == 4 and abs(centroid_x(matte(rest[-1:], "threshold")[0].numpy() > 0.5) - centre(11)[0]) < 1.0


def test_too_short_video_names_the_file_and_the_counts(tmp_path):
    mp4 = write_video(tmp_path / "short.mp4", clip(12)[0], fps=12)
    with pytest.raises(ValueError, match=r"short\.mp4: has 12 frames; asked for 5 frames from frame 5 with stride 2") as e:
        read_frames(mp4, start=5, stride=2, num_frames=5)
    assert not isinstance(e.value, VideoReadError)  # a readable file, only too short
    with pytest.raises(ValueError, match="has 12 frames"):
        read_frames(mp4, start=12)


def test_rgba_folder_natural_order_and_exact_alpha(tmp_path):
    folder = rgba_folder(tmp_path / "frames")
    got, fps = read_frames(folder, start=1, stride=4)  # files 2, 6, 10 (string order would give 10, 2, 6 ...)
    assert got.shape == (3, H, W, 4) and fps is None
    for f, i in zip(got, (1, 5, 9)):
        assert (f[..., 3] == np.where(disc(i), 255, np.where(disc(i, r=R + 2), 128, 0))).all()
    alpha = matte(got, "auto")
    assert torch.equal(alpha, torch.from_numpy(got[..., 3]).float() / 255.0)  # the alpha path is exact
    # The threshold matte on the same frames without alpha: the coloured disc of radius R + 2, almost exactly.
    for a, i in zip(matte(got[..., :3], "threshold").numpy(), (1, 5, 9)):
        assert iou(a > 0.5, disc(i, r=R + 2)) > 0.98


def test_gif_transparent_and_opaque(tmp_path):
    frames, masks = clip(6)
    rgba = [Image.fromarray(np.dstack([f, m * np.uint8(255)]), "RGBA") for f, m in zip(frames, masks)]
    rgba[0].save(tmp_path / "t.gif", save_all=True, append_images=rgba[1:], duration=50, loop=0, disposal=2)
    got, fps = read_frames(tmp_path / "t.gif", start=1, stride=2)
    assert got.shape == (3, H, W, 4) and fps == pytest.approx(10.0)  # 20 fps / stride 2
    for f, i in zip(got, (1, 3, 5)):
        assert ((f[..., 3] > 0) == masks[i]).all() and (f[masks[i], :3] == FG).all()
    write_video(tmp_path / "o.gif", frames, fps=10)
    opaque, _ = read_frames(tmp_path / "o.gif", start=4, num_frames=2)
    assert opaque.shape == (2, H, W, 3)
    assert abs(centroid_x(matte(opaque, "threshold")[0].numpy() > 0.5) - centre(4)[0]) < 1.0


def test_square_box_matches_the_analytic_box():
    masks = np.stack([disc(i) for i in range(4)]).astype(np.float32)
    m = 0.1
    x0, y0, x1, y1 = square_box(masks, margin=m)
    half = R * (1 + 2 * m)
    cx, cy = centre(0)
    assert max(abs(x0 - (cx - half)), abs(y0 - (cy - half)), abs(x1 - (cx + half)), abs(y1 - (cy + half))) <= 2
    assert x1 - x0 == y1 - y0
    # Union: from the first disc's left edge to the last one's right edge, centred between them.
    x0, y0, x1, y1 = square_box(masks, margin=m, reference="union")
    ucx, half = (centre(0)[0] + centre(3)[0]) / 2, (centre(3)[0] - centre(0)[0] + 2 * R) / 2 * (1 + 2 * m)
    assert max(abs(x0 - (ucx - half)), abs(y0 - (cy - half)), abs(x1 - (ucx + half)), abs(y1 - (cy + half))) <= 2


def test_crop_square_pads_with_transparency_and_keeps_the_disc_centred():
    cx, cy = 12.0, 30.0  # near the left border: a 2x box reaches outside the image
    mask = disc(0, cx, cy)[None]
    frames = np.where(mask[..., None], FG, BG).astype(np.uint8)
    x0, y0, x1, y1 = square_box(mask.astype(np.float32), margin=0.5)
    assert x0 < 0 and x1 - x0 == 4 * R
    rgb, alpha = crop_square(frames, mask.astype(np.float32), margin=0.5, size=80)
    assert rgb.shape == (1, 3, 80, 80) and alpha.shape == (1, 1, 80, 80)
    pad = round(-x0 * 80 / (4 * R))
    assert alpha[0, 0, :, : pad - 1].max() == 0 and rgb[0, :, :, : pad - 1].max() == 0  # transparent, not the background
    fg = alpha[0, 0].numpy() > 0.5
    ys, xs = np.nonzero(fg)
    assert abs(xs.mean() + 0.5 - 40) < 1 and abs(ys.mean() + 0.5 - 40) < 1  # centred
    assert fg.sum() == pytest.approx(math.pi * (R * 80 / (4 * R)) ** 2, rel=0.03)  # radius scaled by 80 / (4R)
    inside = torch.from_numpy(fg)
    assert torch.allclose(rgb[0][:, inside].mean(1), torch.tensor(FG / 255.0, dtype=torch.float32), atol=0.01)


def test_prepare_video_frames_from_rgba_folder_is_exact(tmp_path):
    folder = rgba_folder(tmp_path / "frames")
    # The ring's alpha 128/255 is > 0.5, so frame 2's box is that of the disc of radius R + 2 times 1 + 2·0.25, the
    # output size: no resampling happens and the result is exact.
    side = 3 * (R + 2)
    out = prepare_video_frames(folder, num_frames=3, start=2, stride=2, size=side, background="white", margin=0.25)
    cx, cy = centre(2)
    assert out.box == (cx - side // 2, cy - side // 2, cx + side // 2, cy + side // 2)
    assert out.matting == "alpha" and out.fps is None and out.source == folder
    assert out.images.shape == (3, 3, side, side) and out.alpha.shape == (3, 1, side, side)
    x0, y0, x1, y1 = out.box
    for k, i in enumerate((2, 4, 6)):
        a = np.where(disc(i), 255, np.where(disc(i, r=R + 2), 128, 0))[y0:y1, x0:x1] / 255.0
        rgb = np.where(disc(i, r=R + 2)[..., None], FG, BG)[y0:y1, x0:x1] / 255.0
        want = rgb * a[..., None] + (1 - a[..., None])  # on white
        assert np.abs(out.alpha[k, 0].numpy() - a).max() < 1e-6
        assert np.abs(out.images[k].permute(1, 2, 0).numpy() - want).max() < 1e-5
    black = prepare_video_frames(folder, num_frames=1, size=side, background="black")
    assert black.images[0, :, 0, 0].abs().max() < 1e-6  # corners are transparent -> black


def test_prepare_video_frames_from_mp4_uses_the_threshold_and_warns(tmp_path, monkeypatch):
    import pipeline.matting

    monkeypatch.setattr(pipeline.matting, "rembg_problem", lambda model="u2net": "not installed")
    mp4 = write_video(tmp_path / "disc.mp4", clip()[0], fps=12)
    with pytest.warns(UserWarning, match="threshold"):
        out = prepare_video_frames(mp4, num_frames=4, stride=3, size=32, background=0.5)
    assert out.matting == "threshold" and out.fps == pytest.approx(4.0) and out.images.shape == (4, 3, 32, 32)
    half = R * 1.2
    assert max(abs(b - e) for b, e in zip(out.box, (20 - half, 30 - half, 20 + half, 30 + half))) <= 2
    assert abs(out.images[0, :, 0, 0] - 0.5).max() < 0.02  # a corner is background, replaced by grey 0.5


def test_frame_without_foreground_is_named(tmp_path):
    folder = rgba_folder(tmp_path / "frames", empty=(3,))
    with pytest.raises(ValueError, match="source frame 3 has no foreground"):
        prepare_video_frames(folder, num_frames=6, size=16)
    frames = np.stack([np.where(disc(0)[..., None], FG, BG), np.broadcast_to(BG, (H, W, 3))]).astype(np.uint8)
    with pytest.raises(ValueError, match="frame 1 has no foreground"):
        crop_square(frames, matte(frames, "threshold"))


def test_unreadable_inputs_raise_video_read_error(tmp_path):
    bad = tmp_path / "noise.mp4"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(VideoReadError, match=r"noise\.mp4: is not a readable video"):
        read_frames(bad)
    (tmp_path / "noise.gif").write_bytes(bad.read_bytes())
    with pytest.raises(VideoReadError, match=r"noise\.gif"):
        read_frames(tmp_path / "noise.gif")
    folder = rgba_folder(tmp_path / "frames", n=3)
    data = (folder / "2.png").read_bytes()
    (folder / "2.png").write_bytes(data[: len(data) // 2])
    read_frames(folder, num_frames=1)  # frames before the damaged one still read
    with pytest.raises(VideoReadError, match=r"2\.png"):
        read_frames(folder)
    with pytest.raises(VideoReadError, match="no such file"):
        read_frames(tmp_path / "missing.mp4")
    with pytest.raises(ValueError, match=r"notes\.txt: expected a video"):
        (tmp_path / "notes.txt").write_text("x")
        prepare_video_frames(tmp_path / "notes.txt", num_frames=1)


def test_is_video_input(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "a.MOV").write_bytes(b"x")
    (tmp_path / "a.txt").write_bytes(b"x")
    rgba_folder(tmp_path / "frames", n=1)
    assert is_video_input(tmp_path / "a.MOV") and is_video_input(tmp_path / "frames")
    assert not is_video_input(tmp_path / "empty") and not is_video_input(tmp_path / "a.txt")
    assert not is_video_input(tmp_path / "missing.mp4")


def test_rembg_without_weights_says_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("U2NET_HOME", str(tmp_path / "no_weights"))
    with pytest.raises(RuntimeError, match="never downloads") as e:
        matte(clip(1)[0], "rembg")
    assert str(tmp_path / "no_weights" / "u2net.onnx") in str(e.value) and "U2NET_HOME" in str(e.value)
    with pytest.raises(ValueError, match="alpha channel"):
        matte(clip(1)[0], "alpha")


def test_empty_zero_frame_and_one_frame_videos_say_so(tmp_path):
    import subprocess

    import imageio_ffmpeg
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(VideoReadError, match=r"empty\.mp4: the file is empty \(0 bytes\)"):
        read_frames(tmp_path / "empty.mp4")
    # A valid MP4 container that holds no frames at all (ffmpeg's own words for it are "Error opening output files").
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-f", "lavfi", "-i", "color=s=64x64:r=10",
                    "-frames:v", "0", "-c:v", "libx264", str(tmp_path / "zero.mp4")], check=True)
    with pytest.raises(VideoReadError, match=r"zero\.mp4: has no video frames .*0 frames"):
        read_frames(tmp_path / "zero.mp4")
    frames, _ = clip(1)
    write_video(tmp_path / "one.mp4", frames, fps=12)
    with pytest.raises(ValueError, match=r"one\.mp4: has 1 frame; asked for 4 frames"):
        read_frames(tmp_path / "one.mp4", num_frames=4)


def test_huge_frames_are_shrunk_as_read_with_one_warning(tmp_path):
    """A 4000 x 300 frame folder: the longer side comes back at MAX_SIDE, the disc where the scale puts it."""
    from utils.video import MAX_SIDE
    folder = tmp_path / "big"
    folder.mkdir()
    w, h, cx, cy, r = 4000, 300, 1000.0, 150.0, 100.0
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    for i in range(2):
        Image.fromarray(np.where(mask[..., None], FG, BG).astype(np.uint8)).save(folder / f"{i}.png")
    with pytest.warns(UserWarning, match=r"big: frames of 4000x300 pixels are large; shrunk to 2048x154") as rec:
        got, _ = read_frames(folder)
    assert len([w_ for w_ in rec if "large" in str(w_.message)]) == 1  # once per clip, not per frame
    f = MAX_SIDE / w
    assert got.shape == (2, round(h * f), MAX_SIDE, 3)
    fg = np.abs(got[0].astype(int) - FG).sum(-1) < 60
    assert abs(centroid_x(fg) - cx * f) < 1.0 and abs(fg.sum() - np.pi * (r * f) ** 2) < 0.05 * np.pi * (r * f) ** 2
    small, _ = read_frames(folder, max_side=None)  # opting out keeps the full size
    assert small.shape == (2, h, w, 3)
