import math

import pytest

import torch

from models.sparse import SparseVoxels
from models.static_vae import StaticVAE
from reference import load_golden, load_golden_weights, load_manifest, rel_err
from utils.checkpoint import map_trellis_slat
from utils.config import load_config
from utils.gaussians import Gaussians


def _golden(dtype=torch.float32):
    t, meta = load_golden("static_vae")
    cfg = meta["config"]
    model = StaticVAE(**cfg["backbones"]["vae"]["args"],
                      representation=cfg["framework"]["args"]["representation_config"]["MipGS"]).eval()
    model.load_state_dict(load_golden_weights("static_vae"), strict=True)
    return model.to(dtype), t, meta["tolerance"]


def test_golden_encoder_decoder_and_gaussians():
    for dtype in (torch.float32, torch.float64):
        model, t, tol = _golden(dtype)
        out, bound = ("out64", tol["tol64"]) if dtype == torch.float64 else ("out", tol["tol"])
        x = SparseVoxels(t["in.coords"], t["in.feats"].to(dtype))
        with torch.no_grad():
            post = model.encode(x)
            raw = model.decode(x.replace(t["dec.in.z"].to(dtype)))
            gs = Gaussians.cat(model.to_gaussians(x.replace(t["gs.in.raw"].to(dtype))))
        assert rel_err(post.mean, t[f"enc.{out}.mean"]) <= bound
        assert rel_err(raw.feats, t[f"dec.{out}.raw"]) <= bound
        assert rel_err(gs.to_condition(), t[f"gs.{out}.tensor14"]) <= bound
        if dtype == torch.float32:
            assert rel_err(post.logvar, t["enc.out.logvar"]) <= bound
            assert [len(g) for g in model.to_gaussians(x.replace(t["gs.in.raw"]))] == t["gs.out.counts"].tolist()
            for ours, key in [(gs.xyz, "xyz"), (gs.f_dc, "features_dc"), (gs.scale, "scaling"), (gs.opacity, "opacity"),
                              (gs.rotation, "rotation"), (gs.xyz + 0.5, "raw_xyz")]:
                assert rel_err(ours, t[f"gs.out.{key}"].reshape(ours.shape)) <= bound, key


def test_paper_config_loads_the_published_manifest_strictly():
    manifest = load_manifest("static_vae")
    model = StaticVAE(**load_config("configs/vae.yml").static_vae.backbones.vae.args)
    assert sum(p.numel() for p in model.parameters()) == 170_927_744 == manifest["num_params"]
    assert torch.allclose(model.MipGS_perturbation, torch.tensor(manifest["MipGS_perturbation_value"]), atol=1e-7)
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(shape, generator=g) for k, shape in manifest["state_dict"].items()}
    model.load_state_dict(sd, strict=True)
    assert set(model.state_dict()) == set(manifest["state_dict"])


def test_trellis_names_map_onto_ours():
    manifest = load_manifest("static_vae")["state_dict"]
    ours_dec = {k: v for k, v in manifest.items() if k.startswith(("decoder.", "from_latent.", "out_layer.", "MipGS"))}
    trellis_dec = {}
    for k, shape in ours_dec.items():  # the TRELLIS decoder names, written from the mapping of docs/trellis.md §10
        k = k.replace("decoder.", "blocks.", 1).replace("from_latent.", "input_layer.", 1)
        trellis_dec[k.replace("MipGS_perturbation", "offset_perturbation")] = shape
    assert map_trellis_slat(trellis_dec, "decoder") == ours_dec
    trellis_enc = {"input_layer.weight": 1, "blocks.3.attn.to_qkv.bias": 2, "out_layer.weight": 3}
    assert map_trellis_slat(trellis_enc, "encoder") == {"input_layer.weight": 1, "encoder.3.attn.to_qkv.bias": 2,
                                                        "to_latent.weight": 3}


def _hammersley(g, n):
    def ri(base, i):
        digits, f, out = i, 1.0 / base, 0.0
        while digits:
            out += f * (digits % base)
            digits //= base
            f /= base
        return out
    return [g / n, ri(2, g), ri(3, g)]


def test_zero_output_puts_gaussians_at_hammersley_points():
    cfg = load_config("configs/tiny/vae.yml").static_vae.backbones.vae.args
    model = StaticVAE(**cfg)
    res = cfg.resolution
    coords = torch.tensor([[0, 0, 0, 0], [0, 3, 7, 1], [1, res - 1, 5, 9]], dtype=torch.int32)
    gs = model.to_gaussians(SparseVoxels(coords, torch.zeros(3, 112)))
    flat = Gaussians.cat(gs)
    want = []
    for b, i, j, k in coords.tolist():
        for g in range(8):
            h = _hammersley(g, 8)
            want.append([(c + hc) / res - 0.5 for c, hc in zip((i, j, k), h)])  # the Hammersley point inside the voxel
    torch.testing.assert_close(flat.xyz.double(), torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-6)
    torch.testing.assert_close(flat.scale, torch.full((24, 3), math.sqrt(0.004**2 + 0.0009**2)), rtol=1e-6, atol=0)
    torch.testing.assert_close(flat.opacity, torch.full((24, 1), 0.1), rtol=1e-6, atol=0)
    torch.testing.assert_close(flat.rotation, torch.tensor([[1.0, 0, 0, 0]]).expand(24, 4))
    assert [len(g) for g in gs] == [16, 8]


def test_mem_ratio_checkpointing_keeps_values_and_gradients():
    cfg = load_config("configs/tiny/vae.yml").static_vae.backbones.vae.args
    torch.manual_seed(0)
    model = StaticVAE(**cfg).train()
    g = torch.Generator().manual_seed(1)
    coords = torch.unique(torch.randint(0, cfg.resolution, (300, 3), generator=g), dim=0)
    x = SparseVoxels.from_list([coords[:150], coords[150:]], [torch.randn(150, cfg.in_channels, generator=g),
                                                               torch.randn(len(coords) - 150, cfg.in_channels, generator=g)])

    def run():
        model.zero_grad()
        post = model.encode(x)
        raw = model.decode(x.replace(post.mean))
        raw.feats.square().mean().backward()
        return raw.feats.detach(), model.input_layer.weight.grad.clone()

    ref, grad = run()
    model.set_mem_ratio(0.2)  # published: checkpointing on the first ceil(0.8 n) + 1 blocks
    assert [b.use_checkpoint for b in list(model.encoder) + list(model.decoder)] == [True, True, True, True]
    out, grad2 = run()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad2, grad, rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_equals_cpu():
    model, t, tol = _golden()
    x = SparseVoxels(t["in.coords"], t["in.feats"])
    with torch.no_grad():
        cpu = model.decode(x.replace(model.encode(x).mean)).feats
        xg = SparseVoxels(x.coords.cuda(), x.feats.cuda())
        gpu = model.cuda().decode(xg.replace(model.encode(xg).mean)).feats.cpu()
    assert rel_err(gpu, cpu) <= 1e-4  # TF32-free float32 on both; summation order differs
