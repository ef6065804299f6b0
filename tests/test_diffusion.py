"""models/diffusion.py (and the continuous-time schedule of models/dpm_solver.py) against the golden `diffusion`
case of the published code, the sample values of docs/published_system.md §5.1 and analytic identities."""
import math

import pytest
import torch
from reference import load_golden, rel_err

from models.diffusion import GaussianDiffusion, cosine_betas, uniform_timesteps
from models.dpm_solver import DiscreteVPSchedule


@pytest.fixture(scope="module")
def golden():
    return load_golden("diffusion")


@pytest.fixture(scope="module")
def diffusion(golden):
    return GaussianDiffusion.from_config(golden[1]["config"]["diffusion"])


def test_schedule_arrays_float64(golden, diffusion):
    g, meta = golden
    tol64 = meta["tolerance"]["tol64"]
    for name in ("betas", "alphas_cumprod", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"):
        ours = getattr(diffusion, name)
        assert ours.dtype == torch.float64 and ours.shape == (1000,)
        assert rel_err(ours, g[f"out.{name}"]) <= tol64, name
    assert torch.equal(diffusion.timestep_map, g["out.timestep_map"])


def test_schedule_matches_spec_sample_values():
    betas = cosine_betas(1000)
    acp = torch.cumprod(1 - betas, 0)
    assert betas[0].item() == pytest.approx(4.13e-5, rel=1e-3)
    assert betas[999].item() == 0.999  # clipped at max_beta
    assert acp[0].item() == pytest.approx(0.99996, abs=1e-5)
    assert acp[499].item() == pytest.approx(0.494, abs=1e-3)
    assert acp[999].item() == pytest.approx(2.4e-9, rel=0.05)


def test_forward_process_and_v_conversions(golden, diffusion):
    g, meta = golden
    tol = meta["tolerance"]["tol"]
    x0, noise, t = g["in.x0"], g["in.noise"], g["in.t"]
    x_t = diffusion.q_sample(x0, t, noise)
    v = diffusion.v_target(x0, noise, t)
    assert x_t.dtype == torch.float32 and v.dtype == torch.float32
    assert rel_err(x_t, g["out.x_t"]) <= tol
    assert rel_err(v, g["out.v"]) <= tol
    # The conversions take the golden x_t and v as inputs, so each is tested on its own.
    assert rel_err(diffusion.x0_from_v(g["out.x_t"], t, g["out.v"]), g["out.x0_from_v"]) <= tol
    assert rel_err(diffusion.eps_from_v(g["out.x_t"], t, g["out.v"]), g["out.eps_from_v"]) <= tol
    mt = diffusion.model_time(t)
    assert mt.dtype == torch.float32 and rel_err(mt, g["out.model_time"]) <= tol


def test_training_loss_is_per_sample_v_mse(golden, diffusion):
    g, _ = golden
    x0, noise, t = g["in.x0"], g["in.noise"], g["in.t"]
    seen = {}

    def zero_model(x, t_in, **cond):
        seen.update(x=x, t_in=t_in, cond=cond)
        return torch.zeros_like(x)

    loss = diffusion.training_loss(zero_model, x0, t, noise, cond_images=torch.ones(4, 1))
    assert loss.shape == (4,)
    # A zero prediction leaves the v target itself: loss = mean(v^2) per sample, v from the published code.
    expected = g["out.v"].pow(2).reshape(4, -1).mean(1)
    assert rel_err(loss, expected) <= 1e-5
    assert rel_err(seen["x"], g["out.x_t"]) <= 1e-6
    assert torch.equal(seen["t_in"], g["out.model_time"]) and "cond_images" in seen["cond"]
    # The exact v predictor has zero loss; an error of 0.5 everywhere costs 0.25.
    exact = diffusion.training_loss(lambda x, ti: g["out.v"], x0, t, noise)
    assert exact.abs().max().item() < 1e-10
    off = diffusion.training_loss(lambda x, ti: g["out.v"] + 0.5, x0, t, noise)
    assert torch.allclose(off, torch.full((4,), 0.25), atol=1e-6)


def test_vp_schedule_matches_published_noise_schedule(golden):
    g, meta = golden
    tol, tol64, per_key = meta["tolerance"]["tol"], meta["tolerance"]["tol64"], meta["tolerance"]["per_key"]
    betas = g["out.betas"]
    ns = DiscreteVPSchedule(betas)
    assert ns.total_N == int(g["vp.out.total_N"]) == 996
    assert ns.log_alpha_array.dtype == torch.float32 and ns.t_array.dtype == torch.float32
    assert rel_err(ns.log_alpha_array, g["vp.out.log_alpha_array"]) <= tol
    assert rel_err(ns.t_array, g["vp.out.t_array"]) <= tol

    ns64 = DiscreteVPSchedule(betas, dtype=torch.float64)
    t32 = g["vp.in.t"]
    for key, ours, ours64 in (
        ("marginal_alpha", ns.marginal_alpha(t32), ns64.marginal_alpha(t32.double())),
        ("marginal_std", ns.marginal_std(t32), ns64.marginal_std(t32.double())),
        ("marginal_lambda", ns.marginal_lambda(t32), ns64.marginal_lambda(t32.double())),
        ("inverse_lambda", ns.inverse_lambda(ns.marginal_lambda(t32)),
         ns64.inverse_lambda(ns64.marginal_lambda(t32.double()))),
    ):
        assert ours.dtype == torch.float32 and ours64.dtype == torch.float64
        assert rel_err(ours, g[f"vp.out.{key}"]) <= per_key.get(f"vp.out.{key}", tol), key
        assert rel_err(ours64, g[f"vp.out64.{key}"]) <= tol64, key


def test_vp_schedule_analytic_properties():
    ns = DiscreteVPSchedule(cosine_betas(1000), dtype=torch.float64)
    t = torch.linspace(0.01, 1.0, 50, dtype=torch.float64)
    a, s = ns.marginal_alpha(t), ns.marginal_std(t)
    assert torch.allclose(a ** 2 + s ** 2, torch.ones_like(a), atol=1e-12)
    assert torch.allclose(ns.marginal_lambda(t), torch.log(a / s), atol=1e-10)
    # The table is clipped where lambda < -5.1, so lambda(1) is just above the clip.
    assert -5.1 <= ns.marginal_lambda(torch.tensor([1.0], dtype=torch.float64)).item() < -5.0
    # Model time (t - 1/N) * 1000: 0 at the first grid point t = 1/N.
    assert ns.model_time(torch.tensor(1.0 / 996)).item() == pytest.approx(0.0, abs=1e-9)
    assert ns.model_time(torch.tensor(1.0)).item() == pytest.approx(1000 * (1 - 1 / 996))


def test_from_config_rejects_unsupported_values(golden):
    cfg = dict(golden[1]["config"]["diffusion"])
    for key, bad in (("noise_schedule", "linear"), ("predict_type", "eps"), ("learn_sigma", True),
                     ("use_kl", True), ("predict_xstart", True)):
        with pytest.raises(ValueError, match=key):
            GaussianDiffusion.from_config({**cfg, key: bad})
    with pytest.raises(ValueError, match="unknown"):
        GaussianDiffusion.from_config({**cfg, "nosie_schedule": "cosine"})
    unscaled = GaussianDiffusion.from_config({**cfg, "steps": 500, "rescale_timesteps": False})
    assert unscaled.model_time(torch.tensor([499])).item() == 499.0
    assert GaussianDiffusion.from_config({**cfg, "steps": 500}).model_time(torch.tensor([499])).item() == 998.0


def test_uniform_timesteps():
    n = 200_000
    t = uniform_timesteps(n, 1000, torch.Generator().manual_seed(3))
    assert t.dtype == torch.int64 and t.min().item() == 0 and t.max().item() == 999
    # Mean of U{0..999} is 499.5 with sd 288.7: 5 standard errors of the sample mean.
    assert abs(t.float().mean().item() - 499.5) < 5 * 288.7 / math.sqrt(n)
    assert torch.bincount(t, minlength=1000).min().item() > 100  # every step is drawn (expected 200)
    again = uniform_timesteps(n, 1000, torch.Generator().manual_seed(3))
    assert torch.equal(t, again)
