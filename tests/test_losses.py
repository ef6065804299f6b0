"""utils/losses.py image losses: SSIM and LPIPS against independent float64 references, weight loading without network."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import utils.losses as losses
from utils.losses import LPIPS, LPIPSWeightsNotFound, l1_loss, load_lpips, render_loss, ssim

C1, C2 = 0.01 ** 2, 0.03 ** 2


# ----------------------------------------------------------------------------- SSIM references
def gauss1d(size=11, sigma=1.5):
    g = [math.exp(-((i - size // 2) ** 2) / (2 * sigma ** 2)) for i in range(size)]
    t = sum(g)
    return torch.tensor([v / t for v in g], dtype=torch.float64)


def ssim_reference(x, y, size=11, sigma=1.5):
    """float64 SSIM map from explicit local statistics: zero-pad, unfold every size×size patch, weight by the window."""
    x, y = x.double(), y.double()
    B, C, H, W = x.shape
    w = torch.outer(gauss1d(size, sigma), gauss1d(size, sigma)).flatten()  # (size²,)
    p = size // 2

    def patches(t):  # (B, C, size², H·W)
        return F.unfold(F.pad(t, (p, p, p, p)).reshape(B * C, 1, H + 2 * p, W + 2 * p), size).reshape(B, C, size * size, H * W)

    px, py = patches(x), patches(y)
    wv = w.view(1, 1, -1, 1)
    mx, my = (px * wv).sum(2), (py * wv).sum(2)
    vx = (px * px * wv).sum(2) - mx ** 2
    vy = (py * py * wv).sum(2) - my ** 2
    cxy = (px * py * wv).sum(2) - mx * my
    m = ((2 * mx * my + C1) * (2 * cxy + C2)) / ((mx ** 2 + my ** 2 + C1) * (vx + vy + C2))
    return m.reshape(B, C, H, W)


def test_ssim_matches_float64_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 23, 17, generator=g)
    y = (x + 0.2 * torch.randn(2, 3, 23, 17, generator=g)).clamp(0, 1)
    ref = ssim_reference(x, y)
    assert torch.allclose(ssim(x, y).double(), ref.mean(), atol=1e-5)
    per_image = ssim(x, y, reduction="none")
    assert per_image.shape == (2,)
    assert torch.allclose(per_image.double(), ref.flatten(1).mean(1), atol=1e-5)
    assert torch.allclose(losses._ssim_map(x.double(), y.double()), ref, atol=1e-12)


def test_ssim_identical_images_is_one():
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(ssim(x, x, reduction="none"), torch.ones(3), atol=1e-6)


def test_ssim_constant_images_analytic():
    """Constants a and b: with zero padding a pixel sees window mass s ≤ 1, so μ = a·s, σ² = a²·s(1−s), σxy = ab·s(1−s);
    in the interior s = 1 and SSIM = (2ab + C1) / (a² + b² + C1)."""
    a, b, H, W = 0.7, 0.3, 24, 20
    x, y = torch.full((1, 1, H, W), a, dtype=torch.float64), torch.full((1, 1, H, W), b, dtype=torch.float64)
    g = gauss1d().tolist()

    def inside(i, n):  # window mass that falls inside [0, n) along one axis, centre i
        return sum(g[k] for k in range(11) if 0 <= i + k - 5 < n)

    s = torch.tensor([[inside(i, H) * inside(j, W) for j in range(W)] for i in range(H)], dtype=torch.float64)
    mx, my, v = a * s, b * s, s * (1 - s)
    expect = ((2 * mx * my + C1) * (2 * a * b * v + C2)) / ((mx ** 2 + my ** 2 + C1) * ((a * a + b * b) * v + C2))
    got = losses._ssim_map(x, y)[0, 0]
    assert torch.allclose(got, expect, atol=1e-12)
    assert abs(got[H // 2, W // 2].item() - (2 * a * b + C1) / (a * a + b * b + C1)) < 1e-12
    assert torch.allclose(ssim(x, y), expect.mean(), atol=1e-12)


def test_ssim_gradient_finite_and_input_checks():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, 12, 12, generator=g, requires_grad=True)
    for y in (torch.rand(2, 3, 12, 12, generator=g), x.detach().clone(), torch.zeros(2, 3, 12, 12)):
        x.grad = None
        (1 - ssim(x, y)).backward()
        assert torch.isfinite(x.grad).all()
    with pytest.raises(ValueError):
        ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 9))
    with pytest.raises(ValueError):
        ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8), reduction="sum")


# ----------------------------------------------------------------------------- random weights in the published layouts
CONV_IDX = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
CONV_CH = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
LIN_CH = (64, 128, 256, 512, 512)
SLICE_OF = {0: 1, 2: 1, 5: 2, 7: 2, 10: 3, 12: 3, 14: 3, 17: 4, 19: 4, 21: 4, 24: 5, 26: 5, 28: 5}


def random_weights(seed=0):
    """torchvision-style `features.N.*` trunk (He init, so activations stay O(1)) plus lpips-style heads."""
    g = torch.Generator().manual_seed(seed)
    vgg, c_in = {}, 3
    for i, c in zip(CONV_IDX, CONV_CH):
        vgg[f"features.{i}.weight"] = torch.randn(c, c_in, 3, 3, generator=g) * math.sqrt(2.0 / (9 * c_in))
        vgg[f"features.{i}.bias"] = 0.05 * torch.randn(c, generator=g)
        c_in = c
    # what torchvision's file also holds and the loader must ignore
    vgg["classifier.0.weight"], vgg["classifier.0.bias"] = torch.randn(8, 4, generator=g), torch.zeros(8)
    lin = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for k, c in enumerate(LIN_CH)}
    return vgg, lin


def lpips_reference(x, y, vgg, lin):
    """float64 LPIPS written out with functional ops, independent of the module."""
    shift = torch.tensor([-0.030, -0.088, -0.188], dtype=torch.float64).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450], dtype=torch.float64).view(1, 3, 1, 1)

    def conv_relu(h, i):
        return F.relu(F.conv2d(h, vgg[f"features.{i}.weight"].double(), vgg[f"features.{i}.bias"].double(), padding=1))

    def feats(img):
        h = ((2 * img.double() - 1) - shift) / scale
        out = []
        for stage, idx in enumerate(((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))):
            if stage:
                h = F.max_pool2d(h, 2)
            for i in idx:
                h = conv_relu(h, i)
            out.append(h)
        return out

    total = torch.zeros(x.shape[0], dtype=torch.float64)
    for k, (a, b) in enumerate(zip(feats(x), feats(y))):
        a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        w = lin[f"lin{k}.model.1.weight"].double()
        total += F.conv2d((a - b) ** 2, w).mean((1, 2, 3))
    return total


@pytest.fixture
def weight_files(tmp_path, monkeypatch):
    """Random weights saved as a torchvision-layout trunk (.pth and .safetensors) and lpips-layout heads (.pth);
    no env var and no hub from outside leak in."""
    monkeypatch.delenv("GVF_LPIPS_DIR", raising=False)
    monkeypatch.delenv("GVF_LPIPS_HUB", raising=False)

    def no_hub(repo_id, filename):
        raise ConnectionError("no network in tests")

    monkeypatch.setattr(losses, "_hub_download", no_hub)
    vgg, lin = random_weights()
    torch.save(vgg, tmp_path / "vgg16-397923af.pth")
    save_file(vgg, str(tmp_path / "vgg16_features.safetensors"))
    torch.save(lin, tmp_path / "lpips_vgg_v0.1.pth")
    return tmp_path, vgg, lin


def images(seed, b=2, hw=(32, 40)):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, *hw, generator=g), torch.rand(b, 3, *hw, generator=g)


def test_lpips_matches_float64_reference(weight_files):
    d, vgg, lin = weight_files
    model = LPIPS.from_pretrained(vgg_path=d / "vgg16-397923af.pth", lin_path=d / "lpips_vgg_v0.1.pth")
    x, y = images(0)
    got, ref = model(x, y), lpips_reference(x, y, vgg, lin)
    assert got.shape == (2,) and got.dtype == torch.float32
    assert torch.allclose(got.double(), ref, rtol=1e-4, atol=1e-7), (got, ref)
    # the safetensors trunk gives the same network
    model2 = LPIPS.from_pretrained(vgg_path=d / "vgg16_features.safetensors", lin_path=d / "lpips_vgg_v0.1.pth")
    assert torch.equal(model2(x, y), got)


def test_lpips_properties_and_frozen_gradients(weight_files):
    d, _, _ = weight_files
    model = LPIPS.from_pretrained(vgg_path=d / "vgg16_features.safetensors", lin_path=d / "lpips_vgg_v0.1.pth")
    x, y = images(1)
    assert torch.equal(model(x, x), torch.zeros(2))
    assert torch.allclose(model(x, y), model(y, x), rtol=1e-5)
    assert (model(x, y) > 0).all()
    model.train()
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    xg = x.clone().requires_grad_(True)
    model(xg, y).sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_lpips_gradient_finite_where_features_vanish(weight_files):
    """All-zero features at a pixel: sqrt'(0) = inf would turn the normalisation's gradient into NaN; it must be 0.
    (Through a ReLU trunk the NaN is masked by the ReLU backward, so test the per-layer term on a leaf too.)"""
    f = torch.zeros(2, 4, 3, 3, requires_grad=True)
    LPIPS._layer_distance(f, torch.rand(1, 4, 1, 1), 1).sum().backward()
    assert torch.equal(f.grad, torch.zeros_like(f))
    d, vgg, lin = weight_files
    model = LPIPS({**vgg, **lin, "features.2.bias": torch.full((64,), -1e4)})  # relu1_2 dead everywhere
    x, y = images(2)
    xg = x.clone().requires_grad_(True)
    out = model(xg, y)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(xg.grad).all()


def test_lpips_combined_lpips_package_layout(weight_files, tmp_path):
    """One file in the pip-lpips layout (net.slice{s}.N, scaling_layer, lin{k} and lins.{k}) loads the same network."""
    d, vgg, lin = weight_files
    combined = {f"net.slice{SLICE_OF[i]}.{i}.{p}": vgg[f"features.{i}.{p}"] for i in CONV_IDX for p in ("weight", "bias")}
    combined.update(lin)
    combined.update({f"lins.{k}.model.1.weight": v.clone() for k, v in enumerate(lin.values())})
    combined["scaling_layer.shift"] = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    combined["scaling_layer.scale"] = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    path = tmp_path / "combined.safetensors"
    save_file(combined, str(path))
    x, y = images(3)
    ref = LPIPS.from_pretrained(vgg_path=d / "vgg16-397923af.pth", lin_path=d / "lpips_vgg_v0.1.pth")(x, y)
    assert torch.equal(LPIPS.from_pretrained(vgg_path=path)(x, y), ref)

    bad = dict(combined, **{"scaling_layer.scale": torch.ones(1, 3, 1, 1)})
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="scaling_layer.scale"):
        LPIPS.from_pretrained(vgg_path=tmp_path / "bad.safetensors")


def test_lpips_env_dir_and_hub(weight_files, tmp_path, monkeypatch):
    d, vgg, lin = weight_files
    x, y = images(4)
    ref = LPIPS.from_pretrained(vgg_path=d / "vgg16-397923af.pth", lin_path=d / "lpips_vgg_v0.1.pth")(x, y)

    monkeypatch.setenv("GVF_LPIPS_DIR", str(d))
    m = LPIPS.from_pretrained()
    assert torch.equal(m(x, y), ref) and "vgg16_features.safetensors" in m.source

    # the hub path: a stand-in for huggingface_hub that serves a combined file and records what was asked
    monkeypatch.delenv("GVF_LPIPS_DIR")
    hub_file = tmp_path / "hub.safetensors"
    save_file({**vgg, **lin}, str(hub_file))
    asked = []

    def fake_hub(repo_id, filename):
        asked.append((repo_id, filename))
        return str(hub_file)

    monkeypatch.setattr(losses, "_hub_download", fake_hub)
    assert torch.equal(LPIPS.from_pretrained()(x, y), ref)
    monkeypatch.setenv("GVF_LPIPS_HUB", "someone/lpips:weights/vgg.safetensors")
    LPIPS.from_pretrained()
    assert asked == [(losses.LPIPS_HUB_REPO, losses.LPIPS_HUB_FILE), ("someone/lpips", "weights/vgg.safetensors")]
    with pytest.raises(LPIPSWeightsNotFound):
        LPIPS.from_pretrained(hub=False)


def test_lpips_without_weights_refuses_and_load_warns_once(weight_files, monkeypatch):
    with pytest.raises(RuntimeError, match="no weights"):
        LPIPS()(*images(5))
    monkeypatch.setattr(losses, "_lpips_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_lpips() is None
        assert load_lpips() is None
    msgs = [str(w.message) for w in caught if "LPIPS disabled" in str(w.message)]
    assert len(msgs) == 1 and "GVF_LPIPS_DIR" in msgs[0]
    assert "\n" not in msgs[0] and len(msgs[0]) < 120  # one short line, not the hub's error story
    # an explicit path that does not exist is a configuration error, not "no weights"
    with pytest.raises(FileNotFoundError):
        load_lpips(vgg_path="/nonexistent/vgg16.pth", lin_path="/nonexistent/lin.pth")


def test_lpips_rejects_incomplete_wrong_or_negative_weights(weight_files):
    d, vgg, lin = weight_files
    with pytest.raises(ValueError, match="missing"):
        LPIPS.from_pretrained(vgg_path=d / "vgg16-397923af.pth")  # trunk without heads
    with pytest.raises(ValueError, match="shape"):
        LPIPS({**vgg, **lin, "lin2.model.1.weight": torch.rand(1, 128, 1, 1)})
    with pytest.raises(ValueError, match="non-negative"):
        LPIPS({**vgg, **lin, "lin0.model.1.weight": -torch.rand(1, 64, 1, 1)})


class _Payload:
    """Unpickling this would create a file: the marker proves whether any code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_refused(weight_files, tmp_path):
    d, _, _ = weight_files
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"lin0.model.1.weight": _Payload(str(marker))}, evil)
    with pytest.raises(ValueError, match="refused"):
        LPIPS.from_pretrained(vgg_path=d / "vgg16-397923af.pth", lin_path=evil)
    assert not marker.exists()


# ----------------------------------------------------------------------------- render loss
def test_render_loss_terms(weight_files):
    d, _, _ = weight_files
    x, y = images(6, hw=(32, 32))
    loss, terms = render_loss(x, y)
    assert set(terms) == {"l1", "ssim"}
    assert torch.allclose(loss, l1_loss(x, y) + 0.2 * (1 - ssim(x, y)))
    assert torch.allclose(terms["l1"], (x - y).abs().mean())

    lp = LPIPS.from_pretrained(vgg_path=d / "vgg16-397923af.pth", lin_path=d / "lpips_vgg_v0.1.pth")
    loss2, terms2 = render_loss(x, y, lpips=lp, l1_w=0.5, ssim_w=0.3, lpips_w=0.7)
    assert torch.allclose(terms2["lpips"], lp(x, y).mean())
    assert torch.allclose(loss2, 0.5 * terms2["l1"] + 0.3 * (1 - terms2["ssim"]) + 0.7 * terms2["lpips"])
    _, terms3 = render_loss(x, y, lpips=lp, lpips_w=0.0)
    assert "lpips" not in terms3

    xg = x.clone().requires_grad_(True)
    render_loss(xg, y, lpips=lp)[0].backward()
    assert torch.isfinite(xg.grad).all()
    assert render_loss(y, y, lpips=lp)[0].abs() < 1e-6
