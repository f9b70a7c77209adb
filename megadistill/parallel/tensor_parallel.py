"""Megatron tensor parallelism, applied from outside a model by a data-only plan.

A family states WHICH layers split in a ``TensorParallelPlan`` (module-path patterns -> a style, in
``models/<family>/parallelize.py``); ``parallelize_module(model, plan, group)`` swaps those
submodules for the parallel layers here, and the memory planner reads the same plan
(``plan_partition``) to count each rank's parameters without building anything:

- ``Colwise(chunks)``: a Linear's output features split (weight rows and bias): each rank owns
  out / tp features. ``chunks`` > 1: the output is that many concatenated parts (fused q/k/v), each
  split on its own.
- ``Rowwise()``: a Linear's input features split (weight columns); its outputs are summed across the
  group and the replicated bias added once, after the reduction.
- ``FullWidthNorm()``: an RMSNorm (``weight``, ``eps``) over the FULL width of a column-sharded input
  (q/k norms normalising all heads before the head split): the mean of squares is a sum of local sums
  of squares all-reduced across TP (``TPRMSNorm``). A pattern that meets an element-wise module
  without weight (nn.Identity) leaves it alone.
- ``plan.heads``: modules whose ``num_heads`` attribute becomes num_heads / tp.

Communication (Megatron's f/g operators, parallel/comm.py): a column-parallel layer's input passes
through ``copy_to_tensor_model_parallel_region`` (identity forward, all-reduce backward) and a
row-parallel layer's output through ``reduce_from_tensor_model_parallel_region`` (all-reduce forward,
identity backward). Every TP region is bracketed by the two, so outside the regions activations AND
their gradients are full and identical on all TP ranks. Each column-parallel layer brackets its own
input, so separate q, k, v all-reduce their (equal-sized) input gradients three times in backward
where a fused qkv does it once: prefer fused qkv with TP.

Gradients of replicated parameters therefore need NO extra all-reduce across TP: each replicated
parameter is used only on replicated activations, whose incoming gradient (after the copy's backward
all-reduce) is the full gradient, so every TP rank computes the full, identical gradient (tested
against the single-process model). Megatron's extra all-reduce of norm/AdaLN gradients is for
Megatron-style sequence parallelism, where the replicated layers see only a slice of the tokens; here
the Ulysses SP ranks' partial gradients are summed by ZeRO over the sequence_data group instead.

Sharded parameters keep their names (``self_attn.q.weight`` ...) and carry Megatron's attributes
``tensor_model_parallel = True``, ``partition_dim`` and ``partition_chunks`` (DeepSpeed's gradient-norm
code counts them on every TP rank, replicated ones once). Checkpoints stay unsharded: load the full
state dict into the unsharded model, then parallelize, or (never holding the full model) build on the
meta device, parallelize, materialise (``to_empty``) and ``load_unsharded_state_dict``;
``gather_tensor_parallel_state_dict`` rebuilds the full state dict (original keys and shapes) with
``gather_tensor_parallel``, the dict-level gather the trainer also uses (ZeRO-gathered shards, EMA).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from megadistill.parallel.comm import (all_reduce_sum, copy_to_tensor_model_parallel_region, group_size,
                                       reduce_from_tensor_model_parallel_region)

# ---------------------------------------------------------------------------------------------------
# Sharding of one tensor
# ---------------------------------------------------------------------------------------------------

def shard(t: torch.Tensor, dim: int, rank: int, size: int, chunks: int = 1) -> torch.Tensor:
    """This rank's shard of ``t`` along ``dim``. With ``chunks`` > 1 the dim holds that many equal parts
    (fused [q; k; v]) and each part is split separately: the shard is [part_0 slice, part_1 slice, ...],
    so the local tensor still chunks into the same parts."""
    if t.shape[dim] % (chunks * size):
        raise ValueError(f"dim {dim} of size {t.shape[dim]} ({chunks} part(s)) does not split into {size} shards")
    return torch.cat([part.chunk(size, dim)[rank] for part in t.chunk(chunks, dim)], dim)


def unshard(shards: list[torch.Tensor], dim: int, chunks: int = 1) -> torch.Tensor:
    """Inverse of ``shard``: the full tensor from every rank's shard, in rank order."""
    if chunks == 1:
        return torch.cat(shards, dim)
    per_rank = [s.chunk(chunks, dim) for s in shards]
    return torch.cat([torch.cat([p[c] for p in per_rank], dim) for c in range(chunks)], dim)


def _mark(p: nn.Parameter, dim: int, chunks: int) -> None:
    # Megatron's attributes; DeepSpeed's gradient norm counts such parameters on every TP rank.
    p.tensor_model_parallel, p.partition_dim, p.partition_chunks = True, dim, chunks


def _sharded_parameter(full: torch.Tensor, dim: int, group: Any, chunks: int) -> nn.Parameter:
    local = shard(full.detach(), dim, dist.get_rank(group), group_size(group), chunks).clone().contiguous()
    p = nn.Parameter(local, requires_grad=full.requires_grad)
    _mark(p, dim, chunks)
    return p


def _replicated_parameter(full: Optional[torch.Tensor]) -> Optional[nn.Parameter]:
    return None if full is None else nn.Parameter(full.detach().clone(), requires_grad=full.requires_grad)


# ---------------------------------------------------------------------------------------------------
# Parallel layers
# ---------------------------------------------------------------------------------------------------

class _GroupHandle:
    """A layer's process group. Deep copies of the model (EMA, a generator copied from the teacher)
    share it: a ProcessGroup cannot be copied."""

    __slots__ = ("group",)

    def __init__(self, group: Any):
        self.group = group

    def __deepcopy__(self, memo):
        return self


class _TPLayer(nn.Module):
    """A layer split across a TP group. ``partition`` maps each sharded parameter's name to (dim,
    chunks): the layout lives on the module, since parameter objects (and their attributes) can be
    replaced, e.g. by ``to_empty``."""

    partition: dict[str, tuple[int, int]] = {}

    def __init__(self, group: Any):
        super().__init__()
        self._group = _GroupHandle(group)

    @property
    def group(self) -> Any:
        return self._group.group


class ColumnParallelLinear(_TPLayer):
    """y_r = x W_r^T + b_r: this rank's output features (W split on dim 0). ``chunks`` > 1: the output is
    ``chunks`` concatenated parts (fused qkv), each split, so ``y_r.chunk(chunks, -1)`` gives this rank's
    slice of every part."""

    def __init__(self, weight: nn.Parameter, bias: Optional[nn.Parameter], group: Any, in_features: int,
                 chunks: int = 1):
        super().__init__(group)
        self.weight, self.bias = weight, bias
        self.in_features, self.out_features = in_features, weight.shape[0]
        self.partition = {"weight": (0, chunks)} if bias is None else {"weight": (0, chunks), "bias": (0, chunks)}

    @classmethod
    def from_linear(cls, linear: nn.Linear, group: Any, chunks: int = 1) -> "ColumnParallelLinear":
        w = _sharded_parameter(linear.weight, 0, group, chunks)
        b = None if linear.bias is None else _sharded_parameter(linear.bias, 0, group, chunks)
        return cls(w, b, group, linear.in_features, chunks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_tensor_model_parallel_region(x, self.group), self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} (local), "
                f"bias={self.bias is not None}, tp={group_size(self.group)}")


class RowParallelLinear(_TPLayer):
    """y = sum_r x_r W_r^T + b: this rank's input features (W split on dim 1), outputs all-reduced; the
    replicated bias is added once, after the reduction."""

    partition = {"weight": (1, 1)}

    def __init__(self, weight: nn.Parameter, bias: Optional[nn.Parameter], group: Any, out_features: int):
        super().__init__(group)
        self.weight, self.bias = weight, bias
        self.in_features, self.out_features = weight.shape[1], out_features

    @classmethod
    def from_linear(cls, linear: nn.Linear, group: Any) -> "RowParallelLinear":
        w = _sharded_parameter(linear.weight, 1, group, 1)
        return cls(w, _replicated_parameter(linear.bias), group, linear.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = reduce_from_tensor_model_parallel_region(F.linear(x, self.weight), self.group)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} (local), out_features={self.out_features}, "
                f"bias={self.bias is not None}, tp={group_size(self.group)}")


def tp_rms_normalize(x: torch.Tensor, full_dim: int, eps: float, group: Any) -> torch.Tensor:
    """x / sqrt(mean(x_full^2) + eps) for x this rank's slice of the last dim of x_full."""
    sum_sq = all_reduce_sum(x.pow(2).sum(dim=-1, keepdim=True), group)
    return x * torch.rsqrt(sum_sq / full_dim + eps)


class TPRMSNorm(_TPLayer):
    """An RMSNorm over the full width for a column-sharded input: the weight holds this rank's slice;
    statistics in float32 across the TP group, then cast back to the input dtype, then scale (the
    order of the families' q/k norms)."""

    partition = {"weight": (0, 1)}

    def __init__(self, weight: nn.Parameter, full_dim: int, eps: float, group: Any):
        super().__init__(group)
        self.weight, self.full_dim, self.eps = weight, full_dim, eps

    @classmethod
    def from_norm(cls, norm: nn.Module, group: Any) -> "TPRMSNorm":
        return cls(_sharded_parameter(norm.weight, 0, group, 1), norm.weight.shape[0], norm.eps, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return tp_rms_normalize(x.float(), self.full_dim, self.eps, self.group).type_as(x) * self.weight

    def extra_repr(self) -> str:
        return f"full_dim={self.full_dim}, local={self.weight.shape[0]}, eps={self.eps}, tp={group_size(self.group)}"


def sharded_parameters(model: nn.Module) -> dict[str, tuple[nn.Parameter, int, int]]:
    """Every TP-sharded parameter of ``model``: full name -> (parameter, dim, chunks), in module order."""
    out = {}
    for prefix, module in model.named_modules():
        if isinstance(module, _TPLayer):
            for pname, (dim, chunks) in module.partition.items():
                out[f"{prefix}.{pname}" if prefix else pname] = (getattr(module, pname), dim, chunks)
    return out


def mark_tensor_parallel_parameters(model: nn.Module) -> None:
    """(Re)set Megatron's ``tensor_model_parallel`` / ``partition_dim`` / ``partition_chunks`` attributes
    on the sharded parameters, e.g. after ``to_empty`` replaced the parameter objects."""
    for p, dim, chunks in sharded_parameters(model).values():
        _mark(p, dim, chunks)


# ---------------------------------------------------------------------------------------------------
# The plan, and applying it
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Colwise:
    """Split a Linear's output features (``chunks`` concatenated parts, each split)."""

    chunks: int = 1


@dataclass(frozen=True)
class Rowwise:
    """Split a Linear's input features; outputs summed over the group, bias replicated."""


@dataclass(frozen=True)
class FullWidthNorm:
    """An RMSNorm (``weight``, ``eps``) over the full width of a column-sharded input."""


Style = Union[Colwise, Rowwise, FullWidthNorm]


@dataclass(frozen=True)
class TensorParallelPlan:
    """Which submodules split, by module path: ``layers`` maps an fnmatch pattern (``*`` matches dots
    too: ``*blocks.*.ffn.0`` meets ``blocks.3.ffn.0`` and ``high_noise_model.blocks.3.ffn.0``) to a
    style; ``heads`` lists the patterns of modules whose ``num_heads`` divides by tp. The first
    matching pattern wins. No process group, no module: data a planner can read."""

    layers: Mapping[str, Style]
    heads: Tuple[str, ...] = ()
    unit: str = "block"  # what one pattern set covers, for messages

    def style(self, module_path: str) -> Optional[Style]:
        for pattern, style in self.layers.items():
            if fnmatch.fnmatchcase(module_path, pattern):
                return style
        return None

    def splits_heads(self, module_path: str) -> bool:
        return any(fnmatch.fnmatchcase(module_path, p) for p in self.heads)


def plan_partition(plan: TensorParallelPlan, param_name: str) -> Optional[Tuple[int, int]]:
    """(dim, chunks) along which the plan splits parameter ``param_name`` (``module.named_parameters``
    names), or None when it stays replicated: what ``parallelize_module`` will do, without a model."""
    module_path, _, pname = param_name.rpartition(".")
    style = plan.style(module_path)
    if isinstance(style, Colwise) and pname in ("weight", "bias"):
        return 0, style.chunks
    if isinstance(style, Rowwise) and pname == "weight":
        return 1, 1
    if isinstance(style, FullWidthNorm) and pname == "weight":
        return 0, 1
    return None


def _planned_modules(model: nn.Module, plan: TensorParallelPlan) -> list[tuple[str, nn.Module, Style]]:
    out = []
    for path, module in model.named_modules():
        style = plan.style(path)
        if style is None or (isinstance(style, FullWidthNorm) and getattr(module, "weight", None) is None):
            continue  # an element-wise norm (nn.Identity when qk_norm is off): nothing to shard
        out.append((path, module, style))
    return out


def check_tensor_parallel(model: nn.Module, plan: TensorParallelPlan, tp: int) -> None:
    """Raise ValueError (before anything is modified) when ``model`` cannot be split ``tp`` ways."""
    planned = _planned_modules(model, plan)
    if not planned:
        raise ValueError(f"{type(model).__name__} has no {plan.unit} to apply tensor parallelism to")
    if any(isinstance(m, _TPLayer) for m in model.modules()):
        raise ValueError("tensor parallelism is already applied to this model")
    for path, module in model.named_modules():
        if plan.splits_heads(path) and module.num_heads % tp:
            heads = module.num_heads
            valid = ", ".join(str(d) for d in range(1, heads + 1) if heads % d == 0)
            raise ValueError(f"tensor parallel size {tp} does not divide the model's {heads} heads "
                             f"(tp must be one of {valid})")
    for path, module, style in planned:
        if isinstance(style, Colwise) and module.out_features % (style.chunks * tp):
            raise ValueError(f"tensor parallel size {tp} does not divide the {module.out_features // style.chunks} "
                             f"output features of {path}")
        if isinstance(style, Rowwise) and module.in_features % tp:
            raise ValueError(f"tensor parallel size {tp} does not divide the {module.in_features} "
                             f"input features of {path}")
        if isinstance(style, FullWidthNorm) and module.weight.shape[0] % tp:
            raise ValueError(f"tensor parallel size {tp} does not divide the width {module.weight.shape[0]} of {path}")


def _parallel_layer(module: nn.Module, style: Style, group: Any) -> nn.Module:
    if isinstance(style, Colwise):
        return ColumnParallelLinear.from_linear(module, group, chunks=style.chunks)
    if isinstance(style, Rowwise):
        return RowParallelLinear.from_linear(module, group)
    return TPRMSNorm.from_norm(module, group)


def parallelize_module(model: nn.Module, plan: TensorParallelPlan, tp_group: Any) -> nn.Module:
    """Split ``model``'s submodules as ``plan`` says across ``tp_group``, in place; returns it.

    Load the unsharded weights first: each rank keeps its shard of them (or build on meta, split,
    materialise and ``load_unsharded_state_dict``). A group of size 1 (or None) leaves the model
    untouched. ValueError, before anything changes, when a split does not divide. Apply it before
    sequence parallelism, which splits the (then local) heads again.
    """
    tp = group_size(tp_group)
    if tp == 1:
        return model
    check_tensor_parallel(model, plan, tp)
    for path, module, style in _planned_modules(model, plan):
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, _parallel_layer(module, style, tp_group))  # nn.Sequential: "0" works too
    for path, module in model.named_modules():
        if plan.splits_heads(path):
            module.num_heads //= tp
    return model


@torch.no_grad()
def gather_tensor_parallel_state_dict(model: nn.Module, tp_group: Any) -> dict[str, torch.Tensor]:
    """The unsharded state dict (original keys and shapes) of a TP model, on every rank of the group.

    Collective: every rank of ``tp_group`` must call it (parameters are visited in the same order).
    """
    state = model.state_dict()
    return state if group_size(tp_group) == 1 else gather_tensor_parallel(model, state)


@torch.no_grad()
def load_unsharded_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], tp_group: Any) -> None:
    """Copy an unsharded state dict (original keys and shapes) into a TP model, each rank taking its
    shard: for a model built on the meta device, split, then materialised (``to_empty``), so no rank
    ever holds the full weights in its parameters. Strict: every key must match."""
    own, sharded = model.state_dict(), sharded_parameters(model)
    missing, unexpected = sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise ValueError(f"state dict does not match the model: missing {missing}, unexpected {unexpected}")
    size = group_size(tp_group)
    rank = dist.get_rank(tp_group) if size > 1 else 0
    for name, target in own.items():
        full = state_dict[name]
        if name in sharded:
            _, dim, chunks = sharded[name]
            full = shard(full, dim, rank, size, chunks)
        if full.shape != target.shape:
            raise ValueError(f"{name}: checkpoint shape {tuple(full.shape)} does not match {tuple(target.shape)}")
        target.copy_(full)
    mark_tensor_parallel_parameters(model)


def tensor_parallel_layout(module: nn.Module) -> Dict[str, Tuple[Any, int, int]]:
    """name -> (tp group, dim, chunks) of every TP-sharded parameter of ``module`` (names as in
    ``module.named_parameters()``); empty for a module without tensor parallelism."""
    out = {}
    for name, (_, dim, chunks) in sharded_parameters(module).items():
        layer = module.get_submodule(name.rpartition(".")[0])  # the parallel layer holds its TP group
        if group_size(layer.group) > 1:
            out[name] = (layer.group, dim, chunks)
    return out


@torch.no_grad()
def gather_tensor_parallel(module: nn.Module, tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``tensors`` (this rank's local values of ``module``'s parameters, e.g. the ZeRO-gathered TP
    shards or EMA values) with every TP-sharded entry replaced by the full tensor. Collective over
    the TP groups: every rank calls it with the same names, in the same order."""
    layout = tensor_parallel_layout(module)
    out = dict(tensors)
    for name, (group, dim, chunks) in layout.items():
        if name not in tensors:
            continue
        local = tensors[name].contiguous()
        parts = [torch.empty_like(local) for _ in range(group_size(group))]
        dist.all_gather(parts, local, group=group)
        out[name] = unshard(parts, dim, chunks)
    return out


def shard_tensor_parallel(module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Full tensors (``module.named_parameters()`` names) cut to this rank's TP shards; no communication."""
    layout = tensor_parallel_layout(module)
    out = dict(tensors)
    for name, (group, dim, chunks) in layout.items():
        if name in tensors:
            out[name] = shard(tensors[name], dim, dist.get_rank(group), group_size(group), chunks)
    return out
