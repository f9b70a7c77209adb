"""Adversarial losses and regularisers against hand-computed values and autograd."""
import math

import pytest
import torch

from megadistill.methods import adversarial as adv


def _t(*v):
    return torch.tensor(v, dtype=torch.float64)


def sp(x):  # softplus by hand
    return math.log1p(math.exp(x))


def test_non_saturating_losses_hand_values():
    real, fake = _t(2.0, -1.0), _t(0.0, math.log(3.0))
    g = adv.non_saturating_generator_loss(fake)
    assert g.item() == pytest.approx((math.log(2.0) + math.log(4.0 / 3.0)) / 2, abs=1e-12)
    d = adv.non_saturating_discriminator_loss(real, fake)
    want = (sp(-2.0) + sp(1.0)) / 2 + (sp(0.0) + sp(math.log(3.0))) / 2
    assert d.item() == pytest.approx(want, abs=1e-12)


def test_hinge_losses_hand_values():
    real, fake = _t(2.0, 0.5, -1.0), _t(-2.0, 0.0, 0.5)
    assert adv.hinge_generator_loss(fake).item() == pytest.approx(1.5 / 3, abs=1e-12)  # -mean(-2, 0, 0.5)
    # relu(1 - r) = [0, 0.5, 2] ; relu(1 + f) = [0, 1, 1.5]
    assert adv.hinge_discriminator_loss(real, fake).item() == pytest.approx(2.5 / 3 + 2.5 / 3, abs=1e-12)


def test_relativistic_losses_hand_values_and_pairing():
    real, fake = _t(1.0, -2.0), _t(0.0, 1.0)
    g = adv.relativistic_generator_loss(real, fake)
    assert g.item() == pytest.approx((sp(1.0) + sp(-3.0)) / 2, abs=1e-12)
    d = adv.relativistic_discriminator_loss(real, fake)
    assert d.item() == pytest.approx((sp(-1.0) + sp(3.0)) / 2, abs=1e-12)
    # RpGAN pairs element-wise: permuting only the fakes changes the value
    assert adv.relativistic_discriminator_loss(real, fake.flip(0)).item() != pytest.approx(d.item())
    # D's loss is G's loss with the roles swapped
    assert adv.relativistic_discriminator_loss(real, fake).item() == pytest.approx(
        adv.relativistic_generator_loss(fake, real).item()
    )


def test_dispatch_matches_named_functions_and_rejects_unknown():
    real, fake = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    assert torch.equal(adv.generator_adversarial_loss("hinge", None, fake), adv.hinge_generator_loss(fake))
    ns = adv.generator_adversarial_loss("non_saturating", None, fake)
    assert torch.equal(ns, adv.non_saturating_generator_loss(fake))
    rp = adv.generator_adversarial_loss("relativistic", real, fake)
    assert torch.equal(rp, adv.relativistic_generator_loss(real, fake))
    assert torch.equal(
        adv.discriminator_adversarial_loss("relativistic", real, fake), adv.relativistic_discriminator_loss(real, fake)
    )
    with pytest.raises(ValueError, match="wgan"):
        adv.generator_adversarial_loss("wgan", real, fake)
    with pytest.raises(ValueError, match="real_logits"):
        adv.generator_adversarial_loss("relativistic", None, fake)


def test_finite_difference_penalty_linear_d_is_exact():
    # D(x) = x . w: r = n . w exactly, whatever sigma
    w = _t(1.0, -2.0, 0.5)
    x = torch.randn(4, 3, dtype=torch.float64)
    n = torch.randn(4, 3, dtype=torch.float64)
    pen = adv.finite_difference_penalty(lambda z: z @ w, x, sigma=0.3, noise=n)
    assert pen.item() == pytest.approx(((n @ w) ** 2).mean().item(), rel=1e-12)


def test_finite_difference_penalty_matches_autograd_gradient_norm():
    """E[r^2] -> ||grad_x D||^2 for small sigma (the exact R1/R2 the approximation stands for)."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(16, 6, generator=g, dtype=torch.float64) / 2
    a = torch.randn(16, generator=g, dtype=torch.float64)

    def d_fn(z):
        return torch.tanh(z @ W.T) @ a

    x = torch.randn(8, 6, generator=g, dtype=torch.float64).requires_grad_(True)
    (grad,) = torch.autograd.grad(d_fn(x).sum(), x)
    exact = grad.pow(2).sum(1).mean().item()
    reps = 4000  # relative Monte-Carlo error ~ sqrt(2 / (8 * reps)) = 0.8 %
    xr = x.detach().repeat(reps, 1)
    pen = adv.finite_difference_penalty(d_fn, xr, sigma=1e-4, generator=g).item()
    assert pen == pytest.approx(exact, rel=0.04)
    # APT's raw form ||D(x) - D(x + sigma n)||^2 is sigma^2 times the gradient-scale penalty
    n = torch.randn(xr.shape, generator=g, dtype=torch.float64)
    sigma = 0.01
    raw = (d_fn(xr) - d_fn(xr + sigma * n)).pow(2).mean().item()
    scaled = adv.apt_to_gradient_scale(1.0, sigma) * adv.finite_difference_penalty(d_fn, xr, sigma, noise=n).item()
    assert scaled == pytest.approx(raw, rel=1e-9)


def test_finite_difference_penalty_reuses_d_x_and_backpropagates_to_d():
    w = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 2, dtype=torch.float64)
    n = torch.randn(3, 2, dtype=torch.float64)
    d_x = torch.tanh(x @ w)
    pen = adv.finite_difference_penalty(lambda z: torch.tanh(z @ w), x, 0.05, d_x=d_x, noise=n)
    ref = adv.finite_difference_penalty(lambda z: torch.tanh(z @ w), x, 0.05, noise=n)
    assert pen.item() == pytest.approx(ref.item(), rel=1e-12)
    pen.backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="sigma"):
        adv.finite_difference_penalty(lambda z: z.sum(1), x, 0.0)


def test_feature_matching_hand_value():
    f = [_t(1.0, 2.0).reshape(1, 1, 2), _t(0.0, 0.0, 0.0, 4.0).reshape(1, 2, 2)]
    r = [_t(0.0, 0.0).reshape(1, 1, 2), _t(1.0, 1.0, 1.0, 1.0).reshape(1, 2, 2)]
    # layer 0: mean(|1|,|2|) = 1.5; layer 1: mean(1,1,1,3) = 1.5
    assert adv.feature_matching_loss(f, r).item() == pytest.approx(1.5)
    with pytest.raises(ValueError):
        adv.feature_matching_loss(f, r[:1])


def test_lazy_regularization_weight_keeps_expected_value():
    weights = [adv.lazy_regularization_weight(s, 4) for s in range(16)]
    assert weights[0] == 4.0 and weights[1] == 0.0 and weights[4] == 4.0
    assert sum(weights) / len(weights) == pytest.approx(1.0)
    assert adv.lazy_regularization_weight(7, 1) == 1.0
    with pytest.raises(ValueError):
        adv.lazy_regularization_weight(0, 0)


def test_cat_batch_concatenates_dataclass_conditions_field_by_field():
    from megadistill.methods.adversarial import cat_batch
    from megadistill.models.wan.denoiser import WanCondition

    a = WanCondition(torch.randn(2, 3, 4), first_frame=torch.randn(2, 5, 1, 2, 2))
    b = WanCondition(torch.randn(1, 3, 4), first_frame=torch.randn(1, 5, 1, 2, 2))
    out = cat_batch(a, b)
    assert isinstance(out, WanCondition) and out.y is None and out.clip_fea is None
    assert torch.equal(out.context, torch.cat([a.context, b.context]))
    assert torch.equal(out.first_frame, torch.cat([a.first_frame, b.first_frame]))
    with pytest.raises(TypeError):
        cat_batch(a, {"context": b.context})
