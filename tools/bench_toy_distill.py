"""Distil the toy-lab teacher with every method; print the table (ratio < 1: the student beat the
undistilled teacher at its step count).

    python tools/bench_toy_distill.py [--methods dmd,sid] [--steps 1,4] [--budget-scale 1.0] [--seed 0]
    python tools/bench_toy_distill.py --trainer [--methods gan,apt] [--world-size 2] [--out DIR]

Default: the toy lab's recipes in this process (megadistill/toylab/). ``--trainer``: every method
through the DeepSpeed trainer users run, one ``launch/train.py --ds_config configs/zero3.json --config
configs/<method config>`` per method (ZeRO-3; torchrun over ``--world-size`` ranks when > 1), read
back from each run's result.json.

Columns: sliced W1 of the student's samples to the guided teacher's 50-step samples, the same for
the undistilled guided teacher (Euler) at the student's step count, their ratio and wall seconds
(training only for the lab; the whole run, teacher training and evaluation included, for --trainer).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from megadistill.toylab.config import ToyLabConfig
from megadistill.toylab.lab import format_table, get_lab, run_lab

ROOT = Path(__file__).resolve().parents[1]
# method -> (config, extra overrides): the toy family's shipped config of each method.
TRAINER_RUNS = {
    "dmd": ("toylab_dmd.yaml", []),
    "sid": ("toylab_dmd.yaml", ["method.name=sid"]),
    "gan": ("toy_gan.yaml", []),
    "ode_regression": ("toy_ode_regression.yaml", []),
    "apt": ("toy_apt.yaml", []),
    "consistency": ("toy_consistency.yaml", []),
    "progressive": ("toy_progressive.yaml", []),
}


def trainer_row(method: str, out: Path, world_size: int, extra) -> dict:
    """Train ``method``'s shipped toy config through launch/train.py; its result.json as a table row."""
    config, overrides = TRAINER_RUNS[method]
    run_dir = out / method
    args = [str(ROOT / "launch" / "train.py"), "--ds_config", str(ROOT / "configs" / "zero3.json"),
            "--config", str(ROOT / "configs" / config), f"run.output_dir={run_dir}", "train.resume=false",
            "train.progress_bar=false", *overrides, *extra]
    if world_size > 1:
        cmd = ["torchrun", "--nproc_per_node", str(world_size), "--master_port", str(_free_port()), *args]
    else:
        cmd = [sys.executable, *args]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHONPATH"] = str(ROOT)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{method}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    r = json.loads((run_dir / "result.json").read_text())
    return {"method": method, "steps": r["student_steps"], "distance": r["distance"],
            "teacher_distance": r["teacher_distance"], "ratio": r["ratio"], "wall_s": time.perf_counter() - start,
            "noise_floor": r["noise_floor"]}


def _free_port() -> int:
    from megadistill.engine.engines import free_port

    return free_port()


def run_trainer(args) -> int:
    methods = [m for m in args.methods.split(",") if m] or list(TRAINER_RUNS)
    unknown = [m for m in methods if m not in TRAINER_RUNS]
    if unknown:
        print(f"error: no toy trainer config for {unknown}; known: {sorted(TRAINER_RUNS)}", file=sys.stderr)
        return 2
    extra = [f"train.seed={args.seed}"] if args.seed else []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp)
        rows = []
        for m in methods:
            rows.append(trainer_row(m, out, args.world_size, extra))
            r = rows[-1]
            print(f"  {m} {r['steps']}-step: ratio {r['ratio']:.3f} ({r['wall_s']:.1f} s)", file=sys.stderr, flush=True)
    print(format_table(rows, rows[-1]["noise_floor"]))
    print(f"\nTotal wall time {time.perf_counter() - t0:.1f} s ({args.world_size} rank(s), ZeRO-3)")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="", help="comma-separated method names (default: all)")
    parser.add_argument("--steps", default="1,4", help="comma-separated student step counts (lab only)")
    parser.add_argument("--budget-scale", type=float, default=1.0, help="multiply every iteration budget (lab only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    parser.add_argument("--trainer", action="store_true", help="run each method through launch/train.py")
    parser.add_argument("--world-size", type=int, default=1, help="ranks per --trainer run (torchrun when > 1)")
    parser.add_argument("--out", default="", help="--trainer: keep the runs here (default: a temporary dir)")
    args = parser.parse_args(argv)
    if args.trainer:
        return run_trainer(args)
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
