"""Causal diffusion: flow-matching training of a block-causal generator on real clean latents.

The ODE-init stage of CausVid / Self-Forcing without a teacher's trajectories (upstream
``model/diffusion.py``): the generator is trained as an ordinary diffusion model, but block-causally,
so that it can later be rolled out block by block with a KV cache. Real-data training: no teacher and
no critic are used.

Samples are video latents [B, C, F, H, W] (frame axis from the latents); F splits into blocks of
``num_frame_per_block`` frames. Timesteps are drawn uniformly over the shifted ``FlowMatchSchedule``
grid (upstream ``scheduler.timesteps[randint(0, 1000)]``), restricted to
[min_timestep, max_timestep]. Frame f is noised at its per-frame timestep t[b, f] with the grid sigma,
x_t = (1 - sigma) x0 + sigma eps; the generator sees t as [B, F] in ONE parallel block-causal forward
and is trained on the flow target eps - x0, per frame, weighted by the schedule's training weight
(``weighting: upstream``, as upstream) or not (``none``).

``context: diffusion_forcing`` (CausVid): every block of every sample draws its own timestep; the loss
covers every frame.

``context: teacher_forcing``: per sample a block index b ~ U{0..num_blocks-1} and a timestep t_b.
Frames of blocks < b are the exact clean latents at t = 0 (ground-truth context, no grid snapping to
sigma ~ 1e-3), block b is noised at t_b, and the loss covers block b only. Frames after the batch's
largest b are dropped before the forward (they cannot influence any loss frame under the causal
mask, so computing them is waste); a sample whose b is smaller than the batch's largest keeps its
later frames in the forward (noised at its t_b) and masked out of the loss: the block-causal mask
keeps them from reaching block b, so they receive no gradient. (Upstream's teacher forcing instead
doubles the sequence with a clean copy and trains every block at once under a special mask; this is
the one-block-per-sample form of the same objective.)

``context: mixed``: per sample, teacher forcing with probability ``teacher_forcing_fraction``, else
diffusion forcing, in one forward (no frames dropped; a teacher-forcing sample's frames after its
block b stay noised at t_b and out of its loss). Diffusion forcing alone trains every block but only
ever shows the model noisy context, while the streaming sampler conditions on clean context blocks
(``context_noise`` 0); teacher forcing shows exactly that but trains one block per sample: the mix gets
both. On the demo (configs/demo_causal_init.yaml, 1200 steps from the teacher's weights) the 4-step
causal model reached feature distance 0.2195 / attributes right 0.69 with ``mixed`` against 0.2295 /
0.59 with diffusion forcing alone (teacher forcing alone not measured).

Random draws, in this order, from ``rng`` (one CPU generator; tests re-derive them):
  teacher forcing:   b = randint(0, num_blocks, (B,)); index = randint(0, K, (B,));
                     eps = randn(B, C, F_kept, H, W)
  diffusion forcing: index = randint(0, K, (B, num_blocks)); eps = randn(B, C, F, H, W)
  mixed:             use_tf = rand(B) < teacher_forcing_fraction; b = randint(0, num_blocks, (B,));
                     index = randint(0, K, (B, num_blocks)) (a teacher-forcing sample uses its entry
                     of block b for every frame from b on); eps = randn(B, C, F, H, W)
with K the number of eligible grid timesteps and F_kept = (max(b) + 1) * num_frame_per_block.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Optional, Tuple

import torch

from megadistill.diffusion.flow_match import FlowMatchSchedule, flow_target
from megadistill.diffusion.latents import frame_mean, per_frame, require_dense
from megadistill.diffusion.losses import reduce_loss
from megadistill.diffusion.noise_schedule import GENERIC

from .base import Denoiser, DistillationMethod, DistillBatch, logs_to_floats

CONTEXTS = ("diffusion_forcing", "teacher_forcing", "mixed")
LOSS_WEIGHTINGS = ("upstream", "none")


@dataclass
class CausalDiffusionConfig:
    """``context``: diffusion_forcing (every block its own noise level) or teacher_forcing (clean
    context blocks, one noised block per sample); ``num_frame_per_block``: the generator's causal block
    (the job sets it from rollout: ``bind_rollout``); ``shift``: timestep shift of the training grid;
    ``min_timestep`` / ``max_timestep``: the drawn grid timesteps lie in this range (shifted timesteps,
    in [0, num_train_timesteps]); ``weighting``: ``upstream`` = the schedule's training weight per
    frame, ``none`` = plain MSE. ``shift``, ``max_timestep`` and ``num_train_timesteps`` default to the
    model family's noise schedule."""

    SCHEDULE_FIELDS: ClassVar[Dict[str, str]] = {
        "shift": "shift", "max_timestep": "num_train_timesteps", "num_train_timesteps": "num_train_timesteps"}

    context: str = "diffusion_forcing"
    teacher_forcing_fraction: float = 0.5  # context mixed only
    num_frame_per_block: int = 3
    shift: float = GENERIC.shift
    min_timestep: float = 0.0
    max_timestep: float = float(GENERIC.num_train_timesteps)
    num_train_timesteps: int = GENERIC.num_train_timesteps
    weighting: str = "upstream"

    def __post_init__(self):
        if self.context not in CONTEXTS:
            raise ValueError(f"context must be one of {CONTEXTS}, got {self.context!r}")
        if not 0.0 <= self.teacher_forcing_fraction <= 1.0:
            raise ValueError(f"teacher_forcing_fraction must be in [0, 1], got {self.teacher_forcing_fraction}")
        if self.weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"weighting must be one of {LOSS_WEIGHTINGS}, got {self.weighting!r}")
        if isinstance(self.num_frame_per_block, bool) or int(self.num_frame_per_block) != self.num_frame_per_block \
                or self.num_frame_per_block < 1:
            raise ValueError(f"num_frame_per_block must be an int >= 1, got {self.num_frame_per_block!r}")
        if not self.shift > 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")
        if self.num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be >= 1, got {self.num_train_timesteps}")
        if not 0 <= self.min_timestep < self.max_timestep <= self.num_train_timesteps:
            raise ValueError(f"min_timestep / max_timestep must satisfy 0 <= min < max <= "
                             f"{self.num_train_timesteps}, got {self.min_timestep} / {self.max_timestep}")
        if len(eligible_timesteps(self)) == 0:
            raise ValueError(f"no timestep of the shift-{self.shift} grid lies in "
                             f"[min_timestep, max_timestep] = [{self.min_timestep}, {self.max_timestep}]")

    @property
    def schedule(self) -> FlowMatchSchedule:
        return FlowMatchSchedule(num_train_timesteps=self.num_train_timesteps, shift=self.shift)


def eligible_timesteps(cfg: CausalDiffusionConfig) -> torch.Tensor:
    """The grid timesteps (float64, descending) the method draws from."""
    ts = cfg.schedule.timesteps
    return ts[(ts >= cfg.min_timestep) & (ts <= cfg.max_timestep)]


def frame_blocks(num_frames: int, num_frame_per_block: int) -> torch.Tensor:
    """Long [F]: the causal block of each frame."""
    if num_frames % num_frame_per_block:
        raise ValueError(f"{num_frames} frames do not split into blocks of {num_frame_per_block}")
    return torch.arange(num_frames) // num_frame_per_block


def noise_per_frame(clean: torch.Tensor, eps: torch.Tensor, t: torch.Tensor,
                    schedule: FlowMatchSchedule, *, frame_dim: int) -> torch.Tensor:
    """x_t of video latents (frames along ``frame_dim``) at per-frame timesteps t [B, F]: the grid
    sigma of t (upstream add_noise snapping), except frames at t = 0, which stay exactly clean."""
    sigma = schedule.sigma_at(t).to(clean.device, torch.promote_types(clean.dtype, torch.float32))
    sigma = per_frame(sigma, clean.dim(), frame_dim)
    x_t = ((1.0 - sigma) * clean + sigma * eps).to(clean.dtype)
    return torch.where(per_frame((t == 0).to(clean.device), clean.dim(), frame_dim), clean, x_t)


def flow_error_per_frame(generator: Denoiser, x_t: torch.Tensor, t: torch.Tensor, cond: Any,
                         clean: torch.Tensor, eps: torch.Tensor, *, frame_dim: int) -> torch.Tensor:
    """Squared flow error [B, F] (mean over each frame) of one parallel block-causal forward with t [B, F]."""
    v = generator.flow(x_t, t.to(x_t.device), cond)
    return frame_mean((v.float() - flow_target(clean, eps).float()) ** 2, frame_dim)


def causal_diffusion_loss(
    generator: Denoiser, clean: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, cond: Any,
    schedule: FlowMatchSchedule, weighting: str = "upstream", loss_mask: Optional[torch.Tensor] = None,
    *, frame_dim: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(loss, per-frame errors [B, F]) for clean video latents (frames along ``frame_dim``) at
    per-frame timesteps t [B, F].

    loss = mean over samples of the (weighted) mean error over the frames in ``loss_mask`` [B, F]
    (every frame when None).
    """
    x_t = noise_per_frame(clean, eps, t, schedule, frame_dim=frame_dim)
    err = flow_error_per_frame(generator, x_t, t, cond, clean, eps, frame_dim=frame_dim)
    weight = schedule.training_weight(t).to(err.device) if weighting == "upstream" else None
    mask = loss_mask.to(err.device) if loss_mask is not None else None
    return reduce_loss(err, weight, mask), err


def _randn(shape, rng: Optional[torch.Generator], like: torch.Tensor) -> torch.Tensor:
    device = rng.device if rng is not None else like.device
    return torch.randn(shape, generator=rng, device=device, dtype=like.dtype).to(like.device)


def diffusion_forcing_draw(clean: torch.Tensor, cfg: CausalDiffusionConfig, rng: Optional[torch.Generator] = None,
                           *, frame_dim: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(t [B, F], eps): one grid timestep per block of every sample."""
    b, f = clean.shape[0], clean.shape[frame_dim]
    blocks = frame_blocks(f, cfg.num_frame_per_block)
    grid = eligible_timesteps(cfg)
    index = torch.randint(0, len(grid), (b, int(blocks[-1]) + 1), generator=rng, device=_rng_device(rng))
    t = grid[index.cpu()][:, blocks]
    return t, _randn(clean.shape, rng, clean)


def teacher_forcing_draw(clean: torch.Tensor, cfg: CausalDiffusionConfig, rng: Optional[torch.Generator] = None,
                         *, frame_dim: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kept clean latents, t [B, F_kept], eps, loss mask [B, F_kept]): per sample a block b and a
    timestep; blocks < b at t = 0, block b and later kept blocks at t_b; the loss mask is block b."""
    bsz, f = clean.shape[0], clean.shape[frame_dim]
    blocks = frame_blocks(f, cfg.num_frame_per_block)
    grid = eligible_timesteps(cfg)
    target = torch.randint(0, int(blocks[-1]) + 1, (bsz,), generator=rng, device=_rng_device(rng)).cpu()
    t_b = grid[torch.randint(0, len(grid), (bsz,), generator=rng, device=_rng_device(rng)).cpu()]
    kept = (int(target.max()) + 1) * cfg.num_frame_per_block
    clean, blocks = clean.narrow(frame_dim, 0, kept), blocks[:kept]
    context = blocks[None, :] < target[:, None]
    t = torch.where(context, torch.zeros((), dtype=t_b.dtype), t_b[:, None].expand(bsz, kept))
    mask = blocks[None, :] == target[:, None]
    return clean, t, _randn(clean.shape, rng, clean), mask


def mixed_draw(clean: torch.Tensor, cfg: CausalDiffusionConfig, rng: Optional[torch.Generator] = None,
               *, frame_dim: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(t [B, F], eps, loss mask [B, F]): per sample teacher forcing (clean blocks < b at t = 0, block
    b and later at t_b, loss on block b) or diffusion forcing (a timestep per block, loss everywhere)."""
    bsz, f = clean.shape[0], clean.shape[frame_dim]
    blocks = frame_blocks(f, cfg.num_frame_per_block)
    num_blocks = int(blocks[-1]) + 1
    grid = eligible_timesteps(cfg)
    device = _rng_device(rng)
    use_tf = (torch.rand(bsz, generator=rng, device=device) < cfg.teacher_forcing_fraction).cpu()
    target = torch.randint(0, num_blocks, (bsz,), generator=rng, device=device).cpu()
    index = torch.randint(0, len(grid), (bsz, num_blocks), generator=rng, device=device).cpu()
    t_df = grid[index][:, blocks]
    t_b = grid[index.gather(1, target[:, None])]  # [B, 1]
    t_tf = torch.where(blocks[None, :] < target[:, None], torch.zeros((), dtype=grid.dtype), t_b)
    t = torch.where(use_tf[:, None], t_tf, t_df)
    mask = ~use_tf[:, None] | (blocks[None, :] == target[:, None])
    return t, _randn(clean.shape, rng, clean), mask


def _rng_device(rng: Optional[torch.Generator]) -> Optional[torch.device]:
    return rng.device if rng is not None else None


def _check_causal(generator: Denoiser, cfg: CausalDiffusionConfig) -> None:
    """A generator whose network config has ``num_frame_per_block`` must run block-causally with the
    configured block (other networks: unchecked)."""
    config = getattr(getattr(generator, "net", None), "config", None)
    if config is None or not hasattr(config, "num_frame_per_block"):
        return
    if config.num_frame_per_block is None:
        raise ValueError("causal_diffusion trains a block-causal generator, got a bidirectional one "
                         "(its config has num_frame_per_block None)")
    if config.num_frame_per_block != cfg.num_frame_per_block:
        raise ValueError(f"num_frame_per_block {cfg.num_frame_per_block} differs from the generator's "
                         f"{config.num_frame_per_block}")


class CausalDiffusion(DistillationMethod):
    """Generator-only; built like every method: ``cls(cfg, generator=..., rng=...)`` (other keywords,
    e.g. a teacher, are accepted and ignored: this is real-data training)."""

    name = "causal_diffusion"
    has_critic = False
    needs_real = True
    generator_forward = "parallel"

    @classmethod
    def bind_rollout(cls, config: CausalDiffusionConfig, rollout) -> CausalDiffusionConfig:
        """The generator's causal block; a bidirectional rollout is refused."""
        if not rollout.causal:
            raise ValueError("method causal_diffusion trains a block-causal generator (the ODE-init stage of a "
                             f"causal student): set rollout.kind=causal, not {rollout.kind!r}")
        return dataclasses.replace(config, num_frame_per_block=rollout.num_frame_per_block)

    def __init__(self, cfg: CausalDiffusionConfig, *, generator: Denoiser, rng: Optional[torch.Generator] = None, **_):
        _check_causal(generator, cfg)
        self.cfg = cfg
        self.generator = generator
        self.rng = rng
        self.schedule = cfg.schedule

    def generator_loss(self, batch: DistillBatch, step: int) -> Tuple[torch.Tensor, Dict[str, float]]:
        if batch.real is None:
            raise ValueError("causal_diffusion trains on real clean latents: batch.real is None")
        clean = batch.real
        frame_dim = require_dense(batch.latents, "causal_diffusion").video_frame_dim()
        mask = None
        if self.cfg.context == "teacher_forcing":
            clean, t, eps, mask = teacher_forcing_draw(clean, self.cfg, self.rng, frame_dim=frame_dim)
        elif self.cfg.context == "mixed":
            t, eps, mask = mixed_draw(clean, self.cfg, self.rng, frame_dim=frame_dim)
        else:
            t, eps = diffusion_forcing_draw(clean, self.cfg, self.rng, frame_dim=frame_dim)
        loss, err = causal_diffusion_loss(self.generator, clean, eps, t, batch.cond, self.schedule,
                                          self.cfg.weighting, mask, frame_dim=frame_dim)
        trained = mask if mask is not None else torch.ones_like(t, dtype=torch.bool)
        logs = {"diffusion_loss": loss, "flow_mse": err.detach()[trained.to(err.device)].mean(),
                "timestep_mean": t[trained].mean(), "forward_frames": float(t.shape[1])}
        return loss, logs_to_floats(**logs)


__all__ = [
    "CausalDiffusion", "CausalDiffusionConfig", "CONTEXTS", "LOSS_WEIGHTINGS", "eligible_timesteps",
    "frame_blocks", "noise_per_frame", "flow_error_per_frame", "causal_diffusion_loss",
    "diffusion_forcing_draw", "teacher_forcing_draw", "mixed_draw",
]
