"""The lab's sample distance: zero on identical sets, linear in a shift, symmetric, per class."""
import math

import pytest
import torch

from megadistill.toylab.distance import per_class_distance, projection_directions, sliced_wasserstein


def test_identical_sets_are_at_zero_and_permutation_invariant():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 2, generator=g)
    u = projection_directions(2, 64, 0)
    assert sliced_wasserstein(a, a, u) == 0.0
    assert sliced_wasserstein(a, a[torch.randperm(500, generator=g)], u) == pytest.approx(0.0, abs=1e-12)


def test_shift_grows_linearly_and_monotonically():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(400, 2, generator=g)
    u = projection_directions(2, 256, 3)
    e = torch.tensor([0.6, 0.8])
    scale = float((u @ e.double()).abs().mean())  # closed form: SW1(a, a + d e) = |d| mean_u |u.e|
    dists = [sliced_wasserstein(a, a + d * e, u) for d in (0.05, 0.1, 0.2, 0.4, 0.8)]
    assert all(x < y for x, y in zip(dists, dists[1:]))
    for d, dist in zip((0.05, 0.1, 0.2, 0.4, 0.8), dists):
        assert dist == pytest.approx(d * scale, rel=1e-6)
    # Projections are unit vectors spread over the circle: mean |cos| = 2 / pi.
    assert scale == pytest.approx(2 / math.pi, rel=0.05)


def test_symmetric_and_per_class_mean():
    g = torch.Generator().manual_seed(2)
    a = {0: torch.randn(300, 2, generator=g), 1: torch.randn(300, 2, generator=g)}
    b = {0: torch.randn(300, 2, generator=g) + 1.0, 1: torch.randn(300, 2, generator=g)}
    u = projection_directions(2, 64, 1)
    d = per_class_distance(a, b, u)
    assert d == pytest.approx(per_class_distance(b, a, u))
    assert d == pytest.approx((sliced_wasserstein(a[0], b[0], u) + sliced_wasserstein(a[1], b[1], u)) / 2)
    with pytest.raises(ValueError, match="class sets"):
        per_class_distance(a, {0: b[0]}, u)
    with pytest.raises(ValueError, match="same shape"):
        sliced_wasserstein(a[0], a[0][:10], u)
