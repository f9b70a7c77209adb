"""Predict per-GPU memory of a distillation run before starting it, and say whether it fits.

    python tools/plan_memory.py --generator wan2.1-t2v-1.3b --critic wan2.1-t2v-1.3b \\
        --teacher wan2.1-t2v-14b --frames 81 --height 480 --width 832 --gpus 64 --zero 3
    python tools/plan_memory.py --config configs/wan2.1_t2v_1.3b_self_forcing_dmd.yaml \\
        --ds-config configs/zero3.json --gpus 64 --tp 2

Models are counted on the meta device (no weights, no GPU). Flags given on the command line override
what --config / --ds-config say. Exit codes: 0 plan printed (fits or not), 2 bad input.
Numbers: megadistill/parallel/memory_plan.py (which are exact, which are estimates) and
megadistill/models/wan/memory.py (the Wan estimates).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megadistill.models.wan.memory import PlanConfig, plan_from_experiment, plan_memory  # noqa: E402
from megadistill.parallel.memory_plan import (  # noqa: E402
    PRECISIONS, ROLLOUT_KINDS, ZeroSettings, format_plan, suggestions,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="experiment YAML (wan job): models, latent shape, batch, precision, rollout")
    p.add_argument("--ds-config",
                   help="DeepSpeed JSON: ZeRO stage and bucket sizes (default: ZeRO-3 with DeepSpeed's defaults)")
    p.add_argument("--generator", help="Wan preset of the generator")
    p.add_argument("--critic", help="Wan preset of the critic, or 'none'")
    p.add_argument("--teacher", help="Wan preset of the frozen teacher, or 'none'")
    p.add_argument("--frames", type=int, help="pixel frames (1 + 4k)")
    p.add_argument("--height", type=int, help="pixel height")
    p.add_argument("--width", type=int, help="pixel width")
    p.add_argument("--latent", nargs=3, type=int, metavar=("F", "H", "W"), help="latent size instead of pixels")
    p.add_argument("--batch", type=int, help="samples per micro batch (per sample group)")
    p.add_argument("--gpus", type=int, default=None, help="world size (default 8)")
    p.add_argument("--tp", type=int)
    p.add_argument("--sp", type=int)
    p.add_argument("--cfg-parallel", type=int, dest="cfg", help="1 or 2")
    p.add_argument("--zero", type=int, choices=(0, 1, 2, 3), help="ZeRO stage (default 3)")
    ck = p.add_mutually_exclusive_group()
    ck.add_argument("--checkpointing", dest="grad_checkpointing", action="store_true", default=None)
    ck.add_argument("--no-checkpointing", dest="grad_checkpointing", action="store_false")
    p.add_argument("--precision", choices=PRECISIONS)
    p.add_argument("--rollout", choices=ROLLOUT_KINDS)
    p.add_argument("--num-frame-per-block", type=int)
    p.add_argument("--local-attn-size", type=int)
    p.add_argument("--gpu-gib", type=float, help="GPU memory in GiB (default 80)")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> PlanConfig:
    zero = ZeroSettings()
    if args.ds_config:
        with open(args.ds_config) as f:
            zero = ZeroSettings.from_ds_config(json.load(f))
    if args.zero is not None:
        zero = dataclasses.replace(zero, stage=args.zero)
    fields = {k: getattr(args, k) for k in ("generator", "critic", "teacher", "frames", "height", "width", "batch",
                                            "tp", "sp", "cfg", "grad_checkpointing", "precision", "rollout",
                                            "num_frame_per_block", "local_attn_size", "gpu_gib")}
    fields = {k: v for k, v in fields.items() if v is not None}
    for role in ("critic", "teacher"):
        if fields.get(role, "").lower() == "none":
            fields[role] = None
    if args.latent:
        fields.update(latent=tuple(args.latent), frames=None, height=None, width=None)
    elif any(k in fields for k in ("frames", "height", "width")):
        fields["latent"] = None
    fields.update(zero=zero, world_size=args.gpus if args.gpus is not None else 8)
    if args.config:
        return plan_from_experiment(args.config, **fields)
    return PlanConfig(**fields)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = build_config(args)
        plan = plan_memory(cfg)
    except (ValueError, OSError, json.JSONDecodeError) as e:
        print(f"plan_memory: error: {e}", file=sys.stderr)
        return 2
    print(format_plan(plan, None if plan.fits else suggestions(cfg)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
