"""Adversarial post-training (Seaweed-APT) with the SeedVR2 recipe: a one-step generator.

Generator. Always fed t = T: x_hat = G(z, c) = z - v(z, c, T) (``Denoiser.x0`` at sigma = 1).

Target x (what x_hat should become), ``target``:
  * ``teacher``: the teacher's multi-step sample for the SAME noise z (Euler over
    ``flow_inference_sigmas(teacher_steps, teacher_shift)`` with CFG), computed on the fly; when the
    batch carries ODE pairs (``batch.trajectory`` [B, K+1, ...]) their endpoints (noise, clean) are
    used instead of re-running the teacher;
  * ``real``: ``batch.real`` with fresh noise (SeedVR2 restoration: the HQ video paired with the
    condition, which holds the LQ latent).
The same x is the discriminator's real sample, so x_hat and x are paired element-wise, which is what
the relativistic (RpGAN) loss compares.

Discriminator input. x_hat and x are noised at one discriminator timestep per sample with one eps,
t = T * shift(u, s), u ~ U(0, 1) (APT's timestep ensemble; s = 1 images, 12 video), and go through
the discriminator (backbone copy + register heads, ``models.discriminators``) as one batch of 2B.

Generator loss (discriminator frozen):
    distill_weight * d(x_hat, x)                      d = L1 / L2 / pseudo-Huber (diffusion.losses)
  + gan_g_weight   * G-loss(D(x_hat_t), D(x_t))       non_saturating / hinge / relativistic
  + fm_weight      * mean_l mean |F_l(x_hat_t) - F_l(x_t)|   (features before the heads, reals detached)
Discriminator loss:
    gan_d_weight * D-loss + lazy(step) * (r1_weight * R1 + r2_weight * R2)
with R1 = ||D(x_t) - D(x_t + sigma n)||^2 on reals and R2 the same on fakes, in APT's raw form
(= sigma^2 * the gradient-scale ``finite_difference_penalty``), so the paper's weights apply directly;
lazy(step) = ``reg_interval`` every ``reg_interval`` steps, else 0 (APT: interval 1, every D step).

Defaults follow SeedVR2: RpGAN, L1 = FM = GAN = 1 (0.1 for L1 and FM in their final model), D:
GAN 1, R1 = R2 = 1000, sigma 0.01 (APT images; 0.1 for video). APT's own choice is the
non-saturating loss with R1 only (r2_weight 0), lambda 100.

No SNR weighting of the distillation loss: the generator sits at the single timestep T, where
SNR = 0 for every sample, so a per-sample SNR weight is a constant (zero for plain SNR); methods with
varying t use ``diffusion.losses.denoising_weight`` for it.

Multi-step use: APT trains one step only; ``student_step_list`` is [T]. A 4-step sampler can re-noise
the 1-step output and call the same network at lower t, but those inputs were never trained here, so
the toy lab reports APT at 1 step (see toylab/recipes_adversarial.py).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Dict, List, Optional, Tuple

import torch

from megadistill.diffusion.flow_match import add_noise_continuous, shift_sigma
from megadistill.diffusion.losses import LOSS_KINDS, distillation_loss
from megadistill.diffusion.noise_schedule import GENERIC
from megadistill.diffusion.samplers import euler_flow_sample, flow_inference_sigmas
from megadistill.models.discriminators.discriminator import Discriminator

from .adversarial import (
    GAN_LOSS_KINDS,
    apt_to_gradient_scale,
    cat_batch,
    discriminator_adversarial_loss,
    feature_matching_loss,
    finite_difference_penalty,
    frozen,
    generator_adversarial_loss,
    lazy_regularization_weight,
)
from .base import Denoiser, DistillationMethod, DistillBatch, MethodNeeds, check_guidance_form, logs_to_floats

APT_TARGETS = ("teacher", "real")


@dataclass
class APTConfig:
    SCHEDULE_FIELDS: ClassVar[Dict[str, str]] = {"teacher_shift": "shift", "num_train_timesteps": "num_train_timesteps"}

    gan_loss: str = "relativistic"
    distill_loss: str = "l1"
    huber_c: float = 1e-3
    distill_weight: float = 1.0
    fm_weight: float = 1.0
    gan_g_weight: float = 1.0
    gan_d_weight: float = 1.0
    r1_weight: float = 1000.0  # APT raw scale: weight on mean ||D(x) - D(x + sigma n)||^2
    r2_weight: float = 1000.0
    reg_sigma: float = 0.01
    reg_interval: int = 1
    d_timestep_shift: float = 1.0
    target: str = "teacher"
    teacher_steps: int = 50
    teacher_shift: float = GENERIC.shift
    guidance_scale: float = 1.0
    guidance_form: str = "standard"
    num_train_timesteps: int = GENERIC.num_train_timesteps

    def __post_init__(self):
        if self.gan_loss not in GAN_LOSS_KINDS:
            raise ValueError(f"gan_loss must be one of {GAN_LOSS_KINDS}, got {self.gan_loss!r}")
        if self.distill_loss not in LOSS_KINDS:
            raise ValueError(f"distill_loss must be one of {LOSS_KINDS}, got {self.distill_loss!r}")
        for name in ("distill_weight", "fm_weight", "gan_g_weight", "gan_d_weight", "r1_weight", "r2_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("huber_c", "reg_sigma", "d_timestep_shift", "teacher_shift"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.reg_interval < 1:
            raise ValueError(f"reg_interval must be >= 1, got {self.reg_interval}")
        if self.target not in APT_TARGETS:
            raise ValueError(f"target must be one of {APT_TARGETS}, got {self.target!r}")
        if self.teacher_steps < 1:
            raise ValueError(f"teacher_steps must be >= 1, got {self.teacher_steps}")
        check_guidance_form(self.guidance_form)


def discriminator_timesteps(
    batch_size: int, shift: float, num_train_timesteps: int = 1000,
    generator: Optional[torch.Generator] = None, device: Optional[torch.device] = None,
) -> torch.Tensor:
    """APT's timestep ensemble t = T * shift(u, s), u ~ U(0, 1) (float64 [B])."""
    u = torch.rand(batch_size, generator=generator, dtype=torch.float64, device=device)
    return shift_sigma(u, shift) * num_train_timesteps


class APTDistillation(DistillationMethod):
    """See the module docstring. ``cls(cfg, generator=, critic=, teacher=, rng=)``; ``critic`` is the
    ``Discriminator``; other keywords are ignored."""

    name = "apt"
    has_critic = True
    critic_kind = "discriminator"
    generator_forward = "parallel"

    @classmethod
    def bind_rollout(cls, config: APTConfig, rollout) -> APTConfig:
        """APT trains a one-step bidirectional generator: the rollout must be that one step, at T."""
        steps = rollout.steps.timesteps()
        if rollout.causal or steps != [float(config.num_train_timesteps)]:
            raise ValueError(f"APT trains a one-step generator fed t = {config.num_train_timesteps}: set "
                             f"rollout.kind=bidirectional and rollout.steps.steps=[{config.num_train_timesteps}] "
                             f"(got kind {rollout.kind!r}, steps {steps})")
        return config

    @classmethod
    def needs(cls, config: Optional[APTConfig] = None) -> MethodNeeds:
        """``target: teacher`` runs the guided teacher (or reads stored ODE pairs); ``real`` trains on real samples."""
        teacher = config is None or config.target == "teacher"
        return dataclasses.replace(super().needs(config), teacher=teacher, guided_teacher=teacher, real=not teacher)

    def __init__(
        self,
        cfg: APTConfig,
        *,
        generator: Denoiser,
        critic: Discriminator,
        teacher: Optional[Denoiser] = None,
        rng: Optional[torch.Generator] = None,
        **_,
    ):
        if cfg.target == "teacher" and teacher is None:
            raise ValueError("target='teacher' needs a teacher (or use target='real')")
        self.cfg = cfg
        self.generator = generator
        self.critic = critic
        self.teacher = teacher
        self.rng = rng



    def student_step_list(self) -> List[float]:
        return [float(self.cfg.num_train_timesteps)]

    # ---- pieces -------------------------------------------------------------------------------
    def _noise_and_target(self, batch: DistillBatch) -> Tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        if cfg.target == "real":
            if batch.real is None:
                raise ValueError("target='real' needs batch.real")
            return batch.noise(self.rng), batch.real
        if batch.trajectory is not None:
            return batch.trajectory[:, 0], batch.trajectory[:, -1]
        z = batch.noise(self.rng)
        sigmas = flow_inference_sigmas(cfg.teacher_steps, cfg.teacher_shift)

        def v_fn(x, t):
            return self.teacher.flow_guided(x, t, batch.cond, batch.uncond, cfg.guidance_scale, cfg.guidance_form)

        with torch.no_grad():
            x = euler_flow_sample(v_fn, z, sigmas, cfg.num_train_timesteps)
        return z, x

    def generate(self, z: torch.Tensor, cond) -> torch.Tensor:
        """One step from pure noise: G(z, c) = z - v(z, c, T)."""
        t = torch.full((z.shape[0],), float(self.cfg.num_train_timesteps), dtype=torch.float64, device=z.device)
        return self.generator.x0(z, t, cond)

    def _discriminate(self, fake: torch.Tensor, real: torch.Tensor, batch: DistillBatch):
        cfg = self.cfg
        t = batch.per_row(discriminator_timesteps(
            batch.batch_size, cfg.d_timestep_shift, cfg.num_train_timesteps, self.rng, fake.device
        ))
        eps = torch.randn(fake.shape, generator=self.rng, dtype=fake.dtype, device=fake.device)
        sigma = (t / cfg.num_train_timesteps).to(fake.dtype)
        fake_t, real_t = add_noise_continuous(fake, eps, sigma), add_noise_continuous(real.to(fake.dtype), eps, sigma)
        # .forward, not the root module's __call__ (ZeRO-3 root hooks; see GANDistillation._critic)
        out = self.critic.forward(torch.cat([fake_t, real_t]), torch.cat([t, t]), cat_batch(batch.cond, batch.cond))
        b = fake.shape[0]
        feats_fake, feats_real = [f[:b] for f in out.features], [f[b:] for f in out.features]
        return t, fake_t, real_t, out.logits[:b], out.logits[b:], feats_fake, feats_real

    # ---- losses -------------------------------------------------------------------------------
    def generator_loss(self, batch: DistillBatch, step: int) -> Tuple[torch.Tensor, Dict[str, float]]:
        cfg = self.cfg
        z, target = self._noise_and_target(batch)
        fake = self.generate(z, batch.cond)
        distill = distillation_loss(fake, target.detach().to(fake.dtype), cfg.distill_loss, cfg.huber_c)
        loss = cfg.distill_weight * distill
        logs = dict(distill_loss=distill)
        if cfg.gan_g_weight > 0 or cfg.fm_weight > 0:
            with frozen(self.critic):
                _, _, _, d_fake, d_real, f_fake, f_real = self._discriminate(fake, target.detach(), batch)
            g_loss = generator_adversarial_loss(cfg.gan_loss, d_real.detach(), d_fake)
            fm = feature_matching_loss(f_fake, [f.detach() for f in f_real])
            loss = loss + cfg.gan_g_weight * g_loss + cfg.fm_weight * fm
            logs.update(gan_g_loss=g_loss, fm_loss=fm, fake_logit=d_fake.mean(), real_logit=d_real.mean())
        return loss, logs_to_floats(**logs)

    def critic_loss(self, batch: DistillBatch, step: int) -> Tuple[torch.Tensor, Dict[str, float]]:
        cfg = self.cfg
        with torch.no_grad():
            z, target = self._noise_and_target(batch)
            fake = self.generate(z, batch.cond)
        t, fake_t, real_t, d_fake, d_real, _, _ = self._discriminate(fake, target, batch)
        d_loss = discriminator_adversarial_loss(cfg.gan_loss, d_real, d_fake)
        loss = cfg.gan_d_weight * d_loss
        logs = dict(gan_d_loss=d_loss, fake_logit=d_fake.mean(), real_logit=d_real.mean())
        lazy = lazy_regularization_weight(step, cfg.reg_interval)
        if lazy > 0 and (cfg.r1_weight > 0 or cfg.r2_weight > 0):
            def logits(x):
                return self.critic.forward(x, t, batch.cond).logits

            scale = lazy * apt_to_gradient_scale(1.0, cfg.reg_sigma)
            if cfg.r1_weight > 0:
                r1 = finite_difference_penalty(logits, real_t, cfg.reg_sigma, d_x=d_real, generator=self.rng)
                loss = loss + scale * cfg.r1_weight * r1
                logs["r1"] = r1
            if cfg.r2_weight > 0:
                r2 = finite_difference_penalty(logits, fake_t, cfg.reg_sigma, d_x=d_fake, generator=self.rng)
                loss = loss + scale * cfg.r2_weight * r2
                logs["r2"] = r2
        return loss, logs_to_floats(**logs)
