"""Evaluation protocol of the demo: which prompts, how many samples, and the comparison report.

Shared by the teacher's training tool and the distillation job, so both print numbers measured the
same way: ``eval_prompts`` lists each prompt ``per_prompt`` times; a sampler's videos for those
prompts are scored by attribute accuracy and by their distance to a reference set (the teacher's
50-step samples) of the same prompts.

Few prompts with many samples each rather than many prompts with few: the distance is a per-prompt
Wasserstein distance between sets, and with one or two samples per prompt it degenerates into a
pairwise distance that rates a sampler collapsed onto the mean video better than a second draw
of the reference itself. ``EVAL_PROMPTS`` covers every colour twice, every shape four times and
every direction twice.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .metrics import attribute_accuracy, video_distance
from .videos import make_prompt

EVAL_PROMPTS: tuple[str, ...] = tuple(make_prompt(c, s, d) for c, s, d in [
    ("red", "square", "left"), ("red", "disc", "up"), ("green", "square", "right"), ("green", "disc", "down"),
    ("blue", "square", "up"), ("blue", "disc", "left"), ("yellow", "square", "down"), ("yellow", "disc", "right")])


def eval_prompts(per_prompt: int, prompts: Optional[Sequence[str]] = None) -> list[str]:
    """Each prompt (default: ``EVAL_PROMPTS``) repeated ``per_prompt`` times, prompt-major."""
    if per_prompt < 1:
        raise ValueError(f"per_prompt must be >= 1, got {per_prompt}")
    prompts = EVAL_PROMPTS if prompts is None else prompts
    return [p for p in prompts for _ in range(per_prompt)]


def compare(samples: torch.Tensor, reference: torch.Tensor, prompts: Sequence[str]) -> dict[str, float]:
    """{"accuracy": all attributes right, "colour"/"shape"/"direction": per attribute, "feature" /
    "pixel": distance of ``samples`` to ``reference``} for videos of the same ``prompts``."""
    acc = attribute_accuracy(samples, prompts)
    out = {"accuracy": acc["all"], "colour": acc["colour"], "shape": acc["shape"], "direction": acc["direction"]}
    out.update(video_distance(samples, reference, prompts))
    return out


def format_row(name: str, row: dict[str, float]) -> str:
    keys = [k for k in ("accuracy", "colour", "shape", "direction", "feature", "pixel") if k in row]
    return f"{name:<28}" + "  ".join(f"{k} {row[k]:.3f}" for k in keys)
