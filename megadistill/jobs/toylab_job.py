"""The toy-lab jobs: ``toylab`` (one method through the DeepSpeed trainer) and ``toylab_table``.

``toylab`` distills the toy-lab teacher with ``method.name`` into a ``method.student_steps``-step
student through the trainer (ZeRO stage from the ds_config, checkpoints and auto-resume in
``<run.output_dir>/checkpoints``) and prints, on rank 0, the student's distance to the teacher's
50-step samples next to the undistilled teacher's at the same step count. ``toylab_table`` trains
every method (1- and 4-step students) with the lab's own loop and prints the table.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import time

import torch
import torch.distributed as dist

from megadistill.experiment import ExperimentConfig

RESULT_FILE = "result.json"


def run_trainer(cfg: ExperimentConfig, ds: dict) -> int:
    from megadistill.engine.data_source import SeededBatchSource
    from megadistill.engine.engines import full_state_dict, init_distributed, load_full_state_dict
    from megadistill.engine.rng import derive_seed
    from megadistill.engine.trainer import Trainer
    from megadistill.methods import get_method
    from megadistill.methods.base import FewStepRollout
    from megadistill.toylab.lab import TrainedStudent, get_lab, student_step_list

    start = time.perf_counter()
    info = init_distributed()
    rank = info.rank
    log = logging.getLogger("megadistill.toylab_job")

    lab = get_lab(cfg.toylab)  # every rank trains the same (seeded) teacher ...
    with torch.no_grad():  # ... and rank 0's weights win, whatever the ranks' thread counts did
        for p in lab.teacher.parameters():
            dist.broadcast(p.data, src=0)
    log.info(f"toy lab: teacher trained in {lab.teacher_train_seconds:.1f} s")
    n = cfg.method.student_steps
    steps = student_step_list(n, cfg.toylab.shift)
    # Measured now: under ZeRO-3 the trainer partitions the teacher it is handed.
    teacher_distance = lab.teacher_distance(n) if rank == 0 else float("nan")

    method_cls, _ = get_method(cfg.method.name)
    rng, rollout_rng = torch.Generator(), torch.Generator()
    # The rollout's exit step decides which modules run, so it is drawn identically on every rank
    # (a shared generator); its noise comes from the per-rank method generator.
    method = method_cls(
        cfg.method.config, generator=lab.copy_teacher(), teacher=copy.deepcopy(lab.teacher),
        critic=lab.copy_teacher(), rollout=FewStepRollout(steps, generator=rollout_rng, noise_generator=rng),
        rng=rng,
    )
    student = copy.deepcopy(method.generator)  # plain copy to evaluate in, whatever ZeRO does to the original
    micro = cfg.train.micro_batch_size
    data = SeededBatchSource(lambda g: lab.make_batch(micro, g), derive_seed(cfg.train.seed, rank, "data"))
    trainer = Trainer(method, data, cfg.train, ds, os.path.join(cfg.run.output_dir, "checkpoints"),
                      generators={"method": rng}, shared_generators={"rollout": rollout_rng})
    train_start = time.perf_counter()
    trainer.train()
    if trainer.step < cfg.train.max_steps:  # preempted: the checkpoint is saved, the grace period is short
        return 0
    train_seconds = time.perf_counter() - train_start

    # Collective gathers (every rank), then rank 0 evaluates on a plain module.
    use_ema = trainer.ema is not None and trainer.ema.started
    weights = trainer.ema.gather() if use_ema else full_state_dict(method.generator)
    if rank == 0:
        load_full_state_dict(student, weights)
        samples = lab.student_samples(TrainedStudent(student.eval(), steps, "renoise"))
        distance = lab.distance(samples)
        result = {
            "method": cfg.method.name, "student_steps": n, "evaluated": "ema" if use_ema else "generator",
            "step": trainer.step, "world_size": info.world_size, "zero_stage": trainer.engines.zero_stage,
            "distance": distance, "teacher_distance": teacher_distance, "ratio": distance / teacher_distance,
            "noise_floor": lab.noise_floor, "train_seconds": train_seconds,
            "total_seconds": time.perf_counter() - start,
        }
        with open(os.path.join(cfg.run.output_dir, RESULT_FILE), "w") as f:
            json.dump(result, f, indent=2)
        print(format_result(result), flush=True)
    dist.barrier()
    return 0


def format_result(r: dict) -> str:
    n = r["student_steps"]
    return (
        f"final: {r['method']} {n}-step student ({r['evaluated']}, step {r['step']}, ZeRO-{r['zero_stage']}, "
        f"{r['world_size']} rank(s)): SW1 to teacher-50 {r['distance']:.4f} | undistilled teacher {n}-step "
        f"{r['teacher_distance']:.4f} | ratio {r['ratio']:.3f} (noise floor {r['noise_floor']:.4f}; "
        f"{r['total_seconds']:.0f} s)"
    )


def run_table(cfg: ExperimentConfig) -> int:
    from megadistill.toylab.lab import format_table, get_lab, run_lab

    start = time.perf_counter()
    lab = get_lab(cfg.toylab)
    print(f"toy lab: teacher trained in {lab.teacher_train_seconds:.1f} s", flush=True)
    rows = run_lab(cfg.toylab, progress=lambda r: print(
        f"  {r['method']:>15} {r['steps']}-step: ratio {r['ratio']:.3f} ({r['wall_s']:.1f} s)", flush=True))
    os.makedirs(cfg.run.output_dir, exist_ok=True)
    table = format_table(rows, lab.noise_floor)
    with open(os.path.join(cfg.run.output_dir, "toylab.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    print(f"\ntoy lab finished in {time.perf_counter() - start:.1f} s; table written to "
          f"{os.path.join(cfg.run.output_dir, 'toylab.md')}")
    return 0
