"""``CausalDenoiser``: what a model family gives the streaming rollouts to generate block by block.

A causal denoiser is a ``Denoiser`` whose network can run one block of latent frames against a cache
of the blocks before it. The generic Self-Forcing rollout and streaming inference (``CausalStream``)
call only these methods; a model family implements them on its denoiser (``models/<family>/denoiser.py``).

    block = denoiser.causal_block_frames()                       # latent frames per block
    denoiser.check_causal(cond, (C, F, H, W), batch_size)        # before any compute
    cache = denoiser.new_causal_cache(batch, (H, W), max_frames, device, cache_gradient)
    v = denoiser.causal_flow(x_block, t, cond, cache, start_frame)   # writes the block to the cache

Calling ``causal_flow`` again with the same ``start_frame`` overwrites that block's cache entry (the
clean-context refresh).
"""
from __future__ import annotations

from typing import Any, Optional, Protocol, Tuple, runtime_checkable

import torch


@runtime_checkable
class CausalDenoiser(Protocol):
    def causal_block_frames(self) -> int:
        """Latent frames per block; ValueError when the network is not block-causal."""

    def check_causal(self, cond: Any, sample_shape: Tuple[int, ...], batch_size: int) -> None:
        """ValueError for a condition or sample shape (C, F, H, W) this network cannot stream."""

    def new_causal_cache(self, batch_size: int, latent_hw: Tuple[int, int], max_frames: int,
                         device: Optional[torch.device], cache_gradient: str) -> Any:
        """An empty cache for one video of up to ``max_frames`` latent frames."""

    def causal_flow(self, x: torch.Tensor, t: torch.Tensor, cond: Any, cache: Any, start_frame: int) -> torch.Tensor:
        """Flow prediction of the block x [B, C, Fb, H, W] (frames [start_frame, start_frame + Fb))."""


def as_causal(denoiser: Any) -> CausalDenoiser:
    """``denoiser`` if it streams, else a ValueError naming what it is."""
    if not isinstance(denoiser, CausalDenoiser):
        raise ValueError(f"causal generation needs a denoiser that streams blocks (CausalDenoiser), got "
                         f"{type(denoiser).__name__}")
    return denoiser


__all__ = ["CausalDenoiser", "as_causal"]
