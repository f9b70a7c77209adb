"""Classifier-free guidance: the upstream form cond + g (cond - uncond) is standard CFG at g + 1."""
import pytest
import torch

from megadistill.diffusion.guidance import cfg, cfg_upstream, guided, upstream_to_standard
from megadistill.diffusion.parameterization import convert_prediction


def test_upstream_is_standard_plus_one():
    g = torch.Generator().manual_seed(0)
    c, u = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(4, 6, generator=g, dtype=torch.float64)
    for scale in (0.0, 1.0, 3.0, 5.5):
        assert torch.allclose(cfg_upstream(c, u, scale), cfg(c, u, scale + 1), rtol=0, atol=1e-14)
        assert torch.allclose(cfg_upstream(c, u, scale), c + scale * (c - u), rtol=0, atol=1e-14)
    assert upstream_to_standard(3.0) == 4.0
    assert torch.allclose(cfg(c, u, 1.0), c, atol=1e-14) and torch.equal(cfg(c, u, 0.0), u)


def test_guided_callable():
    calls = {"u": 0}
    cond = lambda x, t: 2 * x + t  # noqa: E731

    def uncond(x, t):
        calls["u"] += 1
        return x - t

    x, t = torch.randn(3, 2, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)
    assert torch.allclose(guided(cond, uncond, 3.0, "upstream")(x, t), guided(cond, uncond, 4.0)(x, t), atol=1e-14)
    assert torch.allclose(guided(cond, uncond, 4.0)(x, t), cfg(cond(x, t), uncond(x, t), 4.0))
    n = calls["u"]
    assert torch.equal(guided(cond, uncond, 1.0)(x, t), cond(x, t)) and calls["u"] == n  # no-op skips uncond
    assert torch.equal(guided(cond, uncond, 0.0, "upstream")(x, t), cond(x, t)) and calls["u"] == n
    with pytest.raises(ValueError, match="form"):
        guided(cond, uncond, 2.0, form="dmd")


def test_cfg_commutes_with_prediction_conversion():
    """CFG is an affine combination, so guiding x0 predictions == guiding flow predictions (same x_t)."""
    g = torch.Generator().manual_seed(1)
    x_t, c, u = (torch.randn(2, 5, generator=g, dtype=torch.float64) for _ in range(3))
    sigma = torch.tensor([0.3, 0.8], dtype=torch.float64)
    to_x0 = lambda p: convert_prediction(p, "flow", "x0", x_t, 1 - sigma, sigma)  # noqa: E731
    assert torch.allclose(to_x0(cfg(c, u, 4.0)), cfg(to_x0(c), to_x0(u), 4.0), atol=1e-12)
