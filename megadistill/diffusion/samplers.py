"""Samplers: Euler flow, few-step re-noising (flow convention, see flow_match.py) and DDIM (ddpm.py).

Model callables used here:
  v_fn(x_t, t)  -> flow prediction; t is a float64 tensor of shape [B] (timesteps in [0, T])
  x0_fn(x_t, t) -> clean-sample prediction
  model_fn(x_t, t) -> prediction of the DDPMSchedule's prediction_type; t is an int64 tensor [B]
CFG is applied by the caller inside the callable (see guidance.py), which keeps these loops model-
and guidance-agnostic.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .ddpm import DDPMSchedule
from .flow_match import FlowMatchSchedule, _expand_like, add_noise_continuous, shift_sigma


def flow_inference_sigmas(num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """Sigma grid for an N-step Euler flow sampler: linspace(1, 0, N+1)[:-1] shifted, then a terminal 0.

    This is the schedule of upstream Self-Forcing inference (FlowMatchScheduler with
    extra_one_step) and yields N model evaluations.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    s = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)[:-1]
    return torch.cat([shift_sigma(s, shift), torch.zeros(1, dtype=torch.float64)])


def diffusers_flow_sigmas(num_steps: int, shift: float = 1.0, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Sigmas of diffusers' FlowMatchEulerDiscreteScheduler(shift).set_timesteps(N), terminal 0 appended.

    diffusers spaces N points linearly from sigma_max = 1 down to sigma_min = shift_sigma(1/T) (its
    smallest training sigma, already shifted) and then shifts them again, so it ends at
    shift_sigma(shift_sigma(1/T)) rather than 0 like ``flow_inference_sigmas``. Timesteps = T * sigmas[:-1].
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    sigma_min = shift_sigma(1.0 / num_train_timesteps, shift)
    s = torch.linspace(1.0, sigma_min, num_steps, dtype=torch.float64)
    return torch.cat([shift_sigma(s, shift), torch.zeros(1, dtype=torch.float64)])


def euler_flow_sample(
    v_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    num_train_timesteps: int = 1000,
) -> torch.Tensor:
    """Integrate dx/dsigma = v from sigmas[0] to sigmas[-1] with Euler steps."""
    x = noise
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        t = torch.full((x.shape[0],), sigma * num_train_timesteps, dtype=torch.float64, device=x.device)
        v = v_fn(x, t)
        x = x + v.to(x.dtype) * (sigma_next - sigma)
    return x


def few_step_sample(
    x0_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    step_list: Sequence[float],
    generator: Optional[torch.Generator] = None,
    schedule: Optional[FlowMatchSchedule] = None,
    num_train_timesteps: int = 1000,
) -> torch.Tensor:
    """The DMD / Self-Forcing student sampler: predict x0 at each step, re-noise to the next step.

    x = noise (taken to be at step_list[0]); for each t_i: x0 = x0_fn(x, t_i); if a next step
    exists, x = (1 - sigma_{i+1}) x0 + sigma_{i+1} eps with fresh eps. Returns the last x0.
    With ``schedule`` the re-noising snaps to its grid like upstream ``scheduler.add_noise``.
    """
    steps = [float(s) for s in step_list]
    if not steps:
        raise ValueError("step_list is empty")
    if any(a <= b for a, b in zip(steps, steps[1:])):
        raise ValueError(f"step_list must be strictly decreasing, got {steps}")
    x = noise
    x0 = noise
    for i, t_i in enumerate(steps):
        t = torch.full((x.shape[0],), t_i, dtype=torch.float64, device=x.device)
        x0 = x0_fn(x, t)
        if i + 1 < len(steps):
            eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
            t_next = torch.full((x.shape[0],), steps[i + 1], dtype=torch.float64, device=x.device)
            if schedule is not None:
                x = schedule.add_noise(x0, eps, t_next)
            else:
                x = add_noise_continuous(x0, eps, _expand_like(t_next / num_train_timesteps, x0).to(x0.dtype))
    return x0


def ddim_sample(
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    schedule: DDPMSchedule,
    num_inference_steps: int,
    eta: float = 0.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """DDIM sampling loop exactly as diffusers' DDIMScheduler (timesteps from ``set_timesteps``,
    previous timestep t - T // N, alpha_bar 1 past the end when set_alpha_to_one).

    ``noise`` is the sample at the first timestep (pipelines pass N(0, I)). eta = 0 is the
    deterministic DDIM ODE solver, eta = 1 the DDPM ancestral sampler; its noise comes from
    ``generator`` in the same order as diffusers draws it.
    """
    x = noise
    for t in schedule.inference_timesteps(num_inference_steps).tolist():
        t_b = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        out = model_fn(x, t_b)
        # scalar t for the step: the coefficients are shared by the batch
        prev = schedule.ddim_prev_timestep(t, num_inference_steps)
        x, _ = schedule.ddim_step(out, t, x, prev, eta, generator=generator)
    return x
