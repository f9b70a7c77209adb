"""RMSNorm: x / sqrt(mean(x^2) + eps) over the last dim, then the weight.

The statistics are float32 whatever the input; the normalised values are cast back to the input
dtype *before* the weight multiplies them (the order the upstream video DiTs were trained with: a float32
weight then promotes a bf16 input to float32).
"""
from __future__ import annotations

from typing import Optional

import torch


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) over the last dim, in x's dtype (no weight)."""
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)


def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """Normalise in float32, cast to x's dtype, then scale by ``weight`` (None: no weight)."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        out = rms_normalize(x.float(), eps).type_as(x)
        return out if weight is None else out * weight
