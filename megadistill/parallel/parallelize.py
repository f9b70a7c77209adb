"""Apply the mesh to Wan models, and move their weights between the full and the tensor-parallel form.

``parallelize_wan(model, mesh)`` is the one place that reads the mesh and rewires a WanModel / WanMoE
(generator, critic and teacher alike): Megatron tensor parallelism over ``mesh.tp_group`` first, which
leaves each rank num_heads / tp heads, then Ulysses sequence parallelism over ``mesh.sp_group``, which
splits those heads again around self-attention. Degree-1 dimensions change nothing. CFG parallelism
is no model transform: it wraps the teacher's denoiser (``cfg_parallel.cfg_parallel(denoiser,
mesh.cfg_group)``, done where the job builds the method).

The trainer exchanges FULL weights with the outside world (checkpoint export, sampling, EMA export,
loading a full state dict): ``gather_tensor_parallel`` rebuilds full tensors from this rank's TP
shards (a collective over each sharded layer's TP group) and ``shard_tensor_parallel`` takes this
rank's shard of full tensors. Both work on ``{name: tensor}`` dicts named like
``module.named_parameters()``, so they compose with ZeRO-3's gather (engines.full_state_dict).
"""
from __future__ import annotations

from typing import Mapping, Optional

from torch import nn

from .mesh import ParallelConfig, ParallelMesh
from .sequence_parallel import apply_sequence_parallel
from .tensor_parallel import apply_tensor_parallel, sharded_parameters
# The full <-> TP-sharded weight helpers live with the TP layers; the trainer reaches them through here.
from .tensor_parallel import gather_tensor_parallel, shard_tensor_parallel, tensor_parallel_layout


def parallelize_wan(model: nn.Module, mesh: ParallelMesh) -> nn.Module:
    """Tensor then sequence parallelism of ``mesh`` on a WanModel / WanMoE, in place; returns it.

    A model from ``parallel.loading.load_wan(..., tp_group=mesh.tp_group)`` is already split over TP
    (each rank read only its shards); a full model (the demo's) is split here, each TP rank keeping
    its shard. Under ZeRO-3 the module is partitioned over ``mesh.sequence_data_group``, while loading
    (``engines.zero3_partitioner``) or by the engines.
    """
    if not sharded_parameters(model):
        apply_tensor_parallel(model, mesh.tp_group)  # no-op for tp = 1
    apply_sequence_parallel(model, mesh.sp_group)  # no-op for sp = 1; splits the tp-local heads
    return model


def check_parallel_sizes(parallel: ParallelConfig, world_size: int, heads: Mapping[str, int]) -> int:
    """Validate ``parallel`` against the world size and every model's head count before anything is
    built (``heads``: a model's name in messages -> its num_heads); returns dp. ValueError otherwise.
    (Whether cfg = 2 pays for a given method is the job's call: ``jobs/distill.check_parallel``.)"""
    for model, num_heads in heads.items():
        parallel.check(world_size, num_heads, model=model)
    return parallel.check(world_size)


def uses_model_parallel(mesh: Optional[ParallelMesh]) -> bool:
    """True when ``mesh`` puts several ranks on one sample (tp, sp or cfg > 1): DeepSpeed then needs it as
    mpu, so that its data-parallel size (the batch arithmetic) counts dp alone while ZeRO partitions and
    reduces over the sequence_data group (dp x sp x cfg)."""
    return mesh is not None and (mesh.tp > 1 or mesh.sp > 1 or mesh.cfg > 1)


__all__ = ["check_parallel_sizes", "gather_tensor_parallel", "parallelize_wan", "shard_tensor_parallel",
           "tensor_parallel_layout", "uses_model_parallel"]
