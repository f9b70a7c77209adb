"""Conversions between x0 / eps / v / flow predictions for both diffusion families.

Every function is pure and works in the dtype it is given (tests call them in float64).

Flow family (rectified flow, the video DiTs): x_t = (1 - sigma) x0 + sigma eps, flow v = eps - x0.
DDPM family (Gaussian VP): x_t = alpha x0 + sigma eps with alpha = sqrt(alphas_cumprod),
sigma = sqrt(1 - alphas_cumprod); v-prediction v = alpha eps - sigma x0.

Both are x_t = alpha x0 + sigma eps (flow: alpha = 1 - sigma), so ``convert_prediction`` handles any
pair of x0 / eps / v / flow for either family. The DDPM helpers keep alpha and sigma separate and do
not assume alpha^2 + sigma^2 = 1, which makes every round trip exact up to rounding.
"""
from __future__ import annotations

import torch

from .flow_match import _expand_like


def _b(coef, x: torch.Tensor) -> torch.Tensor:
    return _expand_like(torch.as_tensor(coef, dtype=x.dtype, device=x.device), x)


# ---- flow family -------------------------------------------------------------------------------
def flow_to_x0(v: torch.Tensor, x_t: torch.Tensor, sigma) -> torch.Tensor:
    return x_t - _b(sigma, x_t) * v


def flow_to_eps(v: torch.Tensor, x_t: torch.Tensor, sigma) -> torch.Tensor:
    return x_t + (1.0 - _b(sigma, x_t)) * v


def x0_to_flow(x0: torch.Tensor, x_t: torch.Tensor, sigma) -> torch.Tensor:
    """v = (x_t - x0) / sigma; undefined at sigma = 0."""
    return (x_t - x0) / _b(sigma, x_t)


def eps_to_flow(eps: torch.Tensor, x_t: torch.Tensor, sigma) -> torch.Tensor:
    """v = (eps - x_t) / (1 - sigma); undefined at sigma = 1."""
    return (eps - x_t) / (1.0 - _b(sigma, x_t))


def x0_to_eps_flow(x0: torch.Tensor, x_t: torch.Tensor, sigma) -> torch.Tensor:
    s = _b(sigma, x_t)
    return (x_t - (1.0 - s) * x0) / s


def eps_to_x0_flow(eps: torch.Tensor, x_t: torch.Tensor, sigma) -> torch.Tensor:
    s = _b(sigma, x_t)
    return (x_t - s * eps) / (1.0 - s)


# ---- DDPM family (x_t = alpha x0 + sigma eps, v = alpha eps - sigma x0) -----------------------------
def ddpm_x0_from_eps(eps: torch.Tensor, x_t: torch.Tensor, alpha, sigma) -> torch.Tensor:
    return (x_t - _b(sigma, x_t) * eps) / _b(alpha, x_t)


def ddpm_eps_from_x0(x0: torch.Tensor, x_t: torch.Tensor, alpha, sigma) -> torch.Tensor:
    return (x_t - _b(alpha, x_t) * x0) / _b(sigma, x_t)


def ddpm_x0_from_v(v: torch.Tensor, x_t: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """x0 = (alpha x_t - sigma v) / (alpha^2 + sigma^2); the familiar alpha x_t - sigma v for VP."""
    a, s = _b(alpha, x_t), _b(sigma, x_t)
    return (a * x_t - s * v) / (a * a + s * s)


def ddpm_eps_from_v(v: torch.Tensor, x_t: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """eps = (sigma x_t + alpha v) / (alpha^2 + sigma^2)."""
    a, s = _b(alpha, x_t), _b(sigma, x_t)
    return (s * x_t + a * v) / (a * a + s * s)


def ddpm_v_from_x0(x0: torch.Tensor, x_t: torch.Tensor, alpha, sigma) -> torch.Tensor:
    return _b(alpha, x_t) * ddpm_eps_from_x0(x0, x_t, alpha, sigma) - _b(sigma, x_t) * x0


def ddpm_v_from_eps(eps: torch.Tensor, x_t: torch.Tensor, alpha, sigma) -> torch.Tensor:
    return _b(alpha, x_t) * eps - _b(sigma, x_t) * ddpm_x0_from_eps(eps, x_t, alpha, sigma)


# ---- generic ----------------------------------------------------------------------------------------
PREDICTIONS = ("x0", "eps", "v", "flow")


def _to_x0_eps(pred: torch.Tensor, kind: str, x_t: torch.Tensor, a: torch.Tensor, s: torch.Tensor):
    if kind == "x0":
        return pred, (x_t - a * pred) / s
    if kind == "eps":
        return (x_t - s * pred) / a, pred
    if kind == "v":
        n = a * a + s * s
        return (a * x_t - s * pred) / n, (s * x_t + a * pred) / n
    # flow u = eps - x0: x_t = (a + s) x0 + s u
    x0 = (x_t - s * pred) / (a + s)
    return x0, x0 + pred


def convert_prediction(pred: torch.Tensor, from_type: str, to_type: str, x_t: torch.Tensor, alpha, sigma):
    """Convert a prediction between ``x0``, ``eps``, ``v`` (alpha eps - sigma x0) and ``flow`` (eps - x0).

    Works for any x_t = alpha x0 + sigma eps: pass alpha = sqrt(alphas_cumprod), sigma = sqrt(1 -
    alphas_cumprod) for DDPM, alpha = 1 - sigma for the flow family. alpha / sigma are scalars or
    [B] (or [B, F]) tensors, right-padded to x_t. Going through x0 needs alpha > 0, through eps sigma > 0.
    """
    for name, kind in (("from_type", from_type), ("to_type", to_type)):
        if kind not in PREDICTIONS:
            raise ValueError(f"{name} must be one of {PREDICTIONS}, got {kind!r}")
    if from_type == to_type:
        return pred
    a, s = _b(alpha, x_t), _b(sigma, x_t)
    x0, eps = _to_x0_eps(pred, from_type, x_t, a, s)
    return {"x0": x0, "eps": eps, "v": a * eps - s * x0, "flow": eps - x0}[to_type]
