"""Train the demo teacher (tiny Wan T2V DiT) by flow matching on the procedural video set, ship it, score it.

    OMP_NUM_THREADS=1 python tools/train_demo_teacher.py [--steps 2800] [--out megadistill/demo/assets/demo_teacher.safetensors]

The shipped weights are three stages (each a fresh warm-up + cosine schedule, EMA restarted from the
stage's initial weights), about 35 minutes on one free core in all:

    python tools/train_demo_teacher.py --steps 2800 --lr 2e-3 --seed 0 --out stage1.safetensors
    python tools/train_demo_teacher.py --steps 1600 --lr 1e-3 --seed 1 --init stage1.safetensors --out stage2.safetensors
    python tools/train_demo_teacher.py --steps 1600 --lr 1e-3 --seed 2 --init stage2.safetensors --cfg-scale 3

Training: x0 = a batch of procedural videos (pixels: the demo's latent space), eps ~ N(0, I),
sigma ~ U(0, 1), x_t = (1 - sigma) x0 + sigma eps, loss = MSE(v(x_t, 1000 sigma, c), eps - x0).
Uniform sigma rather than a shifted / logit-normal density because the teacher is queried at every
noise level later: DMD's real score and the critic draw t over the whole range, and the 4-step
baseline evaluates it at sigma 1, 0.75, 0.5, 0.25. The prompt is replaced by "" with probability
``--cfg-dropout`` (the unconditional model of CFG). AdamW with linear warm-up and cosine decay,
gradient clipping, and an EMA of the weights (the EMA is what is saved).

Then it writes the weights (Wan checkpoint saver, original keys) and the settings JSON and prints
the metrics of megadistill/demo/metrics.py on fresh noise: attribute accuracy of the real data, of
the teacher at 50 and at 4 steps; sample distances of teacher-4 and of the real data to teacher-50,
the floor (teacher-50 vs teacher-50 on other noise) and real data with shuffled prompts.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import random
import sys
import time

import torch
from tqdm import tqdm

from megadistill.demo.evaluation import compare, eval_prompts, format_row
from megadistill.demo.metrics import video_distance
from megadistill.demo.teacher import (DEFAULT_WEIGHTS, DemoSettings, demo_noise, load_demo_teacher, save_demo_teacher,
                                    settings_path, teacher_sample)
from megadistill.demo.videos import render_videos, sample_videos
from megadistill.diffusion.flow_match import add_noise_continuous, flow_target
from megadistill.engine.ema import ema_update_
from megadistill.models.wan import build_wan, load_wan_checkpoint


def lr_at(step: int, total: int, warmup: int, peak: float, final_fraction: float = 0.1) -> float:
    """Linear warm-up to ``peak``, then cosine decay to ``final_fraction * peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(settings: DemoSettings, args) -> torch.nn.Module:
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    model = build_wan(settings.model).train()
    if args.init:
        # A warm start (continue an earlier run; its EMA weights become the starting point).
        load_wan_checkpoint(model, args.init)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    encoder = settings.encoder()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.99))
    bar = tqdm(range(args.steps), desc="demo teacher", file=sys.stdout, mininterval=5.0)
    running = None
    for step in bar:
        prompts, x0 = sample_videos(args.batch_size, g, settings.video)
        drop = torch.rand(args.batch_size, generator=g) < args.cfg_dropout
        prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
        context = encoder.encode(prompts)
        eps = torch.randn(x0.shape, generator=g)
        sigma = torch.rand(args.batch_size, generator=g)
        x_t = add_noise_continuous(x0, eps, sigma)
        loss = ((model(x_t, sigma * settings.model.num_train_timesteps, context) - flow_target(x0, eps)) ** 2).mean()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.warmup, args.lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        # EMA warm-up (decay grows with the step count) so early weights do not linger in a short run.
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                ema_update_(pe, pm, decay)
        value = loss.item()
        running = value if running is None else 0.98 * running + 0.02 * value
        bar.set_postfix(loss=f"{running:.4f}", refresh=False)
    bar.close()
    return ema


@torch.no_grad()
def evaluate(model: torch.nn.Module, settings: DemoSettings, per_prompt: int, seed: int,
             few_steps: int = 4) -> dict[str, dict[str, float]]:
    """The metric table: rows real / teacher-50 floor / teacher-4 / shuffled real, each vs teacher-50."""
    prompts = eval_prompts(per_prompt)
    g = torch.Generator().manual_seed(seed)
    noise_a = demo_noise(len(prompts), settings, g)
    noise_b = demo_noise(len(prompts), settings, g)
    real = render_videos(prompts, g, settings.video)
    t0 = time.perf_counter()
    ref = teacher_sample(model, prompts, noise_a, settings.num_steps, settings)
    seconds_50 = time.perf_counter() - t0
    other = teacher_sample(model, prompts, noise_b, settings.num_steps, settings)
    # The few-step baseline starts from the floor set's noise: both differ from the reference only
    # by their sampler, and neither is paired with it (the same noise would make teacher-4 a
    # close copy of teacher-50, the ODE being the same).
    few = teacher_sample(model, prompts, noise_b, few_steps, settings)
    shuffled = prompts[:]
    random.Random(seed).shuffle(shuffled)
    rows = {
        "real data": compare(real, ref, prompts),
        f"teacher-{settings.num_steps} (floor)": compare(other, ref, prompts),
        f"teacher-{few_steps}": compare(few, ref, prompts),
    }
    # Real videos labelled with the wrong prompts: what "unrelated to the prompt" scores.
    rows["real, shuffled prompts"] = video_distance(real, ref, shuffled, prompts)
    rows["_timing"] = {"teacher_50_seconds": seconds_50, "num_videos": len(prompts)}
    return rows


def report(model: torch.nn.Module, settings: DemoSettings, per_prompt: int, seed: int) -> dict:
    """Print the metric table; returns it (rounded) for the settings JSON."""
    rows = evaluate(model, settings, per_prompt, seed)
    timing = rows.pop("_timing")
    print(f"sampling: shift {settings.shift}, CFG {settings.cfg_scale} (standard form); distances to "
          f"teacher-{settings.num_steps} samples ({timing['num_videos']} videos: 8 prompts x {per_prompt}; "
          f"teacher-{settings.num_steps} took {timing['teacher_50_seconds']:.0f} s):")
    for name, row in rows.items():
        print(format_row(name, row))
    return {name: {k: round(v, 4) for k, v in row.items() if v == v} for name, row in rows.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2800)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--ema-decay", type=float, default=0.998)
    p.add_argument("--cfg-dropout", type=float, default=0.1)
    p.add_argument("--shift", type=float, default=None, help=f"sampling timestep shift (default {DemoSettings.shift})")
    p.add_argument("--cfg-scale", type=float, default=None,
                   help=f"standard-form CFG scale (default {DemoSettings.cfg_scale})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", default=None, help="warm start: weights of an earlier run to continue from")
    p.add_argument("--eval-per-prompt", type=int, default=16, help="samples per prompt (the 8 EVAL_PROMPTS)")
    p.add_argument("--eval-only", action="store_true",
                   help="no training: load --out, re-score it with --shift / --cfg-scale and rewrite its settings JSON")
    p.add_argument("--out", default=str(DEFAULT_WEIGHTS))
    args = p.parse_args(argv)
    sampling = {k: v for k, v in (("shift", args.shift), ("cfg_scale", args.cfg_scale)) if v is not None}

    if args.eval_only:
        model, settings = load_demo_teacher(args.out)
        settings = dataclasses.replace(settings, **sampling)
        settings.training["metrics"] = report(model, settings, args.eval_per_prompt, seed=args.seed + 1)
        settings_path(args.out).write_text(json.dumps(settings.to_dict(), indent=2) + "\n")
        print(f"rewrote {settings_path(args.out)}")
        return 0

    settings = DemoSettings(**sampling)
    t0 = time.perf_counter()
    model = train(settings, args)
    train_seconds = time.perf_counter() - t0
    print(f"trained {args.steps} steps x {args.batch_size} videos in {train_seconds:.0f} s")
    settings.training = {
        "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "warmup": args.warmup,
        "weight_decay": args.weight_decay, "grad_clip": args.grad_clip, "ema_decay": args.ema_decay,
        "cfg_dropout": args.cfg_dropout, "seed": args.seed, "timestep_sampling": "sigma ~ U(0, 1)",
        "init": args.init, "train_seconds": round(train_seconds, 1),
    }
    if args.init and settings_path(args.init).exists():
        # Keep the record of the earlier stages: the shipped JSON says how its weights came about.
        earlier = json.loads(settings_path(args.init).read_text()).get("training", {})
        stages = earlier.pop("stages", []) + ([earlier] if earlier else [])
        for stage in stages:
            stage.pop("metrics", None)
        settings.training["stages"] = stages
    # Save before scoring: the weights are the expensive part.
    for path in save_demo_teacher(model, settings, args.out):
        print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    settings.training["metrics"] = report(model, settings, args.eval_per_prompt, seed=args.seed + 1)
    save_demo_teacher(model, settings, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
