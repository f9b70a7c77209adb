"""What DMD and SiD share: score timestep sampling, the real (teacher) and fake (critic) scores, and
the critic's denoising loss on a no_grad generator rollout (Self-Forcing ``model/dmd.py``).

Timesteps (upstream ``_get_timestep`` + shift + clamp):
    t0 ~ randint(min_t, max_t)   min_t = denoised_timestep_to if ts_schedule else min_score_timestep
                                 max_t = denoised_timestep_from if ts_schedule_max else T
    t = T * shift_sigma(t0 / T, timestep_shift), clamped to [min_step_ratio T, max_step_ratio T]
    x_t = (1 - sigma) x + sigma eps, sigma snapped to the FlowMatch grid (shift = timestep_shift)
    when ``snap_noise_to_grid`` (upstream scheduler.add_noise), else continuous.

Real score: teacher x0 with CFG, ``guidance_form`` "upstream" (x_c + g (x_c - x_u); Self-Forcing's
guidance_scale 3.0 is standard CFG 4.0) or "standard" (x_u + s (x_c - x_u)).
Critic loss: ``flow``: mean((v_fake - (eps - x))^2) in float64; ``x0``: mean((x0_fake - x)^2)
(the TI2V-5B fork of Self-Forcing).

Score sigma (``score_sigma``): the sigma with which the teacher's and the critic's flow predictions
become x0. ``exact``: the noise level x_t was made with (the grid sigma when snapping). ``upstream``:
Self-Forcing's, whose score wrappers are built without the config's shift and snap t to the grid
of ``upstream_score_shift`` (8) while x_t was noised on the shift-5 grid; its critic loss then turns
x0_fake back into a flow with the noise sigma, (x_t - x0_fake) / sigma_noise, which rescales the
critic's flow by sigma_8 / sigma_5. README "Differences from upstream" gives the sizes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Dict, Optional, Tuple

import torch

from megadistill.diffusion.flow_match import FlowMatchSchedule, _expand_like, add_noise_continuous, shift_timestep
from megadistill.diffusion.noise_schedule import GENERIC

from .base import (
    Denoiser, DistillationMethod, DistillBatch, Rollout, RolloutOutput, check_guidance_form, logs_to_floats,
    masked_mean,
)

CRITIC_LOSS_TYPES = ("flow", "x0")
SCORE_SIGMAS = ("exact", "upstream")


@dataclass
class ScoreTimestepConfig:
    """How a critic / score network's timesteps are drawn and noised (Self-Forcing names and defaults;
    ``timestep_shift`` and ``num_train_timesteps`` default to the model family's noise schedule,
    diffusion/noise_schedule.py).

    Shared by DMD, SiD and the GAN critic, which all call ``sample_score_timesteps`` / ``add_score_noise``.
    """

    SCHEDULE_FIELDS: ClassVar[Dict[str, str]] = {"timestep_shift": "shift", "num_train_timesteps": "num_train_timesteps"}

    timestep_shift: float = GENERIC.shift
    min_step_ratio: float = 0.02
    max_step_ratio: float = 0.98
    min_score_timestep: int = 0
    ts_schedule: bool = False
    ts_schedule_max: bool = False
    snap_noise_to_grid: bool = True
    num_train_timesteps: int = GENERIC.num_train_timesteps

    def __post_init__(self):
        if self.timestep_shift <= 0:
            raise ValueError(f"timestep_shift must be > 0, got {self.timestep_shift}")
        if not 0.0 <= self.min_step_ratio < self.max_step_ratio <= 1.0:
            raise ValueError(
                f"need 0 <= min_step_ratio < max_step_ratio <= 1, got {self.min_step_ratio}, {self.max_step_ratio}"
            )
        if not 0 <= self.min_score_timestep < self.num_train_timesteps:
            raise ValueError(
                f"min_score_timestep must be in [0, {self.num_train_timesteps}), got {self.min_score_timestep}"
            )


@dataclass
class ScoreDistillConfig(ScoreTimestepConfig):
    """Fields shared by DMD and SiD (defaults = Self-Forcing self_forcing_dmd.yaml)."""

    guidance_scale: float = 3.0
    guidance_form: str = "upstream"
    critic_loss_type: str = "flow"
    score_sigma: str = "exact"
    upstream_score_shift: float = 8.0

    def __post_init__(self):
        super().__post_init__()
        check_guidance_form(self.guidance_form)
        if self.critic_loss_type not in CRITIC_LOSS_TYPES:
            raise ValueError(f"critic_loss_type must be one of {CRITIC_LOSS_TYPES}, got {self.critic_loss_type!r}")
        if self.score_sigma not in SCORE_SIGMAS:
            raise ValueError(f"score_sigma must be one of {SCORE_SIGMAS}, got {self.score_sigma!r}")
        if self.upstream_score_shift <= 0:
            raise ValueError(f"upstream_score_shift must be > 0, got {self.upstream_score_shift}")


def timestep_range(cfg: ScoreTimestepConfig, rollout: Optional[RolloutOutput]) -> Tuple[int, int]:
    """[min_t, max_t) of the nominal draw, narrowed to the rollout's denoised range when asked."""
    lo, hi = cfg.min_score_timestep, cfg.num_train_timesteps
    if rollout is not None and cfg.ts_schedule and rollout.denoised_timestep_to is not None:
        lo = int(rollout.denoised_timestep_to)
    if rollout is not None and cfg.ts_schedule_max and rollout.denoised_timestep_from is not None:
        hi = int(rollout.denoised_timestep_from)
    return lo, max(hi, lo + 1)  # randint needs a non-empty range


def sample_score_timesteps(
    cfg: ScoreTimestepConfig,
    batch_size: int,
    rollout: Optional[RolloutOutput] = None,
    generator: Optional[torch.Generator] = None,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """float64 [B] timesteps for the DMD / SiD / critic score evaluation (see module docstring)."""
    lo, hi = timestep_range(cfg, rollout)
    t0 = torch.randint(lo, hi, (batch_size,), generator=generator).to(torch.float64)
    t = shift_timestep(t0, cfg.timestep_shift, cfg.num_train_timesteps)
    t = t.clamp(cfg.min_step_ratio * cfg.num_train_timesteps, cfg.max_step_ratio * cfg.num_train_timesteps)
    return t.to(device) if device is not None else t


def noise_schedule(cfg: ScoreTimestepConfig) -> FlowMatchSchedule:
    return FlowMatchSchedule(num_train_timesteps=cfg.num_train_timesteps, shift=cfg.timestep_shift)


def add_score_noise(cfg: ScoreTimestepConfig, x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    if cfg.snap_noise_to_grid:
        return noise_schedule(cfg).add_noise(x, eps, t)
    return add_noise_continuous(x, eps, (t / cfg.num_train_timesteps).to(x.dtype))


def score_noise_sigma(cfg: ScoreTimestepConfig, t: torch.Tensor) -> torch.Tensor:
    """The noise level (float64, shape of t) at which ``add_score_noise`` noised x_t."""
    if cfg.snap_noise_to_grid:
        return noise_schedule(cfg).sigma_at(t)
    return torch.as_tensor(t, dtype=torch.float64) / cfg.num_train_timesteps


def score_sigma(cfg: ScoreDistillConfig, t: torch.Tensor) -> torch.Tensor:
    """The sigma the score networks' flow -> x0 conversion uses (``cfg.score_sigma``, module docstring)."""
    if cfg.score_sigma == "upstream":
        return FlowMatchSchedule(num_train_timesteps=cfg.num_train_timesteps, shift=cfg.upstream_score_shift).sigma_at(t)
    return score_noise_sigma(cfg, t)


def critic_denoising_loss(
    critic: Denoiser, x: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, cond, loss_type: str,
    mask: Optional[torch.Tensor] = None, sigma: Optional[torch.Tensor] = None,
    noise_sigma: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Denoising loss of the fake score on noised generator samples (float64, unweighted mean over
    ``mask``: the rollout's gradient mask, which leaves out e.g. the TI2V conditioning frame, whose
    target is not a denoising target).

    ``sigma`` / ``noise_sigma`` (the ``upstream`` score sigma): the critic's x0 is taken at ``sigma``
    and, for ``flow``, turned back into a flow at the noise level, (x_t - x0) / noise_sigma; without
    them the critic's own flow is the prediction (the same thing when the two sigmas agree)."""
    if loss_type == "flow":
        if sigma is None:
            v = critic.flow(x_t, t, cond).double()
        else:
            x0 = critic.x0(x_t, t, cond, sigma).double()
            v = (x_t.double() - x0) / _expand_like(torch.as_tensor(noise_sigma, dtype=torch.float64), x_t)
        return masked_mean((v - (eps.double() - x.double())) ** 2, mask)
    if loss_type == "x0":
        return masked_mean((critic.x0(x_t, t, cond, sigma).double() - x.double()) ** 2, mask)
    raise ValueError(f"critic loss_type must be one of {CRITIC_LOSS_TYPES}, got {loss_type!r}")


class ScoreDistillationMethod(DistillationMethod):
    """Generator vs frozen teacher (real score) and a trainable critic (fake score)."""

    has_critic = True
    uses_teacher = guided_teacher = True

    def __init__(
        self,
        cfg: ScoreDistillConfig,
        *,
        generator: Denoiser,
        teacher: Denoiser,
        critic: Denoiser,
        rollout: Rollout,
        rng: Optional[torch.Generator] = None,
    ):
        self.cfg = cfg
        self.generator = generator
        self.teacher = teacher
        self.critic = critic
        self.rollout = rollout
        self.rng = rng

    def draw_score_noise(self, x: torch.Tensor, batch: DistillBatch, rollout: Optional[RolloutOutput]):
        """(t, eps) of one score evaluation of samples x: the only random draws of a score step; t is
        drawn per sample and laid out against x (``batch.per_row``)."""
        t = batch.per_row(sample_score_timesteps(self.cfg, batch.batch_size, rollout, self.rng, x.device))
        eps = torch.randn(x.shape, generator=self.rng, dtype=x.dtype, device=x.device)
        return t, eps

    def noised(self, x: torch.Tensor, batch: DistillBatch, rollout: Optional[RolloutOutput]):
        """(x_t, t, eps) for the score evaluation of samples x."""
        t, eps = self.draw_score_noise(x, batch, rollout)
        return add_score_noise(self.cfg, x, eps, t), t, eps

    def score_sigma(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The score networks' conversion sigma for timesteps t, on x's device (``cfg.score_sigma``)."""
        return score_sigma(self.cfg, t).to(x.device)

    def real_x0(self, x_t: torch.Tensor, t: torch.Tensor, batch: DistillBatch) -> torch.Tensor:
        return self.teacher.x0_guided(x_t, t, batch.cond, batch.uncond, self.cfg.guidance_scale, self.cfg.guidance_form,
                                      sigma=self.score_sigma(t, x_t))

    def critic_loss(self, batch: DistillBatch, step: int) -> Tuple[torch.Tensor, Dict[str, float]]:
        with torch.no_grad():
            out = self.rollout(self.generator, batch, grad=False)
            x = out.samples.detach()
            x_t, t, eps = self.noised(x, batch, out)
        sigma = noise_sigma = None
        if self.cfg.score_sigma == "upstream":
            sigma, noise_sigma = self.score_sigma(t, x), score_noise_sigma(self.cfg, t).to(x.device)
        loss = critic_denoising_loss(self.critic, x, x_t, t, eps, batch.cond, self.cfg.critic_loss_type,
                                     out.gradient_mask, sigma, noise_sigma)
        return loss, logs_to_floats(critic_loss=loss, critic_timestep=t.mean())
