"""The ``toylab_table`` job: every toy-lab method (1- and 4-step students) trained with the lab's own
loop, and the table of their distances to the teacher. (One method on the toy model through the
DeepSpeed trainer is the distill job with ``model.family: toy``.)
"""
from __future__ import annotations

import os
import time

from megadistill.experiment import ExperimentConfig


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
