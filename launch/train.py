#!/usr/bin/env python
"""megadistill main entry point.

    python launch/train.py [--config configs/X.yaml] [--print-config] [key.path=value ...]

Without ``--config`` it runs the embedded default, ``configs/default.yaml``. The config is resolved and
validated (unknown keys, wrong types, missing files) before any work starts. Until the DeepSpeed
trainer lands, the main job is the toy lab: a real distillation of a small flow-matching teacher with
every method, ending with the result table.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, "configs", "default.yaml")
if REPO not in sys.path:  # runnable from a checkout without `pip install -e .`
    sys.path.insert(0, REPO)

from megadistill.config import ConfigError, dump_config, load_config  # noqa: E402
from megadistill.experiment import ExperimentConfig  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help=f"experiment YAML (default: {os.path.relpath(DEFAULT_CONFIG)})")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides (YAML values)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(ExperimentConfig, args.config or DEFAULT_CONFIG, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0

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


if __name__ == "__main__":
    sys.exit(main())
