"""adaLN modulation and the gated residual add of a DiT block.

Modulation rows: shift / scale / gate are [B, R, dim] with R dividing the token count L, each row
covering L / R consecutive tokens: R = 1 (one timestep per sample), R = F (one per latent frame,
block-causal training, no [B, L, dim] tensor per row) or R = L (one per token: per-token timesteps).
"""
from __future__ import annotations

import torch


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (1 + scale) + shift for x [B, L, dim] and shift, scale [B, R, dim]."""
    rows = shift.shape[1]
    return (x.unflatten(1, (rows, -1)) * (1 + scale.unsqueeze(2)) + shift.unsqueeze(2)).flatten(1, 2)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + y * gate for x, y [B, L, dim] and gate [B, R, dim]."""
    rows = gate.shape[1]
    return (x.unflatten(1, (rows, -1)) + y.unflatten(1, (rows, -1)) * gate.unsqueeze(2)).flatten(1, 2)
