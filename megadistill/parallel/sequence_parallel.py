"""Ulysses sequence parallelism for Wan, applied from outside the model.

Between the embeddings and the head each rank of an SP group of size P holds a contiguous shard of
the tokens: the sequence is zero-padded from L to a multiple of P (L need not divide) and rank r takes
tokens [r n, (r + 1) n), n = ceil(L / P). Per-token modulation rows (timesteps per token or per frame)
and RoPE rows follow their tokens (RoPE keeps the positions of the full sequence); norms, FFN and
cross-attention (local queries, full text context) are per token and run on the shard as they are.

Self-attention exchanges tokens for heads around its core (``SelfAttentionCore``: KV cache + attention):
one packed all-to-all turns q, k, v [B, n, H, D] into [B, P n, H / P, D], the padding is dropped so the
core sees exactly the L true tokens with the mask the single-process model builds (block-causal masks
and KV caches need nothing else: each rank caches the full past sequence for its H / P heads), and a
second all-to-all brings the output back to [B, n, H, D]. Before the head the shards are all-gathered
and the padding stripped; head and unpatchify run on the full sequence, identically on every rank.

Gradients. Every collective's backward is its adjoint (all-to-all: the reverse all-to-all; the
all-gather before the head: a reduce-scatter, sum), so each rank's parameter gradients are those of
its own loss through the distributed computation. (Backpropagating only this rank's slice of its own
output gradient instead would give everything before the head 1/P of the gradient the head gets.)
With the same loss on every rank, each replicated parameter's gradient summed over the SP group is P
times the single-process gradient: backpropagate loss / P on each rank and the sum equals it, or
backpropagate the full loss and average over the group, which is what ZeRO's mean over the
data x sequence group does.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from megadistill.models.wan.model import TokenLayout, WanModel, WanMoE


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


# torch 2.13 renamed the single-tensor collectives (the old names warn there); setup.py admits torch >= 2.4.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """all_to_all_single over dim 0 (chunk j of rank i -> chunk i of rank j): its own adjoint."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return _all_to_all(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_to_all(grad, ctx.group), None


class _AllGather(torch.autograd.Function):
    """Concatenate every rank's x over dim 0; backward sums the gradients and returns this rank's chunk."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        x = x.contiguous()
        out = x.new_empty((dist.get_world_size(group) * x.shape[0],) + x.shape[1:])
        _all_gather_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        out = grad.new_empty((grad.shape[0] // dist.get_world_size(ctx.group),) + grad.shape[1:])
        _reduce_scatter_single(out, grad, group=ctx.group)
        return out, None


@dataclass(frozen=True)
class UlyssesMask:
    """What the layout hands each self-attention core in place of the mask: the single-process mask
    of the full sequence (None, a dense mask or a flex BlockMask) and the true token count L, which
    the core needs to drop the padding after the exchange."""

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
            raise TypeError("a sequence-parallel attention core runs inside WanModel's forward, whose token "
                            f"layout passes a UlyssesMask; got {type(mask).__name__}")
        sp, seq_len = self.sp, mask.seq_len
        b, n, h, d = q.shape
        if h % sp:  # e.g. tensor parallelism applied after this with an incompatible size
            raise ValueError(f"{h} attention heads per rank do not divide by the sequence parallel size {sp}")
        # One message [P (head group), B, n, 3, H/P, D], packed by a single copy. q and k are cast to
        # v's dtype here instead of inside attention() (the same rounding) so the three fit one buffer.
        by_group = [x.to(v.dtype).reshape(b, n, sp, h // sp, d).permute(2, 0, 1, 3, 4) for x in (q, k, v)]
        qkv = _AllToAll.apply(torch.stack(by_group, dim=3), self.group)  # [P (token shard), B, n, 3, H/P, D]
        qkv = qkv.permute(1, 0, 2, 3, 4, 5).reshape(b, sp * n, 3, h // sp, d)[:, :seq_len]
        out = self.inner(*qkv.unbind(2), mask.mask, kv_cache)  # [B, L, H/P, D]
        out = F.pad(out, (0, 0, 0, 0, 0, sp * n - seq_len)).view(b, sp, n, h // sp, d)
        out = _AllToAll.apply(out.permute(1, 0, 2, 3, 4), self.group)  # [P (head group), B, n, H/P, D]
        return out.permute(1, 2, 0, 3, 4).reshape(b, n, h, d)

    def cache_heads(self, num_heads: int) -> int:
        return self.inner.cache_heads(num_heads) // self.sp

    def __deepcopy__(self, memo):
        # A process group cannot be copied; a copied model (EMA, frozen teacher) shares it.
        return UlyssesAttention(self.group, copy.deepcopy(self.inner, memo))


class UlyssesTokenLayout(TokenLayout):
    """Tokens, modulation rows and RoPE rows sharded contiguously over the SP group (see module doc)."""

    def __init__(self, group):
        self.group = group
        self.sp, self.rank = dist.get_world_size(group), dist.get_rank(group)

    def scatter(self, tokens: torch.Tensor, e0: torch.Tensor, freqs: torch.Tensor, mask):
        seq_len = tokens.shape[1]
        n = shard_length(seq_len, self.sp)
        pos = shard_positions(seq_len, self.sp, self.rank, device=tokens.device)
        tokens = F.pad(tokens, (0, 0, 0, self.sp * n - seq_len)).narrow(1, self.rank * n, n)
        if e0.shape[1] != 1:  # R rows of L / R tokens each (per frame or per token): one row per token
            e0 = e0.index_select(1, pos // (seq_len // e0.shape[1]))
        return tokens, e0, freqs.index_select(0, pos), UlyssesMask(mask, seq_len)

    def gather(self, tokens: torch.Tensor, num_tokens: int) -> torch.Tensor:
        full = _AllGather.apply(tokens.transpose(0, 1), self.group).transpose(0, 1)
        return full[:, :num_tokens]

    def __deepcopy__(self, memo):
        return UlyssesTokenLayout(self.group)


def apply_sequence_parallel(model: nn.Module, sp_group) -> nn.Module:
    """Shard a WanModel's (or both WanMoE experts') sequence over ``sp_group``; returns the model.

    A group of size 1 leaves the model untouched. Every self-attention's current head count (after
    tensor parallelism, if applied first) must divide by the group size; this is checked for every
    block before anything is changed. Composes with any core already installed (it becomes ``inner``).
    """
    experts = [model.high_noise_model, model.low_noise_model] if isinstance(model, WanMoE) else [model]
    if not all(isinstance(m, WanModel) for m in experts):
        raise TypeError(f"apply_sequence_parallel expects a WanModel or WanMoE, got {type(model).__name__}")
    sp = dist.get_world_size(sp_group)
    if sp == 1:
        return model
    for net in experts:
        if isinstance(net.token_layout, UlyssesTokenLayout):
            raise ValueError("sequence parallelism is already applied to this model")
        for i, block in enumerate(net.blocks):
            heads = block.self_attn.num_heads
            if heads % sp:
                raise ValueError(f"sequence parallel size {sp} must divide the attention heads: blocks.{i}.self_attn "
                                 f"has num_heads = {heads} (tp-local if tensor parallelism is applied)")
    for net in experts:
        net.token_layout = UlyssesTokenLayout(sp_group)
        for block in net.blocks:
            block.self_attn.core = UlyssesAttention(sp_group, block.self_attn.core)
    return model
