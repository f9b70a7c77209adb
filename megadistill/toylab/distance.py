"""Sample distance of the lab: sliced Wasserstein-1 over fixed random projections.

For equal-size sets the 1-D W1 between projections is the mean absolute difference of the sorted
values, so SW1(a, b) = mean over projections u of mean_i |sort(a.u)_i - sort(b.u)_i|. It is 0 for
identical sets and equals |d| * mean_u |u.e| for a set shifted by d along e (linear in |d|).

W1 rather than W2: with several well-separated modes per class, finite-sample fluctuations of the
mode weights move mass across modes; W2 squares those long moves and its noise floor (two
independent reference sets) swamps the blur of a few-step sampler, W1 does not.
"""
from __future__ import annotations

from typing import Dict

import torch


def projection_directions(dim: int, num_projections: int, seed: int) -> torch.Tensor:
    """[num_projections, dim] unit vectors, fixed by seed (the same directions for every comparison)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(num_projections, dim, generator=g, dtype=torch.float64)
    return u / u.norm(dim=1, keepdim=True)


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, directions: torch.Tensor) -> float:
    """Sliced W1 between two equal-size point sets [N, dim] (float64 internally)."""
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"need two [N, dim] sets of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    pa = torch.sort(a.double() @ directions.T, dim=0).values
    pb = torch.sort(b.double() @ directions.T, dim=0).values
    return float((pa - pb).abs().mean())


def per_class_distance(
    a: Dict[int, torch.Tensor], b: Dict[int, torch.Tensor], directions: torch.Tensor
) -> float:
    """Mean over classes of the sliced W1 between the class-c sets of a and b."""
    if set(a) != set(b):
        raise ValueError(f"class sets differ: {sorted(a)} vs {sorted(b)}")
    return sum(sliced_wasserstein(a[c], b[c], directions) for c in a) / len(a)
