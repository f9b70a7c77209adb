"""Denoising and distillation losses (pure functions).

Both reduce the same way: elementwise loss, times an optional elementwise-broadcast weight, averaged
over each sample's (masked) elements, then averaged over the batch. ``weight`` and ``mask`` may be
[B], [B, F] (per frame) or full shape; they are right-padded to the prediction's rank.

Weights for the denoising loss (``denoising_weight``) are expressed for the chosen prediction type:
an error in prediction type p equals c_p times an error in x0 (c_x0 = 1, c_eps = sigma / alpha,
c_v = sigma / (alpha^2 + sigma^2), c_flow = sigma / (alpha + sigma)), so a weight w_x0 in x0 space
becomes w_x0 * c_p^2. Min-SNR-gamma (Hang et al. 2023) is w_x0 = min(SNR, gamma), which gives their
min(SNR, gamma) / SNR for eps and min(SNR, gamma) / (SNR + 1) for v.
"""
from __future__ import annotations

from typing import Optional

import torch

from .flow_match import FlowMatchSchedule, _expand_like
from .parameterization import PREDICTIONS

LOSS_KINDS = ("l2", "l1", "huber")
WEIGHTINGS = ("none", "upstream", "snr", "min_snr")


def reduce_loss(
    elementwise: torch.Tensor, weight: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Weighted, masked per-sample mean, then batch mean. A sample with an empty mask contributes 0."""
    if weight is not None:
        elementwise = elementwise * _expand_like(weight.to(elementwise.dtype), elementwise)
    dims = tuple(range(1, elementwise.dim()))
    if mask is None:
        per_sample = elementwise.mean(dim=dims) if dims else elementwise
    else:
        m = _expand_like(mask.to(elementwise.dtype), elementwise).expand_as(elementwise)
        per_sample = (elementwise * m).sum(dim=dims) / m.sum(dim=dims).clamp_min(torch.finfo(m.dtype).tiny)
    return per_sample.mean()


def denoising_target(x0: torch.Tensor, eps: torch.Tensor, alpha, sigma, prediction_type: str) -> torch.Tensor:
    """What a network of the given prediction type should output for x_t = alpha x0 + sigma eps."""
    if prediction_type == "x0":
        return x0
    if prediction_type == "eps":
        return eps
    if prediction_type == "flow":
        return eps - x0
    if prediction_type == "v":
        a = _expand_like(torch.as_tensor(alpha, dtype=x0.dtype, device=x0.device), x0)
        s = _expand_like(torch.as_tensor(sigma, dtype=x0.dtype, device=x0.device), x0)
        return a * eps - s * x0
    raise ValueError(f"prediction_type must be one of {PREDICTIONS}, got {prediction_type!r}")


def x0_error_scale(alpha, sigma, prediction_type: str) -> torch.Tensor:
    """c_p with (x0 error) = c_p * (prediction error) at fixed x_t; see the module docstring."""
    a = torch.as_tensor(alpha, dtype=torch.float64)
    s = torch.as_tensor(sigma, dtype=torch.float64)
    scale = {"x0": torch.ones_like(s), "eps": s / a, "v": s / (a * a + s * s), "flow": s / (a + s)}
    if prediction_type not in scale:
        raise ValueError(f"prediction_type must be one of {PREDICTIONS}, got {prediction_type!r}")
    return scale[prediction_type]


def denoising_weight(
    weighting: str,
    prediction_type: str,
    alpha=None,
    sigma=None,
    gamma: float = 5.0,
    timestep=None,
    schedule: Optional[FlowMatchSchedule] = None,
) -> Optional[torch.Tensor]:
    """Per-sample (or per-frame) loss weight, float64, or None for ``none``.

    ``upstream``: FlowMatch training weight of ``timestep`` on ``schedule`` (as Self-Forcing's
    diffusion loss); ``snr``: w_x0 = SNR = alpha^2 / sigma^2 (i.e. the plain eps-loss, for any
    prediction type); ``min_snr``: w_x0 = min(SNR, gamma).
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if weighting == "none":
        return None
    if weighting == "upstream":
        if timestep is None or schedule is None:
            raise ValueError("weighting 'upstream' needs timestep and schedule")
        return schedule.training_weight(timestep)
    if alpha is None or sigma is None:
        raise ValueError(f"weighting {weighting!r} needs alpha and sigma")
    a = torch.as_tensor(alpha, dtype=torch.float64)
    s = torch.as_tensor(sigma, dtype=torch.float64)
    snr = (a / s) ** 2
    w_x0 = snr if weighting == "snr" else snr.clamp(max=gamma)
    return w_x0 * x0_error_scale(a, s, prediction_type) ** 2


def denoising_loss(
    pred: torch.Tensor,
    x0: torch.Tensor,
    eps: torch.Tensor,
    prediction_type: str,
    alpha=None,
    sigma=None,
    weight: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """MSE between ``pred`` and the target of ``prediction_type`` (alpha/sigma needed only for ``v``)."""
    target = denoising_target(x0, eps, alpha, sigma, prediction_type)
    return reduce_loss((pred - target) ** 2, weight, mask)


def distillation_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    kind: str = "l2",
    huber_c: float = 1e-3,
    weight: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Regression of a student output onto a (detached by the caller) teacher target.

    ``l2``: d^2; ``l1``: |d|; ``huber``: pseudo-Huber sqrt(d^2 + c^2) - c per element (quadratic
    d^2 / 2c near 0, linear |d| far away; as in the LCM training scripts). ``weight`` is e.g. a
    per-sample SNR weight from ``denoising_weight``.
    """
    d = pred - target
    if kind == "l2":
        elementwise = d * d
    elif kind == "l1":
        elementwise = d.abs()
    elif kind == "huber":
        if huber_c <= 0:
            raise ValueError(f"huber_c must be > 0, got {huber_c}")
        elementwise = torch.sqrt(d * d + huber_c**2) - huber_c
    else:
        raise ValueError(f"kind must be one of {LOSS_KINDS}, got {kind!r}")
    return reduce_loss(elementwise, weight, mask)
