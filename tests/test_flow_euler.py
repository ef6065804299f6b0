"""FlowEuler sampler (docs/trellis.md §9): golden trellis_flow_euler, first-order convergence, guidance interval, grid."""
import argparse
import math
from fractions import Fraction

import pytest
import torch

from models.sparse import SparseVoxels
from models.trellis.flow_euler import (PIPELINE_DEFAULTS, SLAT_DEFAULTS, SS_DEFAULTS, FlowEulerSampler,
                                       add_sampler_args, sampler_from_args, time_grid)
from reference import load_golden, rel_err

_RUN_SAMPLER = {  # the golden runs as configurations of our one class
    "FlowEulerGuidanceIntervalSampler": lambda p: FlowEulerSampler(sigma_min=1e-5, **p),
    "FlowEulerCfgSampler": lambda p: FlowEulerSampler(sigma_min=1e-5, cfg_interval=None, **p),
    "FlowEulerSampler": lambda p: FlowEulerSampler(sigma_min=1e-5, cfg_strength=0.0, **p),
}


class GoldenModel:
    """The README's fixed field v = 0.5 W x + cos(t_in pi / 2000) u[c] + 0.1 mean(cond[b]); logs every call."""

    def __init__(self, W, u, cond):
        self.W, self.u, self.cond = W, u, cond
        self.t_log, self.flag_log = [], []

    def __call__(self, x, t_in, cond):
        self.t_log.append(t_in.clone())
        self.flag_log.append(1 if cond is self.cond else 0)
        t = t_in.to(x.dtype)
        return (0.5 * torch.einsum("bcxyz,dc->bdxyz", x, self.W)
                + torch.cos(t * math.pi / 2000)[:, None, None, None, None] * self.u[None, :, None, None, None]
                + 0.1 * cond.mean(dim=(1, 2))[:, None, None, None, None])


@pytest.fixture(scope="module")
def golden():
    return load_golden("trellis_flow_euler")


@pytest.mark.parametrize("run", ["ss12", "slat12", "default25", "cfg12", "plain12"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_golden_runs(golden, run, dtype):
    g, meta = golden
    cfg, tol = meta["config"]["runs"][run], meta["tolerance"]
    sampler = _RUN_SAMPLER[cfg["sampler"]](cfg["params"])
    cond = g["in.cond"].to(dtype)
    model = GoldenModel(g["in.W"].to(dtype), g["in.u"].to(dtype), cond)
    out = sampler.sample(model, g["in.noise"].to(dtype), cond, neg_cond=torch.zeros_like(cond),
                         return_trajectory=True)
    assert out.samples.dtype == dtype
    if dtype == torch.float32:
        assert rel_err(out.samples, g[f"{run}.out.samples"]) < tol["tol"]
        if f"{run}.out.pred_x_0" in g:
            assert rel_err(torch.stack(out.pred_x_0), g[f"{run}.out.pred_x_0"]) < tol["tol"]
    else:
        assert rel_err(out.samples, g[f"{run}.out64.samples"]) < tol["tol64"]
    # Call bookkeeping is exact: times (float32 1000 t, same for the batch), cond-before-neg order, NFE, grid.
    t_calls = torch.stack(model.t_log)
    assert t_calls.dtype == torch.float32 and (t_calls == t_calls[:, :1]).all()
    assert torch.equal(t_calls[:, 0], g[f"{run}.out.model_t"])
    assert model.flag_log == g[f"{run}.out.cond_flag"].tolist()
    assert out.nfe == len(model.t_log) == int(g[f"{run}.out.nfe"])
    assert torch.equal(torch.from_numpy(time_grid(sampler.steps, sampler.rescale_t)), g[f"{run}.out.t_seq"])


def test_golden_sparse_equals_dense(golden):
    """The SLat stage runs on SparseVoxels features with fixed coords: same numbers as the dense run."""
    g, _ = golden
    B, C = g["in.noise"].shape[:2]
    feats = g["in.noise"].permute(0, 2, 3, 4, 1).reshape(-1, C)
    grid = torch.stack(torch.meshgrid(*[torch.arange(4)] * 3, indexing="ij"), -1).reshape(-1, 3)
    coords = torch.cat([torch.arange(B).repeat_interleave(64)[:, None], grid.repeat(B, 1)], 1).int()
    dense_model = GoldenModel(g["in.W"], g["in.u"], g["in.cond"])

    def sparse_model(x, t_in, cond):
        dense = x.feats.reshape(B, 4, 4, 4, C).permute(0, 4, 1, 2, 3)
        return x.replace(dense_model(dense, t_in, cond).permute(0, 2, 3, 4, 1).reshape(-1, C))

    out = FlowEulerSampler(**SLAT_DEFAULTS).sample(sparse_model, SparseVoxels(coords, feats), g["in.cond"])
    assert isinstance(out.samples, SparseVoxels) and torch.equal(out.samples.coords, coords)
    assert rel_err(out.samples.feats, g["slat12.out.samples"].permute(0, 2, 3, 4, 1).reshape(-1, C)) < 1e-6


def _gaussian_flow(mu, s):
    """Exact marginal velocity of rectified flow from N(mu, s^2) data (t = 0) to N(0, 1) noise (t = 1), sigma_min 0.

    x_t = (1 - t) x0 + t eps: v(x, t) = E[eps - x0 | x_t = x] = -mu + (t - (1 - t) s^2) / var_t (x - (1 - t) mu),
    var_t = (1 - t)^2 s^2 + t^2. The ODE maps x_1 to x_0 = mu + s x_1 (it keeps the standardised value).
    """
    def model(x, t_in, cond):
        t = (t_in.to(x.dtype) / 1000)[:, None]
        var = (1 - t) ** 2 * s ** 2 + t ** 2
        return -mu + (t - (1 - t) * s ** 2) / var * (x - (1 - t) * mu)
    return model


@pytest.mark.parametrize("rescale_t", [1.0, 3.0])
def test_euler_converges_first_order_to_the_exact_flow_map(rescale_t):
    gen = torch.Generator().manual_seed(0)
    mu, s = 1.5, 0.3
    x1 = torch.randn(4, 16, generator=gen, dtype=torch.float64)
    exact = mu + s * x1
    errs = []
    for steps in (25, 50, 100, 200):
        out = FlowEulerSampler(steps=steps, rescale_t=rescale_t, sigma_min=0.0).sample(_gaussian_flow(mu, s), x1, None)
        errs.append((out.samples - exact).abs().max().item())
    assert errs[-1] < 0.025 and errs[-1] < errs[0] / 7  # converges (error ~ C / steps)
    ratios = [a / b for a, b in zip(errs[:-1], errs[1:])]
    assert all(1.7 < r < 2.3 for r in ratios), (errs, ratios)  # halving h halves the error: first order


class CountingModel:
    """v = -x + c-dependent constant; neg calls are recorded with their time and may be forbidden."""

    def __init__(self, cond, forbid_neg=False):
        self.cond, self.forbid_neg, self.calls = cond, forbid_neg, []

    def __call__(self, x, t_in, c):
        is_cond = c is self.cond
        self.calls.append((float(t_in[0]) / 1000, is_cond))
        if not is_cond and self.forbid_neg:
            raise AssertionError("unconditional branch evaluated")
        return -0.7 * x + c.mean() + torch.sin(t_in / 500)[:, None]


def _run(sampler, model, x, cond, **kw):
    return sampler.sample(model, x, cond, **kw)


def test_guidance_interval_gates_the_neg_call():
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    cond = torch.full((3, 2), 0.8)
    plain = _run(FlowEulerSampler(steps=12, rescale_t=3.0), CountingModel(cond, forbid_neg=True), x, cond)
    assert plain.nfe == 12

    # GVF SS setting: neg calls exactly at the steps with t_i in [0.5, 1], the t = 0.5 step included (10 of 12).
    m = CountingModel(cond)
    ss = _run(FlowEulerSampler(**SS_DEFAULTS), m, x, cond)
    neg_t = [t for t, is_cond in m.calls if not is_cond]
    grid = time_grid(12, 3.0)[:-1]
    assert len(neg_t) == 10 and ss.nfe == 22 and min(neg_t) == 0.5
    assert neg_t == pytest.approx([t for t in grid if 0.5 <= t <= 1.0], abs=1e-6)
    assert [c for _, c in m.calls[:2]] == [True, False]  # cond call first
    assert not torch.equal(ss.samples, plain.samples)

    # An interval containing no grid time: never evaluates the neg branch, bit-identical to conditional sampling.
    off = _run(FlowEulerSampler(**{**SS_DEFAULTS, "cfg_interval": (2.0, 3.0)}), CountingModel(cond, forbid_neg=True),
               x, cond)
    assert off.nfe == 12 and torch.equal(off.samples, plain.samples)
    # cfg_strength 0 is no guidance (and no neg calls), also with the interval set.
    zero = _run(FlowEulerSampler(**{**SS_DEFAULTS, "cfg_strength": 0.0}), CountingModel(cond, forbid_neg=True), x, cond)
    assert torch.equal(zero.samples, plain.samples)


def test_cfg_formula_and_default_neg_cond():
    """One guided step from t = 1 to 0 equals x - ((1 + w) v_c - w v_n), with neg_cond defaulting to zeros."""
    x, cond, w = torch.randn(2, 3, dtype=torch.float64), torch.full((2, 4), 2.0, dtype=torch.float64), 7.5
    model = lambda x, t, c: x * 0 + c.sum(1, keepdim=True)  # v_c = 8, v_n = 0
    out = FlowEulerSampler(steps=1, cfg_strength=w).sample(model, x, cond)
    assert torch.allclose(out.samples, x - (1 + w) * 8.0)


def test_rescale_t_grid_closed_form():
    for steps, r in [(12, 3.0), (25, 3.0), (7, 1.0), (9, 0.5)]:
        exact = [float(r * s / (1 + (r - 1) * s)) for s in (Fraction(steps - i, steps) for i in range(steps + 1))]
        t = time_grid(steps, r)
        assert t.dtype.name == "float64" and t[0] == 1.0 and t[-1] == 0.0
        assert max(abs(a - b) for a, b in zip(t.tolist(), exact)) < 4e-16
    t = time_grid(12, 3.0)
    assert t[9] == 0.5  # the trap: this step must stay guided
    assert t.tolist() == pytest.approx([1, 0.970588, 0.9375, 0.9, 0.857143, 0.807692, 0.75, 0.681818, 0.6, 0.5,
                                        0.375, 0.214286, 0], abs=1e-6)
    assert sum(0.5 <= v <= 1.0 for v in time_grid(25, 3.0)[:-1]) == 19  # pipeline default: 19 guided steps


def test_defaults_and_flags():
    assert SS_DEFAULTS == dict(steps=12, cfg_strength=7.5, cfg_interval=(0.5, 1.0), rescale_t=3.0, sigma_min=1e-5)
    assert SLAT_DEFAULTS == {**SS_DEFAULTS, "cfg_strength": 3.0}
    assert PIPELINE_DEFAULTS["steps"] == 25 and PIPELINE_DEFAULTS["cfg_strength"] == 5.0
    p = argparse.ArgumentParser()
    add_sampler_args(p, "ss", SS_DEFAULTS)
    add_sampler_args(p, "slat", SLAT_DEFAULTS)
    a = p.parse_args([])
    assert sampler_from_args(a, "ss", SS_DEFAULTS) == FlowEulerSampler(**SS_DEFAULTS)
    assert sampler_from_args(a, "slat", SLAT_DEFAULTS) == FlowEulerSampler(**SLAT_DEFAULTS)
    a = p.parse_args(["--ss-steps", "25", "--ss-cfg-strength", "5", "--slat-cfg-interval", "0.2", "0.9"])
    assert sampler_from_args(a, "ss", SS_DEFAULTS) == FlowEulerSampler(**{**SS_DEFAULTS, "steps": 25,
                                                                          "cfg_strength": 5.0})
    assert sampler_from_args(a, "slat", SLAT_DEFAULTS).cfg_interval == (0.2, 0.9)
