"""Every differentiable collective the parallel layers use, under Megatron-Core's verbs.

Each verb is an autograd Function whose backward is the adjoint of its forward, so a layer built from
them needs no gradient code of its own:

- ``copy_to_tensor_model_parallel_region``: identity forward, all-reduce (sum) backward -- the input of
  a column-parallel region (Megatron's f).
- ``reduce_from_tensor_model_parallel_region``: all-reduce forward, identity backward -- the output of
  a row-parallel region (Megatron's g).
- ``all_reduce_sum``: all-reduce forward AND backward -- a partial statistic every rank consumes with
  its own slice (the TP RMSNorm's sum of squares).
- ``all_to_all``: all_to_all_single over dim 0 (chunk j of rank i -> chunk i of rank j), its own adjoint
  -- Ulysses' token <-> head exchange.
- ``gather_from_sequence_parallel_region``: concatenate every rank's tensor over dim 0, backward a
  reduce-scatter (sum) -- the sequence shards before a replicated head.
- ``all_gather_with_grad``: every rank's tensor stacked [world, ...], backward this rank's slice summed
  over the group -- the two CFG passes of one sample.

A group of size 1 (or None) makes every verb the identity.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

# torch 2.13 renamed the single-tensor collectives (the old names warn there); setup.py admits torch >= 2.4.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def group_size(group: Any) -> int:
    """Size of a process group; None (no group) counts as 1."""
    return 1 if group is None else dist.get_world_size(group)


def _all_reduced(x: torch.Tensor, group: Any) -> torch.Tensor:
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    return x


def _all_to_all_single(x: torch.Tensor, group: Any) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_reduced(grad, ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:
        return _all_reduced(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _AllReduceSum(torch.autograd.Function):
    """Each rank's backward holds the gradient through its own slice only; the statistic's true
    gradient is the sum of them."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return _all_reduced(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_reduced(grad, ctx.group), None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return _all_to_all_single(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_to_all_single(grad, ctx.group), None


class _GatherFromSequenceRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:
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


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x, group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_reduced(grad, ctx.group)[dist.get_rank(ctx.group)], None


def copy_to_tensor_model_parallel_region(x: torch.Tensor, group: Any) -> torch.Tensor:
    return x if group_size(group) == 1 else _CopyToRegion.apply(x, group)


def reduce_from_tensor_model_parallel_region(x: torch.Tensor, group: Any) -> torch.Tensor:
    return x if group_size(group) == 1 else _ReduceFromRegion.apply(x, group)


def all_reduce_sum(x: torch.Tensor, group: Any) -> torch.Tensor:
    return x if group_size(group) == 1 else _AllReduceSum.apply(x, group)


def all_to_all(x: torch.Tensor, group: Any) -> torch.Tensor:
    """x [P, ...] (chunk j goes to rank j) -> [P, ...] (chunk i came from rank i)."""
    return x if group_size(group) == 1 else _AllToAll.apply(x, group)


def gather_from_sequence_parallel_region(x: torch.Tensor, group: Any) -> torch.Tensor:
    """x [n, ...] on each rank -> [P n, ...], the ranks' tensors in group-rank order."""
    return x if group_size(group) == 1 else _GatherFromSequenceRegion.apply(x, group)


def all_gather_with_grad(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Every rank's ``x`` stacked in group-rank order, [world, *x.shape]. Every rank must pass a tensor
    of the same shape and dtype. (A group of size 1 gives x[None].)"""
    return x.unsqueeze(0) if group_size(group) == 1 else _AllGatherWithGrad.apply(x, group)
