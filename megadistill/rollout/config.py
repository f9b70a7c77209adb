"""The ``rollout`` section: how the generator produces its training samples, and the same step list at
inference. Model-agnostic: ``causal`` runs any ``CausalDenoiser`` block by block with its KV cache
(Self-Forcing), ``bidirectional`` any ``Denoiser`` on the whole sample at once.

    rollout = build_rollout(cfg.rollout, shared_rng, noise_rng)     # training
    x0 = generate(cfg.rollout, denoiser, cond, noise, rng)          # few-step inference
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .causal_inference import REFRESH_MODES
from .self_forcing import SelfForcingConfig
from .steps import StepListConfig

ROLLOUT_KINDS = ("causal", "bidirectional")


@dataclass
class RolloutConfig:
    """``kind``: ``causal`` (Self-Forcing: block by block with a KV cache; the generator runs
    block-causally with ``num_frame_per_block`` frames per block, an optional local window of
    ``local_attn_size`` frames and ``sink_size`` sink frames) or ``bidirectional`` (one clip at once).
    ``steps`` is also the inference step list. ``inference_refresh``: what a causal student's cache
    refresh sees when sampling: ``noised`` x0 as in the training rollout, or ``clean`` x0 as upstream's
    inference pipeline (rollout/causal_inference.py)."""

    kind: str = "causal"
    num_frame_per_block: int = 3
    local_attn_size: Optional[int] = None
    sink_size: int = 0
    steps: StepListConfig = field(default_factory=StepListConfig)
    self_forcing: SelfForcingConfig = field(default_factory=SelfForcingConfig)
    inference_refresh: str = "noised"

    def __post_init__(self):
        if self.kind not in ROLLOUT_KINDS:
            raise ValueError(f"kind must be one of {ROLLOUT_KINDS}, got {self.kind!r}")
        if self.num_frame_per_block < 1:
            raise ValueError(f"num_frame_per_block must be >= 1, got {self.num_frame_per_block}")
        if self.inference_refresh not in REFRESH_MODES:
            raise ValueError(f"inference_refresh must be one of {REFRESH_MODES}, got {self.inference_refresh!r}")
        if self.self_forcing.cache_gradient == "upstream" and self.local_attn_size is not None:
            raise ValueError("self_forcing.cache_gradient 'upstream' reproduces upstream's training cache, which "
                             "holds every frame and never evicts; with local_attn_size use 'detached'")
        if self.kind == "causal" and not self.steps.grid:
            raise ValueError("steps.grid=false (continuous re-noising) is for the bidirectional rollout; the causal "
                             "rollout's refresh and re-noising snap to the timestep grid")

    @property
    def causal(self) -> bool:
        return self.kind == "causal"


def build_rollout(config: RolloutConfig, generator: torch.Generator, noise_generator: torch.Generator):
    """The training rollout. ``generator`` draws the exit step (seeded alike on every rank: under ZeRO-3
    it decides which forwards run); ``noise_generator`` the noise (per data-parallel rank)."""
    if config.causal:
        from .self_forcing import SelfForcingRollout

        return SelfForcingRollout(config.steps, config.self_forcing, generator=generator,
                                  noise_generator=noise_generator)
    from .bidirectional import BidirectionalRollout

    return BidirectionalRollout(config.steps, generator=generator, noise_generator=noise_generator)


def generate(config: RolloutConfig, denoiser, cond: Any, noise: torch.Tensor,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Few-step inference from ``noise`` at the training step list (causal streaming or bidirectional)."""
    if config.causal:
        from .causal_inference import causal_generate

        return causal_generate(denoiser, cond, noise, config.steps, generator,
                               context_noise=config.self_forcing.context_noise, refresh=config.inference_refresh)
    from .bidirectional import bidirectional_generate

    return bidirectional_generate(denoiser, cond, noise, config.steps, generator)
