"""ImageTo3D (models/trellis/image_to_3d.py) end to end with tiny random networks on CPU: SS grid 4³ -> occupancy
16³ = SLat / static-VAE grid, condition tokens (1, 5, 16)."""
import pytest
import torch
from torch import nn

from models.sparse import SparseVoxels
from models.static_vae import StaticVAE
from models.trellis.flow_euler import FlowEulerOutput, FlowEulerSampler
from models.trellis.image_to_3d import ImageTo3D
from models.trellis.slat_flow import SLatFlowModel
from models.trellis.ss_decoder import SparseStructureDecoder
from models.trellis.ss_flow import SparseStructureFlowModel

RES, SS_RES, C, COND = 16, 4, 8, 16
MEAN = torch.linspace(-2.0, 1.5, C)
STD = torch.linspace(0.5, 2.7, C)


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    ss_flow = SparseStructureFlowModel(resolution=SS_RES, in_channels=C, out_channels=C, model_channels=32,
                                       cond_channels=COND, num_blocks=1, num_heads=2).eval()
    ss_dec = SparseStructureDecoder(out_channels=1, latent_channels=C, num_res_blocks=1, channels=[16, 8, 8],
                                    num_res_blocks_middle=1).eval()
    slat_flow = SLatFlowModel(resolution=RES, in_channels=C, out_channels=C, model_channels=32, cond_channels=COND,
                              num_blocks=1, num_heads=2, patch_size=2, num_io_res_blocks=1,
                              io_block_channels=[16]).eval()
    vae = StaticVAE(resolution=RES, in_channels=8, model_channels=32, latent_channels=C, num_blocks=1, num_heads=2,
                    num_head_channels=16, window_size=8).eval()
    return ss_flow, ss_dec, slat_flow, vae


def _cond(seed=1):
    return torch.randn(1, 5, COND, generator=torch.Generator().manual_seed(seed))


def _pipe(nets, **kw):
    kw.setdefault("ss_sampler", FlowEulerSampler(steps=3, cfg_strength=7.5, cfg_interval=(0.5, 1.0), rescale_t=3.0))
    kw.setdefault("slat_sampler", FlowEulerSampler(steps=3, cfg_strength=3.0, cfg_interval=(0.5, 1.0), rescale_t=3.0))
    return ImageTo3D(*nets, MEAN, STD, **kw)


class StubDecoder(nn.Module):
    """SS decoder returning fixed logits (the flow output is ignored)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, z):
        return self.logits


class RecordingSampler:
    """Sampler stub: records its inputs and returns `feats` (or the noise) as the t = 0 sample."""

    def __init__(self, feats=None):
        self.feats, self.calls = feats, []

    def sample(self, model, noise, cond, neg_cond=None):
        self.calls.append((noise, cond, neg_cond))
        out = noise if self.feats is None else noise.replace(self.feats)
        return FlowEulerOutput(out, nfe=0)


def test_end_to_end_shapes_counts_and_voxel_extent(nets):
    pipe = _pipe(nets, ss_sampler=None, slat_sampler=None)   # the GVF defaults: 12 steps, cfg interval
    gs, info = pipe(_cond(), seed=0)
    n = info["num_voxels"]
    assert 0 < n < RES ** 3
    assert info["coords"].shape == (n, 4) and info["coords"].dtype == torch.int32
    assert info["slat"].shape == (n, C)
    assert len(gs) == info["num_gaussians"] == 8 * n
    assert gs.xyz.shape == (8 * n, 3) and gs.quat.shape == (8 * n, 4)
    assert info["nfe"] == {"ss": 22, "slat": 22}     # 12 steps, 10 of them guided (docs/trellis.md §9, table)
    assert set(info["seconds"]) == {"ss_flow", "ss_decode", "slat_flow", "gs_decode"}
    assert all(torch.isfinite(t).all() for t in (gs.xyz, gs.f_dc, gs.opacity_logit, gs.scale_pre, gs.quat))
    # Gaussians are voxel-major: 8 per voxel, each within 0.75 voxel (voxel_size 1.5 / 2) of its voxel centre.
    ijk = info["coords"][:, 1:].repeat_interleave(8, 0).float()
    centre = (ijk + 0.5) / RES - 0.5
    assert ((gs.xyz - centre).abs() <= 0.75 / RES + 1e-6).all()
    assert ((gs.xyz - centre).abs().amax(0) > 0.1 / RES).all()   # not all collapsed onto centres


def test_seed_determinism(nets):
    pipe = _pipe(nets)
    a, ia = pipe(_cond(), seed=3)
    b, ib = pipe(_cond(), seed=3)
    c, ic = pipe(_cond(), seed=4)
    assert torch.equal(ia["coords"], ib["coords"]) and torch.equal(a.xyz, b.xyz) and torch.equal(a.f_dc, b.f_dc)
    assert not (ia["coords"].shape == ic["coords"].shape and torch.equal(ia["coords"], ic["coords"])
                and torch.allclose(a.xyz, c.xyz))
    # The global RNG is left alone (a private CPU generator is used).
    torch.manual_seed(123)
    pipe(_cond(), seed=3)
    after = torch.rand(1)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(1))


def test_noise_draws_follow_spec(nets):
    """trellis §0/§9: manual_seed(seed), SS noise randn(1, 8, R³) then SLat noise randn(N, 8), both CPU; neg cond left to the
    sampler (zeros)."""
    ss, sl = RecordingSampler(), RecordingSampler()
    cond = _cond()
    _, info = _pipe(nets, ss_sampler=ss, slat_sampler=sl)(cond, seed=7)
    torch.manual_seed(7)
    want_ss = torch.randn(1, C, SS_RES, SS_RES, SS_RES)
    want_slat = torch.randn(info["num_voxels"], C)
    assert torch.equal(ss.calls[0][0], want_ss)
    assert torch.equal(sl.calls[0][0].feats, want_slat)
    assert torch.equal(sl.calls[0][0].coords, info["coords"])
    assert torch.equal(ss.calls[0][1], cond) and ss.calls[0][2] is None and sl.calls[0][2] is None
    neg = torch.ones_like(cond)
    _pipe(nets, ss_sampler=ss, slat_sampler=sl)(cond, seed=7, neg_cond=neg)
    assert torch.equal(ss.calls[1][2], neg) and torch.equal(sl.calls[1][2], neg)


def test_denormalisation_is_feats_times_std_plus_mean(nets, monkeypatch):
    ss_flow, ss_dec, slat_flow, vae = nets
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(1, 1, RES, RES, RES, generator=g)
    n = int((logits > 0).sum())
    feats = torch.randn(n, C, generator=g)
    seen = []
    real_decode = vae.decode
    monkeypatch.setattr(vae, "decode", lambda z: seen.append(z) or real_decode(z))
    gs, info = ImageTo3D(ss_flow, StubDecoder(logits), slat_flow, vae, MEAN.tolist(), STD.tolist(),
                         ss_sampler=RecordingSampler(), slat_sampler=RecordingSampler(feats))(_cond())
    assert len(seen) == 1
    want = feats * STD[None] + MEAN[None]
    torch.testing.assert_close(seen[0].feats, want, rtol=0, atol=0)
    assert torch.equal(seen[0].coords, info["coords"])
    ref = vae.to_gaussians(real_decode(SparseVoxels(info["coords"], want)))[0]
    assert torch.equal(gs.xyz, ref.xyz) and torch.equal(gs.scale_pre, ref.scale_pre)


def test_occupancy_coords_equal_argwhere(nets):
    ss_flow, _, slat_flow, vae = nets
    logits = torch.randn(1, 1, RES, RES, RES, generator=torch.Generator().manual_seed(9))
    logits[0, 0, 3, 7, 1] = 0.0                              # exactly 0 is not occupied (strict > 0)
    pipe = ImageTo3D(ss_flow, StubDecoder(logits), slat_flow, vae, MEAN, STD,
                     ss_sampler=RecordingSampler(), slat_sampler=RecordingSampler())
    _, info = pipe(_cond())
    idx = torch.argwhere(logits[0, 0] > 0)                   # (N, 3) x, y, z in row-major order
    want = torch.cat([torch.zeros(len(idx), 1, dtype=torch.int64), idx], 1).int()
    assert torch.equal(info["coords"], want)
    assert not ((info["coords"][:, 1:] == torch.tensor([3, 7, 1], dtype=torch.int32)).all(1)).any()


def test_zero_occupancy_raises(nets):
    ss_flow, _, slat_flow, vae = nets
    pipe = ImageTo3D(ss_flow, StubDecoder(-torch.ones(1, 1, RES, RES, RES)), slat_flow, vae, MEAN, STD,
                     ss_sampler=RecordingSampler(), slat_sampler=RecordingSampler())
    with pytest.raises(ValueError, match="no occupied voxel"):
        pipe(_cond())


def test_config_mismatches_raise(nets):
    ss_flow, ss_dec, slat_flow, vae = nets
    with pytest.raises(ValueError, match="slat_mean"):
        ImageTo3D(*nets, MEAN[:4], STD)
    with pytest.raises(ValueError, match="SS decoder grid"):
        ImageTo3D(ss_flow, StubDecoder(torch.ones(1, 1, 8, 8, 8)), slat_flow, vae, MEAN, STD,
                  ss_sampler=RecordingSampler(), slat_sampler=RecordingSampler())(_cond())
    with pytest.raises(ValueError, match=r"\(1, L, C\)"):
        _pipe(nets)(_cond()[0])
