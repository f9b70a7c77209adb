"""Methods with state of their own through launch/train.py on the toy family: consistency (its EMA
target) and progressive (stage after stage, the student of one stage the teacher of the next).

A run resumed from a mid-run checkpoint (for progressive, inside a later stage, whose teacher is an
earlier stage's student) must end with exactly the uninterrupted run's student: the same SW1 to the
last bit. Progressive's stage ends are checkpoints kept whatever ``keep_last`` says. Tiny budgets
(small teacher, few evaluation samples); quality is the bench's business (tools/bench_toy_distill.py
--trainer, the README table).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ROOT / "launch" / "train.py"
ZERO3 = ROOT / "configs" / "zero3.json"
TINY = ["model.teacher.iterations=300", "eval.samples_per_class=300", "eval.num_projections=32",
        "model.trajectory_pool=256", "train.micro_batch_size=64", "train.log_every=1000", "train.progress_bar=false"]


def _run(config: str, out: Path, *extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(TRAIN), "--ds_config", str(ZERO3), "--config", str(ROOT / "configs" / config),
           f"run.output_dir={out}", *TINY, *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads((out / "result.json").read_text())


def test_progressive_stages_are_kept_and_resume_mid_stage_exactly(tmp_path):
    # 16 -> 8 -> 4 -> 2 sampler steps: 3 stages of 4 steps, a 2-step Euler student.
    stages = ["method.progressive.start_steps=16", "method.progressive.iterations_per_stage=4",
              "rollout.steps.steps=[1000,500]", "train.max_steps=12", "train.save_every=5", "train.keep_last=1"]
    full = _run("toy_progressive.yaml", tmp_path / "full", *stages)
    ckpts = tmp_path / "full" / "checkpoints"
    # Stage ends 4, 8, 12 kept; of the periodic saves (5, 10) keep_last=1 leaves the newest.
    assert sorted(os.listdir(ckpts)) == ["latest", "step_000000004", "step_000000008", "step_000000010",
                                         "step_000000012"]
    assert all((ckpts / f"step_{s:09d}" / "KEEP").is_file() for s in (4, 8, 12))
    assert (full["student_steps"], full["step"]) == (2, 12)
    # Step 10 lies in the third stage: its teacher is the second stage's student, restored from the checkpoint.
    resumed = _run("toy_progressive.yaml", tmp_path / "resumed", *stages,
                   f"train.resume_from={ckpts / 'step_000000010'}")
    assert resumed["distance"] == full["distance"]


def test_consistency_resumes_with_its_ema_target_exactly(tmp_path):
    steps = ["train.max_steps=8", "train.save_every=4", "train.keep_last=0"]
    full = _run("toy_consistency.yaml", tmp_path / "full", *steps)
    resumed = _run("toy_consistency.yaml", tmp_path / "resumed", *steps,
                   f"train.resume_from={tmp_path / 'full' / 'checkpoints' / 'step_000000004'}")
    assert resumed["distance"] == full["distance"]
