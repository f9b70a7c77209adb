"""Progressive distillation (Salimans & Ho 2022) adapted to flow Euler sampling (SeedVR2 recipe).

Stage k distils an N_k-step teacher sampler into an N_k / stride-step student: from a student
grid point sigma_j (which is teacher grid point sigma_{j * stride}), ``stride`` teacher Euler steps
land on x'' at sigma'' = the next student point; the student's single Euler step lands there too
iff its flow equals

    v* = (x'' - x) / (sigma'' - sigma)          (computed in float64)

and the loss is MSE(v_student, v*) (SeedVR2: MSE on velocity). After each stage the teacher
takes the student's weights (the teacher module is overwritten: pass one the caller does not need
afterwards) and the step count is divided by the stride. Each stage's end is a kept checkpoint; the
stage and its teacher are the method's checkpointed state, so a run resumes mid-stage exactly. The first
stage's teacher uses CFG ``guidance_scale``; later stages use ``later_guidance_scale`` (SeedVR2:
7.5 at 64 steps, 1.0 afterwards), so the final student is sampled without CFG.

Inputs x at sigma_j (j drawn per sample) are real clean samples noised to sigma_j (batch.real), as
in Salimans & Ho.
Grids are ``flow_inference_sigmas(N, shift)`` (shifted uniform grids are nested when N_k / N_{k+1}
is an integer).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Dict, List, Optional, Tuple

import torch

from megadistill.diffusion.flow_match import add_noise_continuous
from megadistill.diffusion.noise_schedule import GENERIC
from megadistill.diffusion.samplers import flow_inference_sigmas

from megadistill.engine.local_weights import copy_weights_, load_local_state, local_state

from .base import Denoiser, DistillationMethod, DistillBatch, check_guidance_form, freeze, logs_to_floats


@dataclass
class ProgressiveConfig:
    SCHEDULE_FIELDS: ClassVar[Dict[str, str]] = {"shift": "shift", "num_train_timesteps": "num_train_timesteps"}

    start_steps: int = 64
    end_steps: int = 1
    stride: int = 2
    iterations_per_stage: int = 10000
    shift: float = GENERIC.shift
    guidance_scale: float = 7.5
    later_guidance_scale: float = 1.0
    guidance_form: str = "standard"
    num_train_timesteps: int = GENERIC.num_train_timesteps

    def __post_init__(self):
        check_guidance_form(self.guidance_form)
        if self.stride < 2:
            raise ValueError(f"stride must be >= 2, got {self.stride}")
        if self.end_steps < 1 or self.start_steps <= self.end_steps:
            raise ValueError(f"need start_steps > end_steps >= 1, got {self.start_steps}, {self.end_steps}")
        n = self.start_steps
        while n > self.end_steps:
            if n % self.stride:
                raise ValueError(
                    f"start_steps {self.start_steps} does not reach end_steps {self.end_steps} by dividing by "
                    f"stride {self.stride} ({n} is not divisible)"
                )
            n //= self.stride
        if n != self.end_steps:
            raise ValueError(f"start_steps {self.start_steps} / stride^k never equals end_steps {self.end_steps}")
        if self.iterations_per_stage < 1:
            raise ValueError(f"iterations_per_stage must be >= 1, got {self.iterations_per_stage}")
        if self.shift <= 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")

    def step_counts(self) -> List[int]:
        """[start, start / stride, ..., end]: the teacher of stage k has counts[k] steps."""
        counts = [self.start_steps]
        while counts[-1] > self.end_steps:
            counts.append(counts[-1] // self.stride)
        return counts

    @property
    def num_stages(self) -> int:
        return len(self.step_counts()) - 1


def teacher_multistep_target(
    v_fn, x: torch.Tensor, sigmas: torch.Tensor, num_train_timesteps: int = 1000
) -> torch.Tensor:
    """Flow v* such that one Euler step sigmas[0] -> sigmas[-1] equals Euler through every sigma.

    x [R, ...] at sigmas[..., 0] (R rows: samples, or tokens of packed latents); sigmas is [S + 1]
    (shared) or [R, S + 1] (per row).
    Integration and v* are float64.
    """
    sig = torch.as_tensor(sigmas, dtype=torch.float64, device=x.device)
    if sig.dim() == 1:
        sig = sig.expand(x.shape[0], -1)
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    x64 = x.double()
    y = x64
    for i in range(sig.shape[1] - 1):
        a, b = sig[:, i], sig[:, i + 1]
        y = y + v_fn(y.to(x.dtype), a * num_train_timesteps).double() * (b - a).reshape(shape)
    return (y - x64) / (sig[:, -1] - sig[:, 0]).reshape(shape)


class ProgressiveDistillation(DistillationMethod):
    name = "progressive"
    has_critic = False
    uses_teacher = guided_teacher = True
    needs_real = True
    generator_forward = "parallel"
    student_sampling = "euler"

    @classmethod
    def bind_rollout(cls, config: ProgressiveConfig, rollout) -> ProgressiveConfig:
        """The final student samples at the rollout's steps: ``end_steps`` is their count, and they must
        be that student's grid (``flow_inference_sigmas(end_steps, shift)``, no terminal 0)."""
        if rollout.causal:
            raise ValueError("progressive distillation trains a bidirectional student: set rollout.kind=bidirectional")
        steps = rollout.steps.timesteps()
        bound = dataclasses.replace(config, end_steps=len(steps))
        grid = [float(s) * config.num_train_timesteps for s in flow_inference_sigmas(len(steps), config.shift)[:-1]]
        if any(abs(a - b) > 1e-6 * config.num_train_timesteps for a, b in zip(steps, grid)):
            raise ValueError(f"progressive distillation ends with a {len(steps)}-step Euler student on the shift "
                             f"{config.shift} grid {[round(g, 4) for g in grid]}, but rollout.steps gives {steps}: set "
                             "rollout.steps to that grid (warp false, grid false) or change method.progressive.shift")
        return bound

    @classmethod
    def check_steps(cls, config: ProgressiveConfig, max_steps: int) -> None:
        needed = config.num_stages * config.iterations_per_stage
        if max_steps < needed:
            raise ValueError(f"progressive distillation runs {config.num_stages} stages of {config.iterations_per_stage} "
                             f"steps ({config.step_counts()} sampler steps): train.max_steps must be >= {needed}, "
                             f"got {max_steps}")

    def __init__(
        self, cfg: ProgressiveConfig, *, generator: Denoiser, teacher: Denoiser,
        rng: Optional[torch.Generator] = None, **_,
    ):
        self.cfg = cfg
        self.generator = generator
        self.teacher = freeze(teacher)
        self.rng = rng
        self.stage = 0

    def stage_for(self, step: int) -> int:
        return min(step // self.cfg.iterations_per_stage, self.cfg.num_stages - 1)

    def teacher_guidance(self) -> float:
        return self.cfg.guidance_scale if self.stage == 0 else self.cfg.later_guidance_scale

    def _advance_to(self, stage: int) -> None:
        while self.stage < stage:
            # The student of the finished stage becomes the next stage's (frozen) teacher: its weights
            # are copied into the teacher module (partition by partition under ZeRO-3).
            copy_weights_(self.teacher, self.generator)
            self.stage += 1

    def checkpoint_due(self, step: int) -> bool:
        """The end of every stage (``step`` completed steps): its student is kept."""
        return step % self.cfg.iterations_per_stage == 0 and 0 < step // self.cfg.iterations_per_stage <= self.cfg.num_stages

    def state_dict(self):
        """The stage and, past the first, its teacher (the previous stage's student, this rank's part)."""
        return {"stage": self.stage, "teacher": local_state(self.teacher) if self.stage > 0 else None}

    def load_state_dict(self, state) -> None:
        self.stage = int(state["stage"])
        if state["teacher"] is not None:
            load_local_state(self.teacher, state["teacher"])

    def teacher_sigmas(self) -> torch.Tensor:
        return flow_inference_sigmas(self.cfg.step_counts()[self.stage], self.cfg.shift)

    def student_step_list(self) -> List[float]:
        """Timesteps of the current student (no terminal 0)."""
        n = self.cfg.step_counts()[self.stage + 1]
        return [float(s) * self.cfg.num_train_timesteps for s in flow_inference_sigmas(n, self.cfg.shift)[:-1]]

    def final_step_list(self) -> List[float]:
        n = self.cfg.end_steps
        return [float(s) * self.cfg.num_train_timesteps for s in flow_inference_sigmas(n, self.cfg.shift)[:-1]]

    def generator_loss(self, batch: DistillBatch, step: int) -> Tuple[torch.Tensor, Dict[str, float]]:
        if batch.real is None:
            raise ValueError("progressive distillation needs batch.real (clean samples to noise)")
        self._advance_to(self.stage_for(step))
        stride, T = self.cfg.stride, self.cfg.num_train_timesteps
        teacher_sigmas = self.teacher_sigmas()
        num_student = (len(teacher_sigmas) - 1) // stride
        # One student grid index per sample; its segment is ``stride`` teacher steps long.
        j = torch.randint(0, num_student, (batch.batch_size,), generator=self.rng)
        seg = batch.per_row(teacher_sigmas[j[:, None] * stride + torch.arange(stride + 1)[None, :]].to(batch.real.device))
        sigma = seg[:, 0]
        eps = torch.randn(batch.real.shape, generator=self.rng, dtype=batch.real.dtype, device=batch.real.device)
        x = add_noise_continuous(batch.real, eps, sigma.to(batch.real.dtype))
        scale, form = self.teacher_guidance(), self.cfg.guidance_form
        with torch.no_grad():
            v_target = teacher_multistep_target(
                lambda y, t: self.teacher.flow_guided(y, t, batch.cond, batch.uncond, scale, form), x, seg, T
            )
        v = self.generator.flow(x, sigma * T, batch.cond)
        loss = ((v.double() - v_target) ** 2).mean()
        return loss, logs_to_floats(progressive_loss=loss, stage=self.stage, timestep=(sigma * T).mean())
