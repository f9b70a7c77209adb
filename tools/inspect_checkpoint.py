#!/usr/bin/env python
"""Print what a training checkpoint holds: step, world size, ZeRO stage, models with parameter counts
and dtypes, EMA, RNG / data state, config snapshot. Reads metadata only, never the weights.

    python tools/inspect_checkpoint.py CKPT      # a step_* directory or the checkpoint root
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megadistill.engine.merge import MergeError, format_info, read_checkpoint_info  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="step_* checkpoint directory, or the checkpoint root")
    args = p.parse_args(argv)
    try:
        info = read_checkpoint_info(args.checkpoint)
    except (MergeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_info(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
