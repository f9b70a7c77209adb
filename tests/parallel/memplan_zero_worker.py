"""One rank of a DeepSpeed run (CPU, gloo) that records the ACTUAL per-rank sizes of ZeRO's partitions
of a tiny Wan model trained with AdamW (one optimizer step), plus a frozen copy (teacher) under ZeRO-3.

    python tests/parallel/memplan_zero_worker.py SPEC.json

SPEC: {"model": {WanConfig overrides of tiny-t2v}, "results": "out_{rank}.json", "runs": [{"stage": 1 | 2 | 3,
"precision": "bf16" | "fp32", "ds": {zero_optimization extras}}, ...]}. Launched by test_memory_plan.py;
each rank writes its sizes per run. The persistent parameters are measured after a forward (they
stay gathered from their first use on).
"""
from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megadistill.engine.config import OptimConfig, TrainConfig, validate_ds_config  # noqa: E402
from megadistill.engine.engines import (  # noqa: E402
    build_frozen, build_train_engine, init_distributed,
)
from megadistill.models.wan.model import build_wan  # noqa: E402


def _numel(tensors) -> int:
    return int(sum(t.numel() for t in tensors))


def _gathered_numel(params) -> int:
    """Elements of the full buffers that gathered (persistent) parameters occupy now."""
    return int(sum(p.data.untyped_storage().nbytes() // p.element_size() for p in params))


def stage3_sizes(engine, model) -> dict:
    opt = engine.optimizer  # DeepSpeedZeroOptimizer_Stage3
    params = list(model.parameters())
    fp32 = opt.fp32_partitioned_groups_flat
    lowp = opt.fp16_partitioned_groups_flat
    states = [opt.optimizer.state[t] for t in fp32]
    return {
        "param_partition_numel": _numel(p.ds_tensor for p in params),
        "param_element_size": params[0].ds_tensor.element_size(),
        "persistent_count": sum(bool(p.ds_persist) for p in params),
        "persistent_gathered_numel": _gathered_numel(p for p in params if p.ds_persist),
        "persistent_partition_numel": _numel(p.ds_tensor for p in params if p.ds_persist),
        "fp32_partition_numel": _numel(fp32),
        "fp32_element_size": fp32[0].element_size(),
        "fp32_aliases_params": all(a.data_ptr() == b.data_ptr() for a, b in zip(fp32, lowp)),
        "exp_avg_numel": _numel(s["exp_avg"] for s in states),
        "exp_avg_sq_numel": _numel(s["exp_avg_sq"] for s in states),
        "state_element_size": states[0]["exp_avg"].element_size(),
        "grad_partition_numel": opt.grad_partitions_flat_buffer.numel(),
        "grad_element_size": opt.grad_partitions_flat_buffer.element_size(),
        "reduce_bucket_numel": _numel(b.buffer for b in opt.ipg_buckets.values() if b.buffer is not None),
        "reduce_bucket_element_size": next(iter(opt.ipg_buckets.values())).buffer.element_size(),
    }


def stage12_sizes(engine, model) -> dict:
    opt = engine.optimizer  # DeepSpeedZeroOptimizer
    fp32 = opt.single_partition_of_fp32_groups
    states = [opt.optimizer.state[t] for t in fp32]
    return {
        "param_full_numel": _numel(model.parameters()),
        "param_element_size": next(model.parameters()).element_size(),
        "flat_padded_numel": _numel(opt.bit16_groups_flat),
        "fp32_partition_numel": _numel(fp32),
        "fp32_element_size": fp32[0].element_size(),
        "exp_avg_numel": _numel(s["exp_avg"] for s in states),
        "exp_avg_sq_numel": _numel(s["exp_avg_sq"] for s in states),
        "state_element_size": states[0]["exp_avg"].element_size(),
    }


def run(spec: dict, run_spec: dict, dist_info) -> dict:
    """One engine (and under ZeRO-3 a frozen teacher), one AdamW step, then the sizes."""
    stage, precision = run_spec["stage"], run_spec["precision"]
    train = TrainConfig(precision=precision, micro_batch_size=1)
    ds = validate_ds_config({"zero_optimization": {"stage": stage, **run_spec.get("ds", {})}}, train,
                            dist_info.world_size)
    torch.manual_seed(0)
    # Built whole and partitioned by deepspeed.initialize, as the wan job does (WanModel.init_weights
    # cannot run under deepspeed.zero.Init: it would see empty partitions). Same partition sizes.
    model = build_wan("tiny-t2v", **spec["model"])
    teacher = build_wan("tiny-t2v", **spec["model"]) if stage == 3 else None
    engine = build_train_engine(model, list(model.parameters()), OptimConfig(lr=1e-3), ds, "generator")
    frozen = build_frozen(teacher, ds, dist_info.device) if teacher is not None else None

    cfg = model.config
    g = torch.Generator().manual_seed(1)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    x = torch.randn(1, cfg.in_dim, 1, 4, 4, generator=g).to(dtype)
    context = torch.randn(1, 3, cfg.text_dim, generator=g).to(dtype)
    for net in (model, teacher) if frozen is not None else (model,):
        out = net(x, torch.tensor([500.0]), context)
    engine.backward(model(x, torch.tensor([500.0]), context).float().pow(2).mean())
    engine.step()

    result = dict(run_spec, numels=[int(getattr(p, "ds_numel", p.numel())) for p in model.parameters()])
    result.update(stage3_sizes(engine, model) if stage == 3 else stage12_sizes(engine, model))
    if frozen is not None:
        tparams = list(teacher.parameters())
        result["teacher_partition_numel"] = _numel(p.ds_tensor for p in tparams)
        result["teacher_persistent_gathered_numel"] = _gathered_numel(p for p in tparams if p.ds_persist)
    del out
    return result


def main(spec_path: str) -> None:
    torch.set_num_threads(1)
    with open(spec_path) as f:
        spec = json.load(f)
    dist_info = init_distributed()
    results = [run(spec, run_spec, dist_info) for run_spec in spec["runs"]]
    with open(spec["results"].format(rank=dist_info.rank), "w") as f:
        json.dump({"rank": dist_info.rank, "world_size": dist_info.world_size, "runs": results}, f)


if __name__ == "__main__":
    main(sys.argv[1])
