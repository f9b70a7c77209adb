"""Distribution Matching Distillation (DMD / DMD2 as in Self-Forcing, CausVid and FastVideo).

Generator step (all score evaluations under no_grad; only the rollout carries gradient):
    x = rollout(G)                                 (gradient only at the exit step)
    t, eps as in score_distillation.py;  x_t = (1 - sigma) x + sigma eps
    x0_fake = F(x_t, c)                            (+ g_f (F(x_t,c) - F(x_t,u)) if fake_guidance_scale)
    x0_real = CFG(R(x_t, c), R(x_t, u))            (upstream form by default, see guidance.py)
    grad    = nan_to_num((x0_fake - x0_real) / mean_{per sample} |x - x0_real|)
    loss    = 0.5 * mean((x - stopgrad(x - grad))^2) in float64 over gradient_mask
so dL/dx = grad / N: the generator's samples move along x0_real - x0_fake.
Critic step: denoising loss of F on a fresh no_grad rollout (score_distillation.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from megadistill.diffusion.latents import DenseLatents, Latents

from .base import DistillBatch, logs_to_floats, masked_mean
from .score_distillation import ScoreDistillConfig, ScoreDistillationMethod


@dataclass
class DMDConfig(ScoreDistillConfig):
    # Upstream-form guidance of the fake score (x_fc + g_f (x_fc - x_fu)); 0 = conditional only.
    fake_guidance_scale: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if self.fake_guidance_scale < 0:
            raise ValueError(f"fake_guidance_scale must be >= 0, got {self.fake_guidance_scale}")


def dmd_gradient(x: torch.Tensor, x0_fake: torch.Tensor, x0_real: torch.Tensor,
                 latents: Optional[Latents] = None) -> torch.Tensor:
    """(x0_fake - x0_real) / mean|x - x0_real| per sample of ``latents`` (default: dense, dim 0 the
    batch), float64, NaN/inf replaced (upstream nan_to_num)."""
    x, x0_fake, x0_real = x.double(), x0_fake.double(), x0_real.double()
    latents = latents if latents is not None else DenseLatents(x.shape[0], x.shape[1:])
    return torch.nan_to_num((x0_fake - x0_real) / latents.per_sample_mean_abs(x - x0_real))


def dmd_loss(x: torch.Tensor, grad: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """0.5 * MSE(x, stopgrad(x - grad)) in float64, averaged over mask (all elements when None)."""
    x = x.double()
    target = (x - grad.double()).detach()
    return 0.5 * masked_mean((x - target) ** 2, mask)


class DMD(ScoreDistillationMethod):
    name = "dmd"

    def fake_x0(self, x_t: torch.Tensor, t: torch.Tensor, batch: DistillBatch) -> torch.Tensor:
        return self.critic.x0_guided(x_t, t, batch.cond, batch.uncond, self.cfg.fake_guidance_scale, "upstream",
                                     sigma=self.score_sigma(t, x_t))

    def generator_loss(self, batch: DistillBatch, step: int) -> Tuple[torch.Tensor, Dict[str, float]]:
        out = self.rollout(self.generator, batch, grad=True)
        x = out.samples
        with torch.no_grad():
            x_t, t, _ = self.noised(x.detach(), batch, out)
            grad = dmd_gradient(x, self.fake_x0(x_t, t, batch), self.real_x0(x_t, t, batch), batch.latents)
        loss = dmd_loss(x, grad, out.gradient_mask)
        return loss, logs_to_floats(
            dmd_loss=loss, dmdtrain_gradient_norm=grad.abs().mean(), timestep=t.mean(), exit_index=out.exit_index
        )
