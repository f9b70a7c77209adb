"""Bidirectional (whole-clip) training rollout and few-step inference (the recipe of the TI2V DMD fork).

Training: ``BidirectionalRollout`` is ``FewStepRollout`` (one exit step drawn for the whole clip, the
steps before it under no_grad with re-noising, the exit step with gradient) run at
``StepListConfig.timesteps()`` and re-noising on ``StepListConfig.schedule()``. Where the condition
pins part of a sample (a first frame given as an image, which the denoiser overwrites with its latent)
the rollout returns the denoiser's ``generated_mask`` as the gradient mask, which keeps those elements
out of every generator loss (the losses average over the mask).

Inference: ``bidirectional_generate`` is ``few_step_sample`` with the same step list and grid, so the
student runs at exactly the timesteps it was trained at.
"""
from __future__ import annotations

from typing import Any, List, Optional

import torch

from megadistill.diffusion.samplers import few_step_sample
from megadistill.methods.base import Denoiser, DistillBatch, FewStepRollout, RolloutOutput

from .steps import StepListConfig


class BidirectionalRollout:
    """Rollout protocol over any Denoiser; the batch's layout is ``batch.latents``.

    ``generator`` draws the exit step and must be seeded identically on every rank (under ZeRO-3 the
    exit step decides which forwards run); ``noise_generator`` draws the initial and re-noising noise
    and must differ per data-parallel rank. ``last_step_only`` always exits at the final step.
    """

    def __init__(
        self,
        steps: StepListConfig,
        generator: Optional[torch.Generator] = None,
        noise_generator: Optional[torch.Generator] = None,
        last_step_only: bool = False,
    ):
        self.steps = steps
        self._rollout = FewStepRollout(
            steps.timesteps(),
            last_step_only=last_step_only,
            schedule=steps.schedule(),
            generator=generator,
            num_train_timesteps=steps.num_train_timesteps,
            noise_generator=noise_generator,
        )

    @property
    def step_list(self) -> List[float]:
        """The timesteps the generator runs at (what methods report as the student's step list)."""
        return self._rollout.step_list

    def __call__(self, generator: Denoiser, batch: DistillBatch, *, grad: bool) -> RolloutOutput:
        out = self._rollout(generator, batch, grad=grad)
        out.gradient_mask = generator.generated_mask(batch.cond, out.samples)
        return out


def bidirectional_generate(
    denoiser: Denoiser,
    cond: Any,
    noise: torch.Tensor,
    steps: StepListConfig,
    noise_generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Few-step sample [B, C, F, H, W] from ``noise`` at ``steps.timesteps()`` (re-noising between steps)."""
    with torch.no_grad():
        return few_step_sample(
            lambda x, t: denoiser.x0(x, t, cond),
            noise,
            steps.timesteps(),
            generator=noise_generator,
            schedule=steps.schedule(),
            num_train_timesteps=steps.num_train_timesteps,
        )
