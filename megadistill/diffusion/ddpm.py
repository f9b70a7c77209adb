"""DDPM / DDIM (Gaussian variance-preserving) schedule, matching diffusers' DDPMScheduler / DDIMScheduler.

Convention: integer timesteps t in [0, T); alpha_bar_t = prod_{s<=t} (1 - beta_s);
x_t = alpha_t x0 + sigma_t eps with alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t);
SNR(t) = alpha_t^2 / sigma_t^2. Networks predict ``epsilon``, ``v_prediction`` (v = alpha eps - sigma x0)
or ``sample`` (x0). All schedule arithmetic is float64 (diffusers uses float32; tests compare with a
float32 tolerance).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Optional

import torch

from .flow_match import _expand_like
from .parameterization import convert_prediction

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

# diffusers' prediction_type names -> the short names used by convert_prediction.
_PRED_TO_SHORT = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


def make_betas(beta_schedule: str, num_train_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """Betas (float64) for diffusers' ``linear``, ``scaled_linear`` and ``squaredcos_cap_v2`` schedules."""
    n = num_train_timesteps
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
    if beta_schedule == "scaled_linear":  # Stable Diffusion: linear in sqrt(beta)
        return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2
    if beta_schedule == "squaredcos_cap_v2":  # Nichol & Dhariwal cosine alpha_bar, betas capped at 0.999

        def alpha_bar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        return torch.tensor(
            [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)], dtype=torch.float64
        )
    raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}")


def ddim_coefficients(alpha_bar_t, alpha_bar_prev, eta: float):
    """DDIM (Song et al. eq. 12): x_prev = sqrt(ab_prev) x0 + c_eps eps + std noise.

    std = eta * sqrt((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)); eta = 1 is the DDPM posterior
    variance (beta-tilde), eta = 0 the deterministic probability-flow step. Returns (c_x0, c_eps, std).
    """
    ab_t = torch.as_tensor(alpha_bar_t, dtype=torch.float64)
    ab_prev = torch.as_tensor(alpha_bar_prev, dtype=torch.float64)
    variance = (1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)
    std = eta * variance.sqrt()
    return ab_prev.sqrt(), (1 - ab_prev - std**2).sqrt(), std


@dataclass(frozen=True)
class DDPMSchedule:
    """The discrete VP schedule plus DDIM/DDPM stepping; field names and defaults follow diffusers."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 0.0001
    beta_end: float = 0.02
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    set_alpha_to_one: bool = True  # DDIM: alpha_bar used past the last step (1 = fully clean)

    def __post_init__(self):
        if self.num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be >= 1, got {self.num_train_timesteps}")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {self.beta_schedule!r}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {self.timestep_spacing!r}")
        if not 0.0 < self.beta_start < self.beta_end < 1.0:
            raise ValueError(f"need 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}")
        if self.steps_offset < 0:
            raise ValueError(f"steps_offset must be >= 0, got {self.steps_offset}")

    # ---- schedule ---------------------------------------------------------------------------------
    @property
    def betas(self) -> torch.Tensor:
        return make_betas(self.beta_schedule, self.num_train_timesteps, self.beta_start, self.beta_end)

    @cached_property  # built once per schedule: samplers look it up every step (do not modify in place)
    def alphas_cumprod(self) -> torch.Tensor:
        return torch.cumprod(1.0 - self.betas, dim=0)

    @property
    def final_alpha_cumprod(self) -> float:
        return 1.0 if self.set_alpha_to_one else float(self.alphas_cumprod[0])

    def alpha_bar(self, t) -> torch.Tensor:
        """alpha_bar at integer timesteps (float64); t < 0 means "past the end" (final_alpha_cumprod)."""
        t = torch.as_tensor(t, dtype=torch.long)
        ac = self.alphas_cumprod.to(t.device)
        return torch.where(t >= 0, ac[t.clamp(min=0)], torch.full_like(ac[0], self.final_alpha_cumprod))

    def alpha_sigma(self, t):
        """(alpha_t, sigma_t) = (sqrt(alpha_bar), sqrt(1 - alpha_bar)), float64."""
        ab = self.alpha_bar(t)
        return ab.sqrt(), (1.0 - ab).sqrt()

    def snr(self, t) -> torch.Tensor:
        """Signal-to-noise ratio alpha_bar / (1 - alpha_bar)."""
        ab = self.alpha_bar(t)
        return ab / (1.0 - ab)

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        """x_t = alpha_t x0 + sigma_t eps (diffusers ``add_noise``), t of shape [B]."""
        a, s = self.alpha_sigma(t)
        return _expand_like(a.to(x0.dtype), x0) * x0 + _expand_like(s.to(x0.dtype), x0) * eps

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        """Training target for this schedule's prediction_type (v = alpha eps - sigma x0)."""
        if self.prediction_type == "epsilon":
            return eps
        if self.prediction_type == "sample":
            return x0
        a, s = self.alpha_sigma(t)
        return _expand_like(a.to(x0.dtype), x0) * eps - _expand_like(s.to(x0.dtype), x0) * x0

    # ---- inference --------------------------------------------------------------------------------
    def inference_timesteps(self, num_inference_steps: int) -> torch.Tensor:
        """diffusers ``set_timesteps(N)`` for the configured timestep_spacing (descending int64)."""
        T, n = self.num_train_timesteps, num_inference_steps
        if not 1 <= n <= T:
            raise ValueError(f"num_inference_steps must lie in [1, {T}], got {n}")
        if self.timestep_spacing == "linspace":
            ts = torch.linspace(0, T - 1, n, dtype=torch.float64).round().flip(0)
        elif self.timestep_spacing == "leading":
            ts = (torch.arange(n, dtype=torch.float64) * (T // n)).flip(0) + self.steps_offset
        else:  # trailing
            ts = torch.arange(T, 0, -T / n, dtype=torch.float64).round() - 1
        return ts.long()

    def ddim_prev_timestep(self, t, num_inference_steps: int):
        """diffusers DDIM's previous timestep: t - T // N (negative past the end)."""
        return t - self.num_train_timesteps // num_inference_steps

    def ddim_step(
        self,
        model_output: torch.Tensor,
        t,
        x_t: torch.Tensor,
        prev_t,
        eta: float = 0.0,
        noise: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ):
        """One DDIM step from t to prev_t (t, prev_t: ints or [B] tensors). Returns (x_prev, x0_pred).

        For eta > 0 the noise is ``noise`` if given, else drawn with ``generator`` (same draw as
        diffusers' randn_tensor on CPU). eta = 1 equals the DDPM ancestral step to prev_t.
        """
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must lie in [0, 1], got {eta}")
        ab_t, ab_prev = self.alpha_bar(t), self.alpha_bar(prev_t)
        a, s = ab_t.sqrt(), (1.0 - ab_t).sqrt()
        kind = _PRED_TO_SHORT[self.prediction_type]
        x0 = convert_prediction(model_output, kind, "x0", x_t, a, s)
        eps = convert_prediction(model_output, kind, "eps", x_t, a, s)
        c_x0, c_eps, std = ddim_coefficients(ab_t, ab_prev, eta)
        e = lambda c: _expand_like(c.to(x_t.dtype), x_t)  # noqa: E731
        x_prev = e(c_x0) * x0 + e(c_eps) * eps
        if eta > 0:
            if noise is None:
                noise = torch.randn(model_output.shape, generator=generator, dtype=x_t.dtype, device=x_t.device)
            x_prev = x_prev + e(std) * noise
        return x_prev, x0
