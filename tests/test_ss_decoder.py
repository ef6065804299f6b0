import itertools

import pytest
import torch

from models.trellis.ss_decoder import ChannelLayerNorm32, SparseStructureDecoder, occupancy_coords, pixel_shuffle_3d
from reference import assert_matches_manifest, load_golden, load_golden_weights, load_manifest, rel_err


def _golden_model(dtype):
    t, meta = load_golden("trellis_ss_dec")
    model = SparseStructureDecoder(**meta["config"]["model"]).eval()
    model.load_state_dict(load_golden_weights("trellis_ss_dec"), strict=True)
    return model.to(dtype), t, meta["tolerance"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_golden_logits_and_coords(dtype):
    model, t, tol = _golden_model(dtype)
    z = t["in.z"].to(dtype)
    with torch.no_grad():
        h = model.input_layer(z)
        mid = model.middle_block(h)
        up1 = model.blocks[2](model.blocks[1](model.blocks[0](mid)))
        logits = model(z)
    if dtype == torch.float64:
        assert rel_err(logits, t["out64.logits"]) <= tol["tol64"]
    else:
        bound = tol["tol"]
        for ours, key in [(h, "dbg.input_layer"), (mid, "dbg.middle"), (up1, "dbg.up1"), (logits, "out.logits")]:
            assert rel_err(ours, t[key]) <= bound, key
    assert logits.shape == (2, 1, 16, 16, 16) and logits.dtype == dtype
    assert torch.equal(occupancy_coords(logits), t["out.coords"])  # far from threshold: must match exactly


def test_released_config_matches_the_manifest_strictly():
    manifest = load_manifest("trellis_ss_dec_conv3d_16l8_fp16")
    with torch.device("meta"):
        model = SparseStructureDecoder(**manifest["config"])
    assert list(model.state_dict()) == list(manifest["state_dict"])  # same keys in the same order
    assert manifest["num_params"] == 73_671_201 and manifest["num_state_dict_entries"] == 74
    assert_matches_manifest(model, manifest, dtypes=False)  # float32 here; the released float16 pattern is below


def test_loads_the_released_dtype_pattern_into_float32():
    """The released file stores the torso convs in float16; loading copies them into our float32 parameters."""
    manifest = load_manifest("trellis_ss_dec_conv3d_16l8_fp16")
    half = manifest["non_float32_entries"]
    assert set(half.values()) == {"float16"}
    model, t, _ = _golden_model(torch.float32)
    sd = {k: v.half() if k in half else v for k, v in load_golden_weights("trellis_ss_dec").items()}
    assert any(v.dtype == torch.float16 for v in sd.values())
    model.load_state_dict(sd, strict=True)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad():
        err = rel_err(model(t["in.z"]), t["out.logits"])
    assert 0 < err < 1e-2  # float16 rounding of the weights only


def test_pixel_shuffle_3d_against_index_loop():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8 * 3, 2, 3, 4, generator=g, dtype=torch.float64)
    out = pixel_shuffle_3d(x)
    ref = torch.empty(2, 3, 4, 6, 8, dtype=torch.float64)
    for b, c, h, w, d, i, j, k in itertools.product(range(2), range(3), range(2), range(3), range(4), *[range(2)] * 3):
        ref[b, c, 2 * h + i, 2 * w + j, 2 * d + k] = x[b, 8 * c + 4 * i + 2 * j + k, h, w, d]
    assert torch.equal(out, ref)


def test_channel_layer_norm_against_formula():
    g = torch.Generator().manual_seed(1)
    norm = ChannelLayerNorm32(5, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(5, generator=g))
        norm.bias.copy_(torch.randn(5, generator=g))
    x = torch.randn(2, 5, 3, 4, 2, generator=g, dtype=torch.float64) * 3 + 1
    mean = x.mean(1, keepdim=True)
    var = ((x - mean) ** 2).mean(1, keepdim=True)  # biased variance, per voxel over channels
    w, b = (p.double().view(1, 5, 1, 1, 1) for p in (norm.weight, norm.bias))
    ref = (x - mean) / torch.sqrt(var + 1e-5) * w + b
    out = norm(x)
    assert out.dtype == torch.float64  # cast back to the input dtype
    assert (out - ref).abs().max() < 1e-5  # computed in float32
    assert (norm(x.half()).double() - ref).abs().max() < 5e-2 and norm(x.half()).dtype == torch.float16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the use_fp16 torso runs on CUDA only")
def test_use_fp16_runs_the_torso_in_float16_on_cuda():
    model, t, _ = _golden_model(torch.float32)
    model = model.cuda()
    model.use_fp16 = True
    seen = []
    hook = model.blocks[-1].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.no_grad():
        logits = model(t["in.z"].cuda())
    hook.remove()
    assert seen == [torch.float16] and logits.dtype == torch.float32
    assert 0 < rel_err(logits, t["out.logits"]) < 1e-2  # float16 rounding only
    assert all(p.dtype == torch.float32 for p in model.parameters())
