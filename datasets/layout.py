"""Sample directory layout: the ONE place that names files on disk (docs/architecture.md §3.1).

Per-object directory ``<data_root>/<name>/`` (the published layout of docs/published_system.md §1.1, so existing renders
work unchanged)::

    imgs/timestep_{TT:02d}_view_{VV:02d}.png          RGBA render
    meta_data/timestep_{TT:02d}_view_{VV:02d}.json    camera (utils/cameras.load_blender_camera)
    objs/frame{t}.obj                                 the renderer's triangulated mesh of frame t
    objs/mesh_data/static_frame_vertices.pt           (8192, 3) surface points
    objs/mesh_data/moving_frame_deltas.pt             (T, 8192, 3) displacements
    features_all_timesteps/<t>/<extractor>.npz        voxel features: indices (N, 3) uint8, patchtokens (N, C) float16
    metadata.json, static.txt                         render record; marker of an object rejected as static

Per-dataset files, under the same ``<data_root>`` (one convention, fixing the three of published §10.1)::

    latents/<name>/deformation_latent.pt              encode_latent.py output (published §1.6, §7)
    {deformation,static}_{mean,std}.pt                latent normalisation statistics (in a stats folder, default the root)
    mean_latent.pt                                    in a pack: the per-frame mean motion latent (scripts/make_pack.py)
    <prefix>_cond_features/<name>.npz                 image tokens, key ``features`` (T, L, C) float16 (published §1.7);
                                                      prefix "dinov2" for dinov2_vitl14_reg (published name), else
                                                      the extractor name.

This module imports no torch at load time (only the readers that return tensors do), so the Blender script, which runs
in a torch-free venv, names its files through it too.

Readers validate what they load and raise InputError (a ValueError) naming the file and the problem (FileNotFoundError when the
file is missing); npz files are read with ``allow_pickle=False``. Writers are atomic and refuse to overwrite.

Confinement: every path built here resolves (symlinks followed) inside the real data root, or the helper raises
InputError naming the file, so a symlinked file or folder (``imgs/x.png -> /etc/passwd``, ``latents -> /elsewhere``)
is neither read nor written outside the data root. The sample-folder helpers (image_path, ...) confine to their
``data_root=`` argument, else to the sample folder itself. ``allow_symlinks(True)`` (the ``--allow-symlinks`` option
of the tools that take a data root) follows symlinks anywhere, for data kept on another disk.
"""
from __future__ import annotations

import argparse
import functools
import os
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np

from utils.cli import InputError
from utils.fileio import atomic_write

DEFAULT_EXTRACTOR = "dinov2_vitl14_reg"
VOXEL_RESOLUTION = 64
_COND_PREFIX = {"dinov2_vitl14_reg": "dinov2"}  # the published folder name is dinov2_cond_features


# ----------------------------------------------------------------------------------------------- confinement
_ALLOW_SYMLINKS = False
SYMLINK_HELP = ("follow symlinks that lead outside the data root (data kept on another disk); by default a file or "
                "folder under the data root that resolves outside it is refused")


def allow_symlinks(allow: bool = True) -> bool:
    """Switch the confinement of paths to the data root off (True) or on (False, the default); returns the
    previous setting. Set by the tools' --allow-symlinks; process-wide (DataLoader workers forked later inherit it)."""
    global _ALLOW_SYMLINKS
    previous, _ALLOW_SYMLINKS = _ALLOW_SYMLINKS, bool(allow)
    return previous


class _AllowSymlinks(argparse.Action):
    """--allow-symlinks: a flag that also flips the switch when it is parsed (a tool needs no further line)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=False, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, True)
        allow_symlinks(True)


def add_symlink_option(parser: argparse.ArgumentParser) -> None:
    """Add --allow-symlinks to a tool that takes a data root; the tool also calls allow_symlinks(args.allow_symlinks),
    so a main() called again in one process without the flag confines again."""
    parser.add_argument("--allow-symlinks", action=_AllowSymlinks, help=SYMLINK_HELP)


@functools.lru_cache(maxsize=4096)
def _cached_realpath(root: str, device: int, inode: int) -> str:
    return os.path.realpath(root)


def _real_root(root: str) -> str:
    """realpath of a data root or sample folder, cached under the identity of what it leads to (a stat is cheaper
    than a realpath, and a symlink pointed elsewhere or replaced gives a new key)."""
    try:
        st = os.stat(root)
    except OSError:
        return os.path.realpath(root)
    return _cached_realpath(root, st.st_dev, st.st_ino)


def confine(path, root, what: str = "the data root") -> Path:
    """``path`` (unchanged), after checking that it resolves, symlinks followed, inside the real ``root``; a path
    that does not exist yet is resolved as far as it exists. One realpath per call (the root's is cached).
    Raises InputError naming the file; nothing is checked after allow_symlinks(True)."""
    path = Path(path)
    if _ALLOW_SYMLINKS:
        return path
    root_real = _real_root(os.path.abspath(root))
    real = os.path.realpath(path)
    if real != root_real and not real.startswith(root_real.rstrip(os.sep) + os.sep):
        raise InputError(f"{path}: resolves to {real} through a symlink, outside {what} {root_real}; "
                         f"pass --allow-symlinks to follow it")
    return path


def _within(path, sample_root, data_root) -> Path:
    # The sample-folder helpers: confined to the data root when the caller names it, else to the sample folder.
    if data_root is None:
        return confine(path, sample_root, "the sample folder")
    return confine(path, data_root)


# ----------------------------------------------------------------------------------------------- names
def _check_name(data_root, name: str) -> Path:
    # The lexical checks of resolve_sample: the name cannot leave data_root whatever the filesystem holds.
    if not isinstance(name, str) or not name.strip() or "\x00" in name:
        raise InputError(f"sample name must be a non-empty string, got {name!r}")
    if name != name.strip():
        raise InputError(f"sample name {name!r} has leading/trailing whitespace")
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute() or windows.is_absolute() or windows.drive:
        raise InputError(f"sample name {name!r} is an absolute path; names must be relative to the data root "
                         f"{data_root}")
    if ".." in posix.parts or ".." in windows.parts:
        raise InputError(f"sample name {name!r} contains '..' and would leave the data root {data_root}")
    if all(part == "." for part in posix.parts):
        raise InputError(f"sample name {name!r} names the data root itself")
    return Path(data_root) / posix


def resolve_sample(data_root, name: str) -> Path:
    """``data_root / name`` for a name read from a list file, refusing names that could leave the data root:
    empty, absolute (POSIX or Windows style), with a ``..`` component, or a symlink (anywhere along the path) that
    leads outside the data root (InputError; allowed after allow_symlinks(True)). The data root itself may be a
    symlink: the check compares real paths."""
    path = _check_name(data_root, name)
    if not _ALLOW_SYMLINKS:
        root_real, real = _real_root(os.path.abspath(data_root)), os.path.realpath(path)
        if os.path.commonpath([root_real, real]) != root_real:
            raise InputError(f"sample name {name!r} resolves to {real} through a symlink, outside the data root "
                             f"{root_real}; pass --allow-symlinks to follow it")
    return path


def read_list_file(path, data_root) -> list[str]:
    """Sample names from a list file (one per line; blank lines and '#' comments skipped; extra whitespace-separated
    fields such as the published "<name> <canonical_idx>" are ignored). Every entry must stay inside ``data_root``;
    a bad entry raises ValueError naming the file, the line and the entry."""
    names = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name = line.split()[0]
        try:
            resolve_sample(data_root, name)
        except ValueError as e:
            raise InputError(f"{path}, line {lineno}: entry {name!r} refused: {e}") from None
        names.append(name)
    return names


def list_samples(data_root) -> list[str]:
    """Every prepared sample directory directly under ``data_root`` (it holds the surface points), sorted."""
    root = Path(data_root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: data root not found")
    return sorted(p.name for p in root.iterdir() if static_vertices_path(p).is_file())


def select_samples(data_root, list_file=None, start: int = 0, end: int | None = None, default=list_samples) -> list[str]:
    """The names a job works on: the list file's entries (or ``default(data_root)``), sliced [start:end] as the
    published --start_idx/--end_idx. An empty selection is an error naming where it looked."""
    names = read_list_file(list_file, data_root) if list_file else default(data_root)
    picked = names[start:end]
    if not picked:
        where = f"list file {list_file}" if list_file else f"{data_root}"
        raise InputError(f"no samples selected from {where} ({len(names)} found, slice [{start}:{end}])")
    return picked


def write_list_file(path, names) -> Path:
    """One name per line, atomically."""
    text = "".join(f"{n}\n" for n in names)
    return atomic_write(path, lambda tmp: tmp.write_text(text), overwrite=True)


def _index(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise InputError(f"{what} must be a non-negative integer, got {value!r}")
    return int(value)


def _frame_stem(timestep: int, view: int) -> str:
    return f"timestep_{_index(timestep, 'timestep'):02d}_view_{_index(view, 'view'):02d}"


# The files of one sample folder. Each is confined (see the module docstring) to `data_root` when given, else to the
# sample folder.
def image_path(sample_root, timestep: int, view: int, *, data_root=None) -> Path:
    return _within(Path(sample_root) / "imgs" / f"{_frame_stem(timestep, view)}.png", sample_root, data_root)


def has_renders(sample_root) -> bool:
    """A prepared sample has its renders folder (what tells a sample from a video folder)."""
    return (Path(sample_root) / "imgs").is_dir()


def _count(exists) -> int:
    n = 0
    while exists(n):
        n += 1
    return n


def count_frames(sample_root, *, data_root=None) -> int:
    """The frames a sample's renders cover from frame 0: those of view 0 that exist in sequence (0, 1, 2, ... until
    the first missing one); confined as image_path is."""
    return _count(lambda t: image_path(sample_root, t, 0, data_root=data_root).is_file())


def count_views(sample_root, timestep: int = 0, *, data_root=None) -> int:
    """The views of frame `timestep` that exist in sequence from view 0; confined as image_path is."""
    return _count(lambda v: image_path(sample_root, timestep, v, data_root=data_root).is_file())


def camera_path(sample_root, timestep: int, view: int, *, data_root=None) -> Path:
    return _within(Path(sample_root) / "meta_data" / f"{_frame_stem(timestep, view)}.json", sample_root, data_root)


def mesh_frame_path(sample_root, timestep: int, *, data_root=None) -> Path:
    return _within(Path(sample_root) / "objs" / f"frame{_index(timestep, 'timestep')}.obj", sample_root, data_root)


def render_metadata_path(sample_root, *, data_root=None) -> Path:
    return _within(Path(sample_root) / "metadata.json", sample_root, data_root)


def static_marker_path(sample_root, *, data_root=None) -> Path:
    return _within(Path(sample_root) / "static.txt", sample_root, data_root)


def static_vertices_path(sample_root, *, data_root=None) -> Path:
    return _within(Path(sample_root) / "objs" / "mesh_data" / "static_frame_vertices.pt", sample_root, data_root)


def frame_deltas_path(sample_root, *, data_root=None) -> Path:
    return _within(Path(sample_root) / "objs" / "mesh_data" / "moving_frame_deltas.pt", sample_root, data_root)


def _check_extractor(extractor: str) -> str:
    # The extractor name becomes a file / folder name: keep it a plain identifier.
    if not isinstance(extractor, str) or not extractor or not all(c.isalnum() or c in "_-." for c in extractor) \
            or extractor.startswith("."):
        raise InputError(f"extractor name {extractor!r} is not a plain file name")
    return extractor


def voxel_features_path(sample_root, timestep: int = 0, extractor: str = DEFAULT_EXTRACTOR, *, data_root=None) -> Path:
    return _within(Path(sample_root) / "features_all_timesteps" / str(_index(timestep, "timestep"))
                   / f"{_check_extractor(extractor)}.npz", sample_root, data_root)


def latents_dir(data_root) -> Path:
    """<data_root>/latents, confined to the data root (encode_latent.py locks it while it writes)."""
    return confine(Path(data_root) / "latents", data_root)


LATENT_FILE = "deformation_latent.pt"


def latent_path(data_root, name: str) -> Path:
    """<data_root>/latents/<name>/deformation_latent.pt, confined to the data root (a `latents` symlink to a folder
    outside it is refused)."""
    return confine(_check_name(Path(data_root) / "latents", name) / LATENT_FILE, data_root)


def encoded_samples(data_root) -> list[str]:
    """The names of the samples that have a latent under <data_root>/latents (encode_latent.py's output), sorted."""
    return sorted(p.parent.name for p in latents_dir(data_root).glob(f"*/{LATENT_FILE}"))


LATENT_STATS = ("deformation_mean", "deformation_std", "static_mean", "static_std")


def latent_stats_path(stats_dir, which: str) -> Path:
    """One of the four normalisation files (published §1.6): `which` in LATENT_STATS."""
    if which not in LATENT_STATS:
        raise InputError(f"latent statistics are {LATENT_STATS}, got {which!r}")
    return Path(stats_dir) / f"{which}.pt"


def mean_latent_path(pack_dir) -> Path:
    """A pack's mean motion latent (T, C): per frame, the mean over the training objects' posterior means and their
    tokens (scripts/make_pack.py writes it; scripts/evaluate.py's "mean motion" row decodes it)."""
    return Path(pack_dir) / "mean_latent.pt"


def cond_features_dir(data_root, extractor: str = DEFAULT_EXTRACTOR) -> Path:
    prefix = _COND_PREFIX.get(_check_extractor(extractor), extractor)
    return Path(data_root) / f"{prefix}_cond_features"


def cond_features_path(data_root, name: str, extractor: str = DEFAULT_EXTRACTOR) -> Path:
    path = _check_name(cond_features_dir(data_root, extractor), name)
    return confine(path.with_name(path.name + ".npz"), data_root)


# ----------------------------------------------------------------------------------------------- npz I/O
def _atomic_savez(path, overwrite: bool, compressed: bool, **arrays) -> Path:
    """Write an npz atomically (utils/fileio.py): a reader never sees half a file."""
    def write(tmp):
        with open(tmp, "wb") as f:  # a file object, so numpy does not append ".npz" to the temp name
            (np.savez_compressed if compressed else np.savez)(f, **arrays)

    return atomic_write(path, write, overwrite)


def _load_npz(path, keys) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise InputError("an .npy array, not an npz archive")
        with loaded as npz:
            arrays = {k: npz[k] for k in keys if k in npz.files}
            found = sorted(npz.files)
    except Exception as err:  # BadZipFile, EOFError, pickled objects, ...: a truncated or foreign file
        raise InputError(f"{path}: cannot read npz ({type(err).__name__}: {err})") from err
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise InputError(f"{path}: missing key(s) {missing} (found {found})")
    return arrays


def _as_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def _check_voxels(where, indices: np.ndarray, feats: np.ndarray, resolution: int):
    """Shared checks of a voxel feature set; raises ValueError prefixed with ``where``."""
    if indices.ndim != 2 or indices.shape[1] != 3:
        raise InputError(f"{where}: indices must be (N, 3), found shape {indices.shape}")
    if not np.issubdtype(indices.dtype, np.integer):
        raise InputError(f"{where}: indices must be integers, found dtype {indices.dtype}")
    if feats.ndim != 2 or feats.shape[0] != indices.shape[0]:
        raise InputError(f"{where}: patchtokens must be (N={indices.shape[0]}, C), found shape {feats.shape}")
    if not np.issubdtype(feats.dtype, np.floating):
        raise InputError(f"{where}: patchtokens must be floating point, found dtype {feats.dtype}")
    if indices.shape[0] == 0:
        raise InputError(f"{where}: no voxels")
    lo, hi = int(indices.min()), int(indices.max())
    if lo < 0 or hi >= resolution:
        raise InputError(f"{where}: voxel indices must lie in [0, {resolution}), found range [{lo}, {hi}]")
    key = (indices[:, 0].astype(np.int64) * resolution + indices[:, 1]) * resolution + indices[:, 2]
    if np.unique(key).size != key.size:
        raise InputError(f"{where}: {key.size - np.unique(key).size} duplicate voxel indices")
    if not np.isfinite(feats).all():
        raise InputError(f"{where}: patchtokens hold non-finite values")


def _check_half(where, x: np.ndarray):
    if not np.isfinite(x).all():
        raise InputError(f"{where}: features hold non-finite values")
    if x.size and np.abs(x).max() > np.finfo(np.float16).max:
        raise InputError(f"{where}: features overflow float16 (max |x| {np.abs(x).max():.4g} > 65504)")


def write_voxel_features(path, indices, feats, resolution: int = VOXEL_RESOLUTION, overwrite: bool = False) -> Path:
    """Store voxel features in the published layout: ``indices`` (N, 3) uint8, ``patchtokens`` (N, C) float16
    (np.savez, uncompressed, like the published files). Fails before writing if the data would not read back."""
    if not 0 < resolution <= 256:
        raise InputError(f"write_voxel_features: resolution {resolution} does not fit uint8 indices")
    indices, feats = _as_numpy(indices), _as_numpy(feats)
    _check_voxels(f"write_voxel_features({path})", indices, feats, resolution)
    _check_half(f"write_voxel_features({path})", feats)
    return _atomic_savez(path, overwrite, False, indices=indices.astype(np.uint8), patchtokens=feats.astype(np.float16))


def read_voxel_features(path, resolution: int = VOXEL_RESOLUTION) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Read a voxel feature file. Returns (coords int32 (N, 3), feats float32 (N, C)) as the published loader
    (``load_feature``); indices must be unique and inside [0, resolution)."""
    data = _load_npz(path, ("indices", "patchtokens"))
    indices, feats = data["indices"], data["patchtokens"]
    _check_voxels(str(path), indices, feats, resolution)
    import torch

    return torch.from_numpy(indices.astype(np.int32)), torch.from_numpy(feats.astype(np.float32))


def write_cond_features(path, features, overwrite: bool = False) -> Path:
    """Store per-frame image tokens (T, L, C) as ``features`` float16. Uncompressed: DINOv2 tokens barely compress
    and inflating 67 MB per training sample made the DiT trainer data-bound; published compressed files read too."""
    features = _as_numpy(features)
    if features.ndim != 3 or not np.issubdtype(features.dtype, np.floating):
        raise InputError(f"write_cond_features({path}): features must be a float (T, L, C) array, "
                         f"found {features.dtype} {features.shape}")
    _check_half(f"write_cond_features({path})", features)
    return _atomic_savez(path, overwrite, False, features=features.astype(np.float16))


def read_cond_features(path, dtype=None) -> "torch.Tensor":
    """Read per-frame image tokens: (T, L, C) tensor of ``dtype``."""
    features = _load_npz(path, ("features",))["features"]
    if features.ndim != 3 or not np.issubdtype(features.dtype, np.floating) or 0 in features.shape:
        raise InputError(f"{path}: features must be a non-empty float (T, L, C) array, "
                         f"found {features.dtype} {features.shape}")
    if not np.isfinite(features).all():
        raise InputError(f"{path}: features hold non-finite values")
    import torch

    return torch.from_numpy(features).to(dtype or torch.float32)
