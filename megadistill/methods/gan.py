"""GAN distillation (Self-Forcing ``model/gan.py``, written so that it runs).

The critic is a trainable copy of the teacher with register-token heads on chosen layers
(``models.discriminators``). Per step:

  * a generator rollout gives fake clean samples x_f (with grad in the generator step, fresh and
    under no_grad in the critic step); reals x_r come from ``batch.real``;
  * one critic timestep t per sample, drawn exactly as DMD's critic (``sample_score_timesteps``:
    randint in [min_t, max_t), the timestep shift, clamp to [min_step, max_step] * T; ts_schedule /
    ts_schedule_max narrow the range to the rollout's denoised interval) and ONE eps: x_r and x_f
    are noised at the same t with the same eps and go through the critic as one batch of 2B;
  * generator: gan_g_weight * G-loss (non-saturating softplus(-D_f) or relativistic
    softplus(-(D_f - D_r)); hinge also available), critic parameters frozen (gradient reaches x_f only);
  * critic: gan_d_weight * D-loss + 0.5 * (r1 + r2) with r1 = r1_weight * mean(r^2),
    r = (D(x_r,t + sigma n) - D(x_r,t)) / sigma (finite-difference R1 on the noisy real input, R2 the
    same on the noisy fake), sigma = 0.01 (``methods.adversarial.finite_difference_penalty``).

Optional (``critic_denoising_weight`` > 0, off upstream): the critic's backbone also minimises its
flow denoising loss on the noisy fakes, mean((v_F(x_f,t) - (eps - x_f))^2), taken from the same
forward. This keeps the critic a score network of the generator's distribution (DMD's fake score), so
the same critic can serve a DMD + GAN combination; the GAN alone does not need it.
Defaults are Self-Forcing's: gan_g_weight = gan_d_weight = 1e-2, r1 = r2 = 0, sigma 0.01.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from megadistill.diffusion.flow_match import flow_target
from megadistill.models.discriminators.discriminator import Discriminator

from .adversarial import (
    GAN_LOSS_KINDS,
    cat_batch,
    discriminator_adversarial_loss,
    finite_difference_penalty,
    frozen,
    generator_adversarial_loss,
)
from .base import Denoiser, DistillationMethod, DistillBatch, Rollout, RolloutOutput, logs_to_floats, masked_mean
from .score_distillation import ScoreTimestepConfig, add_score_noise, sample_score_timesteps


@dataclass
class GANConfig(ScoreTimestepConfig):
    """Critic timestep draw and noising are the shared ScoreTimestepConfig ones (Self-Forcing)."""

    loss: str = "non_saturating"  # Self-Forcing relativistic_discriminator=True is "relativistic"
    gan_g_weight: float = 1e-2
    gan_d_weight: float = 1e-2
    r1_weight: float = 0.0
    r2_weight: float = 0.0
    r1_sigma: float = 0.01
    r2_sigma: float = 0.01
    critic_denoising_weight: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if self.loss not in GAN_LOSS_KINDS:
            raise ValueError(f"loss must be one of {GAN_LOSS_KINDS}, got {self.loss!r}")
        for name in ("gan_g_weight", "gan_d_weight", "r1_weight", "r2_weight", "critic_denoising_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("r1_sigma", "r2_sigma"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


class GANDistillation(DistillationMethod):
    """See the module docstring. Built like every method: ``cls(cfg, generator=, critic=, rollout=, rng=)``
    (other keywords are ignored); ``critic`` is the ``Discriminator`` (backbone copy + heads)."""

    name = "gan"
    has_critic = True
    critic_kind = "discriminator"
    needs_real = True

    def __init__(
        self,
        cfg: GANConfig,
        *,
        generator: Denoiser,
        critic: Discriminator,
        rollout: Rollout,
        rng: Optional[torch.Generator] = None,
        **_,
    ):
        self.cfg = cfg
        self.generator = generator
        self.critic = critic
        self.rollout = rollout
        self.rng = rng



    def student_step_list(self) -> List[float]:
        return list(self.rollout.step_list)

    # ---- shared pieces ------------------------------------------------------------------------
    def _timesteps(self, batch: DistillBatch, rollout: RolloutOutput) -> torch.Tensor:
        return batch.per_row(sample_score_timesteps(self.cfg, batch.batch_size, rollout, self.rng, batch.device))

    def _noised_pair(self, batch: DistillBatch, fake: torch.Tensor, t: torch.Tensor):
        if batch.real is None:
            raise ValueError("the GAN method needs real clean samples in batch.real")
        real = batch.real.to(fake.dtype)
        eps = torch.randn(fake.shape, generator=self.rng, dtype=fake.dtype, device=fake.device)
        return add_score_noise(self.cfg, real, eps, t), add_score_noise(self.cfg, fake, eps, t), eps

    def _critic(self, fake_t: torch.Tensor, real_t: torch.Tensor, t: torch.Tensor, cond):
        """One forward of 2B: returns (fake output, real output) split back from the batch."""
        # .forward, not __call__: the critic is the root module of its DeepSpeed engine, and ZeRO-3's
        # root hooks would run its backward bookkeeping inside the GENERATOR engine's backward (the
        # generator loss backpropagates through the frozen critic) and fail. Every method calls the
        # root's methods, never the root (its submodules' hooks still gather their parameters).
        out = self.critic.forward(torch.cat([fake_t, real_t]), torch.cat([t, t]), cat_batch(cond, cond))
        b = fake_t.shape[0]
        return out.logits[:b], out.logits[b:], out.flow[:b]

    # ---- losses -------------------------------------------------------------------------------
    def generator_loss(self, batch: DistillBatch, step: int) -> Tuple[torch.Tensor, Dict[str, float]]:
        ro = self.rollout(self.generator, batch, grad=True)
        t = self._timesteps(batch, ro)
        real_t, fake_t, _ = self._noised_pair(batch, ro.samples, t)
        with frozen(self.critic):
            d_fake, d_real, _ = self._critic(fake_t, real_t.detach(), t, batch.cond)
        g_loss = generator_adversarial_loss(self.cfg.loss, d_real, d_fake)
        loss = self.cfg.gan_g_weight * g_loss
        return loss, logs_to_floats(gan_g_loss=g_loss, fake_logit=d_fake.mean(), real_logit=d_real.mean())

    def critic_loss(self, batch: DistillBatch, step: int) -> Tuple[torch.Tensor, Dict[str, float]]:
        cfg = self.cfg
        with torch.no_grad():
            ro = self.rollout(self.generator, batch, grad=False)
        fake = ro.samples.detach()
        t = self._timesteps(batch, ro)
        real_t, fake_t, eps = self._noised_pair(batch, fake, t)
        d_fake, d_real, v_fake = self._critic(fake_t, real_t, t, batch.cond)
        d_loss = discriminator_adversarial_loss(cfg.loss, d_real, d_fake)
        loss = cfg.gan_d_weight * d_loss

        def logits(x):
            return self.critic.forward(x, t, batch.cond).logits

        r1 = r2 = torch.zeros((), device=fake.device)
        if cfg.r1_weight > 0:
            r1 = cfg.r1_weight * finite_difference_penalty(logits, real_t, cfg.r1_sigma, d_x=d_real, generator=self.rng)
        if cfg.r2_weight > 0:
            r2 = cfg.r2_weight * finite_difference_penalty(logits, fake_t, cfg.r2_sigma, d_x=d_fake, generator=self.rng)
        loss = loss + 0.5 * (r1 + r2)
        logs = dict(
            gan_d_loss=d_loss, r1=r1, r2=r2, fake_logit=d_fake.mean(), real_logit=d_real.mean(), critic_t=t.mean()
        )
        if cfg.critic_denoising_weight > 0:
            denoise = masked_mean((v_fake.double() - flow_target(fake, eps).double()).pow(2), ro.gradient_mask)
            loss = loss + cfg.critic_denoising_weight * denoise
            logs["critic_denoising_loss"] = denoise
        return loss, logs_to_floats(**logs)
