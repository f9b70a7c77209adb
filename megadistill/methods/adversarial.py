"""Adversarial losses and regularisers shared by the GAN and APT methods (pure functions).

Logits are raw discriminator outputs of any shape (e.g. [B] or [B, num_class]); every loss is a mean
over all elements, so one class or several behave the same way.

Losses (``kind``):
  * ``non_saturating``: G softplus(-D(f)); D softplus(-D(r)) + softplus(D(f))   (Goodfellow, APT)
  * ``hinge``:          G -D(f);          D relu(1 - D(r)) + relu(1 + D(f))
  * ``relativistic``:   G softplus(-(D(f) - D(r))); D softplus(-(D(r) - D(f)))  (RpGAN: real and
    fake paired element-wise, as Self-Forcing's ``relativistic_discriminator`` and SeedVR2)

Regularisers:
  * ``finite_difference_penalty``: the double-backward-free R1 (perturb reals) / R2 (perturb fakes) of
    APT / SeedVR2 / Self-Forcing. Scale: r = (D(x + sigma n) - D(x)) / sigma, penalty = mean(r^2).
    For n ~ N(0, I) and smooth D, E[r^2] -> ||grad_x D||^2 as sigma -> 0 (E[(g.n)^2] = ||g||^2), so the
    penalty is on the scale of the exact R1 ||grad D||^2 and Self-Forcing's r1_weight applies as is.
    The APT paper writes ||D(x) - D(x + N(0, sigma))||^2 = sigma^2 * r^2: an APT weight lambda at
    noise sigma equals a weight lambda * sigma^2 here (``apt_to_gradient_scale``).
  * ``feature_matching_loss``: SeedVR2's mean L1 between discriminator features of fake and real.
  * ``lazy_regularization_weight``: StyleGAN2 lazy regularisation (every k steps, scaled by k).

``cat_batch`` stacks two opaque conditions (tensors, dicts of tensors) so real and fake share one
discriminator forward of 2B. ``frozen`` switches a discriminator's parameters off for the generator
step (APT / SeedVR2 "D frozen during the G step"): gradients still flow through D to the generator's
samples, none accumulate in D.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn
import torch.nn.functional as F

GAN_LOSS_KINDS = ("non_saturating", "hinge", "relativistic")


def _check_kind(kind: str) -> None:
    if kind not in GAN_LOSS_KINDS:
        raise ValueError(f"unknown GAN loss kind {kind!r}; expected one of {GAN_LOSS_KINDS}")


# ---- generator / discriminator losses -----------------------------------------------------------
def non_saturating_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return F.softplus(-fake_logits).mean()


def non_saturating_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def hinge_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return -fake_logits.mean()


def hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()


def relativistic_generator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """RpGAN generator: each fake must out-score its paired real (gradient also reaches D(real) inputs)."""
    return F.softplus(-(fake_logits - real_logits)).mean()


def relativistic_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return F.softplus(-(real_logits - fake_logits)).mean()


def generator_adversarial_loss(
    kind: str, real_logits: Optional[torch.Tensor], fake_logits: torch.Tensor
) -> torch.Tensor:
    """Dispatch on ``kind``; ``real_logits`` is only read by the relativistic loss."""
    _check_kind(kind)
    if kind == "non_saturating":
        return non_saturating_generator_loss(fake_logits)
    if kind == "hinge":
        return hinge_generator_loss(fake_logits)
    if real_logits is None:
        raise ValueError("the relativistic generator loss needs real_logits")
    return relativistic_generator_loss(real_logits, fake_logits)


def discriminator_adversarial_loss(kind: str, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    _check_kind(kind)
    if kind == "non_saturating":
        return non_saturating_discriminator_loss(real_logits, fake_logits)
    if kind == "hinge":
        return hinge_discriminator_loss(real_logits, fake_logits)
    return relativistic_discriminator_loss(real_logits, fake_logits)


# ---- regularisers -------------------------------------------------------------------------------
def finite_difference_penalty(
    d_fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    sigma: float,
    d_x: Optional[torch.Tensor] = None,
    noise: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Approximate R1 (x = reals) / R2 (x = fakes): mean(((D(x + sigma n) - D(x)) / sigma)^2), n ~ N(0, I).

    ``d_x`` reuses an already computed D(x) (the adversarial loss has it); gradients flow through
    both evaluations, as upstream. ``x`` is treated as data: detach it if it carries generator graph.
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    if noise is None:
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    if d_x is None:
        d_x = d_fn(x)
    r = (d_fn(x + sigma * noise) - d_x) / sigma
    return r.pow(2).mean()


def apt_to_gradient_scale(weight: float, sigma: float) -> float:
    """APT's lambda on ||D(x) - D(x + N(0, sigma))||^2 expressed as a weight on mean(r^2)."""
    return weight * sigma**2


def feature_matching_loss(fake_features: Sequence[torch.Tensor], real_features: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over layers of the mean absolute difference (SeedVR2; pass real features detached)."""
    if len(fake_features) != len(real_features) or not fake_features:
        raise ValueError(
            "need the same non-zero number of fake and real feature maps, "
            f"got {len(fake_features)} and {len(real_features)}"
        )
    per_layer = [(f - r).abs().mean() for f, r in zip(fake_features, real_features)]
    return torch.stack(per_layer).mean()


def lazy_regularization_weight(step: int, interval: int) -> float:
    """StyleGAN2 lazy regularisation: apply every ``interval`` steps with weight ``interval`` (else 0).

    Keeps the expected penalty unchanged while paying for it once per interval.
    """
    if interval < 1:
        raise ValueError(f"interval must be >= 1, got {interval}")
    return float(interval) if step % interval == 0 else 0.0


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Temporarily set requires_grad=False on every parameter of ``module``; restores the flags."""
    params = list(module.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def cat_batch(a: Any, b: Any) -> Any:
    """Concatenate two conditions along the batch dim: tensors, (nested) dicts of tensors, dataclasses
    of them (a family's condition, field by field), or None.

    Lists are refused: a list may be per-sample (concatenate) or per-field (zip), and guessing wrong
    would silently mis-pair conditions.
    """
    if a is None and b is None:
        return None
    if torch.is_tensor(a) and torch.is_tensor(b):
        return torch.cat([a, b], dim=0)
    if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        return {k: cat_batch(a[k], b[k]) for k in a}
    if dataclasses.is_dataclass(a) and not isinstance(a, type) and type(a) is type(b):
        fields = [f.name for f in dataclasses.fields(a) if f.init]
        return dataclasses.replace(a, **{n: cat_batch(getattr(a, n), getattr(b, n)) for n in fields})
    raise TypeError(f"cannot batch conditions of types {type(a).__name__} and {type(b).__name__}")
