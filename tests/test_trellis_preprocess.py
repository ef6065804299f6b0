"""TRELLIS conditioning (docs/trellis.md §2, §3): the crop/resize/premultiply recipe on synthetic images with known
geometry, the matting path for opaque images, and the condition tokens of a tiny random DINOv2-with-registers model
against an independent computation from the model's own final-norm input. No downloads."""
import numpy as np
import pytest
import torch

from pipeline.matting import trellis_crop_box, trellis_preprocess
from tiny_dinov2 import (IMAGE, PATCH, REGISTERS, attention_free_extractor, patch_pair, reference_prenorm,
                         save_tiny_dinov2)
from utils.image_features import get_extractor

COLOUR = (200, 100, 50)


def _object(h=160, w=200):
    """RGBA uint8 on a green, fully transparent background. Opaque columns 40..59 and 90..99, rows 50..89; between
    them (columns 60..89) the same colour at alpha 128, which stays below the 0.8·255 bbox threshold."""
    img = np.zeros((h, w, 4), np.uint8)
    img[..., 1] = 255                                  # colour under alpha 0 must not leak into the output
    img[50:90, 40:100, :3] = COLOUR
    img[50:90, 40:100, 3] = 255
    img[50:90, 60:90, 3] = 128
    return img


# Analytic crop: bbox x 40..99, y 50..89 (inclusive) → centre (69.5, 69.5), size int(1.2·59) = 70,
# box (34.5, 34.5, 104.5, 104.5) → PIL rounds half to even → (34, 34, 104, 104); scale 518/70 = 7.4.
SCALE = 518 / 70
LEFT, RIGHT = (40 - 34) * SCALE, (100 - 34) * SCALE    # 44.4, 488.4 (output pixel edges)
TOP, BOTTOM = (50 - 34) * SCALE, (90 - 34) * SCALE     # 118.4, 414.4


def test_crop_box_rule():
    assert trellis_crop_box(_object()[..., 3]) == (34.5, 34.5, 104.5, 104.5)
    a = np.zeros((50, 50), np.uint8)
    a[10:20, 5:30] = 205                               # > 204 counts; 204 does not
    a[40, 40] = 204
    assert trellis_crop_box(a) == (17 - 14, 14.5 - 14, 17 + 14, 14.5 + 14)   # size int(1.2·24) = 28
    b = np.zeros((20, 20), np.uint8)
    b[2:5, 2:11] = 255                                 # extent 8: int(9.6) = 9 (not rounded up), half 9 // 2 = 4
    assert trellis_crop_box(b) == (2, -1, 10, 7)
    with pytest.raises(ValueError, match="no pixel"):
        trellis_crop_box(np.full((8, 8), 204, np.uint8))


def test_rgba_crop_geometry_black_background_premultiplied():
    out = trellis_preprocess(_object())
    assert out.shape == (3, 518, 518) and out.dtype == torch.float32
    u8 = (out * 255).round().to(torch.uint8)
    assert torch.allclose(out * 255, u8.float(), atol=1e-4)   # quantised to uint8 steps
    # Foreground extent along the middle row and column (red above half its value): the analytic square.
    red = u8[0].int()
    cols = (red[266] > COLOUR[0] // 2).nonzero()[:, 0]
    rows = (red[:, 100] > COLOUR[0] // 2).nonzero()[:, 0]
    assert abs(cols[0].item() - LEFT) <= 1.5 and abs(cols[-1].item() + 1 - RIGHT) <= 1.5
    assert abs(rows[0].item() - TOP) <= 1.5 and abs(rows[-1].item() + 1 - BOTTOM) <= 1.5
    # Exactly black beyond the LANCZOS support (3 source pixels = 22 output pixels) around the object; no green.
    far = torch.ones(518, 518, dtype=torch.bool)
    far[int(TOP) - 23:int(BOTTOM) + 24, int(LEFT) - 23:] = False
    assert far.sum() > 50_000 and (u8[:, far] == 0).all()
    # The background's green never leaks: premultiplied resizing keeps every pixel a multiple of the object colour
    # (LANCZOS overshoot included), up to the uint8 truncations.
    assert ((2 * u8[1].int() - u8[0].int()).abs() <= 5).all()
    # Opaque interior keeps its colour; the alpha-128 interior is premultiplied: int(c · 128/255).
    opaque, semi = u8[:, 266, 120].tolist(), u8[:, 266, 300].tolist()
    assert all(abs(v - c) <= 1 for v, c in zip(opaque, COLOUR))
    assert all(abs(v - int(c * 128 / 255)) <= 2 for v, c in zip(semi, COLOUR)), semi
    # Float input in [0, 1] and a separate alpha give the same image.
    assert torch.equal(trellis_preprocess(torch.from_numpy(_object()).float() / 255), out)
    assert torch.equal(trellis_preprocess(_object()[..., :3], alpha=_object()[..., 3]), out)


def test_premultiply_truncates_without_resampling():
    """A crop of exactly 518 pixels is not resampled, so every output pixel is int(c/255 · a/255 · 255) of its
    source pixel (float32, truncated as published): exact."""
    gen = np.random.default_rng(0)
    img = gen.integers(0, 256, (600, 600, 4), dtype=np.uint8)
    img[..., 3] = gen.integers(0, 205, (600, 600))      # at most 204: none of these enter the bbox
    img[[100, 532], 100, 3] = img[100, 532, 3] = 255   # bbox 100..532 → size int(1.2·432) = 518, box 57..575
    crop = img[57:575, 57:575].astype(np.float32) / 255
    expected = (crop[..., :3] * crop[..., 3:] * 255).astype(np.uint8)
    out = trellis_preprocess(img)
    assert torch.equal(out, torch.from_numpy(expected).permute(2, 0, 1).float() / 255)


def test_opaque_image_goes_through_threshold_matte(monkeypatch):
    import pipeline.matting

    rgba = _object()
    rgba[..., 3] = np.where(rgba[..., 3] > 0, 255, 0)         # one opaque rectangle
    rgb = np.full((160, 200, 3), 255, np.uint8)                # ... drawn on a clean white background
    rgb[rgba[..., 3] > 0] = COLOUR
    expected = trellis_preprocess(rgba)
    assert torch.equal(trellis_preprocess(rgb, matting="threshold"), expected)
    # An all-opaque alpha channel counts as no alpha (published rule): matted too.
    assert torch.equal(trellis_preprocess(np.concatenate([rgb, np.full((160, 200, 1), 255, np.uint8)], -1),
                                          matting="threshold"), expected)
    monkeypatch.setattr(pipeline.matting, "rembg_problem", lambda model="u2net": "not installed")
    with pytest.warns(UserWarning, match="threshold"):
        assert torch.equal(trellis_preprocess(rgb), expected)
    with pytest.raises(ValueError, match="matting"):
        trellis_preprocess(rgb, matting="alpha")


# ----------------------------------------------------------------------------------------------- trellis §3 condition
@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dinov2_tiny_trellis")
    return folder, save_tiny_dinov2(folder, final_norm_affine=True)


def test_condition_is_affine_free_layernorm_of_prenorm(tiny_dinov2):
    folder, model = tiny_dinov2
    e = get_extractor("dinov2_vitl14_reg", weights=folder, image_size=IMAGE)
    images = torch.rand(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))
    cond = e.trellis_condition(images, batch_size=2)
    g = IMAGE // PATCH
    assert cond.shape == (3, 1 + REGISTERS + g * g, 32) and cond.dtype == torch.float32

    x, normed = reference_prenorm(model, images)              # block N's output, the final norm's input
    ref = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    assert torch.allclose(cond, ref, atol=1e-5)
    assert not torch.allclose(cond, normed, atol=1e-2)        # not the model's own (affine) final norm
    assert (cond.mean(-1).abs() < 1e-5).all() and torch.allclose(cond.std(-1, unbiased=False), torch.ones(1), atol=1e-3)
    # eps 1e-5, not DINOv2's 1e-6: visible on a token with tiny variance.
    small = x[:1, :1] * 1e-3
    assert not torch.allclose(torch.nn.functional.layer_norm(small, (32,), eps=1e-5),
                              torch.nn.functional.layer_norm(small, (32,), eps=1e-6), atol=1e-3)


def test_condition_token_order(tiny_dinov2):
    """With attention switched off each token depends only on its own input: CLS and registers (positions 0..4)
    ignore the image, and changing image patch (row 1, column 2) changes token 1 + 4 + 1·g + 2 only."""
    e = attention_free_extractor(tiny_dinov2[0])
    img, img2 = patch_pair()
    a, b = e.trellis_condition(img), e.trellis_condition(img2)
    changed = (a - b)[0].abs().amax(dim=1) > 1e-6
    g = IMAGE // PATCH
    assert changed.nonzero().flatten().tolist() == [1 + REGISTERS + 1 * g + 2]
    # Registers are distinct learned tokens (no position embedding), CLS differs from them.
    assert not torch.allclose(a[0, 1], a[0, 2], atol=1e-3) and not torch.allclose(a[0, 0], a[0, 1], atol=1e-3)
