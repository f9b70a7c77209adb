"""Wan's input/output embeddings: timestep sinusoid, fp32 MLP evaluation, CLIP image projection, patches."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    """Upstream ``sinusoidal_embedding_1d`` in float64: cat[cos(t w), sin(t w)], w_i = 10000^(-i / (dim/2))."""
    if dim % 2 != 0:
        raise ValueError(f"sinusoidal embedding dim must be even, got {dim}")
    half = dim // 2
    t = t.reshape(-1).to(torch.float64)
    freqs = torch.pow(10000, -torch.arange(half, dtype=torch.float64, device=t.device).div(half))
    angles = torch.outer(t, freqs)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


class FP32Linear(nn.Linear):
    """A Linear that always computes in float32 (upstream runs these layers under autocast(float32)).

    The casts live in this module's own forward, not in its parent's, so that ZeRO-3 (which gathers a
    module's parameters when that module is called) sees the weights used; state-dict names are nn.Linear's.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.float() if self.bias is not None else None
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.linear(x.float(), self.weight.float(), bias)


def run_fp32(layers: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """Evaluate a stack of FP32Linear / activations in float32 whatever the parameter dtype or autocast."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        return layers(x.float())


class ImageProjection(nn.Module):
    """Wan2.1 I2V CLIP-feature projection (upstream ``MLPProj``): LN, Linear, GELU, Linear, LN.

    The GELU here is exact (not tanh) and the LayerNorms are affine with torch's default eps 1e-5,
    as upstream; parameter names ``proj.0/1/3/4`` match the original checkpoints.
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Sequential(
            nn.LayerNorm(in_dim), nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, out_dim),
            nn.LayerNorm(out_dim))

    def forward(self, clip_fea: torch.Tensor) -> torch.Tensor:
        return self.proj(clip_fea)


def unpatchify(x: torch.Tensor, grid: tuple[int, int, int], patch_size: tuple[int, int, int],
               channels: int) -> torch.Tensor:
    """[B, f*h*w, pt*ph*pw*C] tokens -> [B, C, f*pt, h*ph, w*pw] (upstream einsum 'fhwpqrc->cfphqwr')."""
    b = x.shape[0]
    f, h, w = grid
    pt, ph, pw = patch_size
    x = x.view(b, f, h, w, pt, ph, pw, channels)
    x = torch.einsum("bfhwpqrc->bcfphqwr", x)
    return x.reshape(b, channels, f * pt, h * ph, w * pw)

