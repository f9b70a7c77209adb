#!/usr/bin/env python
"""megadistill main entry point.

    deepspeed launch/train.py --ds_config configs/zero3.json [--config configs/X.yaml] [key.path=value ...]
    torchrun --nproc_per_node 2 launch/train.py --ds_config configs/zero3.json ...
    python launch/train.py --ds_config configs/zero3.json ...     (one process)
    python launch/train.py [--config configs/X.yaml] [--print-config] [key.path=value ...]

Without ``--config`` it runs the embedded default, ``configs/default.yaml``. The config and the
DeepSpeed config are resolved and validated (unknown keys, wrong types, missing files, ZeRO stage,
batch sizes, resume checkpoint) before any process group, model or output directory exists; a bad
input exits with code 2 and a message naming the file or key.

With ``--ds_config`` the job distills the toy-lab teacher with ``method.name`` into a
``method.student_steps``-step student THROUGH the DeepSpeed trainer (ZeRO stage from the ds_config,
checkpoints and auto-resume in ``<run.output_dir>/checkpoints``) and prints, on rank 0, the student's
distance to the teacher's 50-step samples next to the undistilled teacher's at the same step count.
Without it the job is the toy lab table: every method, 1- and 4-step students.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, "configs", "default.yaml")
if REPO not in sys.path:  # runnable from a checkout without `pip install -e .`
    sys.path.insert(0, REPO)

from megadistill.config import ConfigError, dump_config, load_config  # noqa: E402
from megadistill.experiment import ExperimentConfig  # noqa: E402

CHECKPOINT_SUBDIR = "checkpoints"
RESULT_FILE = "result.json"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help=f"experiment YAML (default: {os.path.relpath(DEFAULT_CONFIG)})")
    p.add_argument("--ds_config", default=None, help="DeepSpeed JSON: train the configured method on the trainer")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    # Added by the `deepspeed` launcher; the rank layout itself is read from the environment.
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides (YAML values)")
    return p.parse_args(argv)


def launcher_world_size() -> int:
    """World size the launcher promised (1 under plain ``python``), known before any process group."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def checkpoint_dir(cfg: ExperimentConfig) -> str:
    return os.path.join(cfg.run.output_dir, CHECKPOINT_SUBDIR)


def check_trainer_inputs(cfg: ExperimentConfig, ds_config_path: str) -> dict:
    """Everything the trainer would reject, checked before anything is built or written.

    Returns the validated DeepSpeed config; raises ConfigError naming the file or key.
    """
    from megadistill.engine import checkpoint as ckpt
    from megadistill.engine.config import load_ds_config

    world_size = launcher_world_size()
    ds = load_ds_config(ds_config_path, cfg.train, world_size)
    resume = None
    if cfg.train.resume_from:
        resume = cfg.train.resume_from
        if not os.path.isdir(resume):
            raise ConfigError(f"train.resume_from: checkpoint directory not found: {resume}")
        if not ckpt.is_complete(resume):
            raise ConfigError(f"train.resume_from: {resume} is not a complete checkpoint (no {ckpt.COMPLETE} "
                              "marker: the save was interrupted)")
    elif cfg.train.resume:
        resume = ckpt.find_latest(checkpoint_dir(cfg))
    if resume is not None:
        saved = ckpt.read_trainer_state(resume)["world_size"]
        if saved != world_size:
            raise ConfigError(f"checkpoint {resume} was written by {saved} ranks, this run has {world_size}; "
                              "resume with the same world size (or set train.resume=false / another run.output_dir)")
    return ds


def setup_logging(rank: int) -> None:
    """One readable console on rank 0; DeepSpeed's own INFO chatter silenced."""
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s",
                        stream=sys.stdout, force=True)
    # DeepSpeed 0.19 calls torch's deprecated collective names on every step.
    warnings.filterwarnings("ignore", message=r".*is deprecated. Please use `torch\.distributed\.", category=FutureWarning)
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)


def run_trainer(cfg: ExperimentConfig, ds: dict) -> int:
    """Toy-lab distillation of ``cfg.method`` on the DeepSpeed trainer, then the quality figure."""
    import torch
    import torch.distributed as dist

    from megadistill.engine.data_source import SeededBatchSource
    from megadistill.engine.engines import full_state_dict, init_distributed, load_full_state_dict
    from megadistill.engine.rng import derive_seed
    from megadistill.engine.trainer import Trainer
    from megadistill.methods import get_method
    from megadistill.methods.base import FewStepRollout
    from megadistill.toylab.lab import TrainedStudent, get_lab, student_step_list

    start = time.perf_counter()
    setup_logging(int(os.environ.get("RANK", "0")))
    info = init_distributed()
    rank = info.rank
    log = logging.getLogger("launch.train")

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
    teacher = copy.deepcopy(lab.teacher)
    method = method_cls(
        cfg.method.config, generator=lab.copy_teacher(), teacher=teacher, critic=lab.copy_teacher(),
        rollout=FewStepRollout(steps, generator=rollout_rng), rng=rng,
    )
    student = copy.deepcopy(method.generator)  # plain copy to evaluate in, whatever ZeRO does to the original
    micro = cfg.train.micro_batch_size
    data = SeededBatchSource(lambda g: lab.make_batch(micro, g), derive_seed(cfg.train.seed, rank, "data"))
    # The rollout's exit step decides which modules run, so it is drawn identically on every rank.
    trainer = Trainer(method, data, cfg.train, ds, checkpoint_dir(cfg),
                      generators={"method": rng}, shared_generators={"rollout": rollout_rng})
    train_start = time.perf_counter()
    trainer.train()
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


def run_lab_table(cfg: ExperimentConfig) -> int:
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


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(ExperimentConfig, args.config or DEFAULT_CONFIG, args.overrides)
        ds = check_trainer_inputs(cfg, args.ds_config) if args.ds_config else None
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    if ds is not None:
        return run_trainer(cfg, ds)
    return run_lab_table(cfg)


if __name__ == "__main__":
    sys.exit(main())
