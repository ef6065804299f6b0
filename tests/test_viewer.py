"""pipeline/viewer.py: viewer.html's embedded data decodes (here in numpy, as its JavaScript does) to apply_delta's
frames within the quantisation bound; the page, opened from disk in headless Chromium with software WebGL and no
network, draws what utils/render.rasterize draws for the same camera and frame, without console errors.

The browser tests need Chromium (Debian: apt-get install chromium; .ci/run installs it). Without it they skip, except
under CI=true, where a missing browser fails rather than hiding the tests.
"""
import base64
import io
import json
import math
import os
import re
import tomllib
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.viewer import READY_JS, viewer_from_result, write_viewer
from render_reference import random_scene
from scripts.render_gaussians import example_torus
from utils.cameras import orbit_cameras
from utils.cli import InputError
from utils.gaussians import DELTA_SLICES, Gaussians
from utils.headless_chromium import HeadlessChromium, find_chromium
from utils.render import rasterize
from utils.video import write_video

ROOT = Path(__file__).resolve().parents[1]
FRAMES = 4


# --- scene -------------------------------------------------------------------------------------------------------------
def quat_mul(a, b):
    w1, x1, y1, z1 = a.unbind(-1)
    w2, x2, y2, z2 = b.unbind(-1)
    return torch.stack([w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2, w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
                        w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2, w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2], -1)


def moving_torus(n=3000, frames=FRAMES):
    """A striped torus turning about Z and rising; every one of Δ's 14 channels changes from frame to frame (scales
    grow, colours shift, opacity drops), so a viewer that skipped any channel would draw another image."""
    g = example_torus(n)
    deltas = []
    for t in range(frames):
        a = math.radians(40.0 * t)
        rot = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]])
        turn = torch.tensor([math.cos(a / 2), 0.0, 0.0, math.sin(a / 2)]).expand_as(g.quat)
        moved = Gaussians(g.xyz @ rot.T + torch.tensor([0.0, 0.0, 0.08 * t]), g.f_dc + torch.tensor([0.3, -0.2, 0.1]) * t,
                          g.opacity_logit - 0.3 * t, g.scale_pre + 0.15 * t, quat_mul(turn, g.quat))
        deltas.append(as_channels(moved) - as_channels(g))
    return g, torch.stack(deltas).float()


def as_channels(g: Gaussians) -> torch.Tensor:
    """(..., N, 14) float64 in the Δ layout (written here, not pipeline/viewer.to_channels, which is under test)."""
    out = torch.empty(*g.xyz.shape[:-1], 14, dtype=torch.float64)
    for name, s in DELTA_SLICES.items():
        out[..., s] = getattr(g, name).double()
    return out


# --- a numpy decoder that follows viewer_template.html's worker step by step ---------------------------------------------
def read_viewer(path: Path) -> tuple[dict, bytes, list]:
    html = path.read_text(encoding="utf-8")
    grab = lambda name: re.search(rf'<script id="{name}" type="[^"]+">(.*?)</script>', html, re.S).group(1)
    return json.loads(grab("gvf-header")), zlib.decompress(base64.b64decode(grab("gvf-payload"))), json.loads(grab("gvf-inputs"))


def decode_like_js(header: dict, payload: bytes) -> np.ndarray:
    """(T, N, 14) float32: canonical = offset + q * step, frame = canonical + d * delta_step[t] in float64, then float32."""
    n, t = header["count"], header["frames"]
    assert len(payload) == 2 * 14 * n * (t + 1)
    raw = np.frombuffer(payload, np.uint8).reshape(t + 1, 2, n, 14)   # per block: low-byte plane, high-byte plane
    q = raw[:, 0].astype(np.int64) | (raw[:, 1].astype(np.int64) << 8)
    canonical = np.asarray(header["offset"]) + q[0] * np.asarray(header["step"])
    signed = np.where(q[1:] >= 32768, q[1:] - 65536, q[1:])
    return (canonical + signed * np.asarray(header["delta_step"])[:, None, :]).astype(np.float32)


def test_decoded_frames_match_apply_delta_within_the_quantisation_bound(tmp_path):
    g, delta = moving_torus(2000)
    delta[0] = 0                       # a frame without motion (delta_step 0)
    g.opacity_logit[:] = 1.5           # a constant channel (step 0)
    write_viewer(tmp_path, g, delta, fps=10.0)
    header, payload, inputs = read_viewer(tmp_path / "viewer.html")
    assert (header["count"], header["frames"], header["fps"], inputs) == (2000, FRAMES, 10.0, [])

    got = decode_like_js(header, payload).astype(np.float64)
    want = as_channels(g.to(dtype=torch.float64).apply_delta(delta.double())).numpy()
    # Bound derived from the format (pipeline/viewer.py): half a canonical step (range / 65535) plus half a Δ step
    # (the frame's max |Δ| / 32767) per channel, plus the final rounding to float32; computed from the inputs here, not
    # from the file's own header.
    values, d = as_channels(g).numpy(), delta.double().numpy()
    bound = (0.5 * np.ptp(values, 0) / 65535)[None, None] + (0.5 * np.abs(d).max(1) / 32767)[:, None, :]
    bound = bound + np.abs(want) * 2.0**-24 + 1e-12
    err = np.abs(got - want)
    assert (err <= bound).all(), f"worst channel {np.unravel_index(np.argmax(err / bound), err.shape)}"
    assert (got[0, :, 13] == 1.5).all()       # constant channel, no motion: exact
    # The quantisation is as coarse as documented (int16 / uint16), not a float copy: the error reaches the bound's scale.
    assert (err / bound).max() > 0.25


def test_write_viewer_refusals(tmp_path):
    g, delta = moving_torus(300, frames=2)
    write_viewer(tmp_path, g, delta, fps=8.0)
    with pytest.raises(FileExistsError, match="viewer.html exists"):
        write_viewer(tmp_path, g, delta, fps=8.0)
    write_viewer(tmp_path, g, delta, fps=8.0, overwrite=True)
    with pytest.raises(ValueError, match=r"expected Δ of shape \(T >= 1, 300, 14\)"):
        write_viewer(tmp_path, g, delta[:, :10], fps=8.0, overwrite=True)
    bad = delta.clone()
    bad[1, 5, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        write_viewer(tmp_path, g, bad, fps=8.0, overwrite=True)
    with pytest.raises(ValueError, match="3 input frames for an animation of 2 frames"):
        write_viewer(tmp_path, g, delta, fps=8.0, input_frames=np.zeros((3, 16, 16, 3), np.uint8), overwrite=True)
    with pytest.raises(ValueError, match="unknown camera keys"):
        write_viewer(tmp_path, g, delta, fps=8.0, overwrite=True, camera={"azimuth": 3})


def write_result(folder: Path, g: Gaussians, delta: torch.Tensor, fps=None, compare_frames=None):
    """A result folder as inference's write_outputs leaves it (the parts the viewer reads)."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"xyz": g.xyz, "f_dc": g.f_dc, "opacity_logit": g.opacity_logit, "scale_pre": g.scale_pre, "quat": g.quat,
              "delta": delta}
    np.savez_compressed(folder / "animation.npz", **{k: v.float().numpy() for k, v in arrays.items()})
    if fps is not None:
        (folder / "summary.json").write_text(json.dumps({"fps": fps}))
    if compare_frames is not None:
        write_video(folder / "compare.mp4", compare_frames, fps=fps or 12.0)


def test_viewer_from_result_reads_animation_npz_and_the_input_column(tmp_path):
    g, delta = moving_torus(500)
    size = 32
    compare = np.zeros((FRAMES, size, 3 * size, 3), np.uint8)
    compare[..., :size, 0] = 255                    # the input column is red, the render columns black
    write_result(tmp_path / "obj", g, delta, fps=6.0, compare_frames=compare)
    path = viewer_from_result(tmp_path / "obj")
    header, payload, inputs = read_viewer(path)
    assert (header["count"], header["frames"], header["fps"], len(inputs)) == (500, FRAMES, 6.0, FRAMES)
    first = np.asarray(Image.open(io.BytesIO(base64.b64decode(inputs[0].split(",", 1)[1]))).convert("RGB"), np.float64)
    assert first.shape == (size, size, 3) and first[..., 0].mean() > 200 and first[..., 1:].mean() < 40
    # The same data as a viewer written straight from the tensors (npz stores float32, as the tensors are).
    write_viewer(tmp_path / "direct", g, delta, fps=6.0)
    assert decode_like_js(*read_viewer(tmp_path / "direct" / "viewer.html")[:2]).tobytes() == decode_like_js(header, payload).tobytes()
    with pytest.raises(FileExistsError):
        viewer_from_result(tmp_path / "obj")


def test_viewer_from_result_refusals_name_the_file(tmp_path):
    with pytest.raises(InputError, match=r"empty[/\\]animation.npz: no such file"):
        viewer_from_result(tmp_path / "empty")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "animation.npz").write_bytes(b"not a zip")
    with pytest.raises(InputError, match=r"broken[/\\]animation.npz: not a readable .npz"):
        viewer_from_result(tmp_path / "broken")
    (tmp_path / "partial").mkdir()
    np.savez(tmp_path / "partial" / "animation.npz", xyz=np.zeros((3, 3), np.float32))
    with pytest.raises(InputError, match=r"partial[/\\]animation.npz: missing arrays \['f_dc'"):
        viewer_from_result(tmp_path / "partial")


def test_template_ships_with_the_package_and_its_shaders_are_ascii():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "pipeline" in setuptools["packages"] and "viewer_template.html" in setuptools["package-data"]["pipeline"]
    html = (ROOT / "pipeline" / "viewer_template.html").read_text(encoding="utf-8")
    shaders = re.findall(r'<script id="[a-z]+-shader" type="x-shader/[a-z-]+">(.*?)</script>', html, re.S)
    assert len(shaders) == 2 and all(src.isascii() for src in shaders)   # older WebGL stacks refuse other characters


# --- in the browser --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    binary = find_chromium()
    if binary is None:
        reason = "no Chromium to run viewer.html in (Debian: apt-get install chromium; .ci/run installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason + "; CI must run these tests")
        pytest.skip(reason)
    with HeadlessChromium(binary) as b:
        yield b


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    folder = tmp_path_factory.mktemp("viewer")
    g, delta = moving_torus()
    inputs = np.zeros((FRAMES, 24, 24, 3), np.uint8)
    inputs[:, :, :, 1] = np.arange(FRAMES)[:, None, None] * 60       # frame t: green level 60·t
    write_viewer(folder, g, delta, fps=4.0, input_frames=inputs)
    return folder, g.apply_delta(delta)


def screenshot(browser, folder: Path, query: str, width: int, height: int):
    """(page, RGB float image of the canvas) once the page says the requested view is drawn."""
    page = browser.open(f"{(folder / 'viewer.html').as_uri()}?{query}&w={width}&h={height}", width + 300, height)
    page.wait_for(READY_JS)
    png = Image.open(io.BytesIO(page.screenshot())).convert("RGB")
    return page, np.asarray(png, np.float64)[:height, :width] / 255


def reference(frames: Gaussians, frame, az, el, radius, fov, width, height, background):
    ext, k = orbit_cameras(az, el, radius, fov, aspect=width / height)
    rgb = rasterize(frames[frame], ext, k, width, height, background=background, backend="torch").rgb[0]
    return (rgb.clamp(0, 1) * 255 + 0.5).floor().numpy() / 255    # as an 8-bit canvas stores it


def psnr(a, b):
    return float(-10 * np.log10(max(((a - b) ** 2).mean(), 1e-12)))


def test_screenshot_matches_the_rasterizer_and_follows_the_frame(browser, scene):
    folder, frames = scene
    w = h = 160
    view = dict(az=30.0, el=20.0, radius=2.0, fov=40.0)
    query = "&".join(f"{k}={v}" for k, v in view.items()) + "&bg=white&play=0"
    refs = {t: reference(frames, t, **view, width=w, height=h, background=1.0) for t in (1, 3)}
    shots = {}
    for t in (1, 3):
        page, shots[t] = screenshot(browser, folder, f"{query}&frame={t}", w, h)
        assert page.errors() == []
        assert "ready" in page.evaluate("document.title")
        # Offline: the page itself, the worker's Blob URL and the embedded input frames (data:), nothing else (no
        # CDN, no sibling file).
        urls = page.requests()
        assert [u for u in urls if u.startswith("file:")] == [page.url] and any(u.startswith("blob:") for u in urls)
        assert all(u.startswith(("file:", "blob:", "data:image/jpeg;base64,")) for u in urls), urls
    # The brief asks for >= 25 dB; the port of render.py reaches 50-58 dB (8-bit blending), so 40 dB still catches a
    # wrong low-pass, cut-off or activation.
    for t in (1, 3):
        assert psnr(shots[t], refs[t]) >= 40, (t, psnr(shots[t], refs[t]))
    # Another frame is another image: far from frame 1's reference (about 11 dB here).
    assert psnr(shots[3], refs[1]) <= psnr(shots[1], refs[1]) - 20
    assert shots[1].std() > 0.05            # something is drawn


def test_non_square_view_dark_background_and_target(browser, scene):
    folder, frames = scene
    w, h = 200, 120
    page, shot = screenshot(browser, folder, "frame=2&az=-70&el=-25&radius=1.6&fov=55&tx=0.1&ty=0&tz=0.05&bg=black&play=0", w, h)
    ext, k = orbit_cameras(-70.0, -25.0, 1.6, 55.0, target=(0.1, 0.0, 0.05), aspect=w / h)
    ref = rasterize(frames[2], ext, k, w, h, background=0.0, backend="torch").rgb[0].clamp(0, 1).numpy()
    assert psnr(shot, ref) >= 40, psnr(shot, ref)
    assert page.errors() == []


def test_small_translucent_splats(browser, tmp_path):
    """Sparse, mostly sub-pixel Gaussians of every opacity: the image is made of the 2D low-pass and its opacity
    compensation, which a dense opaque surface hides."""
    g = random_scene(3000, seed=4, scale_range=(-7.5, -5.0))
    delta = torch.randn(2, 3000, 14, generator=torch.Generator().manual_seed(5)) * 0.05
    write_viewer(tmp_path, g, delta, fps=2.0)
    w = h = 128
    page, shot = screenshot(browser, tmp_path, "frame=1&az=200&el=35&radius=2.2&fov=45&bg=black&play=0", w, h)
    ext, k = orbit_cameras(200.0, 35.0, 2.2, 45.0)
    ref = rasterize(g.apply_delta(delta)[1], ext, k, w, h, background=0.0, backend="torch").rgb[0].clamp(0, 1).numpy()
    assert psnr(shot, ref) >= 40, psnr(shot, ref)
    assert page.errors() == []


def test_page_decodes_exactly_as_the_numpy_decoder(browser, scene):
    folder, _ = scene
    page = browser.open(f"{(folder / 'viewer.html').as_uri()}?play=0", 400, 300)
    page.wait_for(READY_JS)
    header, payload, _ = read_viewer(folder / "viewer.html")
    want = decode_like_js(header, payload)[2]                                    # (N, 14) float32
    got = np.asarray(page.evaluate("gvf.frameFloats(2)"), np.float32).reshape(-1, 16)
    slot = [0, 1, 2, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 3]                     # the worker's texel layout
    assert np.array_equal(got[:, slot], want)


def test_playing_advances_frames_and_the_input_video_follows(browser, scene):
    folder, _ = scene
    page = browser.open(f"{(folder / 'viewer.html').as_uri()}?play=1&speed=4", 500, 300)
    page.wait_for(READY_JS)
    seen = set()
    for _ in range(40):
        seen.add(page.evaluate("gvf.state.frame"))
        browser.pump(0.1)
    assert len(seen) >= 3, seen
    page.evaluate("document.getElementById('play').click()")                     # pause
    browser.pump(1.0)  # let the last sort land
    frame = page.evaluate("gvf.state.frame")
    page.wait_for(f"gvf.shownFrame() === {frame}")
    src = page.evaluate("document.getElementById('input-frame').src")
    green = np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"), np.float64)[..., 1]
    assert abs(green.mean() - 60 * frame) < 8                                    # the input frame of the shown frame
    assert page.errors() == []


# --- scripts/view.py -----------------------------------------------------------------------------------------------
def test_view_script_writes_once_and_refuses_in_one_line(tmp_path, capsys):
    from scripts.view import main
    from utils import cli

    g, delta = moving_torus(200, frames=2)
    write_result(tmp_path / "obj", g, delta, fps=5.0)
    assert cli.run(main, [str(tmp_path / "obj"), "--no-open"]) == 0
    page = tmp_path / "obj" / "viewer.html"
    assert read_viewer(page)[0]["fps"] == 5.0
    assert f"open {page.resolve().as_uri()}" in capsys.readouterr().out
    stamp = page.stat().st_mtime_ns
    assert cli.run(main, [str(tmp_path / "obj"), "--no-open", "--query", "frame=1&bg=white"]) == 0
    assert page.stat().st_mtime_ns == stamp and "viewer.html?frame=1&bg=white" in capsys.readouterr().out
    assert cli.run(main, [str(page), "--no-open"]) == 0 and page.stat().st_mtime_ns == stamp   # the file names its folder

    for folder, named in [(tmp_path / "missing", "missing: no such folder"), (tmp_path, "animation.npz: no such file")]:
        assert cli.run(main, [str(folder), "--no-open"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and named in err, err


def test_view_script_help_and_serve(tmp_path):
    import subprocess
    import sys
    import urllib.request

    run = lambda *a: subprocess.run([sys.executable, "scripts/view.py", *a], cwd=ROOT, capture_output=True, text=True,
                                    timeout=60)
    p = run("--help")
    assert p.returncode == 0 and "--serve" in p.stdout
    g, delta = moving_torus(200, frames=2)
    write_viewer(tmp_path, g, delta, fps=5.0)
    server = subprocess.Popen([sys.executable, "scripts/view.py", str(tmp_path), "--serve", "--port", "0", "--no-open"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        url = re.search(r"(http://\S+)", line).group(1)
        with urllib.request.urlopen(url, timeout=30) as r:
            assert r.read() == (tmp_path / "viewer.html").read_bytes()
    finally:
        server.terminate()
        server.wait(30)


def test_view_script_screenshot(browser, scene, tmp_path, capsys):
    from scripts.view import main
    from utils import cli

    folder, _ = scene
    out = tmp_path / "shot.png"
    assert cli.run(main, [str(folder), "--screenshot", str(out), "--size", "420x180", "--query", "ui=0&bg=white&play=0"]) == 0
    img = np.asarray(Image.open(out).convert("RGB"))
    assert img.shape == (180, 420, 3) and (img < 200).any() and (img[0, 0] == 255).all()   # the torus on white
    assert cli.run(main, [str(folder), "--screenshot", str(out), "--size", "big"]) == 2
    assert "--size 'big': expected WxH" in capsys.readouterr().err


def test_drag_orbits_wheel_zooms_and_background_buttons(browser, scene):
    folder, _ = scene
    page = browser.open(f"{(folder / 'viewer.html').as_uri()}?play=0&az=10&el=5&radius=2&bg=grey&w=200&h=200", 500, 200)
    page.wait_for(READY_JS)
    mouse = lambda kind, x, y, **kw: browser.send("Input.dispatchMouseEvent", page.session, type=kind, x=x, y=y, **kw)
    mouse("mousePressed", 100, 100, button="left", buttons=1, clickCount=1)
    mouse("mouseMoved", 150, 120, button="left", buttons=1)
    mouse("mouseReleased", 150, 120, button="left", buttons=0, clickCount=1)
    az, el = page.evaluate("[gvf.cam.az, gvf.cam.el]")
    assert az == pytest.approx(10 - 50 * 0.4) and el == pytest.approx(5 + 20 * 0.4)    # 0.4° per pixel
    mouse("mouseWheel", 100, 100, deltaX=0, deltaY=200)
    assert page.evaluate("gvf.cam.radius") == pytest.approx(2 * math.exp(0.2))
    corner = lambda: np.asarray(Image.open(io.BytesIO(page.screenshot())).convert("RGB"))[2, 2]
    page.evaluate("document.querySelector('[data-bg=white]').click()")
    browser.pump(0.5)
    assert (corner() == 255).all()
    page.evaluate("document.querySelector('[data-bg=black]').click()")
    browser.pump(0.5)
    assert (corner() == 0).all()
    assert page.errors() == []
