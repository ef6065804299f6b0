"""Image feature extractors: token layout (row-major patches, CLS last, pre-norm, registers skipped), the
weight-free patch encoder, and loading errors. DINOv2 is checked on a tiny random model saved locally: no downloads."""
import pytest
import torch

from tiny_dinov2 import (IMAGE, PATCH, REGISTERS, attention_free_extractor, patch_pair, reference_prenorm,
                         save_tiny_dinov2)
from utils.image_features import get_extractor, resize_images


def _ramp(size, batch=1):
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    return torch.stack([x, y, x * y])[None].expand(batch, -1, -1, -1).clone()


# ----------------------------------------------------------------------------------------------- patch
def test_patch_layout_row_major_cls_last():
    e = get_extractor("patch")
    assert (e.channels, e.image_size, e.grid_size, e.num_tokens) == (32, 224, 16, 257)
    tokens = e(_ramp(224, batch=2))
    assert tokens.shape == (2, 257, 32) and tokens.dtype == torch.float32
    # Channels 0, 1 are the patch's mean red (= x) and green (= y): token r·16 + c sits at row r, column c.
    centre = lambda n: (n * 14 + 6.5) / 223
    for r, c in [(0, 1), (1, 0), (5, 11), (15, 15)]:
        assert tokens[0, r * 16 + c, 0].item() == pytest.approx(centre(c), abs=1e-5)
        assert tokens[0, r * 16 + c, 1].item() == pytest.approx(centre(r), abs=1e-5)
    assert torch.allclose(tokens[:, -1], tokens[:, :-1].mean(dim=1), atol=1e-6)  # CLS = global mean, last
    grid = e.patch_grid(_ramp(224))
    assert grid.shape == (1, 32, 16, 16)
    assert torch.equal(grid[0, :, 5, 11], tokens[0, 5 * 16 + 11])


def test_patch_is_local_and_deterministic():
    e = get_extractor("patch", channels=20, image_size=56, patch_size=14)
    img = torch.full((1, 3, 56, 56), 0.25)
    img2 = img.clone()
    img2[:, :, 14:28, 28:42] = 0.9                         # patch row 1, column 2
    t1, t2 = e(img), e(img2)
    changed = (t1 - t2)[0, :-1].abs().amax(dim=1) > 0
    assert changed.nonzero().flatten().tolist() == [1 * 4 + 2]
    # A flat colour: the means are the colour; std and half-differences vanish.
    assert torch.allclose(t1[0, 0, :3], torch.full((3,), 0.25)) and t1[0, 0, 3:12].abs().max() < 1e-6
    assert torch.equal(get_extractor("patch", channels=20, image_size=56)(img), t1)


def test_patch_reference_values():
    """Pinned values: the seeded projection must not drift across machines or refactors."""
    cls = get_extractor("patch")(_ramp(224))[0, -1]
    expected = [0.5, 0.5, 0.25, 0.0723072, 0.0723072, 0.0553672, 0.1255606, 0.0, 0.0627803, 0.0, 0.1255605, 0.0627803,
                -0.8814852, 0.2545418, -0.2599347, -0.3233849, 0.6116055, -0.4877650, -0.2520261, 0.9218730]
    assert torch.allclose(cls[:20], torch.tensor(expected), atol=2e-5)


def test_resize_and_validation():
    e = get_extractor("patch", image_size=28)
    big = _ramp(100)
    assert torch.allclose(e(big), e(resize_images(big, 28)))
    assert e(torch.rand(2, 3, 30, 50)).shape == (2, 5, 32)        # non-square inputs are stretched
    for bad in (torch.rand(3, 28, 28), torch.rand(1, 4, 28, 28), torch.rand(1, 3, 28, 28) * 255,
                torch.full((1, 3, 28, 28), float("nan")), torch.zeros(0, 3, 28, 28)):
        with pytest.raises(ValueError):
            e(bad)
    with pytest.raises(ValueError, match="unknown"):
        get_extractor("clip")
    with pytest.raises(ValueError, match="weights"):
        get_extractor("patch", weights="x")
    with pytest.raises(ValueError, match="multiple"):
        get_extractor("patch", image_size=30)


# ----------------------------------------------------------------------------------------------- DINOv2
@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dinov2_tiny")
    return folder, save_tiny_dinov2(folder)


def test_dinov2_token_layout(tiny_dinov2):
    folder, model = tiny_dinov2
    e = get_extractor("dinov2_vitl14_reg", weights=folder, image_size=IMAGE)
    g = IMAGE // PATCH
    assert (e.channels, e.grid_size, e.num_tokens) == (32, g, g * g + 1)
    images = torch.rand(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))
    tokens = e(images, batch_size=2)
    assert tokens.shape == (3, g * g + 1, 32)
    prenorm, normed = reference_prenorm(model, images)
    assert prenorm.shape[1] == 1 + REGISTERS + g * g
    assert torch.allclose(tokens[:, :-1], prenorm[:, 1 + REGISTERS:], atol=1e-5)   # patches, registers skipped
    assert torch.allclose(tokens[:, -1], prenorm[:, 0], atol=1e-5)                 # CLS last
    # Pre-norm, not post-norm: the model's final LayerNorm maps our tokens onto its output.
    with torch.no_grad():
        assert torch.allclose(model.layernorm(tokens[:, -1]), normed[:, 0], atol=1e-5)
        assert not torch.allclose(tokens[:, -1], normed[:, 0], atol=1e-2)
    grid = e.patch_grid(images)
    assert grid.shape == (3, 32, g, g) and torch.equal(grid[:, :, 1, 2], tokens[:, 1 * g + 2])


def test_dinov2_patch_order_is_row_major(tiny_dinov2):
    """With the attention branches switched off every token depends on its own patch only: changing the image
    patch at row 1, column 2 must change token 1·g + 2 and no other patch token."""
    e = attention_free_extractor(tiny_dinov2[0])
    img, img2 = patch_pair()
    changed = (e(img) - e(img2))[0, :-1].abs().amax(dim=1) > 1e-6
    assert changed.nonzero().flatten().tolist() == [1 * (IMAGE // PATCH) + 2]


def test_dinov2_resizes_to_its_input_size(tiny_dinov2):
    folder, _ = tiny_dinov2
    e = get_extractor("dinov2_vitl14_reg", weights=folder, image_size=IMAGE)
    big = torch.rand(1, 3, 100, 100)
    assert torch.allclose(e(big), e(resize_images(big, IMAGE)), atol=1e-6)
    assert get_extractor("dinov2_vitl14_reg", weights=folder, image_size=2 * IMAGE)(big).shape == (1, 37, 32)


def test_dinov2_missing_weights_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_extractor("dinov2_vitl14_reg", weights=tmp_path / "nope")
    with pytest.raises(RuntimeError, match="cannot load weights from local folder") as err:
        get_extractor("dinov2_vitl14_reg", weights=tmp_path)               # exists, but holds no model
    assert str(tmp_path) in str(err.value) and "huggingface-cli download" in str(err.value)
