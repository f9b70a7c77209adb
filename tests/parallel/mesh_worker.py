"""One rank of the mesh tests (launched by test_mesh.py through tests/helpers/ranks.py, 4 ranks, gloo).

For each layout it builds a ParallelMesh and records, for every named group, the members as seen by
real communication (an all_gather of global ranks inside the group), next to what the mesh and its
mpu methods report; and one tensor drawn with the rank's seed, gathered over the world. Then
DeepSpeed ZeRO-3 is initialised with the mesh as mpu, and the groups DeepSpeed actually uses are
recorded. Results go to ``<out>/rank<r>.pt``; test_mesh.py compares them with an independent
enumeration of the layout.
"""
from __future__ import annotations

import os
import sys
import traceback

import torch
import torch.distributed as dist

from megadistill.parallel.mesh import GROUP_DIMS, ParallelConfig, ParallelMesh
from megadistill.models.wan.parallelize import apply_tensor_parallel
from megadistill.parallel.tensor_parallel import gather_tensor_parallel_state_dict

LAYOUTS = [(2, 1, 1), (1, 2, 1), (2, 2, 1), (1, 4, 1), (4, 1, 1), (1, 1, 2), (2, 1, 2), (1, 2, 2)]
DEEPSPEED_LAYOUTS = [(1, 2, 1), (2, 1, 1), (1, 1, 2)]
MPU_PREFIXES = ("model", "tensor_model", "data", "sequence", "sequence_data", "pipe")


def members(group) -> list[int]:
    """Global ranks of ``group`` in group-rank order, found by communicating inside it."""
    mine = torch.tensor([dist.get_rank()])
    out = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, mine, group=group)
    return [int(t) for t in out]


def record_layout(tp: int, sp: int, cfg: int) -> dict:
    mesh = ParallelMesh(ParallelConfig(tp=tp, sp=sp, cfg=cfg), num_heads=8)
    groups = {name: dict(comm=members(mesh.group(name)), mesh=mesh.ranks(name), rank=mesh.rank(name),
                         size=mesh.size(name), dist_rank=dist.get_rank(mesh.group(name)))
              for name in GROUP_DIMS}
    mpu = {prefix: dict(group=members(getattr(mesh, f"get_{prefix}_parallel_group")()),
                        rank=getattr(mesh, f"get_{prefix}_parallel_rank")(),
                        world_size=getattr(mesh, f"get_{prefix}_parallel_world_size")())
           for prefix in MPU_PREFIXES}
    g = torch.Generator().manual_seed(mesh.rank_seed(1234, "noise"))
    draw = torch.randn(4, generator=g)
    draws = [torch.zeros_like(draw) for _ in range(dist.get_world_size())]
    dist.all_gather(draws, draw)
    return dict(groups=groups, mpu=mpu, coords=dict(mesh.coords), seed_rank=mesh.seed_rank,
                seed_offsets={n: mesh.seed_offset(n) for n in ("", "noise", "timestep")},
                draws=torch.stack(draws), data_parallel_group_ranks=mesh.get_data_parallel_group_ranks(),
                tp_src=mesh.get_tensor_model_parallel_src_rank())


def record_deepspeed(tp: int, sp: int, cfg: int) -> dict:
    """ZeRO-3 with the mesh as mpu: which groups DeepSpeed partitions and reduces over, and one SGD step
    (lr 1) whose update must be the sum of the gradients over the SP ranks, averaged over the data (and
    cfg) replicas of this rank's sequence_data group."""
    import deepspeed

    mesh = ParallelMesh(ParallelConfig(tp=tp, sp=sp, cfg=cfg))
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True}
    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path=ds_config, **mesh.zero_init_kwargs()):
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                      config=ds_config, mpu=mesh)
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        before = [p.detach().clone() for p in model.parameters()]
    # Each rank's own micro-batch (a different input per rank, as SP ranks hold different tokens).
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(100 + dist.get_rank()))
    loss = engine(x).pow(2).sum()
    engine.backward(loss)
    engine.step()
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        after = [p.detach().clone() for p in model.parameters()]
    weight = model[0].weight
    return dict(
        seq_data_group=members(engine.seq_data_parallel_group),
        optimizer_group=members(engine.optimizer.dp_process_group),
        param_group=members(weight.ds_process_group),
        local_numel=weight.ds_tensor.numel(), full_numel=weight.ds_numel,
        train_batch_size=engine.train_batch_size(), dp_world_size=engine.dp_world_size,
        mp_world_size=engine.mp_world_size, sequence_parallel_size=engine.sequence_parallel_size,
        before=before, update=[b - a for b, a in zip(before, after)],
    )


def record_deepspeed_wan_tp() -> dict:
    """A tiny Wan with tp = 2 under ZeRO-3 (dp = 2): built unsharded, TP applied, converted with
    zero.Init(module=...) over the sequence_data group, one SGD(lr=1) step on one sample per data
    replica (drawn with the mesh's rank seed, so both TP ranks of a replica draw the same sample).
    Records the unsharded weights before and after (ZeRO gather, then TP gather) and the samples."""
    import deepspeed

    from tp_worker import make_inputs, make_model

    mesh = ParallelMesh(ParallelConfig(tp=2), num_heads=4)
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True}
    model = make_model("tiny-t2v")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_tensor_parallel(model, mesh.tp_group)
    deepspeed.zero.Init(module=model, config_dict_or_path=ds_config, **mesh.zero_init_kwargs())
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                      config=ds_config, mpu=mesh)
    kwargs, weight = make_inputs(model)
    g = torch.Generator().manual_seed(mesh.rank_seed(0, "batch"))
    kwargs["x"] = torch.randn(kwargs["x"].shape, generator=g)
    loss = (engine(**kwargs) * weight).sum()
    engine.backward(loss)
    engine.step()
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        after = gather_tensor_parallel_state_dict(model, mesh.tp_group)
    local = model.blocks[0].ffn[0].weight
    return dict(before=before, after=after, kwargs=kwargs, weight=weight, loss=loss.item(),
                dp_rank=mesh.dp_rank, local_numel=local.ds_tensor.numel(), tp_numel=local.ds_numel)


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    results = {}
    for layout in LAYOUTS:
        try:
            results[layout] = record_layout(*layout)
        except Exception:
            results[layout] = {"error": traceback.format_exc()}
    try:  # bad sizes are refused before any group is created (every rank raises the same error)
        ParallelMesh(ParallelConfig(tp=4), num_heads=6)
        results["bad_heads"] = "no error"
    except ValueError as e:
        results["bad_heads"] = str(e)
    for layout in DEEPSPEED_LAYOUTS:
        try:
            results[("deepspeed",) + layout] = record_deepspeed(*layout)
        except Exception:
            results[("deepspeed",) + layout] = {"error": traceback.format_exc()}
    try:
        results["deepspeed_wan_tp"] = record_deepspeed_wan_tp()
    except Exception:
        results["deepspeed_wan_tp"] = {"error": traceback.format_exc()}
    torch.save(results, os.path.join(out_dir, f"rank{dist.get_rank()}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
