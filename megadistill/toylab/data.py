"""The toy data distribution: a class-conditional mixture of Gaussians on a ring (see ToyDataConfig)."""
from __future__ import annotations

import math
from typing import Optional

import torch

from .config import ToyDataConfig


def mode_centers(cfg: ToyDataConfig) -> torch.Tensor:
    """[num_classes, modes_per_class, dim] mode means; class k owns every num_classes-th mode on the ring."""
    c, m = cfg.num_classes, cfg.modes_per_class
    k = torch.arange(c, dtype=torch.float64)[:, None]
    j = torch.arange(m, dtype=torch.float64)[None, :]
    angle = 2 * math.pi * (k + c * j) / (c * m)
    centers = torch.zeros(c, m, cfg.dim, dtype=torch.float64)
    centers[..., 0] = cfg.radius * torch.cos(angle)
    centers[..., 1] = cfg.radius * torch.sin(angle)
    return centers


def sample_data(
    cfg: ToyDataConfig, labels: torch.Tensor, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """One sample per label (LongTensor [N] in [0, num_classes)) -> float32 [N, dim]."""
    centers = mode_centers(cfg).float()
    mode = torch.randint(0, cfg.modes_per_class, labels.shape, generator=generator)
    noise = torch.randn(labels.shape[0], cfg.dim, generator=generator)
    return centers[labels, mode] + cfg.mode_std * noise


def random_labels(cfg: ToyDataConfig, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    return torch.randint(0, cfg.num_classes, (n,), generator=generator)
