"""Training losses (docs/published_system.md §3.4 and §4.1, phase 2): the motion VAE's geometry loss and the image
losses L1, SSIM and LPIPS.

The published trainer uses two LPIPS implementations (published §10.11): the static loss calls the pip `lpips` package and
takes the batch mean; the motion loss calls an lpips-pytorch port that sums over layers and batch and divides by the batch.
Both are VGG16 + LPIPS v0.1 heads on inputs mapped to [-1, 1], so both equal the batch mean of the per-image distance:
`LPIPS` below is the one module for both, and `render_loss` takes that mean.
"""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.checkpoint import hub_file as _hub_download  # module-level name: tests replace it
from utils.pointcloud import interpolate_displacements


def mesh_guided_xyz_loss(pred_delta: torch.Tensor, gaussians_xyz: torch.Tensor, lengths: torch.Tensor,
                         static_pc: torch.Tensor, moving_pc: torch.Tensor, k: int = 8, beta: float = 7.0):
    """Masked L1 between the predicted xyz variation and the mesh displacement interpolated at every canonical Gaussian
    (published §4.1 phase 2, step 4; L1 as published, although the paper's text says L2).

    pred_delta (B, T, Q, 14) in the Δ layout; gaussians_xyz (B, Q, 3) padded canonical positions with `lengths` (B,) valid
    rows; static_pc (B, N, 3), moving_pc (B, T, N, 3). Returns (loss, target (B, T, Q, 3), zero on padding); the loss is
    averaged over the valid Gaussians of the whole batch, the 3 axes and the T frames.
    """
    with torch.no_grad():
        target = interpolate_displacements(gaussians_xyz, static_pc, moving_pc, k, beta, anchor_lengths=lengths)
    valid = (torch.arange(gaussians_xyz.shape[1], device=lengths.device) < lengths[:, None])[:, None, :, None]
    err = (pred_delta[..., :3] - target).abs() * valid
    return err.sum() / (valid.sum() * 3 * pred_delta.shape[1]), target


# ============================================================================= L1 and SSIM
def _check_images(x: torch.Tensor, y: torch.Tensor, what: str) -> None:
    if x.dim() != 4 or x.shape != y.shape:
        raise ValueError(f"{what}: expected two (B, C, H, W) images of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")


def l1_loss(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over every element."""
    return (pred - gt).abs().mean()


def _gaussian_window(size: int, sigma: float, channels: int, device, dtype) -> torch.Tensor:
    """(channels, 1, size, size) normalised separable Gaussian, one copy per channel for a grouped convolution."""
    r = torch.arange(size, device=device, dtype=torch.float64) - size // 2
    g = torch.exp(-r * r / (2.0 * sigma * sigma))
    g = g / g.sum()
    return torch.outer(g, g).to(dtype).expand(channels, 1, size, size).contiguous()


def _ssim_map(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5,
              c1: float = 0.01 ** 2, c2: float = 0.03 ** 2) -> torch.Tensor:
    """Per-pixel SSIM (B, C, H, W). Local statistics are per-channel Gaussian-weighted means with zero padding of
    window//2, so the map keeps the image size and border pixels see zeros outside the image (the classic 3DGS loss)."""
    _check_images(x, y, "ssim")
    if window % 2 != 1:
        raise ValueError(f"ssim: window must be odd, got {window}")
    C = x.shape[1]
    w = _gaussian_window(window, sigma, C, x.device, x.dtype)
    pad = window // 2

    def blur(t):
        return F.conv2d(t, w, padding=pad, groups=C)

    mu_x, mu_y = blur(x), blur(y)
    mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
    var_x = blur(x * x) - mu_xx
    var_y = blur(y * y) - mu_yy
    cov = blur(x * y) - mu_xy
    return ((2 * mu_xy + c1) * (2 * cov + c2)) / ((mu_xx + mu_yy + c1) * (var_x + var_y + c2))


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5,
         c1: float = 0.01 ** 2, c2: float = 0.03 ** 2, reduction: str = "mean") -> torch.Tensor:
    """Gaussian-window SSIM of (B, C, H, W) images in [0, 1] (published §3.4: 11×11, σ 1.5, C1 = 0.01², C2 = 0.03²).

    reduction 'mean': one scalar over batch, channels and pixels (as published); 'none': (B,) per-image means.
    """
    m = _ssim_map(x, y, window, sigma, c1, c2)
    if reduction == "mean":
        return m.mean()
    if reduction == "none":
        return m.flatten(1).mean(1)
    raise ValueError(f"ssim: reduction must be 'mean' or 'none', got {reduction!r}")


def render_loss(pred: torch.Tensor, gt: torch.Tensor, lpips: "LPIPS | None" = None,
                l1_w: float = 1.0, ssim_w: float = 0.2, lpips_w: float = 0.2):
    """`l1_w·L1 + ssim_w·(1 − SSIM) + lpips_w·mean LPIPS` on (B, 3, H, W) renders and targets in [0, 1]
    (published §3.4, §4.1).

    The LPIPS term is left out when `lpips` is None (weights unavailable, see `load_lpips`) or lpips_w is 0.
    Returns (loss, terms): terms holds the detached unweighted 'l1', 'ssim' and, when used, 'lpips' values.
    """
    _check_images(pred, gt, "render_loss")
    l1 = l1_loss(pred, gt)
    s = ssim(pred, gt)
    loss = l1_w * l1 + ssim_w * (1.0 - s)
    terms = {"l1": l1.detach(), "ssim": s.detach()}
    if lpips is not None and lpips_w != 0:
        lp = lpips(pred, gt).mean()
        loss = loss + lpips_w * lp
        terms["lpips"] = lp.detach()
    return loss, terms


# ============================================================================= LPIPS (VGG16, v0.1)
# Where the weights come from, in order: explicit paths, the folder in $GVF_LPIPS_DIR, then the Hugging Face hub.
# The hub file is one safetensors (no pickle) holding the whole pip-`lpips` VGG state dict: torchvision's ImageNet VGG16
# features as `net.slice{1..5}.<index>.*`, `scaling_layer.shift/scale` and the v0.1 heads `lin{k}.model.1.weight`.
# $GVF_LPIPS_HUB overrides it: "owner/name" (same file name) or "owner/name:path/in/repo"; "off" skips the hub.
LPIPS_HUB_REPO = "achiru/DiffSynth-Studio-ImageMetrics"
LPIPS_HUB_FILE = "LPIPS/vgg.safetensors"
LPIPS_DIR_ENV = "GVF_LPIPS_DIR"
LPIPS_HUB_ENV = "GVF_LPIPS_HUB"
# File names looked for in $GVF_LPIPS_DIR (first found wins): the trunk (our export, or torchvision's own download),
# the v0.1 heads (the `lpips` package's weights/v0.1/vgg.pth under our name or its own), or one combined file.
LPIPS_DIR_VGG_FILES = ("vgg16_features.safetensors", "vgg16_features.pth", "vgg16-397923af.pth")
LPIPS_DIR_LIN_FILES = ("lpips_vgg_v0.1.pth", "lpips_vgg_v0.1.safetensors", "vgg.pth")
LPIPS_DIR_COMBINED_FILES = ("lpips_vgg.safetensors",)

# The LPIPS ScalingLayer: applied after mapping [0, 1] to [-1, 1]; ImageNet statistics expressed in that range.
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)

# torchvision's vgg16().features up to relu5_3: numbers are conv widths, 'M' a 2×2 max-pool. The Sequential indices
# (conv at 0, 2, 5, ..., 28) are what make torchvision's `features.N.*` keys load unchanged.
_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_VGG16_TAPS = (3, 8, 15, 22, 29)            # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
LPIPS_CHANNELS = (64, 128, 256, 512, 512)   # channels at those taps = widths of lin0..lin4


class LPIPSWeightsNotFound(FileNotFoundError):
    """No source (explicit paths, $GVF_LPIPS_DIR, hub) supplied a complete set of LPIPS weights."""


def _build_vgg16_features() -> nn.Sequential:
    layers, c_in = [], 3
    for v in _VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            # not in-place: the tapped activations must survive the next layer for autograd
            layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.ReLU()]
            c_in = v
    return nn.Sequential(*layers)


def _read_tensor_file(path: Path) -> dict:
    """A flat {name: tensor} from .safetensors, or from .pth/.pt through torch.load(weights_only=True) only."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    from utils.checkpoint import safe_load  # refusals name the file and never suggest weights_only=False
    obj = safe_load(path)
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return dict(obj)


_FEATURE_KEY = re.compile(r"(?:^|\.)(?:features|slice[1-5])\.(\d+)\.(weight|bias)$")
_LIN_KEY = re.compile(r"(?:^|\.)lins?\.?([0-4])\.(?:model\.1\.)?weight$")
_SCALING_KEY = re.compile(r"(?:^|\.)scaling_layer\.(shift|scale)$")


def _to_lpips_layout(state: Mapping, origin: str = "weights") -> dict:
    """Rename the known layouts to ours (`features.N.{weight,bias}`, `lin{k}.weight`); other keys (classifier, timm head,
    ...) are dropped. Known layouts: torchvision/timm `features.N`, pip lpips `net.slice{s}.N` (global indices) and
    `lin{k}.model.1.weight`, ours (`lins.{k}` accepted too). A stored scaling layer must carry the standard constants."""
    out = {}
    for key, value in state.items():
        key = key[len("module."):] if key.startswith("module.") else key
        if not torch.is_tensor(value):
            continue
        m = _FEATURE_KEY.search(key)
        if m:
            new = f"features.{m[1]}.{m[2]}"
        else:
            m = _LIN_KEY.search(key)
            if m:
                new = f"lin{m[1]}.weight"
            else:
                m = _SCALING_KEY.search(key)
                if m:
                    want = torch.tensor(LPIPS_SHIFT if m[1] == "shift" else LPIPS_SCALE, dtype=torch.float64)
                    if value.numel() != 3 or not torch.allclose(value.double().flatten(), want, atol=1e-6):
                        raise ValueError(f"{origin}: {key} = {value.flatten().tolist()} is not the LPIPS constant {want.tolist()}")
                continue
        if new in out and not torch.equal(out[new], value):  # pip lpips stores each head twice (lin{k}, lins.{k})
            raise ValueError(f"{origin}: two different tensors map to {new} (second: {key})")
        out[new] = value
    return out


class LPIPS(nn.Module):
    """LPIPS v0.1 with a VGG16 trunk: distance (B,) between (B, 3, H, W) images, by default in [0, 1].

    Images → [-1, 1] → ScalingLayer → VGG16 features at relu1_2 ... relu5_3 → unit length over channels per pixel →
    squared difference → 1×1 non-negative head per layer → spatial mean → sum over the 5 layers.
    Frozen (no parameter needs grad, always in eval mode) and differentiable w.r.t. both inputs.
    Built without weights it refuses to run: use `LPIPS.from_pretrained` or `load_lpips`, or pass a state dict.
    """

    def __init__(self, weights: Mapping | None = None, from_unit_range: bool = True):
        super().__init__()
        self.from_unit_range = from_unit_range
        self.features = _build_vgg16_features()
        for k, c in enumerate(LPIPS_CHANNELS):
            self.add_module(f"lin{k}", nn.Conv2d(c, 1, 1, bias=False))
        # persistent=False: the state dict is exactly the trunk + heads, the layout the loaders check against
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.loaded = False
        self.source = "no weights"
        self.requires_grad_(False)
        super().train(False)
        if weights is not None:
            self.load_weights(weights)

    def train(self, mode: bool = True):
        return super().train(False)  # a fixed metric: never leave eval mode

    def load_weights(self, state: Mapping, source: str = "state dict") -> "LPIPS":
        """Load a complete set (any layout `_to_lpips_layout` knows); every trunk and head tensor must be present with
        its exact shape, and the heads non-negative as v0.1 trained them. Missing or odd weights raise, never run."""
        state = _to_lpips_layout(state, source)
        own = self.state_dict()
        missing = sorted(k for k in own if k not in state)
        if missing:
            raise ValueError(f"{source}: LPIPS weights incomplete, missing {len(missing)} of {len(own)} tensors "
                             f"(e.g. {', '.join(missing[:4])})")
        bad = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in own.items() if state[k].shape != v.shape]
        if bad:
            raise ValueError(f"{source}: LPIPS weight shapes differ: {'; '.join(bad[:4])}")
        neg = [k for k in own if k.startswith("lin") and (state[k] < 0).any()]
        if neg:
            raise ValueError(f"{source}: LPIPS v0.1 heads are non-negative, {', '.join(neg)} has negative entries")
        with torch.no_grad():
            for k, v in own.items():
                v.copy_(state[k].to(v.dtype))
        self.loaded, self.source = True, source
        return self

    def extra_repr(self) -> str:
        return f"source={self.source!r}"

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not self.loaded:
            raise RuntimeError("LPIPS has no weights; a random VGG would give meaningless distances. "
                               "Build it with LPIPS.from_pretrained(...) or load_lpips(...).")
        if x.dim() != 4 or x.shape[1] != 3 or x.shape != y.shape:
            raise ValueError(f"LPIPS: expected two (B, 3, H, W) images of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        h = torch.cat([x, y]).to(self.shift.dtype)  # one trunk pass for both images
        if self.from_unit_range:
            h = 2 * h - 1
        h = (h - self.shift) / self.scale
        B = x.shape[0]
        total = h.new_zeros(B, dtype=torch.float32)
        k = 0
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in _VGG16_TAPS:
                total = total + self._layer_distance(h, getattr(self, f"lin{k}").weight, B)
                k += 1
        return total

    @staticmethod
    def _layer_distance(f: torch.Tensor, w: torch.Tensor, B: int) -> torch.Tensor:
        # float32 here: a sum of 512 squared activations can overflow fp16 under autocast
        f = f.float()
        s = f.square().sum(1, keepdim=True)
        # sqrt(s) exactly, but with a zero instead of a NaN gradient where a pixel's features are all zero
        pos = s > 0
        norm = torch.where(pos, s, torch.ones_like(s)).sqrt() * pos
        f = f / (norm + 1e-10)
        d = (f[:B] - f[B:]).square().mean((2, 3))  # (B, C); the head is linear, so average first
        return d @ w.float().flatten()

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, vgg_path: str | os.PathLike | None = None, lin_path: str | os.PathLike | None = None,
                        hub: bool = True) -> "LPIPS":
        """Find and load the weights, in order:
        1. explicit paths: `vgg_path` (torchvision VGG16 features, or a combined file) and `lin_path` (v0.1 heads);
           a given path that does not exist raises FileNotFoundError;
        2. $GVF_LPIPS_DIR holding vgg16_features.safetensors|.pth and lpips_vgg_v0.1.pth (see LPIPS_DIR_* names);
        3. the Hugging Face hub (`LPIPS_HUB_REPO`/`LPIPS_HUB_FILE`, overridable by $GVF_LPIPS_HUB) when `hub`.
        .pth files are read with torch.load(weights_only=True) only. Raises LPIPSWeightsNotFound listing what was tried.
        """
        tried = []
        if vgg_path is not None or lin_path is not None:
            files = [Path(p) for p in (vgg_path, lin_path) if p is not None]
            for f in files:
                if not f.is_file():
                    raise FileNotFoundError(f"LPIPS weights file not found: {f}")
            return cls._from_files(files, "paths " + ", ".join(map(str, files)))

        env_dir = os.environ.get(LPIPS_DIR_ENV)
        if env_dir:
            d = Path(env_dir)
            pick = lambda names: next((d / n for n in names if (d / n).is_file()), None)  # noqa: E731
            combined, vgg, lin = pick(LPIPS_DIR_COMBINED_FILES), pick(LPIPS_DIR_VGG_FILES), pick(LPIPS_DIR_LIN_FILES)
            if vgg is not None and lin is not None:
                return cls._from_files([vgg, lin], f"${LPIPS_DIR_ENV} {vgg}, {lin}")
            if combined is not None:
                return cls._from_files([combined], f"${LPIPS_DIR_ENV} {combined}")
            tried.append(f"${LPIPS_DIR_ENV}={d}: " + ("not a folder" if not d.is_dir() else
                         f"needs one of {LPIPS_DIR_VGG_FILES} and one of {LPIPS_DIR_LIN_FILES}, "
                         f"found {'the trunk' if vgg else 'no trunk'} and {'the heads' if lin else 'no heads'}"))
        else:
            tried.append(f"${LPIPS_DIR_ENV} not set")

        spec = os.environ.get(LPIPS_HUB_ENV, LPIPS_HUB_REPO).strip()
        if not hub or spec.lower() in ("", "off", "none", "0"):
            tried.append("hub not asked for" if not hub else f"hub switched off by ${LPIPS_HUB_ENV}")
        else:
            repo, _, filename = spec.partition(":")
            filename = filename or LPIPS_HUB_FILE
            try:
                local = _hub_download(repo, filename)
            except Exception as e:  # offline, unknown repo, missing file: all mean "not from the hub"
                tried.append(f"hub {repo}/{filename}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            else:
                return cls._from_files([Path(local)], f"hub {repo}/{filename}")
        raise LPIPSWeightsNotFound("; ".join(tried))

    @classmethod
    def _from_files(cls, files: list, source: str) -> "LPIPS":
        state = {}
        for f in files:
            state.update(_to_lpips_layout(_read_tensor_file(Path(f)), str(f)))
        return cls().load_weights(state, source)


_lpips_warned = False


def load_lpips(vgg_path=None, lin_path=None, hub: bool = True, device=None) -> LPIPS | None:
    """`LPIPS.from_pretrained(...)` moved to `device`, or None with one warning per process when no weights are found,
    so training goes on without the LPIPS term rather than with a random network. Bad files still raise.

    To enable LPIPS, set $GVF_LPIPS_DIR to a folder holding vgg16_features.safetensors (or torchvision's
    vgg16-397923af.pth) and lpips_vgg_v0.1.pth (the `lpips` package's weights/v0.1/vgg.pth), pass vgg_path/lin_path,
    or make the hub file (LPIPS_HUB_REPO / LPIPS_HUB_FILE; another repo: $GVF_LPIPS_HUB=owner/name[:file]) reachable."""
    global _lpips_warned
    try:
        model = LPIPS.from_pretrained(vgg_path, lin_path, hub=hub)
    except LPIPSWeightsNotFound as e:
        if not _lpips_warned:
            _lpips_warned = True
            # One short line; where it looked is in LPIPS.from_pretrained's exception, what to do in the docstring.
            warnings.warn(f"LPIPS disabled: no weights found; set ${LPIPS_DIR_ENV} to enable it (see utils/losses.py "
                          f"load_lpips)", RuntimeWarning, stacklevel=2)
        return None
    return model.to(device) if device is not None else model
