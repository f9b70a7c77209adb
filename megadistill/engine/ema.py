"""EMA of the generator, sharded like the parameters: each rank keeps only its own slice.

Upstream keeps a full fp32 CPU copy of the generator on every rank (14B params = 56 GB per rank).
Here every parameter is cut exactly as ZeRO-3 cuts it: flattened, padded to a multiple of the world
size, rank r owning elements [r * P, (r + 1) * P) with P = ceil(numel / world). Under ZeRO-3 the
source of rank r's slice is its fp32 master partition (``safe_get_local_fp32_param``, no
communication); under stages 0-2, where every rank holds the full weights, the rank just reads its
slice of them (with bf16 these are the bf16 weights: stages 1-2 keep their fp32 masters in flat
buffers cut differently). ``gather`` reassembles full tensors (a collective) for export and tests.

Under a parallel mesh ZeRO partitions each parameter over the mesh's sequence_data group (dp x sp at
fixed tp), not the world, and a tensor-parallel layer's parameter is already this TP rank's shard:
``group`` is then that sequence_data group (rank / world_size are the rank's index and the group's
size) and each TP rank keeps the EMA of its own TP shard. ``gather`` gathers over ``group`` first
(the TP-local tensors, as ZeRO-3's gather does) and then across the TP group of every sharded layer of
``tp_module`` (``parallelize.gather_tensor_parallel``), so the export holds full, unsharded tensors.
The state dict records the TP coordinate (``tp_rank`` of ``tp_size``) beside the group's, which is all
an offline merge needs to put the shards of every rank file back together (engine/merge.py).

Update rule (Self-Forcing EMA_FSDP): the EMA starts as a copy of the weights at the first step
>= ``start_step`` and after every generator optimizer step becomes d * ema + (1 - d) * w, in fp32.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn


def shard_bounds(numel: int, rank: int, world_size: int) -> Tuple[int, int, int]:
    """(start, stop, partition_size) of ``rank``'s slice of a flattened tensor (ZeRO-3 layout)."""
    size = math.ceil(numel / world_size)
    start = min(rank * size, numel)
    return start, min(start + size, numel), size


def ema_update_(ema: torch.Tensor, value: torch.Tensor, decay: float) -> torch.Tensor:
    """ema <- decay * ema + (1 - decay) * value, in place."""
    return ema.mul_(decay).add_(value.to(ema.dtype), alpha=1.0 - decay)


def _is_zero3(param: nn.Parameter) -> bool:
    return hasattr(param, "ds_id")


def _tensor_parallel_coordinate(module: Optional[nn.Module]) -> Tuple[int, int]:
    """(tp rank, tp size) of ``module``'s tensor-parallel layers; (0, 1) without any."""
    if module is None:
        return 0, 1
    from megadistill.parallel.parallelize import tensor_parallel_layout

    groups = {id(group): group for group, _, _ in tensor_parallel_layout(module).values()}
    if not groups:
        return 0, 1
    if len(groups) > 1:
        raise ValueError("the EMA's module spans more than one tensor-parallel group")
    group = next(iter(groups.values()))
    return dist.get_rank(group), dist.get_world_size(group)


class ShardedEMA:
    """EMA of ``named_params`` (trainable generator parameters), this rank's shard of each."""

    def __init__(self, named_params: List[Tuple[str, nn.Parameter]], decay: float, start_step: int,
                 rank: int, world_size: int, group: Optional[Any] = None, tp_module: Optional[nn.Module] = None):
        """``rank`` of ``world_size``: this rank's place in ``group`` (None: the default group), the
        group ZeRO partitions the parameters over. ``tp_module``: the module ``named_params`` come from
        (names as its ``named_parameters()``) when it may hold tensor-parallel layers."""
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        if not 0 <= rank < world_size:
            raise ValueError(f"EMA rank must be in [0, world_size={world_size}), got {rank}")
        self.named_params = list(named_params)
        self.decay, self.start_step = float(decay), int(start_step)
        self.rank, self.world_size, self.group = rank, world_size, group
        self.tp_module = tp_module
        self.tp_rank, self.tp_size = _tensor_parallel_coordinate(tp_module)
        self.shards: Optional[Dict[str, torch.Tensor]] = None

    @property
    def started(self) -> bool:
        return self.shards is not None

    def _numel(self, p: nn.Parameter) -> int:
        return p.ds_numel if _is_zero3(p) else p.numel()

    def _shape(self, p: nn.Parameter) -> torch.Size:
        return p.ds_shape if _is_zero3(p) else p.shape

    def local_values(self, p: nn.Parameter) -> torch.Tensor:
        """This rank's padded slice of the current weights of ``p`` as a flat fp32 tensor (a view
        into DeepSpeed's fp32 master partition under ZeRO-3: clone before keeping it)."""
        if _is_zero3(p):
            from deepspeed.utils import safe_get_local_fp32_param

            master = safe_get_local_fp32_param(p)
            if master is None:
                raise RuntimeError("ZeRO-3 parameter without fp32 master partition (not in the optimizer?)")
            return master.reshape(-1)
        start, stop, size = shard_bounds(p.numel(), self.rank, self.world_size)
        out = torch.zeros(size, dtype=torch.float32, device=p.device)
        out[: stop - start] = p.detach().reshape(-1)[start:stop].float()
        return out

    def maybe_start(self, step: int) -> bool:
        """Copy the weights into the EMA at the first step >= start_step; True when it started now."""
        if self.started or step < self.start_step:
            return False
        self.shards = {name: self.local_values(p).detach().clone() for name, p in self.named_params}
        return True

    @torch.no_grad()
    def update(self) -> None:
        if not self.started:
            return
        for name, p in self.named_params:
            ema_update_(self.shards[name], self.local_values(p), self.decay)

    def layout(self) -> Dict[str, Tuple[int, ...]]:
        return {name: tuple(self._shape(p)) for name, p in self.named_params}

    def state_dict(self) -> Dict:
        return {
            "decay": self.decay, "start_step": self.start_step, "rank": self.rank, "world_size": self.world_size,
            "tp_rank": self.tp_rank, "tp_size": self.tp_size, "layout": self.layout(),
            "shards": None if self.shards is None else {k: v.cpu() for k, v in self.shards.items()},
        }

    def load_state_dict(self, state: Dict) -> None:
        saved = (state["rank"], state["world_size"], state.get("tp_rank", 0), state.get("tp_size", 1))
        if saved != (self.rank, self.world_size, self.tp_rank, self.tp_size):
            raise ValueError(
                f"EMA shard was saved by rank {saved[0]} of {saved[1]} (tp rank {saved[2]} of {saved[3]}), "
                f"cannot load into rank {self.rank} of {self.world_size} (tp rank {self.tp_rank} of {self.tp_size})"
            )
        if state["layout"] != self.layout():
            raise ValueError("EMA checkpoint parameters differ from the generator's (names or shapes)")
        self.decay, self.start_step = state["decay"], state["start_step"]
        if state["shards"] is None:
            self.shards = None
            return
        self.shards = {}
        for name, p in self.named_params:
            device = self.local_values(p).device
            self.shards[name] = state["shards"][name].to(device)

    @torch.no_grad()
    def gather(self) -> Dict[str, torch.Tensor]:
        """Full fp32 EMA tensors on every rank (collective over ``group``, then over the TP groups)."""
        if not self.started:
            raise RuntimeError("EMA has not started yet (step < start_step)")
        out = {}
        for name, p in self.named_params:
            shard = self.shards[name]
            if self.world_size > 1:
                parts = [torch.empty_like(shard) for _ in range(self.world_size)]
                dist.all_gather(parts, shard, group=self.group)
                flat = torch.cat(parts)
            else:
                flat = shard
            numel = self._numel(p)
            out[name] = flat[:numel].reshape(self._shape(p)).clone()
        if self.tp_size > 1:
            from megadistill.parallel.parallelize import gather_tensor_parallel

            out = gather_tensor_parallel(self.tp_module, out)
        return out
