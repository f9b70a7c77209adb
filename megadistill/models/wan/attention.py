"""The one attention call every Wan block makes.

Layout is [B, L, H, D] (tokens before heads), the layout of the projections, of flash-attention and of
the Ulysses all-to-all, so no block transposes. ``mask`` is an additive float or boolean (True = keep)
mask broadcastable to [B, H, Lq, Lk], or a flex_attention ``BlockMask`` (the block-causal mode on CUDA,
see ``causal.py``); the KV-cache rollout passes the cached keys and values as k and v. Kernel
back-ends (flash, Triton) plug in behind this function; the torch SDPA path is the reference that
runs everywhere, CPU included.

``SelfAttentionCore`` is the swappable step of self-attention between RoPE and the output projection
(extend the KV cache, attend): sequence parallelism replaces it from outside the model
(``megadistill.parallel.sequence_parallel``), so the blocks carry no parallel branches.
"""
from __future__ import annotations

import functools
from typing import Any, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # torch without flex_attention: the dense-mask path still works
    BlockMask, flex_attention = None, None


@functools.lru_cache(maxsize=1)
def _compiled_flex_attention():
    # Uncompiled flex materialises the full score matrix; upstream Self-Forcing compiles it the same way.
    return torch.compile(flex_attention, dynamic=False, mode="max-autotune-no-cudagraphs")


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: Any) -> torch.Tensor:
    """[B, H, L, D] inputs; compiled on CUDA, eager elsewhere (forward only: tests of the mask logic)."""
    fn = _compiled_flex_attention() if q.is_cuda else flex_attention
    return fn(q, k, v, block_mask=block_mask)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              mask: Union[torch.Tensor, "BlockMask", None] = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + mask) v for q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D].

    q and k are cast to v's dtype: after RoPE they are float32 (upstream rotates in float64 and returns
    float32), while v carries the compute dtype of the projections (bf16 under mixed precision), which
    is also what upstream's flash-attention call casts all three to.
    """
    if q.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"attention expects q [B, Lq, H, D] and k, v [B, Lk, H, D]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    dtype = v.dtype
    q, k, v = q.to(dtype).transpose(1, 2), k.to(dtype).transpose(1, 2), v.transpose(1, 2)
    if BlockMask is not None and isinstance(mask, BlockMask):
        out = _flex(q, k, v, mask)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2)


class SelfAttentionCore(nn.Module):
    """Self-attention after RoPE: append this call's keys/values to the KV cache (if any), then attend.

    Holds no parameters. A parallel layout swaps it for one that exchanges tokens for heads around
    this same computation; ``cache_heads`` tells ``new_kv_cache`` how many heads the layer caches.
    """

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None, kv_cache=None) -> torch.Tensor:
        """q, k, v [B, L, H, D] (rotated); ``kv_cache`` a ``KVCacheStep`` -> [B, L, H, D]."""
        if kv_cache is not None:
            k, v = kv_cache.extend(k, v)
        return attention(q, k, v, mask)

    def cache_heads(self, num_heads: int) -> int:
        """Heads of this layer's KV cache for a module of ``num_heads`` (possibly tensor-parallel local) heads."""
        return num_heads
