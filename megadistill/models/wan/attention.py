"""The self-attention core of a Wan block: the swappable step between RoPE and the output projection.

``SelfAttentionCore`` extends the KV cache (if any) and attends (``megadistill.ops.attention`` with the
model's back-end, resolved at build). Sequence parallelism replaces it from outside the model
(``megadistill.parallel.sequence_parallel``), so the blocks carry no parallel branches.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from megadistill.ops.attention import Backend, attention


class SelfAttentionCore(nn.Module):
    """Self-attention after RoPE: append this call's keys/values to the KV cache (if any), then attend.

    Holds no parameters. A parallel layout swaps it for one that exchanges tokens for heads around
    this same computation; ``cache_heads`` tells ``new_kv_cache`` how many heads the layer caches.
    """

    def __init__(self, backend: Backend):
        super().__init__()
        self.backend = backend

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None, kv_cache=None) -> torch.Tensor:
        """q, k, v [B, L, H, D] (rotated); ``mask``: the attention metadata (None: dense);
        ``kv_cache`` a ``KVCacheStep`` -> [B, L, H, D]."""
        if kv_cache is not None:
            k, v = kv_cache.extend(k, v)
        return attention(q, k, v, mask, self.backend)

    def cache_heads(self, num_heads: int) -> int:
        """Heads of this layer's KV cache for a module of ``num_heads`` (possibly tensor-parallel local) heads."""
        return num_heads
