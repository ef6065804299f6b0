"""A compact bundle of the accepted clips, for a machine that can neither download the packages nor receive the
prepared samples (2.5 GB): `python -m data_rendering.game_assets --cache C --bundle FILE` writes it from the same
listing, judging, dedup, resampling and split as the prepared samples, `python -m data_rendering.game_assets.unbundle
FILE --out D` turns it into those samples (docs/real_data.md).

The file is a zip archive; its entries are written in a fixed order with a fixed timestamp, so the same clips give
the same bytes. Everything but the images is LZMA-compressed by zip itself.

    bundle.json                  format, version, frames, seed, test_fraction, packages, the sample names in order
    game_assets_clips.csv        the listing of every model x clip, as the command writes it beside prepared samples
    meshes/<key>/faces.npy       triangles (F, 3), uint16 or uint32
    meshes/<key>/uvs.npy         texture coordinates (V, 2) float32, when textured
    meshes/<key>/colors.npy      per-vertex colours (V, 3) float32, when coloured (neither: grey)
    textures/<key>.png           the texture as 8-bit RGB, shrunk to at most MAX_TEXTURE on its longest side
    clips/<sample>.json          the manifest row ("record"), what metadata.json records ("meta"), the mesh and
                                 texture keys, the box of the normalised frames ("lo", "hi")
    clips/<sample>.npy           the frames quantised to uint16 within the box, then differenced along time

A mesh or texture entry is stored once and named by its content's hash: the clips of one model share them. The
quantisation step on an axis is (hi - lo) / LEVELS; a decoded position is within half a step of the sample's
(normalised: at most 0.5 / 65535 on the longest axis).
"""
from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from data_rendering.mesh import MeshSequence
from utils.cli import InputError, one_line

FORMAT, VERSION = "gvf-game-assets-bundle", 1
DEFAULT_NAME = "game_assets_bundle.zip"   # the file inside a folder given as the bundle
LEVELS = 65535                            # uint16 quantisation levels across a clip's box
MAX_TEXTURE = 256                         # longest side of a stored texture (the renders are 128 px)
HEADER, LISTING = "bundle.json", "game_assets_clips.csv"
_EPOCH = (1980, 1, 1, 0, 0, 0)            # zip's earliest date: no clock in the bytes


def bundle_file(path: Path) -> Path:
    """The bundle file named by `path`: the path itself, or DEFAULT_NAME inside it when it is a folder."""
    return path / DEFAULT_NAME if path.is_dir() else path


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _key(*blobs: bytes) -> str:
    h = hashlib.sha1()
    for b in blobs:
        h.update(len(b).to_bytes(8, "little") + b)
    return h.hexdigest()[:16]


def quantise(vertices: np.ndarray) -> tuple[np.ndarray, list[float], list[float]]:
    """(uint16 (T, V, 3) codes, box lo, box hi) of positions within their box across all frames."""
    v = vertices.astype(np.float64)
    lo, hi = v.min(axis=(0, 1)), v.max(axis=(0, 1))
    span = np.where(hi > lo, hi - lo, 1.0)  # a flat axis: every code 0, decoded as lo
    codes = np.rint((v - lo) / span * LEVELS).astype(np.uint16)
    return codes, lo.tolist(), hi.tolist()


def dequantise(codes: np.ndarray, lo, hi) -> np.ndarray:
    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    span = np.where(hi > lo, hi - lo, 1.0)
    return (lo + codes.astype(np.float64) / LEVELS * span).astype(np.float32)


def texture_png(texture: np.ndarray) -> bytes:
    """8-bit PNG of a (H, W, 3) float texture in [0, 1], shrunk to at most MAX_TEXTURE on its longest side with the
    filter assemble.read_image shrinks the game's images with. The uvs are fractions of the image: still valid."""
    image = Image.fromarray(np.rint(np.clip(texture, 0, 1) * 255).astype(np.uint8), "RGB")
    scale = MAX_TEXTURE / max(image.size)
    if scale < 1:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.BILINEAR)
    buf = io.BytesIO()
    image.save(buf, "PNG", optimize=True)
    return buf.getvalue()


class BundleWriter:
    """The sink of game_assets.Run with --bundle: every accepted clip is encoded into memory (a few tens of MB for
    the whole set), and finish() writes the archive."""
    status = "bundled"

    def __init__(self):
        self.entries: dict[str, bytes] = {}     # shared mesh and texture entries, by name
        self.clips: dict[str, dict] = {}        # sample -> its json fields besides the manifest row
        self.frames: dict[str, bytes] = {}      # sample -> encoded frames

    def has(self, where: str, name: str) -> bool:
        return False  # a bundle is written whole: every accepted clip goes in

    def put(self, where: str, name: str, seq: MeshSequence, meta: dict) -> None:
        mesh = {"faces.npy": _npy(seq.faces.astype(np.uint16 if seq.vertices.shape[1] <= 1 << 16 else np.uint32))}
        for field in ("uvs", "colors"):
            value = getattr(seq, field)
            if value is not None:
                mesh[f"{field}.npy"] = _npy(np.asarray(value, np.float32))
        mesh_key = _key(*(k.encode() + v for k, v in sorted(mesh.items())))
        for file, blob in mesh.items():
            self.entries[f"meshes/{mesh_key}/{file}"] = blob
        texture_key = None
        if seq.texture is not None:
            png = texture_png(seq.texture)
            texture_key = _key(png)
            self.entries[f"textures/{texture_key}.png"] = png
        codes, lo, hi = quantise(seq.vertices)
        # differences along time are small numbers (wrapping modulo 2^16 is undone exactly): they compress to ~2/3
        codes[1:] -= codes[:-1].copy()
        self.frames[name] = _npy(codes)
        self.clips[name] = dict(meta=meta, mesh=mesh_key, texture=texture_key, lo=lo, hi=hi)

    def finish(self, path: Path, records: list[dict], listing: bytes, settings: dict) -> int:
        """Write the archive (atomically: a .partial file renamed when complete); its size in bytes."""
        names = [r["sample"] for r in records]
        if sorted(names) != sorted(self.clips):
            raise RuntimeError("BundleWriter.finish: the records do not match the clips put in")  # a bug, not input
        header = dict(settings, format=FORMAT, version=VERSION, samples=names)
        tmp = path.with_name(path.name + ".partial")
        path.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(tmp, "w") as zf:
            def add(entry: str, data: bytes, method=zipfile.ZIP_LZMA):
                info = zipfile.ZipInfo(entry, _EPOCH)
                info.compress_type, info.external_attr = method, 0o644 << 16
                zf.writestr(info, data)

            add(HEADER, _json(header))
            add(LISTING, listing)
            for entry in sorted(self.entries):
                add(entry, self.entries[entry], zipfile.ZIP_STORED if entry.endswith(".png") else zipfile.ZIP_LZMA)
            for record in records:
                name = record["sample"]
                add(f"clips/{name}.json", _json(dict(self.clips[name], record=record)))
                add(f"clips/{name}.npy", self.frames[name])
        tmp.replace(path)
        return path.stat().st_size


def _json(value) -> bytes:
    return (json.dumps(value, sort_keys=True, indent=1) + "\n").encode()


class BundleReader:
    """A bundle opened for reading. The header is checked on opening (InputError naming the file); a clip's entries
    are read when asked for, and an unreadable one is an InputError naming `<file>!<entry>`."""

    def __init__(self, path: Path):
        self.path = bundle_file(Path(path))
        if not self.path.is_file():
            raise InputError(f"{self.path}: no such bundle file")
        try:
            self.zip = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError) as e:
            raise InputError(f"{self.path}: not a bundle ({one_line(e)})") from None
        header = self.json(HEADER)
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise InputError(f"{self.path}!{HEADER}: not a game_assets bundle header")
        if header.get("version") != VERSION:
            raise InputError(f"{self.path}: bundle version {header.get('version')}, this reader knows {VERSION}")
        self.header = header
        self.names: list[str] = list(header.get("samples", []))
        self.members = set(self.zip.namelist())

    def read(self, entry: str) -> bytes:
        try:
            return self.zip.read(entry)
        except Exception as e:  # noqa: BLE001 -- a missing member, a bad CRC, broken LZMA data: all say the entry
            raise InputError(f"{self.path}!{entry}: cannot read ({type(e).__name__}: {one_line(e)})") from None

    def json(self, entry: str):
        try:
            return json.loads(self.read(entry))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"{self.path}!{entry}: not JSON ({e})") from None

    def array(self, entry: str) -> np.ndarray:
        try:
            return np.load(io.BytesIO(self.read(entry)), allow_pickle=False)
        except InputError:
            raise
        except Exception as e:  # noqa: BLE001 -- np.load raises several types for damaged data
            raise InputError(f"{self.path}!{entry}: not an array ({type(e).__name__}: {one_line(e)})") from None

    def clip(self, name: str) -> dict:
        """A clip's json: record (the manifest row), meta, mesh, texture, lo, hi."""
        entry = f"clips/{name}.json"
        clip = self.json(entry)
        missing = [k for k in ("record", "meta", "mesh", "texture", "lo", "hi") if k not in clip]
        if missing:
            raise InputError(f"{self.path}!{entry}: missing {', '.join(missing)}")
        return clip

    def sequence(self, name: str) -> tuple[MeshSequence, dict]:
        """(normalised MeshSequence, metadata for metadata.json) of a sample, as the game_assets command would have
        handed them to the writer, up to the quantisation and the texture's size."""
        clip = self.clip(name)
        entry = f"clips/{name}.npy"
        codes = self.array(entry)
        if codes.dtype != np.uint16 or codes.ndim != 3 or codes.shape[-1] != 3:
            raise InputError(f"{self.path}!{entry}: expected uint16 (T, V, 3) codes, found {codes.dtype} {codes.shape}")
        codes = np.cumsum(codes, axis=0, dtype=np.uint16)  # undo the differences (modulo 2^16, as they were made)
        fields = {k[:-4]: self.array(f"meshes/{clip['mesh']}/{k}")
                  for k in ("faces.npy", "uvs.npy", "colors.npy") if f"meshes/{clip['mesh']}/{k}" in self.members}
        if "faces" not in fields:
            raise InputError(f"{self.path}!meshes/{clip['mesh']}/faces.npy: missing (named by clips/{name}.json)")
        if clip["texture"] is not None:
            entry = f"textures/{clip['texture']}.png"
            try:
                image = Image.open(io.BytesIO(self.read(entry)))
                fields["texture"] = np.asarray(image.convert("RGB"), np.float32) / 255.0
            except InputError:
                raise
            except Exception as e:  # noqa: BLE001 -- PIL raises many types for damaged images
                raise InputError(f"{self.path}!{entry}: not an image ({type(e).__name__}: {one_line(e)})") from None
        try:
            seq = MeshSequence(dequantise(codes, clip["lo"], clip["hi"]), **fields)
        except ValueError as e:
            raise InputError(f"{self.path}!clips/{name}: inconsistent entries ({e})") from None
        return seq, clip["meta"]
