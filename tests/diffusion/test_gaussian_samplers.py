"""Samplers on an analytic target: data x0 ~ N(mu, diag(S^2)), so for x_t = a x0 + s eps the exact
posterior is Gaussian and E[x0 | x_t], E[eps | x_t] and the flow E[eps - x0 | x_t] are closed form.

Euler (exact flow) and DDIM eta = 0 (exact eps) are affine maps of the starting sample, so we feed
whitened starting noise (per-dim sample mean 0, std 1 exactly): the output's sample mean / std then
equal the map's offset / gain, and the only error left is discretisation, which allows tight bounds.
"""
import pytest
import torch

from megadistill.diffusion.ddpm import DDPMSchedule
from megadistill.diffusion.flow_match import warp_step_list
from megadistill.diffusion.samplers import (
    ddim_sample,
    euler_flow_sample,
    few_step_sample,
    flow_inference_sigmas,
)

MU = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64)
S = torch.tensor([0.5, 1.5, 1.0], dtype=torch.float64)


def posterior(x, a, s):
    """(E[x0 | x_t], E[eps | x_t]) for x_t = a x0 + s eps; a, s are [B] tensors."""
    a, s = a[:, None], s[:, None]
    r = (x - a * MU) / (a * a * S * S + s * s)
    return MU + a * S * S * r, s * r


def whitened(n, d=3, seed=0):
    z = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = z - z.mean(0)
    return z / z.std(0)


def flow_v(x, t):
    sigma = t / 1000
    x0, eps = posterior(x, 1 - sigma, sigma)
    return eps - x0


def flow_x0(x, t):
    sigma = t / 1000
    return posterior(x, 1 - sigma, sigma)[0]


def _std_err(out):
    return (out.std(0) / S - 1).abs().max().item()


@pytest.mark.parametrize("shift,tol", [(1.0, 2e-3), (5.0, 5e-3)])
def test_euler_flow_reaches_exact_marginal(shift, tol):
    out = euler_flow_sample(flow_v, whitened(512), flow_inference_sigmas(1000, shift=shift))
    assert torch.allclose(out.mean(0), MU, atol=1e-10)  # the offset is exact at any step count
    assert _std_err(out) < tol
    # the remaining error is Euler's first-order discretisation: 4x the steps, 1/4 of the error
    finer = euler_flow_sample(flow_v, whitened(512), flow_inference_sigmas(4000, shift=shift))
    assert 3.5 < _std_err(out) / _std_err(finer) < 4.5


def test_ddim_eta0_reaches_exact_marginal():
    sched = DDPMSchedule(prediction_type="epsilon", timestep_spacing="trailing")

    def eps_fn(x, t):
        a, s = sched.alpha_sigma(t)
        return posterior(x, a, s)[1]

    # start from the exact marginal at the first timestep (alpha_bar_999 ~ 4e-5 is not exactly 0)
    a, s = sched.alpha_sigma(999)
    x_T = a * MU + torch.sqrt(a * a * S * S + s * s) * whitened(512)
    out = ddim_sample(eps_fn, x_T, sched, 1000)
    assert torch.allclose(out.mean(0), MU, atol=1e-10)
    assert _std_err(out) < 4e-3
    coarse = ddim_sample(eps_fn, x_T, sched, 100)  # first order in the step count
    assert 8 < _std_err(coarse) / _std_err(out) < 12


def test_ddim_eta1_ancestral_reaches_marginal_statistically():
    """eta = 1 (the DDPM chain, all 1000 steps) with the exact E[x0 | x_t]; random, so bounds are
    4 standard errors, plus 1% on the std for the ancestral sampler's discretisation bias (~0.6%)."""
    sched = DDPMSchedule(prediction_type="sample", timestep_spacing="trailing")

    def x0_fn(x, t):
        a, s = sched.alpha_sigma(t)
        return posterior(x, a, s)[0]

    n = 10000
    a, s = sched.alpha_sigma(999)
    g = torch.Generator().manual_seed(0)
    x_T = a * MU + torch.sqrt(a * a * S * S + s * s) * torch.randn(n, 3, generator=g, dtype=torch.float64)
    out = ddim_sample(x0_fn, x_T, sched, 1000, eta=1.0, generator=g)
    assert ((out.mean(0) - MU).abs() < 4 * S / n**0.5).all()
    assert ((out.std(0) - S).abs() < 4 * S / (2 * n) ** 0.5 + 1e-2 * S).all()


def test_few_step_one_step_exact_predictor_gives_the_mean():
    """At sigma = 1 the input is pure noise, independent of x0, so the exact (MMSE) predictor
    E[x0 | x_1] is the data mean: every sample collapses to mu. This mean-collapse is why a
    one-step student cannot be trained by regression onto x0 and needs distribution matching."""
    out = few_step_sample(flow_x0, torch.randn(64, 3, dtype=torch.float64), [1000.0])
    assert torch.allclose(out, MU.expand(64, 3), atol=1e-12)


def test_few_step_renoising_matches_variance_recursion():
    """With re-noising the sample mean stays mu, and the std follows the exact recursion
    Var(x0_hat) = k^2 Var(x), Var(x_next) = a'^2 Var(x0_hat) + s'^2 with k = a S^2 / (a^2 S^2 + s^2):
    below S, i.e. the MMSE predictor under-disperses at every step count."""
    steps = warp_step_list([1000, 750, 500, 250], shift=5.0).tolist()
    n = 40000
    out = few_step_sample(flow_x0, torch.randn(n, 3, dtype=torch.float64), steps, torch.Generator().manual_seed(0))
    var = torch.ones(3, dtype=torch.float64)
    for i, t in enumerate(steps):
        sig = t / 1000
        a, s = 1 - sig, sig
        var_x0 = (a * S * S / (a * a * S * S + s * s)) ** 2 * var
        if i + 1 < len(steps):
            sn = steps[i + 1] / 1000
            var = (1 - sn) ** 2 * var_x0 + sn**2
    std = var_x0.sqrt()
    assert (std < 0.95 * S).all()
    assert ((out.mean(0) - MU).abs() < 4 * std / n**0.5).all()
    assert ((out.std(0) - std).abs() < 4 * std / (2 * n) ** 0.5).all()
