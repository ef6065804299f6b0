"""Blender renderer (data_rendering/blender_render.py), its dataset runner (render_dataset.py) and the Objaverse
selection (download_objaverse.py).

The helpers and the runner are tested everywhere (a fake renderer command stands in for Blender, fake annotations for
Objaverse: no network). The real render needs the Blender venv (``./setup.sh --render``) and Debian's
``assimp-testmodels`` (the Khronos AnimatedMorphCube); without them those tests are skipped with the reason.
Acceptance of a real render: its cameras agree with its images, i.e. the stored per-frame mesh, projected through each
view's stored camera, covers the same pixels as the PNG's alpha (IoU >= 0.9).
"""
import json
import math
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from data_rendering import blender_render as br
from data_rendering import download_objaverse as dl
from data_rendering import render_dataset as rd
from datasets import layout as L
from utils import cameras as C

REPO = Path(__file__).resolve().parents[1]
RENDER_PYTHON = REPO / ".venv-render" / "bin" / "python"
GLTF_MODELS = Path("/usr/share/assimp/models/glTF2")
ANIMATED = GLTF_MODELS / "glTF-Sample-Models" / "AnimatedMorphCube-glTF" / "AnimatedMorphCube.gltf"
STILL = GLTF_MODELS / "BoxTextured-glTF" / "BoxTextured.gltf"
CAMERA_KEYS = ["matrix_world", "format_version", "max_depth", "bbox", "origin", "x_fov", "y_fov", "x", "y", "z"]


# ----------------------------------------------------------------------------------------------- helpers (no Blender)
def test_file_names_follow_the_layout(tmp_path):
    assert L.mesh_frame_path(tmp_path, 7) == tmp_path / "objs" / "frame7.obj"
    assert br.partial_dir(tmp_path / "uid") == tmp_path / ".uid.partial"


def test_camera_record_matches_the_cameras_module():
    gen = torch.Generator().manual_seed(0)
    eyes = C.published_view_positions(20, generator=gen, dtype=torch.float64).numpy()
    bbox = [[-0.5, -0.4, -0.3], [0.5, 0.4, 0.3]]
    for eye in eyes:
        m = br.look_at_matrix_world(eye)
        ours = C.extrinsics_from_blender(torch.from_numpy(m))
        np.testing.assert_allclose(ours.numpy(), C.look_at(torch.from_numpy(eye)).numpy(), atol=1e-9)
        record = br.camera_record(m, C.BLENDER_DEFAULT_FOV, bbox=bbox)
        reference = C.blender_camera_json(ours, C.BLENDER_DEFAULT_FOV, bbox=bbox)
        assert list(record) == list(reference) == CAMERA_KEYS
        for key in CAMERA_KEYS:
            np.testing.assert_allclose(np.asarray(record[key], float), np.asarray(reference[key], float), atol=1e-9,
                                       err_msg=key)
        extrinsics, intrinsics = C.load_blender_camera(json.loads(json.dumps(record)))
        np.testing.assert_allclose(extrinsics.numpy(), ours.numpy(), atol=1e-6)
        np.testing.assert_allclose(intrinsics[0, 0].item(), 0.5 / math.tan(C.BLENDER_DEFAULT_FOV / 2), rtol=1e-6)


def test_view_positions_fixed_then_random():
    rng = np.random.default_rng(3)
    first, second = br.view_positions(40, rng), br.view_positions(40, rng)
    np.testing.assert_allclose(first[:8], C.published_view_positions(8, dtype=torch.float64).numpy(), atol=1e-12)
    np.testing.assert_allclose(first[0], [0, -2, 0])
    np.testing.assert_allclose(second[:8], first[:8])
    assert not np.allclose(second[8:], first[8:])  # random views are re-drawn for every frame
    for pos in (first, second):
        np.testing.assert_allclose(np.linalg.norm(pos, axis=1), 2.0)
        polar = np.degrees(np.arccos(pos[8:, 2] / 2.0))
        assert polar.min() >= 75 - 1e-9 and polar.max() <= 135 + 1e-9
    np.testing.assert_array_equal(br.view_positions(40, np.random.default_rng(3)), first)  # seeded
    assert br.view_positions(5, rng).shape == (5, 3)


def test_frame_choice_and_motion():
    assert br.consecutive_frames(0, 100, 4) == [0, 1, 2, 3]
    assert br.consecutive_frames(2, 5, 6) == [2, 3, 4, 5, 5, 5]  # clamped at the last keyframe
    assert br.native_frame_count(0, 100.8) == 101 and br.native_frame_count(1, 11) == 11
    assert br.native_frame_count(3, 2) == 0
    np.testing.assert_allclose(br.uniform_frames(0, 30, 4), [0, 10, 20, 30])
    v = np.zeros((3, 5, 3))
    assert br.mean_displacement(v) == 0.0
    v[1, :, 0], v[2, :, 0] = 0.1, 0.3
    assert br.mean_displacement(v) == pytest.approx(0.2)
    assert br.mean_displacement(v[:1]) == 0.0


def test_write_obj(tmp_path):
    verts = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0.5]], float)
    br.write_obj(tmp_path / "a.obj", verts, np.array([[0, 1, 2]]))
    v, f = _read_obj(tmp_path / "a.obj")
    np.testing.assert_allclose(v, verts)
    np.testing.assert_array_equal(f, [[0, 1, 2]])


def _read_obj(path):
    vertices, faces = [], []
    for line in Path(path).read_text().splitlines():
        if line.startswith("v "):
            vertices.append([float(x) for x in line.split()[1:4]])
        elif line.startswith("f "):
            faces.append([int(x.split("/")[0]) - 1 for x in line.split()[1:]])
    return np.array(vertices, np.float64), np.array(faces, np.int64)


# ----------------------------------------------------------------------------------------------- runner (fake renderer)
FAKE_RENDERER = textwrap.dedent("""
    import argparse, json, os, sys, time
    from pathlib import Path
    p = argparse.ArgumentParser()
    p.add_argument("--input"); p.add_argument("--out"); p.add_argument("--seed")
    p.add_argument("--overwrite", action="store_true")
    args, rest = p.parse_known_args()
    with open(os.environ["FAKE_CALLS"], "a") as f:
        f.write(json.dumps({"input": Path(args.input).stem, "seed": args.seed, "rest": rest}) + "\\n")
    kind = Path(args.input).read_text().strip()
    out = Path(args.out)
    work = out.parent / f".{out.name}.partial"
    work.mkdir(parents=True, exist_ok=True)
    if kind == "fail":
        print("something broke", file=sys.stderr); sys.exit(3)
    if kind == "sleep":
        time.sleep(60)
    if kind == "noop":
        sys.exit(0)
    (work / ("static.txt" if kind == "static" else "metadata.json")).write_text("{}")
    os.replace(work, out)
""")


@pytest.fixture
def fake_setup(tmp_path, monkeypatch):
    assets = tmp_path / "assets"
    assets.mkdir()
    kinds = {"a_ok": "ok", "b_static": "static", "c_fail": "fail", "d_ok": "ok", "e_sleep": "sleep", "f_noop": "noop"}
    for name, kind in kinds.items():
        (assets / f"{name}.glb").write_text(kind)
    script = tmp_path / "fake_renderer.py"
    script.write_text(FAKE_RENDERER)
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_CALLS", str(calls))

    def called():
        return [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []

    return SimpleNamespace(assets=assets, out=tmp_path / "renders", renderer=f"{sys.executable} {script}",
                           called=called, tmp=tmp_path)


def test_runner_resumes_and_lists_failures(fake_setup, capsys):
    s = fake_setup
    failures = s.tmp / "failed.txt"
    base = [str(s.assets), "--out", str(s.out), "--renderer", s.renderer, "--timeout", "2", "--failures",
            str(failures), "--frames", "4", "--", "--light", "area"]
    started = time.time()
    assert rd.main(base) == 1
    assert time.time() - started < 20  # the sleeping renderer was killed at its timeout
    err = capsys.readouterr().err
    for name in ("c_fail", "e_sleep", "f_noop"):
        assert name in err
    assert "something broke" in err and "timed out" in err
    assert sorted(line.split("\t")[0] for line in failures.read_text().splitlines()) == ["c_fail", "e_sleep",
                                                                                          "f_noop"]
    assert br.sample_status(s.out / "a_ok") == "complete" and br.sample_status(s.out / "d_ok") == "complete"
    assert br.sample_status(s.out / "b_static") == "static"
    for name in ("c_fail", "e_sleep", "f_noop"):
        assert not (s.out / name).exists() and not br.partial_dir(s.out / name).exists()
    assert (s.out / ".logs" / "c_fail.log").read_text().count("something broke") == 1
    first = s.called()
    assert len(first) == 6
    assert all(c["rest"] == ["--frames", "4", "--light", "area"] for c in first)
    seeds = {c["input"]: c["seed"] for c in first}
    assert len(set(seeds.values())) == 6 and seeds["a_ok"] == str(rd.object_seed(0, "a_ok"))

    # Second run: finished and static objects are skipped; only the failed ones run again.
    assert rd.main(base) == 1
    assert sorted(c["input"] for c in s.called()[6:]) == ["c_fail", "e_sleep", "f_noop"]


def test_runner_shards(fake_setup):
    s = fake_setup
    names = sorted(p.stem for p in s.assets.glob("*.glb"))
    for i in range(3):
        args = [str(s.assets), "--out", str(s.out), "--renderer", s.renderer, "--shard", str(i), "--num-shards", "3",
                "--start", "0", "--end", "4"]  # a_ok b_static c_fail d_ok → shards [a], [b], [c, d]
        rd.main(args)
    ran = [c["input"] for c in s.called()]
    assert sorted(ran) == names[:4]
    assert rd.select_shard(list(range(10)), 0, None, 0, 3) == [0, 1, 2]
    assert rd.select_shard(list(range(10)), 0, None, 2, 3) == [6, 7, 8, 9]
    parts = [rd.select_shard(list(range(17)), 2, 15, i, 4) for i in range(4)]
    assert sum(parts, []) == list(range(2, 15))
    with pytest.raises(ValueError):
        rd.select_shard([1], 0, None, 3, 3)


def test_runner_inputs(tmp_path):
    (tmp_path / "sub").mkdir()
    for rel in ("x.glb", "sub/y.GLTF", "sub/z.fbx", "sub/notes.txt", ".hidden/w.glb"):
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_text("")
    names = [a.name for a in rd.collect_assets([tmp_path])]
    assert names == ["y", "z", "x"]  # sorted paths under the folder, hidden folders ignored
    lst = tmp_path / "list.txt"
    lst.write_text("# comment\nx.glb\nscene_a\tsub/y.GLTF\n\nx.glb\n")
    assets = rd.collect_assets([lst])
    assert [(a.name, a.path) for a in assets] == [("x", tmp_path / "x.glb"), ("scene_a", tmp_path / "sub/y.GLTF")]
    (tmp_path / "sub" / "x.glb").write_text("")
    with pytest.raises(ValueError, match="share the sample name"):
        rd.collect_assets([tmp_path / "x.glb", tmp_path / "sub" / "x.glb"])
    for bad in ("../up\tx.glb", ".secret\tx.glb", "/abs\tx.glb"):
        lst.write_text(bad + "\n")
        with pytest.raises(ValueError, match="bad sample name"):
            rd.collect_assets([lst])
    with pytest.raises(ValueError, match="no such file"):
        rd.collect_assets([tmp_path / "missing.glb"])


def test_runner_needs_the_blender_venv(tmp_path, capsys):
    (tmp_path / "a.glb").write_text("")
    code = rd.main([str(tmp_path / "a.glb"), "--out", str(tmp_path / "o"), "--python", str(tmp_path / "nope")])
    assert code == 2 and "setup.sh --render" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- Objaverse selection
def _annotations():
    return {
        "u0": {"animationCount": 0, "license": "by"},
        "u1": {"animationCount": 1, "license": "by", "name": "walker", "user": {"username": "ann"}},
        "u2": {"animationCount": 3, "license": "by-nc"},
        "u3": {"license": "by"},  # no count
        "u4": {"animationCount": None, "license": "cc0"},
        "u5": {"animationCount": "2", "license": "cc0"},
        **{f"v{i:02d}": {"animationCount": 1 + i % 2, "license": "by"} for i in range(30)},
    }


def test_objaverse_selection():
    ann = _annotations()
    everything = dl.select_animated(ann)
    assert set(everything) == {"u1", "u2", "u5", *(f"v{i:02d}" for i in range(30))}
    assert dl.select_animated(ann) == everything  # seeded
    assert dl.select_animated(ann, seed=1) != everything and sorted(dl.select_animated(ann, seed=1)) == sorted(
        everything)
    assert dl.select_animated(ann, max_count=5) == everything[:5]
    assert set(dl.select_animated(ann, min_animations=2)) == {"u2", "u5", *(f"v{i:02d}" for i in range(1, 30, 2))}
    assert sorted(dl.select_animated(ann, uids=["u0", "u1", "u2", "zz", "u1"])) == ["u1", "u2"]
    assert sorted(dl.select_animated(ann, uids=["u1", "u2", "u5"], licenses=["cc0", "by"])) == ["u1", "u5"]
    assert dl.attribution(ann["u1"]) == {"name": "walker", "license": "by", "animationCount": 1, "author": "ann"}
    with pytest.raises(ValueError):
        dl.select_animated(ann, min_animations=0)


def test_objaverse_download_flow_without_network(tmp_path, monkeypatch):
    """main() with a stand-in for the objaverse package: selection, chunked download with a failing object, list file
    that render_dataset.py reads."""
    ann = _annotations()
    store = tmp_path / "dl" / "hf-objaverse-v1" / "glbs" / "000-000"

    def load_objects(uids, download_processes=1):
        if "v03" in uids:
            raise OSError("HTTP 500")
        store.mkdir(parents=True, exist_ok=True)
        for uid in uids:
            (store / f"{uid}.glb").write_text("")
        return {uid: str(store / f"{uid}.glb") for uid in uids}

    fake = SimpleNamespace(load_annotations=lambda uids=None: ann if uids is None else
                           {u: ann[u] for u in uids if u in ann}, load_objects=load_objects)
    monkeypatch.setattr(dl, "_objaverse", lambda out: fake)
    uid_file = tmp_path / "uids.txt"
    uid_file.write_text("u1\nu2\nv03\n# comment\nv05\tignored\n")
    assert dl.main(["--out", str(tmp_path / "dl"), "--uids", str(uid_file), "--threads", "2"]) == 1  # v03 failed
    assets = rd.collect_assets([tmp_path / "dl" / "animated.txt"])
    assert sorted(a.name for a in assets) == ["u1", "u2", "v05"]
    assert all(a.path == store / f"{a.name}.glb" and a.path.is_file() for a in assets)
    assert "walker" in (tmp_path / "dl" / "selected_annotations.json").read_text()
    assert dl.main(["--out", str(tmp_path / "dl2"), "--max", "4", "--threads", "3"]) in (0, 1)
    assert len((tmp_path / "dl2" / "animated.txt").read_text().splitlines()) >= 3


# ----------------------------------------------------------------------------------------------- real Blender render
def _blender_missing():
    if not RENDER_PYTHON.is_file():
        return f"{RENDER_PYTHON} not found: make the Blender venv with ./setup.sh --render"
    try:
        probe = subprocess.run([str(RENDER_PYTHON), "-c", "import bpy"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"{RENDER_PYTHON} cannot run: {err}"
    if probe.returncode:
        return f"bpy does not import in {RENDER_PYTHON}: {probe.stderr.strip()[-300:]}"
    return None


@pytest.fixture(scope="module")
def blender():
    reason = _blender_missing()
    if reason:
        pytest.skip(reason)
    if not ANIMATED.is_file():
        pytest.skip(f"{ANIMATED} missing: apt-get install assimp-testmodels")
    return RENDER_PYTHON


def _render(python, asset, out, *extra, timeout=120):
    cmd = [str(python), str(REPO / "data_rendering" / "blender_render.py"), "--input", str(asset), "--out", str(out),
           *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


FRAMES, VIEWS, RES = 4, 10, 80


@pytest.fixture(scope="module")
def rendered(blender, tmp_path_factory):
    out = tmp_path_factory.mktemp("blender") / "morph_cube"
    started = time.time()
    result = _render(blender, ANIMATED, out, "--frames", str(FRAMES), "--views", str(VIEWS), "--resolution", str(RES),
                     "--samples", "8", "--seed", "5")
    assert result.returncode == 0, result.stdout + result.stderr
    return SimpleNamespace(root=out, seconds=time.time() - started, log=result.stdout)


def test_render_layout(rendered):
    root = rendered.root
    assert rendered.seconds < 60
    assert br.sample_status(root) == "complete" and not br.partial_dir(root).exists()
    expected_images = {L.image_path(root, t, v) for t in range(FRAMES) for v in range(VIEWS)}
    assert set((root / "imgs").iterdir()) == expected_images
    assert set((root / "meta_data").iterdir()) == {L.camera_path(root, t, v) for t in range(FRAMES)
                                                   for v in range(VIEWS)}
    assert sorted(p.name for p in (root / "objs").iterdir()) == [f"frame{t}.obj" for t in range(FRAMES)]
    meta = json.loads((root / "metadata.json").read_text())
    assert meta["source"] == str(ANIMATED) and len(meta["source_sha256"]) == 64
    assert meta["num_frames"] == FRAMES and meta["views"] == VIEWS and meta["resolution"] == RES
    assert meta["seed"] == 5 and meta["engine"] == "CYCLES" and meta["x_fov"] == pytest.approx(C.BLENDER_DEFAULT_FOV)
    first, last = meta["keyframe_range"]
    expected = br.uniform_frames(first, last, FRAMES) if meta["frames_resampled_uniformly"] else \
        br.consecutive_frames(first, last, FRAMES)
    np.testing.assert_allclose(meta["frames"], expected)
    assert meta["mean_displacement"] >= 0.01
    for path in expected_images:
        with Image.open(path) as im:
            assert im.mode == "RGBA" and im.size == (RES, RES)
            alpha = np.asarray(im)[..., 3]
        assert alpha.min() == 0 and alpha.max() == 255  # transparent film around an opaque object


def test_render_cameras(rendered):
    root = rendered.root
    fixed = C.published_view_positions(8, dtype=torch.float64).numpy()
    randoms = []
    for t in range(FRAMES):
        for v in range(VIEWS):
            record = json.loads(L.camera_path(root, t, v).read_text())
            assert list(record) == CAMERA_KEYS
            assert record["format_version"] == 6 and record["max_depth"] == 5.0
            assert record["x_fov"] == pytest.approx(C.BLENDER_DEFAULT_FOV, abs=1e-6) == record["y_fov"]
            m = np.asarray(record["matrix_world"])
            np.testing.assert_allclose(record["origin"], m[:3, 3])
            extrinsics, _ = C.load_blender_camera(L.camera_path(root, t, v))
            np.testing.assert_allclose(record["z"], -m[:3, 2], atol=1e-6)
            np.testing.assert_allclose(extrinsics[2, :3].numpy(), record["z"], atol=1e-5)  # OpenCV forward axis
            np.testing.assert_allclose(extrinsics[1, :3].numpy(), record["y"], atol=1e-5)  # OpenCV down axis
            # Looks at the origin from radius 2; the image's up is world +Z (no roll).
            np.testing.assert_allclose(np.asarray(record["z"]), -m[:3, 3] / 2.0, atol=1e-5)
            assert abs(record["x"][2]) < 1e-6 and record["y"][2] < 0
            if v < 8:
                np.testing.assert_allclose(m[:3, 3], fixed[v], atol=1e-5)
            else:
                polar = math.degrees(math.acos(m[2, 3] / 2.0))
                assert 75 - 1e-3 <= polar <= 135 + 1e-3
                randoms.append(m[:3, 3])
            bbox = np.asarray(record["bbox"])
            assert bbox.shape == (2, 3) and (bbox[0] <= bbox[1]).all()
    assert len({tuple(np.round(p, 5)) for p in randoms}) == len(randoms)  # re-drawn for every (frame, view)


def test_render_meshes_and_images_agree(rendered):
    """The acceptance: each view's stored camera projects the stored frame mesh onto the rendered alpha (IoU >= 0.9)."""
    rasterizer = pytest.importorskip("data_rendering.rasterizer")
    root = rendered.root
    faces0 = None
    ious = []
    for t in range(FRAMES):
        vertices, faces = _read_obj(L.mesh_frame_path(root, t))
        if faces0 is None:
            faces0 = faces
            lo, hi = vertices.min(0), vertices.max(0)
            np.testing.assert_allclose((lo + hi) / 2, 0, atol=1e-5)  # frame 0 normalised: centred, extent 1
            assert (hi - lo).max() == pytest.approx(1.0, abs=1e-5)
        np.testing.assert_array_equal(faces, faces0)  # fixed topology, triangles only
        cams = [C.load_blender_camera(L.camera_path(root, t, v)) for v in range(VIEWS)]
        extrinsics = torch.stack([c[0] for c in cams]).double().numpy()
        intrinsics = torch.stack([c[1] for c in cams]).double().numpy()
        mask = rasterizer.silhouette(vertices, faces, extrinsics, intrinsics, RES, RES) > 0.5
        for v in range(VIEWS):
            with Image.open(L.image_path(root, t, v)) as im:
                alpha = np.asarray(im)[..., 3] >= 128
            union = (alpha | mask[v]).sum()
            ious.append(1.0 if union == 0 else (alpha & mask[v]).sum() / union)
    assert min(ious) >= 0.9, f"IoU per view {np.round(ious, 3).tolist()}"
    # The VAE data preparation reads the same meshes.
    from data_rendering.prepare_vae_data import read_obj_sequence
    sequence = read_obj_sequence(root)
    assert sequence.num_frames == FRAMES and np.array_equal(sequence.faces, faces0)


def test_render_static_and_resume(blender, tmp_path):
    """A model without animation ends as static.txt (a finished sample); a finished sample is not rendered again; the
    runner drives the real renderer and skips finished samples."""
    if not STILL.is_file():
        pytest.skip(f"{STILL} missing: apt-get install assimp-testmodels")
    out = tmp_path / "renders"
    assert rd.main([str(STILL), "--out", str(out), "--resolution", "32", "--views", "2"]) == 0
    sample = out / STILL.stem
    assert br.sample_status(sample) == "static" and not (sample / "imgs").exists()
    assert "no keyframes" in (sample / "static.txt").read_text()
    result = _render(blender, STILL, sample)
    assert result.returncode == 0 and "already finished" in result.stdout
    result = _render(blender, tmp_path / "missing.glb", tmp_path / "x")
    assert result.returncode == 1 and "missing.glb" in result.stderr and not (tmp_path / "x").exists()
