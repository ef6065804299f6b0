"""Image features: per-frame image tokens for the DiT condition and patch grids for voxel feature lifting.

    extractor = get_extractor("dinov2_vitl14_reg", device="cuda")       # or "patch" (weight-free)
    tokens = extractor(images)            # images (T, 3, H, W) float in [0, 1] → (T, L, C) float32
    grid = extractor.patch_grid(images)   # (T, C, g, g): the same patch tokens as an image-shaped map

Token layout (docs/published_system.md §1.7): the g×g patch tokens in row-major order (token ``r·g + c`` is image row
r, column c), then the CLS token LAST, so L = g² + 1; for DINOv2 ViT-L/14-reg at 518²: (T, 1370, 1024), g = 37.
Images must already be composited on the background the caller chose (the published training features use
black, in-the-wild inputs white: published §10.5). Inputs of another size are resized to ``image_size²`` (bicubic,
antialiased; non-square inputs are stretched, as the published resize does; the published training script
resized with PIL LANCZOS, a small difference).

Extractors:
- ``dinov2_vitl14_reg``: DINOv2 ViT-L/14 with 4 registers through ``transformers`` (hub
  ``facebook/dinov2-with-registers-large`` or a local folder), ImageNet normalisation, tokens taken BEFORE the
  final LayerNorm (``x_prenorm``, the published default), registers dropped. ``trellis_condition`` gives the
  TRELLIS image-to-3D condition from the same model: all tokens, CLS and registers first, affine-free LayerNorm.
- ``patch``: weight-free and deterministic; per-patch colour statistics mapped to C channels by a fixed
  seeded projection. For tiny configurations, tests and the demo.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINOV2_HUB_ID = "facebook/dinov2-with-registers-large"


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """(T, 3, H, W) in [0, 1] → (T, 3, size, size), bicubic + antialias, clamped (bicubic overshoots)."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)


class ImageFeatureExtractor:
    """Base class: validation, resizing, batching and the token layout. Subclasses implement :meth:`_encode`."""

    name: str = ""

    def __init__(self, channels: int, image_size: int, patch_size: int, device="cpu"):
        if image_size % patch_size:
            raise ValueError(f"{self.name}: image_size {image_size} is not a multiple of the patch size {patch_size}")
        self.channels, self.image_size, self.patch_size = channels, image_size, patch_size
        self.device = torch.device(device)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid_size ** 2 + 1

    def _encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pixels (B, 3, S, S) in [0, 1] on the device → (patch tokens (B, g², C) row-major, CLS (B, C))."""
        raise NotImplementedError

    def _check(self, images) -> torch.Tensor:
        if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            desc = f"{images.dtype} {tuple(images.shape)}" if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"{self.name}: images must be a float tensor (T, 3, H, W), got {desc}")
        if images.shape[0] == 0:
            raise ValueError(f"{self.name}: no images")
        if not torch.isfinite(images).all():
            raise ValueError(f"{self.name}: images hold non-finite values")
        lo, hi = images.min().item(), images.max().item()
        if lo < -1e-3 or hi > 1 + 1e-3:  # catches 0..255 input and already-normalised input
            raise ValueError(f"{self.name}: images must lie in [0, 1], found range [{lo:.4g}, {hi:.4g}]")
        return images

    @torch.no_grad()
    def _run(self, images, batch_size: int):
        images = self._check(images)
        patches, cls = [], []
        for start in range(0, images.shape[0], batch_size):
            chunk = images[start:start + batch_size].to(self.device, torch.float32).clamp(0, 1)
            p, c = self._encode(resize_images(chunk, self.image_size))
            patches.append(p.float())
            cls.append(c.float())
        return torch.cat(patches), torch.cat(cls)

    def __call__(self, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """images (T, 3, H, W) in [0, 1] → tokens (T, g² + 1, C) float32 on the device, CLS last."""
        patches, cls = self._run(images, batch_size)
        return torch.cat([patches, cls[:, None]], dim=1)

    def patch_grid(self, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """images (T, 3, H, W) in [0, 1] → patch tokens as a map (T, C, g, g) float32; ``[:, :, r, c]`` is the patch
        centred at normalised uv ((c + 0.5)/g, (r + 0.5)/g), the pixel-centre convention grid_sample(align_corners=
        False) uses, so the map can be sampled at projected uv directly (utils/feature_lifting.py)."""
        patches, _ = self._run(images, batch_size)
        g = self.grid_size
        return patches.transpose(1, 2).reshape(patches.shape[0], self.channels, g, g)


# ----------------------------------------------------------------------------------------------- DINOv2
class DinoV2Extractor(ImageFeatureExtractor):
    name = "dinov2_vitl14_reg"

    def __init__(self, device="cpu", weights=None, image_size: int = 518, dtype: torch.dtype = torch.float32):
        self.model = _load_dinov2(weights).to(device=device, dtype=dtype).eval().requires_grad_(False)
        cfg = self.model.config
        self.num_registers, self.dtype = cfg.num_register_tokens, dtype
        super().__init__(cfg.hidden_size, image_size, cfg.patch_size, device)
        self._mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    def _prenorm(self, pixels):
        """pixels (B, 3, S, S) in [0, 1] → x_prenorm (B, 1 + registers + g², C): CLS, registers, row-major patches."""
        x = ((pixels - self._mean) / self._std).to(self.dtype)
        out = self.model(pixel_values=x, output_hidden_states=True)
        # transformers: hidden_states = (embeddings, layer 1, ..., layer N); the final LayerNorm is applied only to
        # last_hidden_state, so hidden_states[-1] is x_prenorm. Guard the count in case a version changes that.
        if len(out.hidden_states) != self.model.config.num_hidden_layers + 1:
            raise RuntimeError(f"{self.name}: transformers returned {len(out.hidden_states)} hidden states, "
                               f"expected {self.model.config.num_hidden_layers + 1}")
        return out.hidden_states[-1]

    def _encode(self, pixels):
        prenorm = self._prenorm(pixels)
        return prenorm[:, 1 + self.num_registers:], prenorm[:, 0]

    @torch.no_grad()
    def trellis_condition(self, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """TRELLIS's image condition (docs/trellis.md §3): images (B, 3, H, W) in [0, 1], the object premultiplied on black
        (pipeline.matting.trellis_preprocess) → (B, 1 + registers + g², C) float32; (B, 1374, 1024) at 518².

        All tokens in the model's own order [CLS, reg0..reg3, patches row-major], taken from x_prenorm (block N's
        output, before DINOv2's final LayerNorm) and normalised by layer_norm over channels WITHOUT affine and with
        eps 1e-5: the published pipeline ignores the model's final norm and its weights (trellis §13.1). The
        unconditional branch is zeros of the same shape. Uses this extractor's model: no second copy is loaded.
        """
        images = self._check(images)
        out = []
        for start in range(0, images.shape[0], batch_size):
            chunk = images[start:start + batch_size].to(self.device, torch.float32).clamp(0, 1)
            prenorm = self._prenorm(resize_images(chunk, self.image_size)).float()
            out.append(F.layer_norm(prenorm, prenorm.shape[-1:], eps=1e-5))
        return torch.cat(out)


def _load_dinov2(weights):
    """The transformers model from a local folder (``weights``) or the hub (``weights`` None or a repo id)."""
    from transformers import AutoModel  # deferred: importing transformers costs seconds

    source = DINOV2_HUB_ID if weights is None else str(weights)
    local = weights is not None and Path(weights).exists()
    if weights is not None and not local and (Path(source).is_absolute() or source.startswith(".")
                                              or source.count("/") != 1):
        raise FileNotFoundError(f"dinov2_vitl14_reg: weights folder {source} does not exist")
    try:
        model = AutoModel.from_pretrained(source, local_files_only=local)
    except Exception as err:  # OSError / hub errors / bad config: all mean "no usable weights here"
        where = f"local folder {source}" if local else f"the Hugging Face hub ({source}) or its local cache"
        raise RuntimeError(
            f"dinov2_vitl14_reg: cannot load weights from {where}: {type(err).__name__}: {err}\n"
            f"Download once with `huggingface-cli download {DINOV2_HUB_ID} --local-dir <folder>` and pass that "
            f"folder as weights, or use the weight-free 'patch' extractor.") from err
    if not hasattr(model.config, "num_register_tokens"):
        raise RuntimeError(f"dinov2_vitl14_reg: {source} is a {type(model).__name__}, not DINOv2 with registers")
    return model


# ----------------------------------------------------------------------------------------------- patch (no weights)
class PatchExtractor(ImageFeatureExtractor):
    """Per patch: mean RGB, RGB standard deviation, and mean RGB differences right−left and bottom−top halves
    (12 statistics; ×4 on the differences and std so they span a range like the means). The first
    min(C, 12) channels are these statistics, the rest sin(stats @ W + b) with W, b drawn once from a CPU
    generator seeded by a constant: deterministic everywhere. CLS = the mean of the patch features."""

    name = "patch"
    SEED = 20250701

    def __init__(self, device="cpu", weights=None, channels: int = 32, image_size: int = 224, patch_size: int = 14):
        if weights is not None:
            raise ValueError("patch extractor has no weights; pass weights=None")
        if patch_size < 2 or channels < 1:
            raise ValueError(f"patch extractor: need patch_size >= 2 and channels >= 1, got {patch_size}, {channels}")
        super().__init__(channels, image_size, patch_size, device)
        gen = torch.Generator().manual_seed(self.SEED)
        extra = max(channels - 12, 0)
        self._w = (torch.randn(12, extra, generator=gen) * math.pi).to(self.device)
        self._b = (torch.rand(extra, generator=gen) * 2 * math.pi).to(self.device)

    def _encode(self, pixels):
        B, g, p = pixels.shape[0], self.grid_size, self.patch_size
        x = pixels.reshape(B, 3, g, p, g, p).permute(0, 2, 4, 1, 3, 5)     # (B, g_row, g_col, 3, p_row, p_col)
        h = p // 2
        mean = x.mean(dim=(-2, -1))
        std = x.std(dim=(-2, -1), unbiased=False)
        dx = x[..., p - h:].mean(dim=(-2, -1)) - x[..., :h].mean(dim=(-2, -1))
        dy = x[..., p - h:, :].mean(dim=(-2, -1)) - x[..., :h, :].mean(dim=(-2, -1))
        stats = torch.cat([mean, 4 * std, 4 * dx, 4 * dy], dim=-1).reshape(B, g * g, 12)  # row-major patches
        feats = torch.cat([stats, torch.sin(stats @ self._w + self._b)], dim=-1)[..., :self.channels]
        return feats, feats.mean(dim=1)


# ----------------------------------------------------------------------------------------------- registry
EXTRACTORS = {DinoV2Extractor.name: DinoV2Extractor, PatchExtractor.name: PatchExtractor}


def get_extractor(name: str, device="cpu", weights=None, **kwargs) -> ImageFeatureExtractor:
    """Build an extractor by name (see :data:`EXTRACTORS`). ``weights``: a local folder or hub id for DINOv2,
    None otherwise; ``kwargs`` go to the class (e.g. ``image_size``, ``dtype``, ``channels``)."""
    if name not in EXTRACTORS:
        raise ValueError(f"unknown image feature extractor {name!r}; choose one of {sorted(EXTRACTORS)}")
    return EXTRACTORS[name](device=device, weights=weights, **kwargs)
