"""x0 / eps / v / flow conversions: float64 round trips for both families, and the named helpers
against the defining equations x_t = alpha x0 + sigma eps, v = alpha eps - sigma x0, flow = eps - x0."""
import itertools

import pytest
import torch

from megadistill.diffusion import parameterization as P
from megadistill.diffusion.ddpm import DDPMSchedule

B = 5


def _family(name):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(B, 3, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(B, 3, 4, generator=g, dtype=torch.float64)
    if name == "flow":
        sigma = torch.tensor([0.02, 0.3, 0.5, 0.77, 0.98], dtype=torch.float64)
        alpha = 1 - sigma
    else:
        alpha, sigma = DDPMSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alpha_sigma(
            torch.tensor([0, 100, 500, 900, 999])
        )
    a, s = alpha[:, None, None], sigma[:, None, None]
    x_t = a * x0 + s * eps
    truth = {"x0": x0, "eps": eps, "v": a * eps - s * x0, "flow": eps - x0}
    return x_t, alpha, sigma, truth


@pytest.mark.parametrize("family", ["flow", "ddpm"])
def test_convert_prediction_all_pairs(family):
    x_t, alpha, sigma, truth = _family(family)
    for src, dst in itertools.product(P.PREDICTIONS, repeat=2):
        out = P.convert_prediction(truth[src], src, dst, x_t, alpha, sigma)
        # truth within 1e-12 and a round trip back to 1e-12
        assert torch.allclose(out, truth[dst], rtol=0, atol=1e-12), (src, dst)
        back = P.convert_prediction(out, dst, src, x_t, alpha, sigma)
        assert torch.allclose(back, truth[src], rtol=0, atol=1e-12), (src, dst)


def test_flow_helpers():
    x_t, _, sigma, t = _family("flow")
    assert torch.allclose(P.flow_to_x0(t["flow"], x_t, sigma), t["x0"], atol=1e-12)
    assert torch.allclose(P.flow_to_eps(t["flow"], x_t, sigma), t["eps"], atol=1e-12)
    assert torch.allclose(P.x0_to_flow(t["x0"], x_t, sigma), t["flow"], atol=1e-12)
    assert torch.allclose(P.eps_to_flow(t["eps"], x_t, sigma), t["flow"], atol=1e-12)
    assert torch.allclose(P.x0_to_eps_flow(t["x0"], x_t, sigma), t["eps"], atol=1e-12)
    assert torch.allclose(P.eps_to_x0_flow(t["eps"], x_t, sigma), t["x0"], atol=1e-12)


def test_ddpm_helpers():
    x_t, a, s, t = _family("ddpm")
    pairs = [
        (P.ddpm_x0_from_eps, "eps", "x0"), (P.ddpm_eps_from_x0, "x0", "eps"),
        (P.ddpm_x0_from_v, "v", "x0"), (P.ddpm_eps_from_v, "v", "eps"),
        (P.ddpm_v_from_x0, "x0", "v"), (P.ddpm_v_from_eps, "eps", "v"),
    ]
    for fn, src, dst in pairs:
        assert torch.allclose(fn(t[src], x_t, a, s), t[dst], rtol=0, atol=1e-12), fn.__name__


def test_ddpm_helpers_without_vp_identity():
    """alpha^2 + sigma^2 != 1 (e.g. an un-normalised or EDM-like scaling): still exact."""
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(3, 7, generator=g, dtype=torch.float64), torch.randn(3, 7, generator=g, dtype=torch.float64)
    a, s = torch.tensor([0.9, 0.5, 2.0], dtype=torch.float64), torch.tensor([0.2, 1.5, 0.7], dtype=torch.float64)
    x_t = a[:, None] * x0 + s[:, None] * eps
    v = a[:, None] * eps - s[:, None] * x0
    assert torch.allclose(P.ddpm_x0_from_v(v, x_t, a, s), x0, atol=1e-12)
    assert torch.allclose(P.ddpm_eps_from_v(v, x_t, a, s), eps, atol=1e-12)
    assert torch.allclose(P.convert_prediction(v, "v", "flow", x_t, a, s), eps - x0, atol=1e-12)


def test_bad_type_is_named():
    with pytest.raises(ValueError, match="to_type"):
        P.convert_prediction(torch.zeros(1), "x0", "epsilon", torch.zeros(1), 1.0, 0.5)
