"""Sample directory layout: the ONE place that names files on disk (DESIGN.md, "Sample directory").

Per-object directory ``<data_root>/<name>/`` (published layout, spec §1.1, so existing renders work unchanged)::

    imgs/timestep_{TT:02d}_view_{VV:02d}.png          RGBA render
    meta_data/timestep_{TT:02d}_view_{VV:02d}.json    camera (utils/cameras.load_blender_camera)
    objs/frame{t}.obj                                 the renderer's triangulated mesh of frame t
    objs/mesh_data/static_frame_vertices.pt           (8192, 3) surface points
    objs/mesh_data/moving_frame_deltas.pt             (T, 8192, 3) displacements
    features_all_timesteps/<t>/<extractor>.npz        voxel features: indices (N, 3) uint8, patchtokens (N, C) float16
    metadata.json, static.txt                         render record; marker of an object rejected as static

Per-dataset files, under the same ``<data_root>`` (one convention, fixing the three of spec §10.1)::

    latents/<name>/deformation_latent.pt              encode_latent.py output (spec §1.6, §7)
    {deformation,static}_{mean,std}.pt                latent normalisation statistics (in a stats folder, default the root)
    <prefix>_cond_features/<name>.npz                 image tokens, key ``features`` (T, L, C) float16 (spec §1.7);
                                                      prefix "dinov2" for dinov2_vitl14_reg (published name), else
                                                      the extractor name.

This module imports no torch at load time (only the readers that return tensors do), so the Blender script, which runs
in a torch-free venv, names its files through it too.

Readers validate what they load and raise ValueError naming the file and the problem (FileNotFoundError when the
file is missing); npz files are read with ``allow_pickle=False``. Writers are atomic and refuse to overwrite.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np

from utils.fileio import atomic_write

DEFAULT_EXTRACTOR = "dinov2_vitl14_reg"
VOXEL_RESOLUTION = 64
_COND_PREFIX = {"dinov2_vitl14_reg": "dinov2"}  # the published folder name is dinov2_cond_features


# ----------------------------------------------------------------------------------------------- names
def resolve_sample(data_root, name: str) -> Path:
    """``data_root / name`` for a name read from a list file, refusing names that could leave the data root:
    empty, absolute (POSIX or Windows style), with a ``..`` component, or a symlink (anywhere along the path) that
    leads outside the data root. The data root itself may be a symlink: the check compares real paths."""
    if not isinstance(name, str) or not name.strip() or "\x00" in name:
        raise ValueError(f"sample name must be a non-empty string, got {name!r}")
    if name != name.strip():
        raise ValueError(f"sample name {name!r} has leading/trailing whitespace")
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute() or windows.is_absolute() or windows.drive:
        raise ValueError(f"sample name {name!r} is an absolute path; names must be relative to the data root "
                         f"{data_root}")
    if ".." in posix.parts or ".." in windows.parts:
        raise ValueError(f"sample name {name!r} contains '..' and would leave the data root {data_root}")
    if all(part == "." for part in posix.parts):
        raise ValueError(f"sample name {name!r} names the data root itself")
    path = Path(data_root) / posix
    root_real, real = os.path.realpath(data_root), os.path.realpath(path)
    if os.path.commonpath([root_real, real]) != root_real:
        raise ValueError(f"sample name {name!r} resolves to {real} through a symlink, outside the data root {root_real}")
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
            raise ValueError(f"{path}, line {lineno}: entry {name!r} refused: {e}") from None
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
        raise ValueError(f"no samples selected from {where} ({len(names)} found, slice [{start}:{end}])")
    return picked


def write_list_file(path, names) -> Path:
    """One name per line, atomically."""
    text = "".join(f"{n}\n" for n in names)
    return atomic_write(path, lambda tmp: tmp.write_text(text), overwrite=True)


def _index(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{what} must be a non-negative integer, got {value!r}")
    return int(value)


def _frame_stem(timestep: int, view: int) -> str:
    return f"timestep_{_index(timestep, 'timestep'):02d}_view_{_index(view, 'view'):02d}"


def image_path(sample_root, timestep: int, view: int) -> Path:
    return Path(sample_root) / "imgs" / f"{_frame_stem(timestep, view)}.png"


def camera_path(sample_root, timestep: int, view: int) -> Path:
    return Path(sample_root) / "meta_data" / f"{_frame_stem(timestep, view)}.json"


def mesh_frame_path(sample_root, timestep: int) -> Path:
    return Path(sample_root) / "objs" / f"frame{_index(timestep, 'timestep')}.obj"


def render_metadata_path(sample_root) -> Path:
    return Path(sample_root) / "metadata.json"


def static_marker_path(sample_root) -> Path:
    return Path(sample_root) / "static.txt"


def static_vertices_path(sample_root) -> Path:
    return Path(sample_root) / "objs" / "mesh_data" / "static_frame_vertices.pt"


def frame_deltas_path(sample_root) -> Path:
    return Path(sample_root) / "objs" / "mesh_data" / "moving_frame_deltas.pt"


def _check_extractor(extractor: str) -> str:
    # The extractor name becomes a file / folder name: keep it a plain identifier.
    if not isinstance(extractor, str) or not extractor or not all(c.isalnum() or c in "_-." for c in extractor) \
            or extractor.startswith("."):
        raise ValueError(f"extractor name {extractor!r} is not a plain file name")
    return extractor


def voxel_features_path(sample_root, timestep: int = 0, extractor: str = DEFAULT_EXTRACTOR) -> Path:
    return (Path(sample_root) / "features_all_timesteps" / str(_index(timestep, "timestep"))
            / f"{_check_extractor(extractor)}.npz")


def latent_path(data_root, name: str) -> Path:
    return resolve_sample(Path(data_root) / "latents", name) / "deformation_latent.pt"


LATENT_STATS = ("deformation_mean", "deformation_std", "static_mean", "static_std")


def latent_stats_path(stats_dir, which: str) -> Path:
    """One of the four normalisation files (spec §1.6): `which` in LATENT_STATS."""
    if which not in LATENT_STATS:
        raise ValueError(f"latent statistics are {LATENT_STATS}, got {which!r}")
    return Path(stats_dir) / f"{which}.pt"


def cond_features_dir(data_root, extractor: str = DEFAULT_EXTRACTOR) -> Path:
    prefix = _COND_PREFIX.get(_check_extractor(extractor), extractor)
    return Path(data_root) / f"{prefix}_cond_features"


def cond_features_path(data_root, name: str, extractor: str = DEFAULT_EXTRACTOR) -> Path:
    path = resolve_sample(cond_features_dir(data_root, extractor), name)
    return path.with_name(path.name + ".npz")


@dataclass(frozen=True)
class SampleDir:
    """One object of a dataset: ``data_root`` plus the name from the list file (validated on construction)."""
    data_root: Path
    name: str

    def __post_init__(self):
        object.__setattr__(self, "data_root", Path(self.data_root))
        resolve_sample(self.data_root, self.name)

    @property
    def root(self) -> Path:
        return resolve_sample(self.data_root, self.name)

    def image(self, timestep: int, view: int) -> Path:
        return image_path(self.root, timestep, view)

    def camera(self, timestep: int, view: int) -> Path:
        return camera_path(self.root, timestep, view)

    @property
    def static_vertices(self) -> Path:
        return static_vertices_path(self.root)

    @property
    def frame_deltas(self) -> Path:
        return frame_deltas_path(self.root)

    def voxel_features(self, timestep: int = 0, extractor: str = DEFAULT_EXTRACTOR) -> Path:
        return voxel_features_path(self.root, timestep, extractor)

    @property
    def latent(self) -> Path:
        return latent_path(self.data_root, self.name)

    def cond_features(self, extractor: str = DEFAULT_EXTRACTOR) -> Path:
        return cond_features_path(self.data_root, self.name, extractor)


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
            raise ValueError("an .npy array, not an npz archive")
        with loaded as npz:
            arrays = {k: npz[k] for k in keys if k in npz.files}
            found = sorted(npz.files)
    except Exception as err:  # BadZipFile, EOFError, pickled objects, ...: a truncated or foreign file
        raise ValueError(f"{path}: cannot read npz ({type(err).__name__}: {err})") from err
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise ValueError(f"{path}: missing key(s) {missing} (found {found})")
    return arrays


def _as_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def _check_voxels(where, indices: np.ndarray, feats: np.ndarray, resolution: int):
    """Shared checks of a voxel feature set; raises ValueError prefixed with ``where``."""
    if indices.ndim != 2 or indices.shape[1] != 3:
        raise ValueError(f"{where}: indices must be (N, 3), found shape {indices.shape}")
    if not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(f"{where}: indices must be integers, found dtype {indices.dtype}")
    if feats.ndim != 2 or feats.shape[0] != indices.shape[0]:
        raise ValueError(f"{where}: patchtokens must be (N={indices.shape[0]}, C), found shape {feats.shape}")
    if not np.issubdtype(feats.dtype, np.floating):
        raise ValueError(f"{where}: patchtokens must be floating point, found dtype {feats.dtype}")
    if indices.shape[0] == 0:
        raise ValueError(f"{where}: no voxels")
    lo, hi = int(indices.min()), int(indices.max())
    if lo < 0 or hi >= resolution:
        raise ValueError(f"{where}: voxel indices must lie in [0, {resolution}), found range [{lo}, {hi}]")
    key = (indices[:, 0].astype(np.int64) * resolution + indices[:, 1]) * resolution + indices[:, 2]
    if np.unique(key).size != key.size:
        raise ValueError(f"{where}: {key.size - np.unique(key).size} duplicate voxel indices")
    if not np.isfinite(feats).all():
        raise ValueError(f"{where}: patchtokens hold non-finite values")


def _check_half(where, x: np.ndarray):
    if not np.isfinite(x).all():
        raise ValueError(f"{where}: features hold non-finite values")
    if x.size and np.abs(x).max() > np.finfo(np.float16).max:
        raise ValueError(f"{where}: features overflow float16 (max |x| {np.abs(x).max():.4g} > 65504)")


def write_voxel_features(path, indices, feats, resolution: int = VOXEL_RESOLUTION, overwrite: bool = False) -> Path:
    """Store voxel features in the published layout: ``indices`` (N, 3) uint8, ``patchtokens`` (N, C) float16
    (np.savez, uncompressed, like the published files). Fails before writing if the data would not read back."""
    if not 0 < resolution <= 256:
        raise ValueError(f"write_voxel_features: resolution {resolution} does not fit uint8 indices")
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
        raise ValueError(f"write_cond_features({path}): features must be a float (T, L, C) array, "
                         f"found {features.dtype} {features.shape}")
    _check_half(f"write_cond_features({path})", features)
    return _atomic_savez(path, overwrite, False, features=features.astype(np.float16))


def read_cond_features(path, dtype=None) -> "torch.Tensor":
    """Read per-frame image tokens: (T, L, C) tensor of ``dtype``."""
    features = _load_npz(path, ("features",))["features"]
    if features.ndim != 3 or not np.issubdtype(features.dtype, np.floating) or 0 in features.shape:
        raise ValueError(f"{path}: features must be a non-empty float (T, L, C) array, "
                         f"found {features.dtype} {features.shape}")
    if not np.isfinite(features).all():
        raise ValueError(f"{path}: features hold non-finite values")
    import torch

    return torch.from_numpy(features).to(dtype or torch.float32)
