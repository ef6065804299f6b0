"""Gaussian diffusion over motion latents: the cosine schedule, v-prediction and the training loss
(docs/published_system.md §5.1).

x_t = sqrt(acp_t) x0 + sqrt(1 - acp_t) eps, the network predicts v = sqrt(acp_t) eps - sqrt(1 - acp_t) x0.
The schedule arrays are float64 (as published); coefficients are gathered at t in float64 and cast to float32
before they multiply the data, which is what the published `_extract_into_tensor` does, so our float32 results
agree with the golden ones to rounding. Sampling lives in models/dpm_solver.py.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

# The published `diffusion` config block and the only values this reimplementation supports
# (None: any value is fine because it does not change anything we compute).
_SUPPORTED = {
    "steps": None,
    "noise_schedule": ("cosine",),
    "predict_type": ("v",),
    "learn_sigma": (False,),
    "sigma_small": None,            # FIXED_LARGE vs FIXED_SMALL: only the ancestral sampler reads it (unused)
    "use_kl": (False,),
    "predict_xstart": (False,),     # would contradict predict_type v
    "rescale_timesteps": (True, False),
    "rescale_learned_sigmas": None,  # RESCALED_MSE equals MSE when no sigma is learned
    "timestep_respacing": (None, "", [], ()),  # the published run uses no respacing (identity timestep_map)
}


def cosine_betas(steps: int = 1000, max_beta: float = 0.999) -> torch.Tensor:
    """iDDPM cosine betas, float64: beta_i = min(1 - abar((i+1)/T) / abar(i/T), max_beta)."""
    def abar(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1.0 - abar((i + 1) / steps) / abar(i / steps), max_beta) for i in range(steps)]
    return torch.tensor(betas, dtype=torch.float64)


def _gather(arr: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """arr[t] (float64) cast to float32, shaped (B, 1, ..., 1) to broadcast against `like`."""
    coef = arr.to(t.device)[t].float()
    return coef.reshape(coef.shape + (1,) * (like.dim() - coef.dim()))


def uniform_timesteps(batch_size: int, steps: int = 1000, generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """t ~ U{0, ..., steps-1}, int64 (B,): the published uniform schedule sampler."""
    gen_device = generator.device if generator is not None else device
    t = torch.randint(0, steps, (batch_size,), generator=generator, device=gen_device)
    return t.to(device) if device is not None else t


class GaussianDiffusion:
    """Discrete-time VP diffusion with v-prediction; holds the float64 schedule arrays."""

    def __init__(self, steps: int = 1000, noise_schedule: str = "cosine", predict_type: str = "v",
                 rescale_timesteps: bool = True):
        if noise_schedule != "cosine":
            raise ValueError(f"noise_schedule: only 'cosine' is supported, got {noise_schedule!r}")
        if predict_type != "v":
            raise ValueError(f"predict_type: only 'v' is supported, got {predict_type!r}")
        if not isinstance(steps, int) or steps < 2:
            raise ValueError(f"steps: expected an integer >= 2, got {steps!r}")
        self.num_timesteps = steps
        self.rescale_timesteps = rescale_timesteps
        self.betas = cosine_betas(steps)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.timestep_map = torch.arange(steps, dtype=torch.int64)  # no respacing

    @classmethod
    def from_config(cls, cfg: Mapping) -> "GaussianDiffusion":
        """Build from the published `diffusion` config block; unsupported values raise ValueError."""
        unknown = sorted(set(cfg) - set(_SUPPORTED))
        if unknown:
            raise ValueError(f"diffusion config: unknown keys {unknown}; known: {sorted(_SUPPORTED)}")
        for key, allowed in _SUPPORTED.items():
            if allowed is not None and key in cfg and cfg[key] not in allowed:
                raise ValueError(f"diffusion config: {key}={cfg[key]!r} is not supported (supported: {list(allowed)})")
        return cls(steps=int(cfg.get("steps", 1000)), noise_schedule=cfg.get("noise_schedule", "cosine"),
                   predict_type=cfg.get("predict_type", "v"),
                   rescale_timesteps=bool(cfg.get("rescale_timesteps", True)))

    # -- forward process and the v parameterisation (t: int64 (B,), tensors (B, ...)) --
    def _coefs(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(acp_t), sqrt(1 - acp_t) as float32 (B, 1, ..., 1)."""
        return _gather(self.sqrt_alphas_cumprod, t, like), _gather(self.sqrt_one_minus_alphas_cumprod, t, like)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        a, s = self._coefs(t, x0)
        return a * x0 + s * noise

    def v_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = self._coefs(t, x0)
        return a * noise - s * x0

    def x0_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        a, s = self._coefs(t, x_t)
        return a * x_t - s * v

    def eps_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        a, s = self._coefs(t, x_t)
        return a * v + s * x_t

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """The time the network sees: t * 1000/steps as float32 (published rescale_timesteps)."""
        t = self.timestep_map.to(t.device)[t]
        return t.float() * (1000.0 / self.num_timesteps) if self.rescale_timesteps else t.float()

    def sample_timesteps(self, batch_size: int, generator: torch.Generator | None = None,
                         device: torch.device | str | None = None) -> torch.Tensor:
        return uniform_timesteps(batch_size, self.num_timesteps, generator, device)

    def training_loss(self, model_fn: Callable[..., torch.Tensor], x0: torch.Tensor, t: torch.Tensor,
                      noise: torch.Tensor | None = None, **cond) -> torch.Tensor:
        """Per-sample MSE (B,) between the v target and model_fn(x_t, model_time(t), **cond)."""
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)
        pred = model_fn(x_t, self.model_time(t), **cond)
        if pred.shape != x0.shape:
            raise ValueError(f"model output shape {tuple(pred.shape)} != data shape {tuple(x0.shape)}")
        err = (self.v_target(x0, noise, t) - pred).float() ** 2
        return err.reshape(err.shape[0], -1).mean(dim=1)
