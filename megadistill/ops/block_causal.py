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

``BlockCausal`` is the attention metadata of that structure (ops/attention.py). Its masks are built
from all of (frames, frame_seq_len, block, window, sink) and cached on exactly that key: upstream
builds its mask once and keeps it when the frame count changes. Two forms: a dense boolean [L, L]
mask for torch SDPA (the reference, CPU included), and a flex_attention ``BlockMask`` that skips fully
masked tiles (a dense mask is 1 GB at 480p x 81 frames).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
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


@dataclass(frozen=True)
class BlockCausal:
    """Attention metadata: ``num_frames`` frames of ``frame_seq_len`` tokens in blocks of
    ``num_frame_per_block``, a query seeing its own and earlier blocks (within ``local_attn_size``
    frames plus ``sink_size`` sink frames when windowed)."""

    num_frames: int
    frame_seq_len: int
    num_frame_per_block: int
    local_attn_size: Optional[int] = None
    sink_size: int = 0

    def __post_init__(self):
        _check(self.num_frames, self.frame_seq_len, self.num_frame_per_block, self.local_attn_size, self.sink_size)

    @property
    def seq_len(self) -> int:
        return self.num_frames * self.frame_seq_len

    def _key(self):
        return self.num_frames, self.frame_seq_len, self.num_frame_per_block, self.local_attn_size, self.sink_size

    def dense_mask(self, device: Union[str, torch.device, None] = None) -> torch.Tensor:
        """The boolean [L, L] mask (cached; treat it as read-only)."""
        return _cached_dense(*self._key(), torch.device(device if device is not None else "cpu"))

    def block_mask(self, device: Union[str, torch.device, None] = None):
        """The flex_attention BlockMask (cached)."""
        return _cached_flex(*self._key(), torch.device(device if device is not None else "cpu"))


def clear_mask_cache():
    _cached_dense.cache_clear()
    _cached_flex.cache_clear()
