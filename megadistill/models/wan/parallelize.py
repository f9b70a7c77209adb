"""The mesh applied to Wan models: the tensor-parallel plan, the Ulysses token layout, ``parallelize_wan``.

``TP_PLAN`` is data (parallel/tensor_parallel.py applies it; the memory planner counts with it): per
block q/k/v (or the fused qkv), the cross-attention's q/k/v (and the I2V image k/v) and ffn.0 are
column-parallel, each attention's o and ffn.2 row-parallel, and the q/k RMSNorms, which Wan applies
over the FULL width (all heads) before the head split, become full-width TP norms. Everything else
(patch, text and time embeddings, modulation, layer norms, the head) stays replicated.

``parallelize_wan(model, mesh)`` is the one place that reads the mesh and rewires a WanModel / WanMoE
(generator, critic and teacher alike): tensor parallelism over ``mesh.tp_group`` first, which leaves
each rank num_heads / tp heads, then Ulysses sequence parallelism over ``mesh.sp_group``
(``WanUlyssesLayout``: tokens, per-token modulation rows and RoPE rows sharded between the embeddings
and the head; every self-attention core wrapped in ``UlyssesAttention``), which splits those heads
again. Degree-1 dimensions change nothing. CFG parallelism is no model transform: the job wraps the
teacher's denoiser (parallel/cfg_parallel.py).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from megadistill.models.wan.model import TokenLayout, WanModel, WanMoE
from megadistill.parallel.mesh import ParallelMesh
from megadistill.parallel.sequence_parallel import (UlyssesAttention, UlyssesMask, gather_sequence, scatter_sequence,
                                                    shard_positions)
from megadistill.parallel.tensor_parallel import (Colwise, FullWidthNorm, Rowwise, TensorParallelPlan,
                                                  parallelize_module, sharded_parameters, tensor_parallel_layout)

TP_PLAN = TensorParallelPlan(
    layers={
        "*blocks.*.self_attn.qkv": Colwise(chunks=3),
        "*blocks.*.self_attn.[qkv]": Colwise(),
        "*blocks.*.cross_attn.[qkv]": Colwise(),
        "*blocks.*.cross_attn.[kv]_img": Colwise(),
        "*blocks.*.ffn.0": Colwise(),
        "*blocks.*_attn.o": Rowwise(),
        "*blocks.*.ffn.2": Rowwise(),
        "*blocks.*_attn.norm_[qk]": FullWidthNorm(),
        "*blocks.*.cross_attn.norm_k_img": FullWidthNorm(),
    },
    heads=("*blocks.*.self_attn", "*blocks.*.cross_attn"),
    unit="WanBlock",
)


def apply_tensor_parallel(model: nn.Module, tp_group: Any) -> nn.Module:
    """Split every block of ``model`` (WanModel, WanMoE or a module holding them) across ``tp_group`` as
    ``TP_PLAN`` says, in place; returns it. A group of size 1 (or None) changes nothing."""
    return parallelize_module(model, TP_PLAN, tp_group)


class WanUlyssesLayout(TokenLayout):
    """Tokens, modulation rows and RoPE rows sharded contiguously over the SP group."""

    def __init__(self, group):
        self.group = group
        self.sp, self.rank = dist.get_world_size(group), dist.get_rank(group)

    def scatter(self, tokens: torch.Tensor, e0: torch.Tensor, freqs: torch.Tensor, mask):
        seq_len = tokens.shape[1]
        pos = shard_positions(seq_len, self.sp, self.rank, device=tokens.device)
        if e0.shape[1] != 1:  # R rows of L / R tokens each (per frame or per token): one row per token
            e0 = e0.index_select(1, pos // (seq_len // e0.shape[1]))
        return scatter_sequence(tokens, self.group), e0, freqs.index_select(0, pos), UlyssesMask(mask, seq_len)

    def gather(self, tokens: torch.Tensor, num_tokens: int) -> torch.Tensor:
        return gather_sequence(tokens, num_tokens, self.group)

    def __deepcopy__(self, memo):
        return WanUlyssesLayout(self.group)


def _experts(model: nn.Module) -> list[WanModel]:
    experts = [model.high_noise_model, model.low_noise_model] if isinstance(model, WanMoE) else [model]
    if not all(isinstance(m, WanModel) for m in experts):
        raise TypeError(f"apply_sequence_parallel expects a WanModel or WanMoE, got {type(model).__name__}")
    return experts


def apply_sequence_parallel(model: nn.Module, sp_group) -> nn.Module:
    """Shard a WanModel's (or both WanMoE experts') sequence over ``sp_group``; returns the model.

    A group of size 1 leaves the model untouched. Every self-attention's current head count (after
    tensor parallelism, if applied first) must divide by the group size; this is checked for every
    block before anything is changed. Composes with any core already installed (it becomes ``inner``).
    """
    experts = _experts(model)
    sp = dist.get_world_size(sp_group)
    if sp == 1:
        return model
    for net in experts:
        if isinstance(net.token_layout, WanUlyssesLayout):
            raise ValueError("sequence parallelism is already applied to this model")
        for i, block in enumerate(net.blocks):
            heads = block.self_attn.num_heads
            if heads % sp:
                raise ValueError(f"sequence parallel size {sp} must divide the attention heads: blocks.{i}.self_attn "
                                 f"has num_heads = {heads} (tp-local if tensor parallelism is applied)")
    for net in experts:
        net.token_layout = WanUlyssesLayout(sp_group)
        for block in net.blocks:
            block.self_attn.core = UlyssesAttention(sp_group, block.self_attn.core)
    return model


def parallelize_wan(model: nn.Module, mesh: ParallelMesh) -> nn.Module:
    """Tensor then sequence parallelism of ``mesh`` on a WanModel / WanMoE, in place; returns it.

    A model from ``models.wan.loading.load_wan(..., tp_group=mesh.tp_group)`` is already split over TP
    (each rank read only its shards); a full model (the demo's) is split here, each TP rank keeping
    its shard. Under ZeRO-3 the module is partitioned over ``mesh.sequence_data_group``, while loading
    (``engines.zero3_partitioner``) or by the engines.
    """
    if not sharded_parameters(model):
        apply_tensor_parallel(model, mesh.tp_group)  # no-op for tp = 1
    apply_sequence_parallel(model, mesh.sp_group)  # no-op for sp = 1; splits the tp-local heads
    return model


def is_parallelized(net: nn.Module) -> bool:
    """Whether tensor or sequence parallelism rewired ``net`` (or a module inside it)."""
    return bool(tensor_parallel_layout(net)) or \
        any(isinstance(getattr(m, "token_layout", None), WanUlyssesLayout) for m in net.modules())


__all__ = ["TP_PLAN", "WanUlyssesLayout", "apply_sequence_parallel", "apply_tensor_parallel", "is_parallelized",
           "parallelize_wan"]
