#!/usr/bin/env python
"""Merge a training checkpoint (any ZeRO stage, world size or tensor-parallel degree) into safetensors, on one CPU.

    python tools/merge_checkpoint.py CKPT OUT [--model generator|ema|critic]
        [--format ours|original|diffusers] [--wan-config PRESET_OR_CONFIG_JSON]
        [--max-shard-size 5GB] [--dtype bf16] [--verify]

CKPT is a step_* checkpoint directory or the checkpoint root (its latest complete checkpoint).
OUT is a .safetensors file or a directory (diffusers: always a directory, with config.json).
The logic lives in megadistill/engine/merge.py.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megadistill.engine.merge import DTYPES, FORMATS, MODELS, MergeError, merge_checkpoint  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="step_* checkpoint directory, or the checkpoint root")
    p.add_argument("out", help="output .safetensors file or directory")
    p.add_argument("--model", default="generator", choices=MODELS)
    p.add_argument("--format", default="ours", choices=FORMATS, dest="fmt")
    p.add_argument("--wan-config", default=None,
                   help="Wan preset name or config.json (required for --format original/diffusers)")
    p.add_argument("--max-shard-size", default=None, help="e.g. 5GB: shard the weights (directory output)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="cast floating tensors (default: fp32)")
    p.add_argument("--verify", action="store_true", help="reload the written files and compare every tensor")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        result = merge_checkpoint(args.checkpoint, args.out, model=args.model, fmt=args.fmt,
                                  wan_config=args.wan_config, max_shard_size=args.max_shard_size,
                                  dtype=args.dtype, verify=args.verify, progress=not args.no_progress)
    except (MergeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"merged {args.model} of {result.info.path} (step {result.info.step}, ZeRO-{result.info.zero_stage}, "
          f"{result.info.world_size} rank(s), tp={result.info.tp}): {result.tensors} tensors -> {args.fmt} format")
    for path in result.written:
        print(f"  wrote {path}")
    if result.report is not None:
        print(result.report.summary())
        return 0 if result.report.ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
