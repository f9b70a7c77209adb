"""Consistency distillation (LCM-style) and consistency training, in the flow convention.

Consistency function. The student is used through its x0 prediction f(x_t, t) = x_t - sigma(t) v(x_t, t)
(the flow-form x0 parameterisation, c_skip = 1, c_out = -sigma). At sigma = 0 it returns x_t exactly,
so the boundary condition f(x, 0) = x holds by construction, with no c_skip/c_out schedule to tune.

Grid and skipping step. [0, T] is discretised as the N-step inference grid
sigma_0 = 1 > sigma_1 > ... > sigma_N = 0 (``flow_inference_sigmas(N, shift)``). A training pair is
(sigma_i, sigma_{i+k}) with i uniform in [0, N - k]: k is LCM's skipping step (LCM: N = 50, k = 1 on
its DDIM grid, i.e. 20 of 1000 training timesteps).

One step (``generator_loss``):
  x_a = (1 - sigma_i) x0 + sigma_i eps                 x0 = a clean sample from ``batch.real``
  x_b = one step from sigma_i to sigma_{i+k}:
        teacher mode (consistency distillation): Euler/DDIM step of the teacher with CFG
            x_b = x_a + (sigma_{i+k} - sigma_i) v_cfg(x_a, t_i)
        data mode (consistency training, no separate teacher): the same x0 and eps,
            x_b = (1 - sigma_{i+k}) x0 + sigma_{i+k} eps  (Song et al. 2023's unbiased estimator)
  target = f_ema(x_b, t_{i+k})  (no grad; = x_b at sigma = 0)
  loss = d(f_theta(x_a, t_i), target), d = L2 or the element-wise pseudo-Huber sqrt(d^2 + c^2) - c of
  the LCM scripts (c = 0.001), via ``diffusion.losses.distillation_loss``.

EMA target network. ``target`` is an EMA copy of the student (decay ``ema_decay``; LCM 0.95, 0 makes
the target the student itself with stop-gradient, as iCT). The method updates it at the start of
each step's first ``generator_loss`` call: the optimiser step of step n-1 has happened by then, so the
target lags the student by exactly one update, as in LCM's update-after-step loop. Under ZeRO-3 the
target is partitioned like the generator and updated partition by partition
(engine/local_weights.py); its weights are part of the method's checkpointed state.

Inference. Multistep consistency sampling = the few-step re-noising sampler
(``diffusion.samplers.few_step_sample``) on the student's x0 predictions (``student_step_list``).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar, Dict, List, Optional, Tuple

import torch
from torch import nn

from megadistill.diffusion.flow_match import _expand_like, add_noise_continuous
from megadistill.diffusion.losses import LOSS_KINDS, distillation_loss
from megadistill.diffusion.noise_schedule import GENERIC
from megadistill.diffusion.samplers import flow_inference_sigmas

from megadistill.engine.local_weights import copy_weights_, lerp_weights_, load_local_state, local_state

from .base import Denoiser, DistillationMethod, DistillBatch, MethodNeeds, check_guidance_form, freeze, logs_to_floats

CONSISTENCY_MODES = ("teacher", "data")


@dataclass
class ConsistencyConfig:
    SCHEDULE_FIELDS: ClassVar[Dict[str, str]] = {"grid_shift": "shift", "num_train_timesteps": "num_train_timesteps"}

    num_grid_steps: int = 50  # N: the ODE discretisation the pairs live on
    skip_steps: int = 1  # k: LCM's skipping step, in grid points
    grid_shift: float = GENERIC.shift
    mode: str = "teacher"  # "teacher" = consistency distillation, "data" = consistency training
    guidance_scale: float = 1.0  # teacher CFG in the solver step (teacher mode)
    guidance_form: str = "standard"
    ema_decay: float = 0.95
    loss: str = "huber"
    huber_c: float = 0.001
    student_steps: List[float] = field(default_factory=lambda: [1000.0])
    num_train_timesteps: int = GENERIC.num_train_timesteps

    def __post_init__(self):
        if self.num_grid_steps < 1:
            raise ValueError(f"num_grid_steps must be >= 1, got {self.num_grid_steps}")
        if not 1 <= self.skip_steps <= self.num_grid_steps:
            raise ValueError(f"skip_steps must lie in [1, num_grid_steps={self.num_grid_steps}], got {self.skip_steps}")
        if self.grid_shift <= 0:
            raise ValueError(f"grid_shift must be > 0, got {self.grid_shift}")
        if self.mode not in CONSISTENCY_MODES:
            raise ValueError(f"mode must be one of {CONSISTENCY_MODES}, got {self.mode!r}")
        check_guidance_form(self.guidance_form)
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        if self.loss not in LOSS_KINDS:
            raise ValueError(f"loss must be one of {LOSS_KINDS}, got {self.loss!r}")
        if self.huber_c <= 0:
            raise ValueError(f"huber_c must be > 0, got {self.huber_c}")
        steps = [float(s) for s in self.student_steps]
        if not steps or any(a <= b for a, b in zip(steps, steps[1:])) or steps[-1] <= 0:
            raise ValueError(f"student_steps must be strictly decreasing and positive, got {self.student_steps}")


def update_ema(target: nn.Module, online: nn.Module, decay: float) -> None:
    """target <- decay * target + (1 - decay) * online, parameters (this rank's parts under ZeRO-3)
    and floating buffers."""
    lerp_weights_(target, online, 1.0 - decay)


class ConsistencyDistillation(DistillationMethod):
    """LCM-style consistency distillation / consistency training; see the module docstring.
    ``cls(cfg, generator=, teacher=, rng=)``; other keywords (critic, rollout) are ignored."""

    name = "consistency"
    has_critic = False
    needs_real = True
    needs_target = True
    generator_forward = "parallel"

    @classmethod
    def bind_rollout(cls, config: ConsistencyConfig, rollout) -> ConsistencyConfig:
        """The student samples at the rollout's steps (a bidirectional student: consistency pairs have
        no causal blocks)."""
        if rollout.causal:
            raise ValueError("consistency distillation trains a bidirectional student: set rollout.kind=bidirectional")
        return dataclasses.replace(config, student_steps=rollout.steps.timesteps())

    @classmethod
    def needs(cls, config: Optional[ConsistencyConfig] = None) -> MethodNeeds:
        """Consistency distillation (``mode: teacher``) runs the guided teacher; training (``data``) none."""
        teacher = config is None or config.mode == "teacher"
        return dataclasses.replace(super().needs(config), teacher=teacher, guided_teacher=teacher)

    def __init__(
        self,
        cfg: ConsistencyConfig,
        *,
        generator: Denoiser,
        teacher: Optional[Denoiser] = None,
        target: Optional[Denoiser] = None,
        rng: Optional[torch.Generator] = None,
        **_,
    ):
        if cfg.mode == "teacher" and teacher is None:
            raise ValueError("mode='teacher' (consistency distillation) needs a teacher")
        self.cfg = cfg
        self.generator = generator
        self.teacher = teacher
        # The EMA target starts as the generator: a built copy (``target``, e.g. ZeRO-3 partitioned
        # like the generator) takes its weights; without one, a plain module is copied.
        if target is None:
            target = copy.deepcopy(generator)
        else:
            copy_weights_(target, generator)
        self.target = freeze(target)
        self.rng = rng
        self.sigmas = flow_inference_sigmas(cfg.num_grid_steps, cfg.grid_shift)
        self.ema_step = -1  # the step of the last target update: once per step, whatever grad_accum

    def state_dict(self):
        return {"target": local_state(self.target), "ema_step": self.ema_step}

    def load_state_dict(self, state) -> None:
        load_local_state(self.target, state["target"])
        self.ema_step = int(state["ema_step"])

    def student_step_list(self) -> List[float]:
        return [float(s) for s in self.cfg.student_steps]


    def _pair_sigmas(self, batch_size: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
        n, k = self.cfg.num_grid_steps, self.cfg.skip_steps
        i = torch.randint(0, n - k + 1, (batch_size,), generator=self.rng, device=device)
        sigmas = self.sigmas.to(device)
        return sigmas[i], sigmas[i + k]

    def generator_loss(self, batch: DistillBatch, step: int) -> Tuple[torch.Tensor, Dict[str, float]]:
        if batch.real is None:
            raise ValueError("consistency distillation needs clean samples in batch.real")
        cfg = self.cfg
        if step != self.ema_step:  # the first micro-batch of a step: the previous update is done
            update_ema(self.target, self.generator, cfg.ema_decay)
            self.ema_step = step
        x0 = batch.real
        sig_a, sig_b = map(batch.per_row, self._pair_sigmas(batch.batch_size, x0.device))
        t_a, t_b = sig_a * cfg.num_train_timesteps, sig_b * cfg.num_train_timesteps
        eps = torch.randn(x0.shape, generator=self.rng, dtype=x0.dtype, device=x0.device)
        x_a = add_noise_continuous(x0, eps, sig_a.to(x0.dtype))
        with torch.no_grad():
            if cfg.mode == "teacher":
                v = self.teacher.flow_guided(x_a, t_a, batch.cond, batch.uncond, cfg.guidance_scale, cfg.guidance_form)
                x_b = x_a + v * _expand_like((sig_b - sig_a).to(x_a.dtype), x_a)
            else:
                x_b = add_noise_continuous(x0, eps, sig_b.to(x0.dtype))
            target = self.target.x0(x_b, t_b, batch.cond)
        pred = self.generator.x0(x_a, t_a, batch.cond)
        loss = distillation_loss(pred, target.detach(), cfg.loss, cfg.huber_c)
        return loss, logs_to_floats(consistency_loss=loss, mean_t=t_a.mean())
