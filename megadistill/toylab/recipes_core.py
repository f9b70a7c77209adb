"""Toy-lab recipes for DMD, SiD, ODE regression and progressive distillation.

Every student and critic starts from the teacher's weights (as upstream). Students are sampled
without CFG: the lab's guidance scale (standard form) is distilled into them.
"""
from __future__ import annotations

import copy
from dataclasses import replace

import torch

from megadistill.diffusion.latents import DenseLatents
from megadistill.methods.base import DistillBatch, FewStepRollout, freeze
from megadistill.methods.dmd import DMD, DMDConfig
from megadistill.methods.ode_regression import (
    ODERegression, ODERegressionConfig, generate_ode_pairs, guided_flow_fn,
)
from megadistill.methods.progressive import ProgressiveConfig, ProgressiveDistillation
from megadistill.methods.sid import SiD, SiDConfig

from .config import ToyLabConfig
from .data import random_labels
from .lab import ToyLab, TrainedStudent, student_step_list
from .loop import train_distillation
from .recipes import register_recipe

# Score timesteps for the toy: no shift and continuous noising; min/max clamp as upstream. Measured
# on the lab (1-step DMD): shift 1 -> SW1 0.13, shift 3 -> 0.29; the sharpening signal of a 2-D
# mixture lives at low noise, which a shift > 1 starves.
_TOY_SCORE = dict(guidance_form="standard", timestep_shift=1.0, snap_noise_to_grid=False)
ODE_POOL_SIZE = 8192


def _score_recipe(method_cls, config_cls, name: str, lab: ToyLab, cfg: ToyLabConfig, num_steps: int, **extra):
    loop = cfg.loop_for(name)
    steps = student_step_list(num_steps, cfg.shift)
    rng = torch.Generator().manual_seed(cfg.seed + 1000 + num_steps)
    method = method_cls(
        config_cls(guidance_scale=cfg.guidance_scale, **_TOY_SCORE, **extra),
        generator=lab.copy_teacher(), teacher=lab.teacher, critic=lab.copy_teacher(),
        rollout=FewStepRollout(steps, generator=rng), rng=rng,
    )
    ema = copy.deepcopy(method.generator) if loop.ema_decay > 0 else None
    logs = train_distillation(method, lambda step: lab.make_batch(loop.batch_size, rng), loop, ema=ema)
    return TrainedStudent(ema if ema is not None else method.generator, steps, "renoise", logs)


@register_recipe("dmd")
def dmd_recipe(lab: ToyLab, cfg: ToyLabConfig, num_steps: int) -> TrainedStudent:
    return _score_recipe(DMD, DMDConfig, "dmd", lab, cfg, num_steps)


@register_recipe("sid")
def sid_recipe(lab: ToyLab, cfg: ToyLabConfig, num_steps: int) -> TrainedStudent:
    return _score_recipe(SiD, SiDConfig, "sid", lab, cfg, num_steps)


@register_recipe("ode_regression")
def ode_regression_recipe(lab: ToyLab, cfg: ToyLabConfig, num_steps: int) -> TrainedStudent:
    loop = cfg.loop_for("ode_regression")
    steps = student_step_list(num_steps, cfg.shift)
    rng = torch.Generator().manual_seed(cfg.seed + 2000 + num_steps)
    labels = random_labels(cfg.data, ODE_POOL_SIZE, rng)
    noise = torch.randn(ODE_POOL_SIZE, cfg.data.dim, generator=rng)
    v_fn = guided_flow_fn(lab.teacher, labels, lab.uncond_like(labels), cfg.guidance_scale)
    trajectory, stored = generate_ode_pairs(v_fn, noise, steps, cfg.eval.reference_steps, cfg.shift)
    method = ODERegression(ODERegressionConfig(step_list=steps), generator=lab.copy_teacher(), rng=rng)

    def make_batch(step: int) -> DistillBatch:
        idx = torch.randint(0, ODE_POOL_SIZE, (loop.batch_size,), generator=rng)
        cond = labels[idx]
        return DistillBatch(
            cond=cond, uncond=lab.uncond_like(cond), latents=DenseLatents(loop.batch_size, (cfg.data.dim,)),
            trajectory=trajectory[idx], trajectory_steps=stored,
        )

    logs = train_distillation(method, make_batch, loop)
    # Deterministic sampling (Euler on v = (x - x0) / sigma, i.e. DDIM) keeps the student on the ODE
    # states it was trained on; re-noising would feed it states from a different coupling.
    return TrainedStudent(method.generator, steps, "euler", logs)


@register_recipe("progressive")
def progressive_recipe(lab: ToyLab, cfg: ToyLabConfig, num_steps: int) -> TrainedStudent:
    loop = cfg.loop_for("progressive")
    rng = torch.Generator().manual_seed(cfg.seed + 3000 + num_steps)
    pcfg = ProgressiveConfig(
        start_steps=cfg.progressive_start_steps, end_steps=num_steps, stride=2, iterations_per_stage=loop.iterations,
        shift=cfg.shift, guidance_scale=cfg.guidance_scale, later_guidance_scale=1.0, guidance_form="standard",
    )
    # Its teacher takes each finished stage's weights: a copy, so the lab's teacher stays as it is.
    method = ProgressiveDistillation(pcfg, generator=lab.copy_teacher(), teacher=freeze(lab.copy_teacher()), rng=rng)
    total = replace(loop, iterations=loop.iterations * pcfg.num_stages)
    logs = train_distillation(method, lambda step: lab.make_batch(loop.batch_size, rng, with_real=True), total)
    return TrainedStudent(method.generator, method.final_step_list(), "euler", logs)
