"""Rotary position embedding over a (frame, height, width) token grid, in float64.

Each head's ``head_dim`` channels form ``head_dim / 2`` complex pairs (interleaved: channels 2i,
2i+1), split over the three axes by ``axis_dims`` (a family's choice, e.g. 44/42/42 of 128).
Each axis has its own frequency ladder theta^(-2i / axis_dim); the angles and the rotation are
float64, the result float32.

Tables are computed per call rather than stored as buffers: a complex buffer would be silently
truncated by ``module.to(torch.bfloat16)``, and the table is cheap next to one attention layer.
``frame_offset`` gives absolute frame positions to a chunk of frames (block-causal KV-cache rollout).
"""
from __future__ import annotations

from typing import Sequence

import torch


def rope_angles(positions: torch.Tensor, axis_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Angles [len(positions), axis_dim / 2] in float64: pos * theta^(-2i / axis_dim)."""
    inv_freq = 1.0 / torch.pow(theta, torch.arange(0, axis_dim, 2, dtype=torch.float64,
                                                   device=positions.device).div(axis_dim))
    return torch.outer(positions.to(torch.float64), inv_freq)


def rope_grid(grid: Sequence[int], axis_dims: Sequence[int], theta: float = 10000.0, frame_offset: int = 0,
              device=None) -> torch.Tensor:
    """Complex128 rotations [F*H*W, sum(axis_dims) / 2] for a (F, H, W) token grid in (f, h, w) raster
    order; ``axis_dims``: the channels of one head rotating with the frame, row and column index."""
    f, h, w = grid
    dt, dh, dw = axis_dims
    if any(d <= 0 or d % 2 for d in axis_dims):
        raise ValueError(f"RoPE axis dims must be positive and even, got {tuple(axis_dims)}")
    ang_t = rope_angles(torch.arange(frame_offset, frame_offset + f, device=device), dt, theta)
    ang_h = rope_angles(torch.arange(h, device=device), dh, theta)
    ang_w = rope_angles(torch.arange(w, device=device), dw, theta)
    angles = torch.cat([
        ang_t.view(f, 1, 1, -1).expand(f, h, w, -1),
        ang_h.view(1, h, 1, -1).expand(f, h, w, -1),
        ang_w.view(1, 1, w, -1).expand(f, h, w, -1),
    ], dim=-1).reshape(f * h * w, (dt + dh + dw) // 2)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, L, H, D] by freqs [L, D/2] (complex) in float64; returns float32."""
    b, l, h, d = x.shape
    if freqs.shape != (l, d // 2):
        raise ValueError(f"RoPE table {tuple(freqs.shape)} does not match {l} tokens x {d // 2} pairs")
    with torch.autocast(device_type=x.device.type, enabled=False):
        xc = torch.view_as_complex(x.to(torch.float64).reshape(b, l, h, d // 2, 2))
        return torch.view_as_real(xc * freqs.unsqueeze(1)).flatten(3).float()
