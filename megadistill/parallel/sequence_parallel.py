"""Ulysses sequence parallelism, the model-agnostic part: how tokens shard, and the attention core.

Between a model's embeddings and its head each rank of an SP group of size P holds a contiguous shard
of the tokens: the sequence is zero-padded from L to a multiple of P (L need not divide) and rank r
takes tokens [r n, (r + 1) n), n = ceil(L / P) (``shard_length``, ``shard_positions``). Per-token work
(norms, FFN, cross-attention with local queries) runs on the shard as it is; a family's token layout
(in its ``parallelize.py``) shards its tokens and their per-token rows that way (``scatter_sequence``)
and hands each self-attention core a ``UlyssesMask``.

Self-attention exchanges tokens for heads around its core (``UlyssesAttention``): one packed
all-to-all turns q, k, v [B, n, H, D] into [B, P n, H / P, D], the padding is dropped so the core sees
exactly the L true tokens with the mask the single-process model builds (block-causal masks and KV
caches need nothing else: each rank caches the full past sequence for its H / P heads), and a second
all-to-all brings the output back to [B, n, H, D]. Before the head the layout all-gathers the shards
(``gather_sequence``) and strips the padding.

Gradients. Every collective's backward is its adjoint (parallel/comm.py), so each rank's parameter
gradients are those of its own loss through the distributed computation. (Backpropagating only this
rank's slice of its own output gradient instead would give everything before the head 1/P of the
gradient the head gets.) With the same loss on every rank, each replicated parameter's gradient summed
over the SP group is P times the single-process gradient: backpropagate loss / P on each rank and the
sum equals it, or backpropagate the full loss and average over the group, which is what ZeRO's mean
over the data x sequence group does.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from megadistill.parallel.comm import all_to_all, gather_from_sequence_parallel_region


def shard_length(seq_len: int, sp: int) -> int:
    """Tokens per rank: ceil(seq_len / sp); the last shards hold the padding."""
    if seq_len < 1 or sp < 1:
        raise ValueError(f"seq_len and sp must be >= 1, got {seq_len}, {sp}")
    return -(-seq_len // sp)


def shard_positions(seq_len: int, sp: int, rank: int, device=None) -> torch.Tensor:
    """Positions in the full sequence of rank ``rank``'s tokens, int64 [shard_length]; padding slots
    repeat the last position (their rows are computed and never read)."""
    n = shard_length(seq_len, sp)
    return torch.arange(rank * n, (rank + 1) * n, device=device).clamp_(max=seq_len - 1)


@dataclass(frozen=True)
class UlyssesMask:
    """What the layout hands each self-attention core in place of the mask: the single-process
    attention metadata of the full sequence (None, Dense or BlockCausal) and the true token count L,
    which the core needs to drop the padding after the exchange."""

    mask: Any
    seq_len: int


class UlyssesAttention(nn.Module):
    """Self-attention core under Ulysses: exchange tokens for heads, run ``inner`` on the full
    sequence with H / P heads, exchange back."""

    def __init__(self, group, inner: nn.Module):
        super().__init__()
        self.group, self.inner = group, inner
        self.sp = dist.get_world_size(group)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[UlyssesMask] = None,
                kv_cache=None) -> torch.Tensor:
        """q, k, v [B, n, H, D] (this rank's tokens, rotated) -> [B, n, H, D]."""
        if not isinstance(mask, UlyssesMask):
            raise TypeError("a sequence-parallel attention core runs inside a model whose sequence-parallel token "
                            f"layout passes a UlyssesMask; got {type(mask).__name__}")
        sp, seq_len = self.sp, mask.seq_len
        b, n, h, d = q.shape
        if h % sp:  # e.g. tensor parallelism applied after this with an incompatible size
            raise ValueError(f"{h} attention heads per rank do not divide by the sequence parallel size {sp}")
        # One message [P (head group), B, n, 3, H/P, D], packed by a single copy. q and k are cast to
        # v's dtype here instead of inside attention() (the same rounding) so the three fit one buffer.
        by_group = [x.to(v.dtype).reshape(b, n, sp, h // sp, d).permute(2, 0, 1, 3, 4) for x in (q, k, v)]
        qkv = all_to_all(torch.stack(by_group, dim=3), self.group)  # [P (token shard), B, n, 3, H/P, D]
        qkv = qkv.permute(1, 0, 2, 3, 4, 5).reshape(b, sp * n, 3, h // sp, d)[:, :seq_len]
        out = self.inner(*qkv.unbind(2), mask.mask, kv_cache)  # [B, L, H/P, D]
        out = F.pad(out, (0, 0, 0, 0, 0, sp * n - seq_len)).view(b, sp, n, h // sp, d)
        out = all_to_all(out.permute(1, 0, 2, 3, 4), self.group)  # [P (head group), B, n, H/P, D]
        return out.permute(1, 2, 0, 3, 4).reshape(b, n, h, d)

    def cache_heads(self, num_heads: int) -> int:
        return self.inner.cache_heads(num_heads) // self.sp

    def __deepcopy__(self, memo):
        # A process group cannot be copied; a copied model (EMA, frozen teacher) shares it.
        return UlyssesAttention(self.group, copy.deepcopy(self.inner, memo))


def scatter_sequence(tokens: torch.Tensor, group) -> torch.Tensor:
    """tokens [B, L, ...] -> this rank's shard [B, n, ...] (zero-padded to P n first)."""
    sp, rank = dist.get_world_size(group), dist.get_rank(group)
    seq_len = tokens.shape[1]
    n = shard_length(seq_len, sp)
    pad = [0, 0] * (tokens.dim() - 2) + [0, sp * n - seq_len]
    return F.pad(tokens, pad).narrow(1, rank * n, n)


def gather_sequence(tokens: torch.Tensor, num_tokens: int, group) -> torch.Tensor:
    """Every rank's shard [B, n, ...] -> the full sequence [B, L, ...] of L = ``num_tokens`` (padding
    stripped); backward: a reduce-scatter (sum)."""
    full = gather_from_sequence_parallel_region(tokens.transpose(0, 1), group).transpose(0, 1)
    return full[:, :num_tokens]
