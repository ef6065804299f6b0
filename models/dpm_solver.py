"""DPM-Solver++ (data prediction) for the v-prediction motion DiT, over the discrete cosine schedule
(docs/published_system.md §6.4).

Continuous time t in (0, 1] indexes the 1000-step discrete schedule the way the published sampler does:
  * log alpha_i = 0.5 * cumsum(log(1 - beta)) in float64, entries with lambda = log(alpha/sigma) < -5.1 dropped
    (the last 4 cosine steps, N = 996 left), then cast to the schedule dtype (float32 by default);
  * time grid t_i = linspace(0, 1, N + 1)[1:] (made in float32), log alpha(t) piecewise linear in t,
    extrapolated linearly outside the grid; sigma = sqrt(1 - alpha^2), lambda = log alpha - log sigma;
  * the network sees t_in = (t - 1/N) * 1000, a slight 1000/996 stretch inherited from upstream DPM-Solver.
The v output becomes eps = alpha v + sigma x, classifier-free guidance combines eps (published §5.4), and the solver
steps on x0 = (x - sigma eps) / alpha. Everything runs in the dtype of the schedule and of x_T.

Entry point: `sample(model, x_T, cond, SamplerConfig(...)) -> (x, stats)`; `model(x, t_in, **cond) -> v` with
x (B, T, N, C).
All solver options live in the frozen `SamplerConfig` (from a `sampling:` block: `SamplerConfig.from_config`).
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields

import torch

from models.diffusion import cosine_betas

Tensor = torch.Tensor


def _interp(x: Tensor, xp: Tensor, yp: Tensor) -> Tensor:
    """Piecewise-linear y(x) through (xp, yp), xp increasing; the end segments extend linearly beyond the grid."""
    i = (torch.searchsorted(xp, x.to(xp.dtype).contiguous()) - 1).clamp(0, xp.numel() - 2)
    x0, x1, y0, y1 = xp[i], xp[i + 1], yp[i], yp[i + 1]
    return y0 + (x - x0) * (y1 - y0) / (x1 - x0)


class DiscreteVPSchedule:
    """alpha_t, sigma_t, lambda_t of a discrete beta schedule in continuous time t in (0, 1]."""

    def __init__(self, betas: Tensor, dtype: torch.dtype = torch.float32, clipped_lambda: float = -5.1):
        log_alpha = 0.5 * torch.log(1.0 - torch.as_tensor(betas, dtype=torch.float64)).cumsum(0)
        lam = log_alpha - 0.5 * torch.log(1.0 - torch.exp(2.0 * log_alpha))
        # lambda decreases with t: dropping the tail with lambda < clip keeps the table well conditioned.
        log_alpha = log_alpha[: int((lam >= clipped_lambda).sum())]
        self.total_N = log_alpha.numel()
        self.T = 1.0
        self.log_alpha_array = log_alpha.to(dtype)
        self.t_array = torch.linspace(0.0, 1.0, self.total_N + 1)[1:].to(dtype)  # float32 grid, as published
        self._on_device: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def _table(self, like: Tensor) -> tuple[Tensor, Tensor]:
        # One copy per device: the solver reads the table several times per step (no host->GPU copy each time).
        if like.device not in self._on_device:
            self._on_device[like.device] = (self.t_array.to(like.device), self.log_alpha_array.to(like.device))
        return self._on_device[like.device]

    def marginal_log_alpha(self, t: Tensor) -> Tensor:
        t_arr, la_arr = self._table(t)
        return _interp(t.reshape(-1), t_arr, la_arr)

    def marginal_alpha(self, t: Tensor) -> Tensor:
        return torch.exp(self.marginal_log_alpha(t))

    def marginal_std(self, t: Tensor) -> Tensor:
        return torch.sqrt(1.0 - torch.exp(2.0 * self.marginal_log_alpha(t)))

    def marginal_lambda(self, t: Tensor) -> Tensor:
        la = self.marginal_log_alpha(t)
        return la - 0.5 * torch.log(1.0 - torch.exp(2.0 * la))

    def inverse_lambda(self, lam: Tensor) -> Tensor:
        """t with lambda_t = lam: log alpha = -0.5 log(1 + e^{-2 lam}), then the table read backwards."""
        la = -0.5 * torch.logaddexp(torch.zeros_like(lam), -2.0 * lam).reshape(-1)
        t_arr, la_arr = self._table(lam)
        return _interp(la, la_arr.flip(0), t_arr.flip(0))

    def model_time(self, t: Tensor) -> Tensor:
        """Continuous t -> the discrete-step time the network was trained with (t_in = 0 at t = 1/N)."""
        return (t - 1.0 / self.total_N) * 1000.0


@functools.lru_cache(maxsize=4)
def cosine_schedule(steps: int = 1000, dtype: torch.dtype = torch.float32) -> DiscreteVPSchedule:
    """The schedule inference uses: NoiseScheduleVP('discrete') of the 1000-step cosine betas."""
    return DiscreteVPSchedule(cosine_betas(steps), dtype=dtype)


class GuidedDataPredictor:
    """x0(x, t) from a v-prediction model with the two-scale classifier-free guidance of published §5.4.

    eps = eps_fu + s1 (eps_u - eps_fu) + s2 (eps_c - eps_u), where fu zeroes cond_images and static_latent, u
    zeroes cond_images and c is the given condition. Only the passes the formula needs are made (s1 = s2 = 1: c;
    s1 = 1: u, c; else fu, u, c), all in ONE batched model call. Counts calls (nfe) and their model times.
    """

    def __init__(self, model: Callable[..., Tensor], schedule: DiscreteVPSchedule, cond: Mapping | None,
                 guidance_scale: float = 1.0, guidance_scale2: float = 1.0):
        self.model, self.schedule = model, schedule
        self.s1, self.s2 = float(guidance_scale), float(guidance_scale2)
        cond = dict(cond or {})
        if self.s1 == 1.0 and self.s2 == 1.0:
            passes = [cond]
        else:
            if cond.get("cond_images") is None:
                raise ValueError("classifier-free guidance needs cond['cond_images']")
            uncond = {**cond, "cond_images": torch.zeros_like(cond["cond_images"])}
            passes = [uncond, cond]
            if self.s1 != 1.0:
                if cond.get("static_latent") is None:
                    raise ValueError("guidance_scale != 1 needs cond['static_latent'] (the full-uncond pass zeroes it)")
                passes.insert(0, {**uncond, "static_latent": torch.zeros_like(cond["static_latent"])})
        self.n_passes = len(passes)
        # Conditions are constant over the solve: concatenate them along the batch once.
        self.cond_in = {k: (torch.cat([p[k] for p in passes]) if isinstance(cond[k], Tensor) else cond[k])
                        for k in cond}
        self.nfe = 0
        self.t_calls: list[Tensor] = []

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        b, k = x.shape[0], self.n_passes
        t = t.reshape(-1).expand(b) if t.numel() == 1 else t.reshape(-1)
        t_in = self.schedule.model_time(t)
        x_in, t_in_all = (x, t_in) if k == 1 else (torch.cat([x] * k), torch.cat([t_in] * k))
        v = self.model(x_in, t_in_all, **self.cond_in)
        self.nfe += 1
        self.t_calls.append(t_in[0].detach().clone())
        bshape = (b,) + (1,) * (x.dim() - 1)
        alpha = self.schedule.marginal_alpha(t).reshape(bshape)
        sigma = self.schedule.marginal_std(t).reshape(bshape)
        eps = [alpha * vi + sigma * x for vi in v.chunk(k)]  # per pass, as the published wrapper converts
        if k == 1:
            eps = eps[0]
        elif k == 2:
            eps_u, eps_c = eps
            eps = eps_u + self.s2 * (eps_c - eps_u)
        else:
            eps_fu, eps_u, eps_c = eps
            eps = eps_fu + self.s1 * (eps_u - eps_fu) + self.s2 * (eps_c - eps_u)
        return (x - sigma * eps) / alpha


DataFn = Callable[[Tensor, Tensor], Tensor]


class DPMSolverPP:
    """DPM-Solver++ updates in lambda (half log-SNR) over a DiscreteVPSchedule; times are (1,) tensors."""

    def __init__(self, schedule: DiscreteVPSchedule):
        self.ns = schedule

    def time_steps(self, steps: int, t_start: float, t_end: float, skip_type: str, device) -> Tensor:
        if skip_type == "time_uniform":
            return torch.linspace(t_start, t_end, steps + 1, device=device)
        if skip_type == "logSNR":
            lam_T = self.ns.marginal_lambda(torch.tensor(t_start, device=device)).item()
            lam_0 = self.ns.marginal_lambda(torch.tensor(t_end, device=device)).item()
            return self.ns.inverse_lambda(torch.linspace(lam_T, lam_0, steps + 1, device=device))
        raise ValueError(f"skip_type: expected 'time_uniform' or 'logSNR', got {skip_type!r}")

    # -- one step from s to t given data predictions (x0) --
    def first_order(self, x: Tensor, s: Tensor, t: Tensor, x0_s: Tensor) -> Tensor:
        """DPM-Solver++(1), identical to DDIM with eta = 0."""
        ns = self.ns
        h = ns.marginal_lambda(t) - ns.marginal_lambda(s)
        return (ns.marginal_std(t) / ns.marginal_std(s)) * x - (ns.marginal_alpha(t) * torch.expm1(-h)) * x0_s

    def multistep_second_order(self, x: Tensor, x0_prev: Tensor, x0_last: Tensor, t_prev: Tensor,
                               t_last: Tensor, t: Tensor) -> Tensor:
        """Multistep DPM-Solver++(2M): the x0 derivative from the last two model values."""
        ns = self.ns
        lam_prev, lam_last, lam_t = ns.marginal_lambda(t_prev), ns.marginal_lambda(t_last), ns.marginal_lambda(t)
        h_last, h = lam_last - lam_prev, lam_t - lam_last
        d1 = (1.0 / (h_last / h)) * (x0_last - x0_prev)  # (1 / r0) * difference, r0 = step-size ratio
        a_phi = ns.marginal_alpha(t) * torch.expm1(-h)
        return (ns.marginal_std(t) / ns.marginal_std(t_last)) * x - a_phi * x0_last - 0.5 * a_phi * d1

    def singlestep_second_order(self, x: Tensor, s: Tensor, t: Tensor, x0_s: Tensor, data_fn: DataFn,
                                r1: float = 0.5) -> Tensor:
        """Singlestep DPM-Solver++(2S): one extra model value at lambda_s + r1 h."""
        ns = self.ns
        lam_s = ns.marginal_lambda(s)
        h = ns.marginal_lambda(t) - lam_s
        s1 = ns.inverse_lambda(lam_s + r1 * h)
        sig_s = ns.marginal_std(s)
        x_s1 = (ns.marginal_std(s1) / sig_s) * x - (ns.marginal_alpha(s1) * torch.expm1(-r1 * h)) * x0_s
        x0_s1 = data_fn(x_s1, s1)
        a_phi = ns.marginal_alpha(t) * torch.expm1(-h)
        return (ns.marginal_std(t) / sig_s) * x - a_phi * x0_s - (0.5 / r1) * a_phi * (x0_s1 - x0_s)

    # -- whole solves --
    def multistep(self, data_fn: DataFn, x: Tensor, steps: int, order: int, t_start: float, t_end: float,
                  skip_type: str, lower_order_final: bool, trace: list | None = None) -> Tensor:
        ts = self.time_steps(steps, t_start, t_end, skip_type, x.device)
        t_hist, x0_hist = [ts[0]], [data_fn(x, ts[0])]
        if trace is not None:
            trace.append(x)
        for step in range(1, steps + 1):
            t = ts[step]
            # The first steps lack history; with few steps the last ones drop order too (upstream: steps < 10).
            step_order = min(order, step)
            if lower_order_final and steps < 10:
                step_order = min(step_order, steps + 1 - step)
            if step_order == 1:
                x = self.first_order(x, t_hist[-1], t, x0_hist[-1])
            else:
                x = self.multistep_second_order(x, x0_hist[-2], x0_hist[-1], t_hist[-2], t_hist[-1], t)
            if trace is not None:
                trace.append(x)
            if step < steps:  # the value at t_end is never needed
                t_hist, x0_hist = (t_hist + [t])[-order:], (x0_hist + [data_fn(x, t)])[-order:]
        return x

    def adaptive(self, data_fn: DataFn, x: Tensor, t_start: float, t_end: float, h_init: float = 0.05,
                 atol: float = 0.0078, rtol: float = 0.05, theta: float = 0.9, t_err: float = 1e-5) -> Tensor:
        """DPM-Solver-12 with error control: 1st vs 2nd order on each step, step size in lambda adapted."""
        ns, order = self.ns, 2
        s = torch.full((1,), t_start, dtype=ns.t_array.dtype, device=x.device)
        lam_s = ns.marginal_lambda(s)
        lam_0 = ns.marginal_lambda(torch.full_like(s, t_end))
        h = torch.full_like(s, h_init)
        x_prev = x
        while (s - t_end).abs().mean() > t_err:
            t = ns.inverse_lambda(lam_s + h)
            x0_s = data_fn(x, s)
            x_lower = self.first_order(x, s, t, x0_s)
            x_higher = self.singlestep_second_order(x, s, t, x0_s, data_fn)
            tol = torch.clamp_min(rtol * torch.maximum(x_lower.abs(), x_prev.abs()), atol)
            err = ((x_higher - x_lower) / tol).reshape(x.shape[0], -1).square().mean(-1).sqrt().max()
            if err <= 1.0:  # accept: advance with the 2nd-order value, keep the 1st-order one for the next tol
                x, s, x_prev = x_higher, t, x_lower
                lam_s = ns.marginal_lambda(s)
            h = torch.minimum(theta * h * torch.float_power(err, -1.0 / order).to(h.dtype), lam_0 - lam_s)
        return x

    def ddim(self, data_fn: DataFn, x: Tensor, steps: int, t_start: float, t_end: float, skip_type: str) -> Tensor:
        """Plain DDIM (eta = 0) on the same grid: x_t = alpha_t x0 + sigma_t eps, eps re-derived from x_s."""
        ns = self.ns
        ts = self.time_steps(steps, t_start, t_end, skip_type, x.device)
        for s, t in zip(ts[:-1], ts[1:]):
            x0 = data_fn(x, s)
            eps = (x - ns.marginal_alpha(s) * x0) / ns.marginal_std(s)
            x = ns.marginal_alpha(t) * x0 + ns.marginal_std(t) * eps
        return x


METHODS = ("multistep", "adaptive", "ddim")
SKIP_TYPES = ("time_uniform", "logSNR")
SAMPLING_BLOCK_OTHER_KEYS = frozenset({"num_frames", "seed", "fov_deg", "radius", "elevation_deg", "resolution",
                                       "background"})
"""Keys of a config's `sampling:` block that belong to the rest of inference (frames, seed, output cameras), not to
the solver: `SamplerConfig.from_config` skips them and refuses any other key that is not a SamplerConfig field."""


@dataclass(frozen=True)
class SamplerConfig:
    """Every option of `sample`, with the published defaults (DPM-Solver++ over the discrete cosine schedule), checked
    once on construction. Build from a `sampling:` config block with `from_config`; override per call with
    `dataclasses.replace(config, steps=..., method=...)` (which re-checks)."""
    steps: int = 20                   # multistep / ddim: model evaluations; ignored by adaptive
    method: str = "multistep"         # one of METHODS
    order: int = 2                    # multistep: 1 or 2; adaptive: 2 (DPM-Solver-12)
    skip_type: str = "time_uniform"   # time grid of multistep / ddim: one of SKIP_TYPES
    lower_order_final: bool = True    # multistep with steps < 10: drop the order on the last steps (upstream)
    guidance_scale: float = 1.0       # CFG s1, s2 (published §5.4); 1, 1 = a single conditional pass
    guidance_scale2: float = 1.0
    t_start: float = 1.0              # 0 < t_end < t_start <= 1
    t_end: float = 1e-3
    atol: float = 0.0078              # adaptive error control (published §6.4 step 5)
    rtol: float = 0.05
    h_init: float = 0.05
    theta: float = 0.9
    t_err: float = 1e-5
    algorithm_type: str = "dpmsolver++"   # the only one implemented (data prediction)

    def __post_init__(self):
        if self.algorithm_type != "dpmsolver++":
            raise ValueError(f"algorithm_type: only 'dpmsolver++' is supported, got {self.algorithm_type!r}")
        if self.method not in METHODS:
            raise ValueError(f"method: expected one of {METHODS}, got {self.method!r}")
        if self.method == "multistep" and self.order not in (1, 2):
            raise ValueError(f"order: multistep supports 1 or 2, got {self.order!r}")
        if self.method == "adaptive" and self.order != 2:
            raise ValueError(f"order: the adaptive solver is DPM-Solver-12 (order 2), got {self.order!r}")
        if self.method != "adaptive" and (not isinstance(self.steps, int) or isinstance(self.steps, bool)
                                          or self.steps < max(self.order, 1)):
            raise ValueError(f"steps: expected an integer >= order ({self.order}), got {self.steps!r}")
        if self.skip_type not in SKIP_TYPES:
            raise ValueError(f"skip_type: expected 'time_uniform' or 'logSNR', got {self.skip_type!r}")
        if not isinstance(self.lower_order_final, bool):
            raise ValueError(f"lower_order_final: expected a bool, got {self.lower_order_final!r}")
        for name in ("guidance_scale", "guidance_scale2", "t_start", "t_end", "atol", "rtol", "h_init", "theta",
                     "t_err"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name}: expected a number, got {value!r}")
        if not 0.0 < self.t_end < self.t_start <= 1.0:
            raise ValueError(f"expected 0 < t_end < t_start <= 1, got t_start={self.t_start}, t_end={self.t_end}")
        for name in ("atol", "rtol", "h_init", "theta", "t_err"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: expected > 0, got {getattr(self, name)!r}")

    @classmethod
    def from_config(cls, cfg: Mapping, ignore: Iterable[str] = SAMPLING_BLOCK_OTHER_KEYS) -> SamplerConfig:
        """The solver options of a `sampling:` config block (a Mapping or a Config with to_dict). Keys in `ignore`
        (by default the block's non-solver keys) are skipped; any other key that is not a field is refused."""
        if hasattr(cfg, "to_dict"):
            cfg = cfg.to_dict()
        names, ignore = {f.name for f in fields(cls)}, set(ignore)
        unknown = sorted(k for k in cfg if k not in names and k not in ignore)
        if unknown:
            raise ValueError(f"sampling: unknown key(s) {', '.join(map(repr, unknown))}; solver options are "
                             f"{', '.join(sorted(names))}")
        return cls(**{k: v for k, v in cfg.items() if k in names})


def sample(model: Callable[..., Tensor], x_T: Tensor, cond: Mapping | None = None,
           config: SamplerConfig = SamplerConfig(), *, schedule: DiscreteVPSchedule | None = None,
           return_intermediates: bool = False) -> tuple[Tensor, dict]:
    """Solve the probability-flow ODE from x_T at config.t_start to config.t_end with a v-prediction model.

    model(x, t_in, **cond) -> v, x (B, ...), t_in float (B,) in the model's 0..999 time units.
    config.method: 'multistep' (DPM-Solver++ order 1 or 2, `steps` model calls), 'adaptive' (DPM-Solver-12 with error
    control, order 2 only, `steps` ignored) or 'ddim' (eta = 0 baseline, `steps` calls).
    Returns (x at t_end, stats): stats['nfe'] = model calls (a batched CFG call counts once), stats['t_calls'] =
    float (nfe,) model times of the calls, stats['intermediates'] = (steps + 1, *x.shape) for multistep if asked.
    """
    if not isinstance(config, SamplerConfig):
        raise TypeError(f"config: expected a SamplerConfig (SamplerConfig.from_config for a mapping), "
                        f"got {type(config).__name__}")
    c = config
    if return_intermediates and c.method != "multistep":
        raise ValueError("return_intermediates is available for method='multistep' only")

    ns = schedule if schedule is not None else cosine_schedule()
    data_fn = GuidedDataPredictor(model, ns, cond, c.guidance_scale, c.guidance_scale2)
    solver = DPMSolverPP(ns)
    trace: list | None = [] if return_intermediates else None
    with torch.no_grad():
        if c.method == "multistep":
            x = solver.multistep(data_fn, x_T, c.steps, c.order, c.t_start, c.t_end, c.skip_type,
                                 c.lower_order_final, trace)
        elif c.method == "adaptive":
            x = solver.adaptive(data_fn, x_T, c.t_start, c.t_end, c.h_init, c.atol, c.rtol, c.theta, c.t_err)
        else:
            x = solver.ddim(data_fn, x_T, c.steps, c.t_start, c.t_end, c.skip_type)
    stats = {"nfe": data_fn.nfe, "t_calls": torch.stack(data_fn.t_calls), "passes_per_call": data_fn.n_passes}
    if trace is not None:
        stats["intermediates"] = torch.stack(trace)
    return x, stats

