"""Denoising / distillation losses: hand-computed values, weights, masks and pseudo-Huber."""
import math

import pytest
import torch

from megadistill.diffusion.ddpm import DDPMSchedule
from megadistill.diffusion.flow_match import FlowMatchSchedule
from megadistill.diffusion.losses import (
    denoising_loss,
    denoising_target,
    denoising_weight,
    distillation_loss,
    reduce_loss,
)
from megadistill.diffusion.parameterization import convert_prediction

D = torch.float64


def test_hand_computed_values():
    pred = torch.tensor([[1.0, 2.0], [0.0, 0.0]], dtype=D)
    target = torch.tensor([[0.0, 0.0], [3.0, -1.0]], dtype=D)
    # per sample: l2 (1+4)/2 = 2.5, (9+1)/2 = 5 -> 3.75; l1 1.5, 2 -> 1.75
    assert distillation_loss(pred, target, "l2").item() == pytest.approx(3.75)
    assert distillation_loss(pred, target, "l1").item() == pytest.approx(1.75)
    w = torch.tensor([2.0, 0.5], dtype=D)
    assert distillation_loss(pred, target, "l2", weight=w).item() == pytest.approx((2 * 2.5 + 0.5 * 5) / 2)
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=D)
    assert distillation_loss(pred, target, "l2", mask=mask).item() == pytest.approx((1.0 + 5.0) / 2)
    empty = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=D)  # an all-masked sample contributes 0
    assert distillation_loss(pred, target, "l1", mask=empty).item() == pytest.approx(1.0)


def test_pseudo_huber_closed_form_and_limits():
    d = torch.tensor([[1e-4, -2e-4], [3.0, -5.0]], dtype=D)
    c = 0.01
    expect = [sum(math.sqrt(x * x + c * c) - c for x in row) / 2 for row in d.tolist()]
    assert distillation_loss(d, torch.zeros_like(d), "huber", huber_c=c).item() == pytest.approx(sum(expect) / 2)
    # quadratic d^2 / (2c) for |d| << c, linear |d| - c for |d| >> c
    small, large = d[:1], d[1:]
    z = torch.zeros(1, 2, dtype=D)
    assert distillation_loss(small, z, "huber", huber_c=c).item() == pytest.approx(
        (small**2 / (2 * c)).mean().item(), rel=1e-3
    )
    assert distillation_loss(large, z, "huber", huber_c=c).item() == pytest.approx(
        (large.abs() - c).mean().item(), rel=1e-4
    )
    with pytest.raises(ValueError, match="kind"):
        distillation_loss(d, d, "l3")
    with pytest.raises(ValueError, match="huber_c"):
        distillation_loss(d, d, "huber", huber_c=0.0)


def test_per_frame_weight_and_mask_broadcast():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 3, 4, 5, generator=g, dtype=D), torch.randn(2, 3, 4, 5, generator=g, dtype=D)
    w = torch.rand(2, 3, generator=g, dtype=D)  # [B, F]
    m = torch.tensor([[1, 1, 0], [0, 1, 1]], dtype=D)
    sq = (pred - target) ** 2
    per_frame = sq.mean(dim=(2, 3))  # [B, F]
    expect = ((per_frame * w * m).sum(1) / m.sum(1)).mean()
    assert torch.allclose(reduce_loss(sq, w, m), expect, atol=1e-14)
    assert torch.allclose(distillation_loss(pred, target, "l2", weight=w, mask=m), expect, atol=1e-14)


@pytest.mark.parametrize("kind", ["x0", "eps", "v", "flow"])
def test_denoising_targets_and_loss(kind):
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(4, 6, generator=g, dtype=D), torch.randn(4, 6, generator=g, dtype=D)
    alpha, sigma = DDPMSchedule().alpha_sigma(torch.tensor([10, 200, 600, 990]))
    x_t = alpha[:, None] * x0 + sigma[:, None] * eps
    target = denoising_target(x0, eps, alpha, sigma, kind)
    # the target is exactly what convert_prediction calls this type for the true x0
    assert torch.allclose(target, convert_prediction(x0, "x0", kind, x_t, alpha, sigma), atol=1e-12)
    pred = target + 0.1
    assert denoising_loss(pred, x0, eps, kind, alpha, sigma).item() == pytest.approx(0.01)
    with pytest.raises(ValueError, match="prediction_type"):
        denoising_target(x0, eps, alpha, sigma, "epsilon")


@pytest.mark.parametrize("kind", ["x0", "eps", "v", "flow"])
@pytest.mark.parametrize("weighting", ["snr", "min_snr"])
def test_snr_weights_are_the_same_x0_space_loss(kind, weighting):
    """A weighted loss in any prediction type equals w_x0 * ||x0 error||^2 (the conversion is affine)."""
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(5, 8, generator=g, dtype=D), torch.randn(5, 8, generator=g, dtype=D)
    sigma = torch.tensor([0.05, 0.2, 0.5, 0.8, 0.95], dtype=D)
    alpha = 1 - sigma  # flow family (any alpha, sigma works)
    x_t = alpha[:, None] * x0 + sigma[:, None] * eps
    x0_hat = x0 + 0.3 * torch.randn(5, 8, generator=g, dtype=D)
    pred = convert_prediction(x0_hat, "x0", kind, x_t, alpha, sigma)
    w = denoising_weight(weighting, kind, alpha, sigma, gamma=5.0)
    snr = (alpha / sigma) ** 2
    w_x0 = snr if weighting == "snr" else snr.clamp(max=5.0)
    expect = (w_x0 * ((x0_hat - x0) ** 2).mean(1)).mean()
    assert torch.allclose(denoising_loss(pred, x0, eps, kind, alpha, sigma, weight=w), expect, rtol=1e-10)


def test_min_snr_matches_paper_forms_for_vp():
    alpha, sigma = DDPMSchedule().alpha_sigma(torch.arange(0, 1000, 37))
    snr = alpha**2 / sigma**2
    gamma = 5.0
    eps_w = denoising_weight("min_snr", "eps", alpha, sigma, gamma)
    v_w = denoising_weight("min_snr", "v", alpha, sigma, gamma)
    assert torch.allclose(eps_w, snr.clamp(max=gamma) / snr, rtol=1e-10)
    assert torch.allclose(v_w, snr.clamp(max=gamma) / (snr + 1), rtol=1e-10)
    assert torch.allclose(denoising_weight("snr", "eps", alpha, sigma), torch.ones_like(snr), rtol=1e-10)


def test_upstream_weight_and_validation():
    sched = FlowMatchSchedule(shift=5.0)
    t = torch.tensor([[1000.0, 500.0], [20.0, 0.0]])  # per-frame timesteps [B, F]
    w = denoising_weight("upstream", "flow", timestep=t, schedule=sched)
    assert w.shape == (2, 2) and torch.equal(w, sched.training_weight(t))
    assert denoising_weight("none", "flow") is None
    with pytest.raises(ValueError, match="weighting"):
        denoising_weight("p2", "flow", 0.5, 0.5)
    with pytest.raises(ValueError, match="timestep"):
        denoising_weight("upstream", "flow")
