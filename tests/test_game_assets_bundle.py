"""The game_assets bundle: `game_assets --bundle` then `game_assets.unbundle` against `game_assets --out` on one .deb
built here (tests/test_game_assets.py's writer: a plain unit and a textured one, two clips each side of the split).

Expected values come from the direct command's own sample folders and sequences: vertices within half the
quantisation step derived here from the direct sequence's box, faces and uvs equal, the texture the direct one
shrunk to 256 px, lists, manifest rows and metadata equal, the renders close."""
import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_rendering.game_assets import __main__ as command
from data_rendering.game_assets import unbundle
from data_rendering.game_assets.bundle import BundleReader
from data_rendering.game_assets.split import is_test
from datasets import layout
from test_game_assets import write_deb
from utils import cli

pytestmark = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb is needed to build the package")

WRITER = ["--frames", "4", "--views", "2", "--res", "16"]
UNIT = "megaglest-data:usr/share/games/megaglest/techs/megapack/factions/f/units/"


def _seed() -> int:
    """A split seed that puts unit u on the train side and unit v on the test side (fraction 0.5)."""
    return next(s for s in range(100) if not is_test(UNIT + "u", s, 0.5) and is_test(UNIT + "v", s, 0.5))


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """(folder, bundle file, direct sample folders' root, unbundled root, sample -> the direct sequence)."""
    tmp = tmp_path_factory.mktemp("bundle")
    cache = tmp / "cache"
    write_deb(tmp, cache, corrupt=False, textured=True)
    common = ["--cache", str(cache), "--packages", "megaglest-data", "--test-fraction", "0.5", "--seed", str(_seed())]
    direct, bundle, unbundled = tmp / "direct", tmp / "b.zip", tmp / "unbundled"
    sequences = {}
    put = command.SampleFolders.put

    def keep(self, where, name, seq, meta):  # the sequence the direct command hands its writer
        sequences[name] = seq
        put(self, where, name, seq, meta)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(command.SampleFolders, "put", keep)
        assert cli.run(command.main, common + ["--out", str(direct), "--write-meshes"] + WRITER) == 0
    assert cli.run(command.main, common + ["--bundle", str(bundle), "--frames", "4"]) == 0
    assert cli.run(unbundle.main, [str(bundle), "--out", str(unbundled), "--write-meshes"] + WRITER) == 0
    return tmp, bundle, direct, unbundled, sequences


def _obj_vertices(path: Path) -> np.ndarray:
    return np.array([[float(x) for x in line.split()[1:]] for line in path.read_text().splitlines()
                     if line.startswith("v ")])


def test_vertices_faces_uvs_and_texture_round_trip(made):
    _, bundle, direct, unbundled, sequences = made
    reader = BundleReader(bundle)
    assert sorted(reader.names) == sorted(sequences) and len(sequences) == 3  # u walking, v walking and attacking
    for name, want in sequences.items():
        got, _ = reader.sequence(name)
        v = want.vertices.astype(np.float64)
        span = v.max(axis=(0, 1)) - v.min(axis=(0, 1))
        half_step = span / 65535 / 2  # 16-bit codes across the clip's own box, rounded to the nearest
        assert np.all(np.abs(got.vertices - v) <= half_step + 1e-7), name
        np.testing.assert_array_equal(got.faces, want.faces)
        for t in range(4):  # the written meshes too (6 decimals on both sides)
            a = _obj_vertices(layout.mesh_frame_path(direct / name, t))
            b = _obj_vertices(layout.mesh_frame_path(unbundled / name, t))
            assert np.all(np.abs(a - b) <= half_step + 1.01e-6), (name, t)
        if want.texture is None:
            assert got.texture is None and got.uvs is None
            np.testing.assert_array_equal(got.colors, want.colors)
            continue
        np.testing.assert_array_equal(got.uvs, want.uvs)
        h, w = want.texture.shape[:2]
        assert (h, w) == (38, 260)  # the 300 px image shrunk to 256 by the reader, plus the atlas border
        assert got.texture.shape == (37, 256, 3)  # 260 -> 256, 38 -> round(38 * 256 / 260) = 37
        shrunk = Image.fromarray(np.rint(want.texture * 255).astype(np.uint8)).resize((256, 37), Image.BILINEAR)
        np.testing.assert_allclose(got.texture, np.asarray(shrunk) / 255.0, atol=1e-7)
        np.testing.assert_allclose(got.texture.mean((0, 1)), want.texture.mean((0, 1)), atol=2 / 255)
    assert any(s.texture is None for s in sequences.values()) and any(s.texture is not None for s in
                                                                      sequences.values())


def test_lists_manifest_metadata_and_split_kept(made):
    _, _, direct, unbundled, _ = made
    for name in ("all", "train", "test"):
        assert layout.read_list_file(unbundled / f"{name}.txt", unbundled) == \
            layout.read_list_file(direct / f"{name}.txt", direct), name
    train = layout.read_list_file(direct / "train.txt", direct)
    test = layout.read_list_file(direct / "test.txt", direct)
    assert [n.split("__")[1] for n in train] == ["f_u"] and len(test) == 2  # the seed put u in train, v in test
    rows = {root: sorted(command.read_jsonl(root / command.MANIFEST), key=lambda r: r["sample"])
            for root in (direct, unbundled)}
    assert rows[unbundled] == rows[direct] and {r["split"] for r in rows[direct]} == {"train", "test"}
    for name in train + test:
        a = json.loads(layout.render_metadata_path(direct / name).read_text())
        b = json.loads(layout.render_metadata_path(unbundled / name).read_text())
        assert b.pop("bundle")["quantisation_levels"] == 65535 and a == b, name
    listing = lambda root: command.read_csv(root / command.CLIPS_CSV)  # noqa: E731
    assert [dict(r, status="") for r in listing(unbundled)] == [dict(r, status="") for r in listing(direct)]
    assert [r["status"] for r in listing(unbundled)].count("bundled") == 3


def test_renders_close_to_the_direct_samples(made):
    _, _, direct, unbundled, sequences = made
    for name in sequences:
        for t in (0, 3):
            a = np.asarray(Image.open(layout.image_path(direct / name, t, 0)), np.float64)
            b = np.asarray(Image.open(layout.image_path(unbundled / name, t, 0)), np.float64)
            mse = np.mean((a - b) ** 2)
            assert mse == 0 or 10 * np.log10(255 ** 2 / mse) > 45, (name, t, mse)  # 60 dB seen


def test_bundle_is_deterministic_and_not_overwritten(made, capsys):
    tmp, bundle, *_ = made
    argv = ["--cache", str(tmp / "cache"), "--packages", "megaglest-data", "--test-fraction", "0.5",
            "--seed", str(_seed()), "--frames", "4", "--bundle", str(tmp)]
    (tmp / "game_assets_bundle.zip").write_bytes(b"the user's own file")
    assert cli.run(command.main, argv) == cli.EXIT_BAD_INPUT  # a folder names game_assets_bundle.zip in it
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "game_assets_bundle.zip: already exists" in err[0]
    assert (tmp / "game_assets_bundle.zip").read_bytes() == b"the user's own file"
    assert cli.run(command.main, argv + ["--overwrite"]) == 0
    assert (tmp / "game_assets_bundle.zip").read_bytes() == bundle.read_bytes()


def test_skip_existing_and_overwrite(made, capsys):
    _, bundle, _, unbundled, sequences = made
    name = sorted(sequences)[0]
    points = layout.static_vertices_path(unbundled / name)
    stamp = points.stat().st_mtime_ns
    lists = (unbundled / "all.txt").read_text()
    assert cli.run(unbundle.main, [str(bundle), "--out", str(unbundled)] + WRITER) == 0
    assert points.stat().st_mtime_ns == stamp and f"{name}: exists, skipped" in capsys.readouterr().out
    assert (unbundled / "all.txt").read_text() == lists  # no name listed twice
    assert cli.run(unbundle.main, [str(bundle), "--out", str(unbundled), "--overwrite", "--limit", "1"] + WRITER) == 0
    out = capsys.readouterr().out
    assert points.stat().st_mtime_ns != stamp and out.count(": written") == 1


def _corrupt(src: Path, dst: Path, entry: str) -> None:
    """A copy of the bundle whose entry's stored bytes are damaged halfway (the zip directory stays intact)."""
    data = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as zf:
        info = zf.getinfo(entry)
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    middle = start + info.compress_size // 2
    data[middle:middle + 4] = bytes(b ^ 0xFF for b in data[middle:middle + 4])
    dst.write_bytes(bytes(data))


def test_a_corrupted_entry_fails_its_sample_only(made, capsys):
    tmp, bundle, _, _, sequences = made
    bad, broken = sorted(sequences)[1], tmp / "broken.zip"
    _corrupt(bundle, broken, f"clips/{bad}.npy")
    out = tmp / "from_broken"
    assert cli.run(unbundle.main, [str(broken), "--out", str(out)] + WRITER) == 1
    err = capsys.readouterr().err.strip().splitlines()
    lines = [line for line in err if f"clips/{bad}.npy" in line]
    assert len(lines) == 2 and lines[0].startswith(f"{bad}: failed: {broken}!clips/{bad}.npy: cannot read")
    assert err[-2:] == ["1 of 3 samples failed:", lines[1]]  # report_failures' summary names it once more
    assert not (out / bad).exists()
    assert sorted(layout.read_list_file(out / "all.txt", out)) == sorted(set(sequences) - {bad})


def test_bad_bundles_and_options_are_one_line(made, tmp_path, capsys):
    _, bundle, *_ = made
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(bundle.read_bytes()[:1000])
    other = tmp_path / "other.zip"
    with zipfile.ZipFile(other, "w") as zf:
        zf.writestr("bundle.json", json.dumps({"format": "something else"}))
    cases = [([str(truncated)], f"{truncated}: not a bundle"),
             ([str(other)], f"{other}!bundle.json: not a game_assets bundle header"),
             ([str(bundle), "--frames", "16"], "resampled to 4 frames, not --frames 16"),
             ([str(tmp_path / "missing.zip")], "missing.zip: no such bundle file")]
    for argv, message in cases:
        assert cli.run(unbundle.main, argv + ["--out", str(tmp_path / "out")]) == cli.EXIT_BAD_INPUT
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (argv, err)
    assert cli.run(command.main, ["--cache", str(tmp_path), "--out", str(tmp_path), "--bundle", str(bundle)]) == \
        cli.EXIT_BAD_INPUT and "either --out" in capsys.readouterr().err


def test_workers_write_the_same_samples(made):
    _, bundle, _, unbundled, sequences = made
    out = made[0] / "two_workers"
    assert cli.run(unbundle.main, [str(bundle), "--out", str(out), "--workers", "2"] + WRITER) == 0
    for name in sequences:
        for t in range(4):
            a = np.asarray(Image.open(layout.image_path(unbundled / name, t, 1)))
            b = np.asarray(Image.open(layout.image_path(out / name, t, 1)))
            np.testing.assert_array_equal(a, b)


def test_the_real_bundle_keeps_the_prepared_split():
    """The bundle of the whole cache (docs/real_data.md) against the prepared set made from the same cache."""
    root = Path(__file__).resolve().parents[1] / "data"
    bundle, real = root / "real_bundle" / "game_assets_bundle.zip", root / "real"
    if not bundle.is_file() or not (real / command.MANIFEST).is_file():
        pytest.skip("no bundle or prepared set of the real data here")
    reader = BundleReader(bundle)
    prepared = {r["sample"]: r for r in command.read_jsonl(real / command.MANIFEST)}
    assert sorted(reader.names) == sorted(prepared)
    for name in reader.names:
        assert reader.clip(name)["record"] == prepared[name], name
