"""Distil the toy-lab teacher with every registered method to 1- and 4-step students; print the table.

    python tools/bench_toy_distill.py [--methods dmd,sid] [--steps 1,4] [--budget-scale 1.0] [--seed 0]

Columns: sliced W1 of the student's samples to the guided teacher's 50-step samples, the same for
the undistilled guided teacher (Euler) at the student's step count, their ratio (< 1: the
distillation beat the teacher at equal cost) and wall seconds of training.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from megadistill.toylab.config import ToyLabConfig
from megadistill.toylab.lab import format_table, get_lab, run_lab


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="", help="comma-separated method names (default: all registered)")
    parser.add_argument("--steps", default="1,4", help="comma-separated student step counts")
    parser.add_argument("--budget-scale", type=float, default=1.0, help="multiply every iteration budget")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = ToyLabConfig(
        seed=args.seed,
        methods=[m for m in args.methods.split(",") if m],
        student_steps=[int(s) for s in args.steps.split(",") if s],
        budget_scale=args.budget_scale,
    )
    t0 = time.perf_counter()
    lab = get_lab(cfg)
    print(
        f"teacher trained in {lab.teacher_train_seconds:.1f} s; lab ready in {time.perf_counter() - t0:.1f} s; "
        f"torch threads {torch.get_num_threads()}",
        file=sys.stderr, flush=True,
    )
    rows = run_lab(cfg, progress=lambda r: print(
        f"  {r['method']} {r['steps']}-step: ratio {r['ratio']:.3f} ({r['wall_s']:.1f} s)", file=sys.stderr, flush=True))
    print(format_table(rows, lab.noise_floor))
    print(f"\nTotal wall time {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
