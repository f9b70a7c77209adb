"""Streaming few-step generation with a block-causal denoiser: one block of latent frames at a time.

Per block (Self-Forcing's ``CausalInferencePipeline`` and, for training, its rollout; both run this code):

    x = noise of the block
    for each step t_i of StepListConfig.timesteps():       the exact list the student trained at
        x0 = x0-prediction of the block at t_i, attending to the KV cache of earlier blocks
        x  = add_noise(x0, fresh eps, t_{i+1})              (not after the last step)
    refresh: run the block once more, told t = context_noise, so the cache holds keys/values of the
             clean block for the blocks that follow (skipped after the last block, which nothing
             reads; upstream runs it anyway)

The refresh input differs upstream between training and inference: the training rollout feeds
add_noise(x0, eps, context_noise), which snaps to the grid of ``steps.schedule()`` so that even
``context_noise = 0`` blends in sigma ~ 0.005 of noise (``refresh="noised"``, the default: what the
student trained with); the inference pipeline feeds x0 itself (``refresh="clean"``: what a student
trained upstream is sampled with there).

``CausalStream`` holds one video's KV caches and does the per-block work (``denoise`` up to an exit
step, with or without gradient, and ``refresh``); ``causal_generate`` is the inference loop around it
and ``megadistill.rollout.self_forcing`` the training rollout. The length of a streamed video is
bounded only by the model: with ``local_attn_size`` / ``sink_size`` the caches hold sink + window
frames and evict the oldest ones, exactly what the windowed block-causal mask shows each block.
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch
from tqdm.auto import tqdm

from megadistill.methods.base import Denoiser
from megadistill.rollout.causal_denoiser import as_causal
from megadistill.rollout.steps import StepListConfig

REFRESH_MODES = ("clean", "noised")
CACHE_GRADIENTS = ("detached", "upstream")


def block_spans(num_frames: int, num_frame_per_block: int) -> List[Tuple[int, int]]:
    """[start, end) latent frames of each block; the last block may be shorter (as the mask allows)."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    return [(s, min(s + num_frame_per_block, num_frames)) for s in range(0, num_frames, num_frame_per_block)]


class CausalStream:
    """One video being generated block by block: the denoiser's cache and the per-block denoising steps.

    ``denoiser`` is a ``CausalDenoiser`` (causal_denoiser.py); ``sample_shape`` (C, F, H, W) with F the
    most frames the stream generates (a model with a local window caches only its window).
    ``noise_generator`` draws every re-noising eps (per data-parallel rank in training). ``refresh``:
    ``noised`` or ``clean`` (module docstring); ``cache_gradient``: ``detached`` or ``upstream``
    (``KVCache.grad_history``).
    """

    def __init__(self, denoiser: Denoiser, cond: Any, steps: StepListConfig, *, batch_size: int,
                 sample_shape: Tuple[int, int, int, int], noise_generator: Optional[torch.Generator] = None,
                 context_noise: float = 0.0, device: Optional[torch.device] = None, refresh: str = "noised",
                 cache_gradient: str = "detached"):
        self.denoiser = as_causal(denoiser)
        if len(sample_shape) != 4:
            raise ValueError(f"sample_shape must be (C, F, H, W), got {tuple(sample_shape)}")
        self.denoiser.check_causal(cond, tuple(sample_shape), batch_size)
        if not 0.0 <= context_noise <= steps.num_train_timesteps:
            raise ValueError(f"context_noise must lie in [0, {steps.num_train_timesteps}], got {context_noise}")
        if refresh not in REFRESH_MODES:
            raise ValueError(f"refresh must be one of {REFRESH_MODES}, got {refresh!r}")
        if cache_gradient not in CACHE_GRADIENTS:
            raise ValueError(f"cache_gradient must be one of {CACHE_GRADIENTS}, got {cache_gradient!r}")
        self.refresh_mode, self.cond = refresh, cond
        self.timesteps = steps.timesteps()
        self.schedule = steps.schedule()
        self.noise_generator = noise_generator
        self.context_noise = float(context_noise)
        _, frames, h, w = sample_shape
        self.cache = self.denoiser.new_causal_cache(batch_size, (h, w), frames, device, cache_gradient)

    @property
    def num_frame_per_block(self) -> int:
        return self.denoiser.causal_block_frames()

    def _t(self, value: float, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0],), value, dtype=torch.float64, device=x.device)

    def x0(self, x: torch.Tensor, t: float, start: int) -> torch.Tensor:
        """x0 prediction of the block x (frames [start, start + Fb)) at timestep t, written to the cache."""
        t_b = self._t(t, x)
        v = self.denoiser.causal_flow(x, t_b, self.cond, self.cache, start)
        return self.denoiser.flow_to_x0(v, x, t_b)

    def eps_like(self, x0: torch.Tensor) -> torch.Tensor:
        """Fresh noise for one re-noising (the stream's only random draw)."""
        return torch.randn(x0.shape, generator=self.noise_generator, dtype=x0.dtype, device=x0.device)

    def renoise(self, x0: torch.Tensor, t: float) -> torch.Tensor:
        return self.schedule.add_noise(x0, self.eps_like(x0), self._t(t, x0))

    def denoise(self, noise: torch.Tensor, start: int, exit_index: Optional[int] = None,
                grad: bool = False) -> torch.Tensor:
        """Steps 0..exit_index (default: all) of one block from its noise; only the exit step may
        carry gradient. The steps before it run under no_grad with fresh re-noising."""
        last = len(self.timesteps) - 1
        exit_index = last if exit_index is None else exit_index
        if not 0 <= exit_index <= last:
            raise ValueError(f"exit_index must lie in [0, {last}], got {exit_index}")
        x = noise
        with torch.no_grad():
            for i in range(exit_index):
                x = self.renoise(self.x0(x, self.timesteps[i], start), self.timesteps[i + 1])
        with torch.set_grad_enabled(grad):
            return self.x0(x, self.timesteps[exit_index], start)

    @torch.no_grad()
    def refresh(self, x0: torch.Tensor, start: int) -> None:
        """Overwrite the block's cache slot with the keys/values of its clean prediction, told
        t = context_noise: ``noised`` first re-noises x0 to context_noise (on the grid), ``clean``
        passes x0 itself."""
        x = x0.detach() if self.refresh_mode == "clean" else self.renoise(x0.detach(), self.context_noise)
        self.x0(x, self.context_noise, start)


def causal_generate(denoiser: Denoiser, cond: Any, noise: torch.Tensor, steps: StepListConfig,
                    noise_generator: Optional[torch.Generator] = None, context_noise: float = 0.0,
                    progress: bool = False, refresh: str = "noised") -> torch.Tensor:
    """Few-step streaming generation: noise [B, C, F, H, W] -> x0 [B, C, F, H, W], block by block.

    Every block runs every step of ``steps.timesteps()`` and is then refreshed into the cache at
    ``context_noise``, ``refresh`` ``noised`` (as the training rollout) or ``clean`` (upstream's
    inference pipeline; see the module docstring). F is free: without a local window the caches hold F frames,
    with one they hold sink + window frames. A last block shorter than num_frame_per_block is
    generated as such. Runs under no_grad.
    """
    if noise.dim() != 5:
        raise ValueError(f"noise must be [B, C, F, H, W], got {list(noise.shape)}")
    b, _, f = noise.shape[:3]
    with torch.no_grad():
        stream = CausalStream(denoiser, cond, steps, batch_size=b, sample_shape=tuple(noise.shape[1:]),
                              noise_generator=noise_generator, context_noise=context_noise, device=noise.device,
                              refresh=refresh)
        spans = block_spans(f, stream.num_frame_per_block)
        blocks = []
        for s, e in tqdm(spans, desc="blocks", disable=not progress):
            x0 = stream.denoise(noise[:, :, s:e], s)
            if e < f:  # nothing reads the cache after the last block
                stream.refresh(x0, s)
            blocks.append(x0)
    return torch.cat(blocks, dim=2)


__all__ = ["CACHE_GRADIENTS", "REFRESH_MODES", "CausalStream", "block_spans", "causal_generate"]
