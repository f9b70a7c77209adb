"""Load a Wan checkpoint straight into this rank's share of a model built on the meta device.

``build_wan`` + ``load_wan_checkpoint`` + ``apply_tensor_parallel`` runs the random initialisation of
the full model (fp32 Wan-14B: 56 GB and minutes of Xavier draws per rank), copies the full weights
in, and only then keeps 1/tp of them, so every rank holds the whole model at least once.
``load_wan`` instead builds on the meta device (no memory, no initialisation), applies tensor
parallelism there, checks the checkpoint against the model's FULL shapes (``plan_wan_checkpoint``:
the key conversion and up-front errors of ``load_wan_checkpoint``), and only then materialises each
tensor from the bytes of this rank's slice of the file (safetensors ``get_slice``), one at a time.
Host memory peaks at this rank's share of the weights plus the transient copies of one tensor, and
the file mapping is dropped after each read (no mapped pages accumulate in the resident set).

Values are those of the current path exactly (same slices of the same stored values, cast the same
way). Non-persistent buffers have no checkpoint entry and Wan has none (RoPE tables are computed per
call); a model that grows one is refused before anything is read rather than left uninitialised.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from megadistill.models.wan.checkpoint import (CheckpointMismatchError, LoadPlan, LoadResult, plan_wan_checkpoint,
                                               read_planned_tensor)
from megadistill.models.wan.config import WanConfig
from megadistill.models.wan.model import WanModel, WanMoE, build_wan
from megadistill.models.wan.parallelize import apply_tensor_parallel
from megadistill.parallel.comm import group_size
from megadistill.parallel.tensor_parallel import mark_tensor_parallel_parameters, tensor_parallel_layout

PathLike = Union[str, os.PathLike]


def load_wan(preset: Union[str, WanConfig], checkpoint: PathLike, *, tp_group: Any = None,
             dtype: Optional[torch.dtype] = None, strict: bool = True,
             partition: Optional[Callable[[nn.Module], Any]] = None, **overrides) -> Union[WanModel, WanMoE]:
    """The Wan model of ``preset`` (+ WanConfig ``overrides``) with the weights of ``checkpoint``, split
    over ``tp_group`` (None or size 1: unsplit), never initialised randomly and never held in full.

    ``dtype`` as in ``build_wan`` (e.g. bfloat16 for a frozen teacher; norms, modulation, time MLPs and
    head stay float32). ``strict=False`` tolerates unexpected checkpoint keys, never missing ones (a
    tensor built on the meta device has no value to keep). Raises ``CheckpointMismatchError`` (keys,
    shapes) or ValueError (tp does not divide heads / ffn_dim) before any weight is allocated. Equal,
    tensor for tensor, to ``apply_tensor_parallel(load_wan_checkpoint(build_wan(...)), tp_group)``.

    ``partition(module)`` (optional) is called with each WanBlock as soon as its tensors are loaded,
    then once with the whole model, e.g. ZeRO-3's ``deepspeed.zero.Init(module=m, ...)``, which
    partitions the parameters not yet partitioned: a rank then holds its partitions plus ONE full
    block (and the small embeddings and head) at any time, even at tp = 1.
    """
    model = build_wan(preset, device="meta", dtype=dtype, **overrides)
    apply_tensor_parallel(model, tp_group)
    load_wan_checkpoint_into_meta(model, checkpoint, strict=strict, partition=partition)
    return model


def load_wan_checkpoint_into_meta(model: nn.Module, checkpoint: PathLike, strict: bool = True,
                                  partition: Optional[Callable[[nn.Module], Any]] = None) -> LoadResult:
    """Materialise a meta-device WanModel / WanMoE (tensor parallelism already applied, or not) from an
    unsharded checkpoint, in place: each rank reads only its TP shard of each tensor. Every check
    (keys, shapes, buffers without a source) runs for the whole model (both experts) before the first
    tensor is allocated. ``partition``: see ``load_wan``."""
    plans = [(module, _plan(module, path, strict)) for module, path in _parts(model, Path(checkpoint))]
    for module, plan in plans:
        _materialize(module, plan, partition)
    mark_tensor_parallel_parameters(model)
    if partition is not None:
        partition(model)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # _plan guarantees this cannot happen; a silent meta tensor would surface much later
        raise RuntimeError(f"tensors left on the meta device after loading: {left[:10]}")
    prefixes = ["high_noise_model.", "low_noise_model."] if isinstance(model, WanMoE) else [""]
    unexpected = [prefix + k for (_, plan), prefix in zip(plans, prefixes) for k in plan.unexpected]
    return LoadResult(plans[0][1].key_format, [], unexpected)


def _parts(model: nn.Module, path: Path) -> list[tuple[nn.Module, Path]]:
    """(network, checkpoint) pairs: a WanMoE's experts load from the release's expert folders."""
    if isinstance(model, WanMoE):
        return [(model.high_noise_model, path / "high_noise_model"), (model.low_noise_model, path / "low_noise_model")]
    return [(model, path)]


def _full_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """Checkpointed tensors (parameters, persistent buffers) -> unsharded shape (local x tp on the split dim)."""
    layout = tensor_parallel_layout(module)
    persistent = set(module.state_dict(keep_vars=True))
    shapes = {}
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if name not in persistent:
            continue
        shape = list(t.shape)
        if name in layout:
            group, dim, _ = layout[name]
            shape[dim] *= group_size(group)
        shapes[name] = tuple(shape)
    return shapes


def _plan(module: nn.Module, path: Path, strict: bool) -> LoadPlan:
    persistent = set(module.state_dict(keep_vars=True))
    transient = [n for n, b in module.named_buffers() if b.is_meta and n not in persistent]
    if transient:
        raise ValueError(f"{type(module).__name__} has non-persistent buffers {transient}: no checkpoint holds them, "
                         "so a meta-device build cannot fill them; compute them when the model is built instead")
    plan = plan_wan_checkpoint(_full_shapes(module), path, strict, type(module).__name__)
    if plan.missing:
        raise CheckpointMismatchError(
            f"checkpoint {plan.source.description} lacks {len(plan.missing)} tensors of {type(module).__name__} "
            f"(e.g. {plan.missing[:10]}); a model built on the meta device has no initial value to keep for them "
            "(build it on a real device and use load_wan_checkpoint(strict=False) instead)")
    return plan


def _materialize(module: nn.Module, plan: LoadPlan, partition: Optional[Callable[[nn.Module], Any]]) -> None:
    """Every planned tensor of ``module``, block by block (each block handed to ``partition`` when
    done), then the rest (embeddings, head)."""
    layout = tensor_parallel_layout(module)
    names = list(plan.tensors)
    for i, block in enumerate(getattr(module, "blocks", [])):
        prefix = f"blocks.{i}."
        _load_tensors(module, plan, layout, [n for n in names if n.startswith(prefix)])
        if partition is not None:
            mark_tensor_parallel_parameters(block)  # before a partitioner replaces the parameters' data
            partition(block)
    _load_tensors(module, plan, layout, [n for n in names if not n.startswith("blocks.")])


@torch.no_grad()
def _load_tensors(module: nn.Module, plan: LoadPlan, layout: dict, names: list[str]) -> None:
    for name in names:
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        current = getattr(owner, leaf)
        if name in layout:
            group, dim, chunks = layout[name]
            value = read_planned_tensor(plan, name, dim, dist.get_rank(group), group_size(group), chunks,
                                        dtype=current.dtype)
        else:
            value = read_planned_tensor(plan, name, dtype=current.dtype)
        if value.shape != current.shape:  # the plan checked full shapes; this guards the slicing
            raise RuntimeError(f"{name}: read {tuple(value.shape)} for a local tensor of {tuple(current.shape)}")
        value = value.contiguous()  # already a new tensor of the model's dtype
        if isinstance(current, nn.Parameter):
            owner._parameters[leaf] = nn.Parameter(value, requires_grad=current.requires_grad)
        else:
            owner._buffers[leaf] = value
