"""What the trainer asks of the mesh whatever the family: size checks, whether DeepSpeed needs an mpu,
and the full <-> tensor-parallel weight exchange.

A family applies the mesh to its own networks (``ModelFamily.parallelize``, its recipe in
``models/<family>/parallelize.py``: a data-only TP plan, then its sequence layout). CFG parallelism
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

from .mesh import ParallelConfig, ParallelMesh
# The full <-> TP-sharded weight helpers live with the TP layers; the trainer reaches them through here.
from .tensor_parallel import gather_tensor_parallel, shard_tensor_parallel, tensor_parallel_layout


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


__all__ = ["check_parallel_sizes", "gather_tensor_parallel", "shard_tensor_parallel",
           "tensor_parallel_layout", "uses_model_parallel"]
