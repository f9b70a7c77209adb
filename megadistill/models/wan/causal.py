"""Block-causal attention structure (Self-Forcing / CausVid): which key tokens each query token sees.

Tokens are in (frame, row, column) raster order, ``frame_seq_len`` tokens per latent frame, frames
grouped in blocks of ``num_frame_per_block`` (the last block may be shorter). With ``end(q)`` the
first token after query q's block, query q may attend key k iff

    k < end(q)                                                      (own and earlier blocks)
    and, with a window, (k >= end(q) - local_attn_size * frame_seq_len  (the last local frames)
                         or k < sink_size * frame_seq_len)                (the attention sink)

This is exactly what a KV cache of ``sink_size + local_attn_size`` frames with left-shift eviction
shows a block generated one at a time (``kv_cache.py``), which is what makes the parallel training
forward and the incremental rollout the same function.

Masks are built per call from all of (frames, frame_seq_len, block, window, sink) and cached on
exactly that key: upstream builds its mask once and keeps it when the frame count changes.
Two forms: a dense boolean [L, L] mask for torch SDPA (the reference, CPU included), and on CUDA a
flex_attention ``BlockMask`` that skips fully masked tiles (a dense mask is 1 GB at 480p x 81 frames).
"""
from __future__ import annotations

import functools
from typing import Optional, Union

import torch


def _check(num_frames: int, frame_seq_len: int, num_frame_per_block: int, local_attn_size: Optional[int],
           sink_size: int):
    for name, value in (("num_frames", num_frames), ("frame_seq_len", frame_seq_len),
                        ("num_frame_per_block", num_frame_per_block)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if local_attn_size is not None and local_attn_size < num_frame_per_block:
        raise ValueError(f"local_attn_size ({local_attn_size}) must be >= num_frame_per_block "
                         f"({num_frame_per_block}) or None")
    if sink_size < 0 or (sink_size and local_attn_size is None):
        raise ValueError(f"sink_size must be >= 0 and needs local_attn_size, got {sink_size}")


def block_ends(num_frames: int, frame_seq_len: int, num_frame_per_block: int,
               device: Optional[torch.device] = None) -> torch.Tensor:
    """end(q) for every token q: the index one past the last token of q's block, int64 [L]."""
    block = num_frame_per_block * frame_seq_len
    total = num_frames * frame_seq_len
    idx = torch.arange(total, device=device)
    return torch.clamp((idx // block + 1) * block, max=total)


def block_causal_mask(num_frames: int, frame_seq_len: int, num_frame_per_block: int,
                      local_attn_size: Optional[int] = None, sink_size: int = 0,
                      device: Optional[Union[str, torch.device]] = None) -> torch.Tensor:
    """Boolean [L, L] mask, True = query (row) may attend key (column); L = num_frames * frame_seq_len."""
    _check(num_frames, frame_seq_len, num_frame_per_block, local_attn_size, sink_size)
    ends = block_ends(num_frames, frame_seq_len, num_frame_per_block, device)[:, None]
    k = torch.arange(ends.shape[0], device=device)[None, :]
    mask = k < ends
    if local_attn_size is not None:
        mask &= (k >= ends - local_attn_size * frame_seq_len) | (k < sink_size * frame_seq_len)
    return mask


@functools.lru_cache(maxsize=8)
def _cached_dense(num_frames, frame_seq_len, num_frame_per_block, local_attn_size, sink_size, device):
    return block_causal_mask(num_frames, frame_seq_len, num_frame_per_block, local_attn_size, sink_size, device)


@functools.lru_cache(maxsize=8)
def _cached_flex(num_frames, frame_seq_len, num_frame_per_block, local_attn_size, sink_size, device):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(
        block_causal_mask_mod(num_frames, frame_seq_len, num_frame_per_block, local_attn_size, sink_size),
        B=None, H=None, Q_LEN=num_frames * frame_seq_len, KV_LEN=num_frames * frame_seq_len, device=device)


def block_causal_mask_mod(num_frames: int, frame_seq_len: int, num_frame_per_block: int,
                          local_attn_size: Optional[int] = None, sink_size: int = 0):
    """The same rule as a flex_attention ``mask_mod(b, h, q_idx, kv_idx)``.

    end(q) is computed, not looked up, so indices in flex's tile padding past L stay in range;
    ``q_idx == kv_idx`` is kept as upstream does, so a padded query row is never empty (it is implied
    by the rule for every real token).
    """
    _check(num_frames, frame_seq_len, num_frame_per_block, local_attn_size, sink_size)
    block, total = num_frame_per_block * frame_seq_len, num_frames * frame_seq_len
    window = None if local_attn_size is None else local_attn_size * frame_seq_len
    sink = sink_size * frame_seq_len

    def mask_mod(b, h, q_idx, kv_idx):
        end = (q_idx // block + 1) * block
        end = torch.where(end > total, total, end)
        keep = kv_idx < end
        if window is not None:
            keep = keep & ((kv_idx >= end - window) | (kv_idx < sink))
        return keep | (q_idx == kv_idx)

    return mask_mod


def flex_available(device: torch.device, dtype: Optional[torch.dtype] = None) -> bool:
    """flex_attention is used on CUDA only (no backward on CPU, where SDPA is the reference), in half
    precision only: inductor's float32 autotuning of it (head_dim 128, H100) failed most configs and
    had not finished after 5 minutes, while SDPA with the mask runs float32 at once."""
    if device.type != "cuda" or dtype not in (None, torch.bfloat16, torch.float16):
        return False
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def attention_mask(num_frames: int, frame_seq_len: int, num_frame_per_block: int,
                   local_attn_size: Optional[int] = None, sink_size: int = 0,
                   device: Union[str, torch.device, None] = None, use_flex: Optional[bool] = None,
                   dtype: Optional[torch.dtype] = None):
    """The mask ``attention()`` takes for one geometry, from a small LRU cache keyed by every argument.

    ``use_flex``: None picks a flex_attention BlockMask where available (CUDA, attention in ``dtype``
    half precision), else a dense bool tensor. The cached tensor is shared between calls: treat it as
    read-only.
    """
    device = torch.device(device if device is not None else "cpu")
    if use_flex is None:
        use_flex = flex_available(device, dtype)
    cached = _cached_flex if use_flex else _cached_dense
    return cached(num_frames, frame_seq_len, num_frame_per_block, local_attn_size, sink_size, device)


def clear_mask_cache():
    _cached_dense.cache_clear()
    _cached_flex.cache_clear()

