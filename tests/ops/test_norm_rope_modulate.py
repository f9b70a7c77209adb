"""ops.rms_norm / ops.rope / ops.modulate against float64 formulas written out here: RMSNorm's
cast order (normalise in float32, cast, then the weight), RoPE as explicit (cos, sin) pair rotations
with per-axis frequency ladders over a small grid, adaLN rows as repeat_interleave."""
import math

import pytest
import torch

from megadistill.ops.modulate import gated_residual, modulate
from megadistill.ops.rms_norm import rms_norm
from megadistill.ops.rope import apply_rope, rope_grid


def test_rms_norm_matches_float64_and_keeps_the_cast_order():
    g = torch.Generator().manual_seed(0)
    x, w, eps = torch.randn(3, 5, 64, generator=g) * 3, torch.rand(64, generator=g) + 0.5, 1e-6
    x64 = x.double()
    ref = x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * w.double()
    torch.testing.assert_close(rms_norm(x, w, eps).double(), ref, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(rms_norm(x, None, eps).double(), ref / w.double(), rtol=2e-6, atol=2e-6)
    # bf16 input, float32 weight: normalised values rounded to bf16 first, then the float32 weight.
    xb = x.bfloat16()
    out = rms_norm(xb, w, eps)
    assert out.dtype == torch.float32
    xb64 = xb.double()
    rounded = (xb64 / torch.sqrt(xb64.pow(2).mean(-1, keepdim=True) + eps)).bfloat16().float()
    torch.testing.assert_close(out, rounded * w, rtol=0, atol=0.02)  # 1 bf16 ulp at most where rounding ties
    assert (out == rounded * w).float().mean() > 0.99


def rope_reference(x: torch.Tensor, grid, axis_dims, theta: float, frame_offset: int) -> torch.Tensor:
    """Each token (f, h, w) and pair i rotated by position * theta^(-2j / axis_dim), j the pair's index
    within its axis; (a, b) -> (a cos - b sin, a sin + b cos), in float64, one pair at a time."""
    out = x.double().clone()
    f_n, h_n, w_n = grid
    pairs = []
    for axis, dim in enumerate(axis_dims):
        pairs += [(axis, j, dim) for j in range(dim // 2)]
    token = 0
    for f in range(f_n):
        for h in range(h_n):
            for w in range(w_n):
                pos = (f + frame_offset, h, w)
                for i, (axis, j, dim) in enumerate(pairs):
                    angle = pos[axis] * theta ** (-2.0 * j / dim)
                    a, b = x[:, token, :, 2 * i].double(), x[:, token, :, 2 * i + 1].double()
                    out[:, token, :, 2 * i] = a * math.cos(angle) - b * math.sin(angle)
                    out[:, token, :, 2 * i + 1] = a * math.sin(angle) + b * math.cos(angle)
                token += 1
    return out


@pytest.mark.parametrize("axis_dims, offset", [((8, 4, 4), 0), ((6, 6, 4), 3)])
def test_rope_is_the_per_axis_pair_rotation(axis_dims, offset):
    grid, theta = (2, 3, 2), 10000.0
    x = torch.randn(2, 12, 3, sum(axis_dims), generator=torch.Generator().manual_seed(1))
    freqs = rope_grid(grid, axis_dims, theta, frame_offset=offset)
    out = apply_rope(x, freqs)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), rope_reference(x, grid, axis_dims, theta, offset), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="does not match"):
        apply_rope(x[:, :5], freqs)


@pytest.mark.parametrize("rows", [1, 4, 12])
def test_modulation_rows_cover_consecutive_tokens(rows):
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(2, 12, 8, generator=g), torch.randn(2, 12, 8, generator=g)
    shift, scale, gate = (torch.randn(2, rows, 8, generator=g) for _ in range(3))
    per_token = [t.repeat_interleave(12 // rows, dim=1) for t in (shift, scale, gate)]
    torch.testing.assert_close(modulate(x, shift, scale), x * (1 + per_token[1]) + per_token[0])
    torch.testing.assert_close(gated_residual(x, y, gate), x + y * per_token[2])
