"""Bidirectional (whole-clip) training rollout and few-step inference on Wan (Wan2.2-TI2V DMD fork).

Training: ``BidirectionalRollout`` is ``FewStepRollout`` (one exit step drawn for the whole clip, the
steps before it under no_grad with re-noising, the exit step with gradient) run at
``StepListConfig.timesteps()`` and re-noising on ``StepListConfig.schedule()``. With TI2V first-frame
conditioning the WanDenoiser already pins latent frame 0 to the image latent; the rollout adds the
gradient mask that keeps frame 0 out of every generator loss (the losses average over the mask).

Inference: ``bidirectional_generate`` is ``few_step_sample`` with the same step list and grid, so the
student runs at exactly the timesteps it was trained at.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from megadistill.diffusion.samplers import few_step_sample
from megadistill.methods.base import DistillBatch, FewStepRollout, RolloutOutput

from .steps import StepListConfig
from megadistill.models.wan.denoiser import WanCondition, WanDenoiser, as_wan_condition


def first_frame_gradient_mask(num_frames: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """bool [1, 1, F, 1, 1]: every latent frame but frame 0 (broadcasts over [B, C, F, H, W])."""
    if num_frames < 2:
        raise ValueError(f"first-frame conditioning needs at least 2 latent frames, got {num_frames}")
    mask = torch.ones(1, 1, num_frames, 1, 1, dtype=torch.bool, device=device)
    mask[:, :, 0] = False
    return mask


class BidirectionalRollout:
    """Rollout protocol over a WanDenoiser; batch.sample_shape is (C, F, H, W), batch.cond a WanCondition.

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

    def __call__(self, generator: WanDenoiser, batch: DistillBatch, *, grad: bool) -> RolloutOutput:
        if len(batch.sample_shape) != 4:
            raise ValueError(f"Wan samples are [C, F, H, W]; batch.sample_shape is {tuple(batch.sample_shape)}")
        out = self._rollout(generator, batch, grad=grad)
        if as_wan_condition(batch.cond).first_frame is not None:
            out.gradient_mask = first_frame_gradient_mask(out.samples.shape[2], out.samples.device)
        return out


def bidirectional_generate(
    denoiser: WanDenoiser,
    cond: WanCondition,
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
