"""This rank's part of a module's weights, and updates of one module from another made part by part.

A method that keeps a frozen copy of its generator (consistency's EMA target, progressive's next-stage
teacher) updates it from the generator between optimiser steps. Under ZeRO-3 neither holds its full
weights outside a forward: each parameter's data is empty and this rank's partition is ``ds_tensor``.
Two modules built alike and partitioned over the same group hold the same slice of each parameter, so
the update is made on the partitions, with no gather (tensor-parallel shards, alike too, the same way).
Plain modules (ZeRO stages 0-2, the toy lab) use the parameters themselves.
"""
from __future__ import annotations

from typing import Dict, Iterator, Tuple

import torch
from torch import nn


def is_partitioned(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


def local_tensor(p: torch.Tensor) -> torch.Tensor:
    """This rank's data of parameter ``p``: its ZeRO-3 partition, else the parameter's own data."""
    return p.ds_tensor.data if is_partitioned(p) else p.data


def _gathered_now(p: torch.Tensor) -> bool:
    """A ZeRO-3 parameter whose full data is present outside a forward: DeepSpeed keeps small ones
    (below ``stage3_param_persistence_threshold``) gathered once it has traced a step."""
    return is_partitioned(p) and p.data.numel() == p.ds_numel > 0


def _pairs(target: nn.Module, source: nn.Module) -> Iterator[Tuple[str, torch.Tensor, torch.Tensor]]:
    t_named, s_named = dict(target.named_parameters()), dict(source.named_parameters())
    if t_named.keys() != s_named.keys():
        missing, extra = sorted(s_named.keys() - t_named.keys()), sorted(t_named.keys() - s_named.keys())
        raise ValueError(f"modules differ: the target lacks {missing[:3]} and has {extra[:3]} beyond the source")
    for name, p_t in t_named.items():
        p_s = s_named[name]
        if is_partitioned(p_t) != is_partitioned(p_s):
            raise ValueError(f"parameter {name}: one module is ZeRO-3 partitioned and the other is not")
        if local_tensor(p_t).shape != local_tensor(p_s).shape:
            raise ValueError(f"parameter {name}: this rank holds {tuple(local_tensor(p_t).shape)} of the target and "
                             f"{tuple(local_tensor(p_s).shape)} of the source (built or partitioned differently)")
        yield name, p_t, p_s


def _refuse_gathered(name: str, p: torch.Tensor) -> None:
    """A target parameter ZeRO-3 keeps gathered would go on computing with its old full copy. A frozen
    module called directly is never kept gathered (measured: tests/engine/test_local_weights.py);
    should one be, this says so instead of training against stale weights."""
    if _gathered_now(p):
        raise RuntimeError(f"parameter {name} is kept gathered by ZeRO-3, so an update of its partition would "
                           "not reach its forward: build the target as a frozen module (engines.build_frozen)")


def _combine(target: nn.Module, source: nn.Module, op) -> None:
    """``op(target_part, source_part)`` in place on every parameter's part; floating buffers are copied."""
    for name, p_t, p_s in _pairs(target, source):
        _refuse_gathered(name, p_t)
        op(local_tensor(p_t), local_tensor(p_s))
    for b_t, b_s in zip(target.buffers(), source.buffers()):
        if b_t.dtype.is_floating_point:
            b_t.copy_(b_s)


@torch.no_grad()
def lerp_weights_(target: nn.Module, source: nn.Module, weight: float) -> None:
    """target <- target + weight * (source - target) on every parameter (an EMA step with decay
    1 - weight); floating buffers are copied from the source."""
    _combine(target, source, lambda a, b: a.lerp_(b.to(a.dtype), weight))


@torch.no_grad()
def copy_weights_(target: nn.Module, source: nn.Module) -> None:
    """target <- source exactly, on every parameter and floating buffer."""
    _combine(target, source, lambda a, b: a.copy_(b))


def local_state(module: nn.Module) -> Dict[str, torch.Tensor]:
    """Copies of this rank's parts of every parameter (what a per-rank checkpoint file keeps)."""
    return {name: local_tensor(p).detach().clone().cpu() for name, p in module.named_parameters()}


@torch.no_grad()
def load_local_state(module: nn.Module, state: Dict[str, torch.Tensor]) -> None:
    """Write ``local_state`` output back (same ranks, same partitioning)."""
    named = dict(module.named_parameters())
    if named.keys() != state.keys():
        raise KeyError(f"saved weights do not match the module: missing {sorted(named.keys() - state.keys())[:3]}, "
                       f"unexpected {sorted(state.keys() - named.keys())[:3]}")
    for name, p in named.items():
        _refuse_gathered(name, p)
        a = local_tensor(p)
        if a.shape != state[name].shape:
            raise ValueError(f"parameter {name}: saved part {tuple(state[name].shape)}, this rank holds {tuple(a.shape)}")
        a.copy_(state[name].to(device=a.device, dtype=a.dtype))
