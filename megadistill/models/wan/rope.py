"""Wan's 3D rotary position embedding: how a head's channels split over (frame, height, width).

The first ``d - 4 * (d // 6)`` channels of a head rotate with the frame index, the next
``2 * (d // 6)`` with the row and the last ``2 * (d // 6)`` with the column (44/42/42 for d = 128),
as upstream ``rope_params``; the rotation itself is ``megadistill.ops.rope``.
"""
from __future__ import annotations

import torch

from megadistill.ops import rope


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels per axis (frame, height, width) of one head; 44/42/42 for head_dim 128."""
    if head_dim % 2 != 0:
        raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_grid(grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0, frame_offset: int = 0,
              device=None) -> torch.Tensor:
    """Complex128 rotations [F*H*W, head_dim / 2] for a (F, H, W) token grid (``ops.rope.rope_grid``
    with Wan's axis split)."""
    return rope.rope_grid(grid, rope_axis_dims(head_dim), theta, frame_offset, device)
