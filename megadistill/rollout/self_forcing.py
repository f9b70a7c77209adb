"""Self-Forcing training rollout: the student generates a video the way it will at inference (block
by block against its KV cache, few steps per block) and only the exit step carries gradient.

One call (``SelfForcingRollout.__call__``):

1. plan, from the generator shared by every rank (under ZeRO-3 the plan decides which module calls
   happen, so all ranks must agree): the number of generated latent frames, uniform over the
   multiples of num_frame_per_block in [min_frames, max_frames] (no draw when they are equal), then
   the exit step: one index for all blocks (``same_step_across_blocks``) or one per block, uniform
   over the step list; ``last_step_only`` forces the last step (no draw).
2. fresh KV and cross-attention caches; initial noise from the per-rank ``noise_generator``.
3. per block (``CausalStream``, shared with ``causal_generate``): the steps before the exit under
   no_grad with x0 prediction and fresh re-noising; the exit step with gradient only when ``grad``
   and the block lies in the last ``num_training_frames`` frames; then the clean-context refresh at
   ``context_noise`` under no_grad (skipped after the last block, which nothing reads).
4. output: ``samples`` = the last ``num_training_frames`` frames; ``denoised_timestep_from/to`` of the
   exit step exactly as ``FewStepRollout`` (nominal timesteps on ``steps.schedule()``; None with
   per-block exits, as upstream); ``exit_index`` (of block 0 with per-block exits).

Shapes: ``batch.latents`` is dense, sample shape (C, max_frames, H, W), the largest video a call can generate; a call
generating n <= max_frames frames draws noise of n frames only. ``samples`` always has
``num_training_frames`` frames (min_frames >= num_training_frames), so what the methods see has one
shape whatever n is.

Longer than the window (n > num_training_frames): upstream decodes the frames before the window's
second frame, re-encodes the last decoded pixel frame as an image latent, puts it in place of the
window's first frame and masks the window's first block out of the loss. With
``reencode_first_frame`` (frames [B, C, n - W + 1, H, W] -> one latent frame [B, C, 1, H, W], called
under no_grad) this rollout does the same and returns that ``gradient_mask``. Without it the window
starts with the generated frame itself, which is a genuine sample with gradient, so nothing is
masked (``gradient_mask`` None).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch

from megadistill.diffusion.latents import require_dense
from megadistill.methods.base import Denoiser, DistillBatch, RolloutOutput, nominal_timestep
from megadistill.rollout.causal_denoiser import as_causal
from megadistill.rollout.causal_inference import CACHE_GRADIENTS, CausalStream, block_spans
from megadistill.rollout.steps import StepListConfig


@dataclass
class SelfForcingConfig:
    """Frame counts are latent frames and must be multiples of the model's num_frame_per_block
    (checked when the rollout meets the model). ``min_frames`` / ``max_frames`` (None: equal to
    ``num_training_frames``, resolved by ``frame_range`` and never written back, so a config file that
    changes only ``num_training_frames`` moves them too); ``context_noise`` is the timestep of the
    cache refresh; ``cache_gradient``: ``detached`` (cached keys of earlier blocks are constants, the
    clean refresh under no_grad wrote them) or ``upstream`` (Self-Forcing's in-place cache: later
    blocks' gradients reach earlier blocks' overwritten noisy exit-step keys; kv_cache.py)."""

    num_training_frames: int = 21
    min_frames: Optional[int] = None
    max_frames: Optional[int] = None
    same_step_across_blocks: bool = True
    last_step_only: bool = False
    context_noise: float = 0.0
    cache_gradient: str = "detached"

    def __post_init__(self):
        lo, hi = self.frame_range()
        for name, value in (("num_training_frames", self.num_training_frames), ("min_frames", lo), ("max_frames", hi)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if lo < self.num_training_frames:
            # The gradient window is the last num_training_frames frames: a shorter video would give
            # the methods samples of another shape.
            raise ValueError(f"min_frames ({lo}) must be >= num_training_frames ({self.num_training_frames})")
        if hi < lo:
            raise ValueError(f"max_frames ({hi}) must be >= min_frames ({lo})")
        for name in ("same_step_across_blocks", "last_step_only"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if not isinstance(self.context_noise, (int, float)) or isinstance(self.context_noise, bool) \
                or self.context_noise < 0:
            raise ValueError(f"context_noise must be a timestep >= 0, got {self.context_noise!r}")
        self.context_noise = float(self.context_noise)
        if self.cache_gradient not in CACHE_GRADIENTS:
            raise ValueError(f"cache_gradient must be one of {CACHE_GRADIENTS}, got {self.cache_gradient!r}")

    def frame_range(self) -> Tuple[int, int]:
        """(min_frames, max_frames) of the generated videos, defaults resolved."""
        lo = self.num_training_frames if self.min_frames is None else self.min_frames
        hi = self.num_training_frames if self.max_frames is None else self.max_frames
        return lo, hi

    def check_blocks(self, num_frame_per_block: int) -> None:
        """Every frame count must be whole blocks, so the gradient window starts on a block boundary."""
        lo, hi = self.frame_range()
        for name, value in (("num_training_frames", self.num_training_frames), ("min_frames", lo), ("max_frames", hi)):
            if value % num_frame_per_block:
                raise ValueError(f"{name} ({value}) must be a multiple of the model's num_frame_per_block "
                                 f"({num_frame_per_block})")


@dataclass(frozen=True)
class RolloutPlan:
    """What every rank must agree on: the number of generated frames and each block's exit step."""

    num_frames: int
    exit_indices: Tuple[int, ...]


@dataclass
class SelfForcingVideo:
    """The generated blocks (latents [B, C, Fb, H, W]; those before the gradient window carry no
    gradient), their [start, end) frames, the plan and the stream (KV caches) they came from."""

    blocks: List[torch.Tensor]
    spans: List[Tuple[int, int]]
    plan: RolloutPlan
    stream: CausalStream

    @property
    def video(self) -> torch.Tensor:
        """All generated frames [B, C, n, H, W]."""
        return torch.cat(self.blocks, dim=2)

    def last_frames(self, num_frames: int) -> torch.Tensor:
        """The last ``num_frames`` frames, concatenated from those blocks only (whole blocks)."""
        start = self.plan.num_frames - num_frames
        picked = [x for x, (s, _) in zip(self.blocks, self.spans) if s >= start]
        if sum(x.shape[2] for x in picked) != num_frames:
            raise ValueError(f"the last {num_frames} frames do not start on a block boundary: {self.spans}")
        return torch.cat(picked, dim=2)


class SelfForcingRollout:
    """See the module docstring. ``generator``: shared by all ranks (plan); ``noise_generator``
    (default ``generator``): per rank (initial and re-noising noise)."""

    def __init__(self, steps: StepListConfig, cfg: SelfForcingConfig, generator: Optional[torch.Generator] = None,
                 noise_generator: Optional[torch.Generator] = None,
                 reencode_first_frame: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        if cfg.context_noise > steps.num_train_timesteps:
            raise ValueError(f"context_noise ({cfg.context_noise}) must be <= num_train_timesteps "
                             f"({steps.num_train_timesteps})")
        self.steps, self.cfg = steps, cfg
        self.timesteps = steps.timesteps()
        self.schedule = steps.schedule()
        self.generator = generator
        self.noise_generator = noise_generator if noise_generator is not None else generator
        self.reencode_first_frame = reencode_first_frame

    # ---------------------------------------------------------------------------------- plan

    def draw_plan(self, num_frame_per_block: int) -> RolloutPlan:
        """Frame count, then exit steps, from the shared generator (identical on every rank)."""
        cfg = self.cfg
        cfg.check_blocks(num_frame_per_block)
        lo, hi = cfg.frame_range()
        choices = list(range(lo, hi + 1, num_frame_per_block))
        num_frames = choices[0]
        if len(choices) > 1:
            num_frames = choices[int(torch.randint(0, len(choices), (1,), generator=self.generator))]
        num_blocks = num_frames // num_frame_per_block
        n = len(self.timesteps)
        if cfg.last_step_only:
            exits = [n - 1] * num_blocks
        elif cfg.same_step_across_blocks:
            exits = [int(torch.randint(0, n, (1,), generator=self.generator))] * num_blocks
        else:
            exits = torch.randint(0, n, (num_blocks,), generator=self.generator).tolist()
        return RolloutPlan(num_frames, tuple(exits))

    # ---------------------------------------------------------------------------------- rollout

    def _check_batch(self, batch: DistillBatch) -> Tuple[int, int, int]:
        sample_shape = require_dense(batch.latents, "the Self-Forcing rollout").sample_shape
        if len(sample_shape) != 4:
            raise ValueError(f"batch.latents.sample_shape must be (C, F, H, W), got {sample_shape}")
        c, f, h, w = sample_shape
        max_frames = self.cfg.frame_range()[1]
        if f != max_frames:
            raise ValueError(f"batch.latents.sample_shape has {f} frames; it must be max_frames = {max_frames} "
                             "(the largest video a call can generate)")
        return c, h, w

    def run(self, generator: Denoiser, batch: DistillBatch, plan: RolloutPlan, *, grad: bool) -> SelfForcingVideo:
        """Generate the video of ``plan`` (see the module docstring, steps 2-3); ``generator`` is a
        ``CausalDenoiser``."""
        c, h, w = self._check_batch(batch)
        n, b = plan.num_frames, batch.batch_size
        stream = CausalStream(generator, batch.cond, self.steps, batch_size=b, sample_shape=(c, n, h, w),
                              noise_generator=self.noise_generator, context_noise=self.cfg.context_noise,
                              device=batch.device, cache_gradient=self.cfg.cache_gradient)
        spans = block_spans(n, stream.num_frame_per_block)
        if len(plan.exit_indices) != len(spans) or n % stream.num_frame_per_block:
            raise ValueError(f"plan {plan} does not match whole blocks of {stream.num_frame_per_block} frames")
        noise = self.initial_noise((b, c, n, h, w), batch)
        window_start = n - self.cfg.num_training_frames
        blocks = []
        for (s, e), exit_index in zip(spans, plan.exit_indices):
            x0 = stream.denoise(noise[:, :, s:e], s, exit_index, grad=grad and s >= window_start)
            if e < n:
                stream.refresh(x0, s)
            blocks.append(x0)
        return SelfForcingVideo(blocks, spans, plan, stream)

    def initial_noise(self, shape: Tuple[int, ...], batch: DistillBatch) -> torch.Tensor:
        """The video's initial noise [B, C, n, H, W] from the per-rank ``noise_generator``."""
        return torch.randn(shape, generator=self.noise_generator, device=batch.device, dtype=batch.dtype)

    def __call__(self, generator: Denoiser, batch: DistillBatch, *, grad: bool) -> RolloutOutput:
        nfpb = as_causal(generator).causal_block_frames()
        plan = self.draw_plan(nfpb)
        out = self.run(generator, batch, plan, grad=grad)
        window = self.cfg.num_training_frames
        samples, gradient_mask = out.last_frames(window), None
        if plan.num_frames > window and self.reencode_first_frame is not None:
            samples, gradient_mask = self._reencoded_window(out, window, nfpb)
        t_from, t_to = self.denoised_timestep_range(plan)
        return RolloutOutput(samples, t_from, t_to, gradient_mask, plan.exit_indices[0])

    def _reencoded_window(self, out: SelfForcingVideo, window: int, num_frame_per_block: int):
        """Upstream's window for videos longer than it: frame 0 re-encoded from the decoded frames
        before it, and its block masked out of the loss."""
        n = out.plan.num_frames
        video = torch.cat([x.detach() for x in out.blocks], dim=2)
        with torch.no_grad():
            first = self.reencode_first_frame(video[:, :, :n - window + 1])
        expected = (*video.shape[:2], 1, *video.shape[3:])
        if tuple(first.shape) != expected:
            raise ValueError(f"reencode_first_frame must return one latent frame {list(expected)}, "
                             f"got {list(first.shape)}")
        rest = out.last_frames(window)[:, :, 1:]  # keeps the gradient of the window's blocks
        samples = torch.cat([first.to(rest.dtype), rest], dim=2)
        mask = torch.ones(1, 1, window, 1, 1, dtype=torch.bool, device=video.device)
        mask[:, :, :num_frame_per_block] = False  # the block holding the re-encoded frame
        return samples, mask

    def denoised_timestep_range(self, plan: RolloutPlan) -> Tuple[Optional[float], Optional[float]]:
        """(from, to) of the exit step as ``FewStepRollout``; None without one exit for all blocks."""
        if not (self.cfg.same_step_across_blocks or self.cfg.last_step_only):
            return None, None
        i = plan.exit_indices[0]
        t_from = nominal_timestep(self.timesteps[i], self.schedule)
        t_to = 0.0 if i == len(self.timesteps) - 1 else nominal_timestep(self.timesteps[i + 1], self.schedule)
        return t_from, t_to


__all__ = ["RolloutPlan", "SelfForcingConfig", "SelfForcingRollout", "SelfForcingVideo"]
