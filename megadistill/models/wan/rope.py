"""Wan's 3D rotary position embedding: per-head channels split over (frame, height, width), fp64.

Each head's ``head_dim`` channels form ``head_dim / 2`` complex pairs (interleaved: channels 2i, 2i+1).
The first ``d - 4 * (d // 6)`` channels rotate with the frame index, the next ``2 * (d // 6)`` with the
row and the last ``2 * (d // 6)`` with the column (44/42/42 for d = 128). Each axis has its own
frequency ladder theta^(-2i / axis_dim), exactly as upstream ``rope_params``; the angles and the
rotation are computed in float64 as upstream does.

Tables are computed per call rather than stored as buffers: a complex buffer would be silently
truncated by ``module.to(torch.bfloat16)``, and the table is cheap next to one attention layer.
``frame_offset`` gives absolute frame positions to a chunk of frames (block-causal KV-cache rollout).
"""
from __future__ import annotations

import torch


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels per axis (frame, height, width) of one head; 44/42/42 for head_dim 128."""
    if head_dim % 2 != 0:
        raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_angles(positions: torch.Tensor, axis_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Angles [len(positions), axis_dim / 2] in float64: pos * theta^(-2i / axis_dim)."""
    inv_freq = 1.0 / torch.pow(theta, torch.arange(0, axis_dim, 2, dtype=torch.float64,
                                                   device=positions.device).div(axis_dim))
    return torch.outer(positions.to(torch.float64), inv_freq)


def rope_grid(grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0, frame_offset: int = 0,
              device=None) -> torch.Tensor:
    """Complex128 rotations [F*H*W, head_dim / 2] for a (F, H, W) token grid in (f, h, w) raster order."""
    f, h, w = grid
    dt, dh, dw = rope_axis_dims(head_dim)
    ang_t = rope_angles(torch.arange(frame_offset, frame_offset + f, device=device), dt, theta)
    ang_h = rope_angles(torch.arange(h, device=device), dh, theta)
    ang_w = rope_angles(torch.arange(w, device=device), dw, theta)
    angles = torch.cat([
        ang_t.view(f, 1, 1, -1).expand(f, h, w, -1),
        ang_h.view(1, h, 1, -1).expand(f, h, w, -1),
        ang_w.view(1, 1, w, -1).expand(f, h, w, -1),
    ], dim=-1).reshape(f * h * w, head_dim // 2)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, L, H, D] by freqs [L, D/2] (complex) in float64; returns float32 like upstream."""
    b, l, h, d = x.shape
    if freqs.shape != (l, d // 2):
        raise ValueError(f"RoPE table {tuple(freqs.shape)} does not match {l} tokens x {d // 2} pairs")
    with torch.autocast(device_type=x.device.type, enabled=False):
        xc = torch.view_as_complex(x.to(torch.float64).reshape(b, l, h, d // 2, 2))
        return torch.view_as_real(xc * freqs.unsqueeze(1)).flatten(3).float()
