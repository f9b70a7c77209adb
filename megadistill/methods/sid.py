"""Score identity Distillation (SiD) as in Self-Forcing ``model/sid.py`` (without its config bug).

    x = rollout(G);  x_t = (1 - sigma) x + sigma eps        (x_t keeps the gradient of x)
    r = CFG(R(x_t, c), R(x_t, u)),  f = F(x_t, c)           (both WITH gradient into x_t)
    L = mean[(r - f) * ((r - x) - alpha (r - f)) / stopgrad(mean_{per sample} |x - r|)]   (float64)
The critic is trained exactly as for DMD (ScoreDistillationMethod.critic_loss). Gradients of L
also reach the critic's parameters; the training loop clears them before the critic step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from megadistill.diffusion.latents import DenseLatents, Latents

from .base import DistillBatch, logs_to_floats, masked_mean
from .score_distillation import ScoreDistillConfig, ScoreDistillationMethod


@dataclass
class SiDConfig(ScoreDistillConfig):
    alpha: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")


def sid_loss(
    x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor, alpha: float, mask: Optional[torch.Tensor] = None,
    latents: Optional[Latents] = None,
) -> torch.Tensor:
    """SiD's generator loss, normalised by mean|x - x0_real| per sample of ``latents`` (default: dense)."""
    x, r, f = x.double(), x0_real.double(), x0_fake.double()
    latents = latents if latents is not None else DenseLatents(x.shape[0], x.shape[1:])
    normaliser = latents.per_sample_mean_abs(x - r).detach()
    loss = torch.nan_to_num((r - f) * ((r - x) - alpha * (r - f)) / normaliser)
    return masked_mean(loss, mask)


class SiD(ScoreDistillationMethod):
    name = "sid"

    def generator_loss(self, batch: DistillBatch, step: int) -> Tuple[torch.Tensor, Dict[str, float]]:
        out = self.rollout(self.generator, batch, grad=True)
        x = out.samples
        x_t, t, _ = self.noised(x, batch, out)
        x0_fake = self.critic.x0(x_t, t, batch.cond, self.score_sigma(t, x_t))
        x0_real = self.real_x0(x_t, t, batch)
        loss = sid_loss(x, x0_real, x0_fake, self.cfg.alpha, out.gradient_mask, batch.latents)
        return loss, logs_to_floats(sid_loss=loss, timestep=t.mean(), exit_index=out.exit_index)
