"""Wan's normalisation layers: statistics always in float32, output in the input dtype (as upstream)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from megadistill.ops.rms_norm import rms_norm


class WanLayerNorm(nn.LayerNorm):
    """LayerNorm over the last dim computed in float32 (upstream ``WanLayerNorm``).

    The affine weights are upcast too, so the layer also works with bf16 parameters and no autocast
    (DeepSpeed / FSDP bf16), where upstream relies on autocast to do the cast.
    """

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = False):
        super().__init__(dim, eps=eps, elementwise_affine=elementwise_affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).type_as(x)


class WanRMSNorm(nn.Module):
    """RMSNorm over the FULL projection width (all heads at once), as upstream ``WanRMSNorm``.

    Upstream order is kept (``ops.rms_norm``): normalise in float32, cast back to the input dtype,
    then scale by the weight (so a float32 weight promotes a bf16 input to float32, as upstream).
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)
