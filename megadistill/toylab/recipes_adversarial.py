"""Toy-lab recipes for the GAN, APT and consistency methods.

Every student and every critic backbone starts as a copy of the lab teacher (as upstream). Real
samples for the discriminators are the lab's target pool: guided-teacher 50-step samples, i.e. the
distribution the lab measures against. Budgets: the ``ToyLabConfig`` section named after the method
when the config has one, else the defaults below; both are scaled by ``budget_scale``.
"""
from __future__ import annotations

import copy
from dataclasses import replace
from typing import Dict, List, Tuple

import torch

from megadistill.diffusion.latents import DenseLatents
from megadistill.methods.apt import APTConfig, APTDistillation
from megadistill.methods.base import Denoiser, DistillationMethod, DistillBatch, FewStepRollout, freeze
from megadistill.methods.consistency import ConsistencyConfig, ConsistencyDistillation, update_ema
from megadistill.methods.gan import GANConfig, GANDistillation
from megadistill.models.discriminators.discriminator import Discriminator
from megadistill.models.discriminators.register_heads import RegisterHeads, RegisterHeadsConfig

from .config import LoopConfig, ToyLabConfig
from .data import random_labels
from .lab import ToyLab, TrainedStudent, sample_with, student_step_list
from .loop import train_distillation
from .recipes import register_recipe

GAN_LOOP = LoopConfig(iterations=600, batch_size=256, lr=1e-4, lr_critic=1e-3, critic_ratio=2)
GAN_EMA_DECAY = 0.995
APT_LOOP = LoopConfig(iterations=200, batch_size=128, lr=1e-3, lr_critic=1e-3, critic_ratio=1, betas=[0.0, 0.99])
CONSISTENCY_LOOP = LoopConfig(iterations=1000, batch_size=256, lr=1e-3, betas=[0.9, 0.999])


class GeneratorEMA(DistillationMethod):
    """Runs a method unchanged and keeps an EMA of its generator, updated before every generator
    step (so after the previous optimiser step; call ``finalize`` after training for the last one).
    Before loop step ``start_step`` the EMA just copies the generator (Self-Forcing's ema_start_step),
    so the teacher initialisation does not linger in it.

    Adversarial students oscillate around the equilibrium; their EMA does not (Self-Forcing keeps a
    generator EMA at 0.99, APT at 0.995). Measured on the 4-step GAN: the raw generator's ratio
    swings between 0.5 and 2 from one checkpoint to the next (1.04 at the end of the budget), the
    EMA's stays in 0.45-0.85.
    """

    def __init__(self, inner: DistillationMethod, decay: float, start_step: int = 0):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must lie in [0, 1), got {decay}")
        self.inner, self.decay, self.start_step = inner, decay, start_step
        self.name, self.has_critic = inner.name, inner.has_critic
        self.generator = inner.generator
        self.ema = freeze(copy.deepcopy(inner.generator))

    def generator_loss(self, batch: DistillBatch, step: int) -> Tuple[torch.Tensor, Dict[str, float]]:
        update_ema(self.ema, self.generator, self.decay if step >= self.start_step else 0.0)
        return self.inner.generator_loss(batch, step)

    def critic_loss(self, batch: DistillBatch, step: int) -> Tuple[torch.Tensor, Dict[str, float]]:
        return self.inner.critic_loss(batch, step)

    def generator_parameters(self):
        return self.inner.generator_parameters()

    def critic_parameters(self):
        return self.inner.critic_parameters()

    def finalize(self) -> Denoiser:
        update_ema(self.ema, self.generator, self.decay)
        return self.ema


def _loop(cfg: ToyLabConfig, name: str, default: LoopConfig) -> LoopConfig:
    if isinstance(getattr(cfg, name, None), LoopConfig):
        return cfg.loop_for(name)
    return replace(default, iterations=max(1, round(default.iterations * cfg.budget_scale)))


def _discriminator(lab: ToyLab, style: str) -> Discriminator:
    """Critic = trainable teacher copy + register heads on the last two residual blocks' outputs.

    Small heads (FFN width = hidden, no time token: the backbone's features already carry t through
    adaLN) keep the discriminator step about as cheap as two teacher forwards.
    """
    backbone = lab.copy_teacher().net
    layers: List[int] = list(range(max(0, backbone.depth - 2), backbone.depth))
    heads = RegisterHeads(
        RegisterHeadsConfig(
            dim=backbone.hidden, num_layers=len(layers), num_heads=4, ffn_dim=backbone.hidden, style=style
        )
    )
    return Discriminator(backbone, heads, layers)


def _batches(lab: ToyLab, loop: LoopConfig, seed: int):
    g = torch.Generator().manual_seed(seed)
    return lambda step: lab.make_batch(loop.batch_size, g, with_real=True)


def _ode_pair_batches(lab: ToyLab, cfg: ToyLabConfig, loop: LoopConfig, seed: int, pool_size: int = 8192):
    """Batches of stored (noise, guided-teacher 50-step sample) pairs as ``trajectory`` [B, 2, dim].

    APT's target is the teacher's sample for the same noise; computing it once for a pool instead
    of per step (50 steps x 2 CFG calls) makes the recipe ~10x cheaper and changes nothing else.
    """
    g = torch.Generator().manual_seed(seed)
    labels = random_labels(cfg.data, pool_size, g)
    noise = torch.randn(pool_size, cfg.data.dim, generator=g)
    steps = student_step_list(cfg.eval.reference_steps, cfg.shift)
    clean = sample_with(lab.teacher, noise, labels, steps, "euler", lab.uncond_like(labels), cfg.guidance_scale)
    pairs = torch.stack([noise, clean], dim=1)
    t_stored = torch.tensor([1000.0], dtype=torch.float64)

    def make(step: int) -> DistillBatch:
        idx = torch.randint(0, pool_size, (loop.batch_size,), generator=g)
        cond = labels[idx]
        return DistillBatch(
            cond=cond, uncond=lab.uncond_like(cond), latents=DenseLatents(loop.batch_size, (cfg.data.dim,)),
            trajectory=pairs[idx], trajectory_steps=t_stored,
        )

    return make


@register_recipe("gan")
def gan_recipe(lab: ToyLab, cfg: ToyLabConfig, num_steps: int) -> TrainedStudent:
    loop = _loop(cfg, "gan", GAN_LOOP)
    steps = student_step_list(num_steps, cfg.shift)
    rng = torch.Generator().manual_seed(cfg.seed + 31)
    generator = lab.copy_teacher()
    method = GANDistillation(
        GANConfig(
            loss="relativistic", gan_g_weight=1.0, gan_d_weight=1.0, r1_weight=0.1, r2_weight=0.1,
            timestep_shift=cfg.shift, snap_noise_to_grid=False,
        ),
        generator=generator,
        critic=_discriminator(lab, "self_forcing"),
        rollout=FewStepRollout(steps, generator=rng),
        rng=rng,
    )
    if num_steps == 1:  # progress is monotone at 1 step: an EMA only lags (measured ratio 0.39 vs 0.18)
        logs = train_distillation(method, _batches(lab, loop, cfg.seed + 32), loop)
        return TrainedStudent(generator, steps, "renoise", logs)
    tracked = GeneratorEMA(method, GAN_EMA_DECAY)
    logs = train_distillation(tracked, _batches(lab, loop, cfg.seed + 32), loop)
    return TrainedStudent(tracked.finalize(), steps, "renoise", logs)


@register_recipe("apt")
def apt_recipe(lab: ToyLab, cfg: ToyLabConfig, num_steps: int) -> TrainedStudent:
    """APT trains a ONE-step generator whatever ``num_steps`` asks for.

    Re-noising it for more steps calls the network at timesteps APT never trained (measured: ratio
    ~3 at 4 steps), so for num_steps > 1 the lab's row holds the 1-step generator measured against
    the teacher at num_steps: APT's 1-step quality at a 4-step budget, not a 4-step student.
    ``apt_recipe.supported_steps`` says so for a lab that skips unsupported rows.
    """
    loop = _loop(cfg, "apt", APT_LOOP)
    rng = torch.Generator().manual_seed(cfg.seed + 41)
    generator = lab.copy_teacher()
    method = APTDistillation(
        APTConfig(
            teacher_steps=cfg.eval.reference_steps, teacher_shift=cfg.shift, guidance_scale=cfg.guidance_scale,
        ),
        generator=generator,
        critic=_discriminator(lab, "apt"),
        teacher=lab.teacher,
        rng=rng,
    )
    logs = train_distillation(method, _ode_pair_batches(lab, cfg, loop, cfg.seed + 42), loop)
    return TrainedStudent(generator, method.student_step_list(), "renoise", logs)


apt_recipe.supported_steps = (1,)


@register_recipe("consistency")
def consistency_recipe(lab: ToyLab, cfg: ToyLabConfig, num_steps: int) -> TrainedStudent:
    loop = _loop(cfg, "consistency", CONSISTENCY_LOOP)
    steps = student_step_list(num_steps, cfg.shift)
    rng = torch.Generator().manual_seed(cfg.seed + 51)
    generator = lab.copy_teacher()
    method = ConsistencyDistillation(
        ConsistencyConfig(
            num_grid_steps=40, skip_steps=1, grid_shift=cfg.shift, mode="teacher",
            guidance_scale=cfg.guidance_scale, student_steps=steps,
        ),
        generator=generator,
        teacher=lab.teacher,
        rng=rng,
    )
    logs = train_distillation(method, _batches(lab, loop, cfg.seed + 52), loop)
    return TrainedStudent(generator, steps, "renoise", logs)
