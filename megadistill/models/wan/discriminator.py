"""The Wan DiT as a discriminator backbone: its flow prediction plus the hidden states of chosen blocks.

``Discriminator`` calls ``backbone(x_t, t, cond, return_features=layers)``; WanModel's forward has no
such argument, so ``WanFeatureBackbone`` wraps a ``WanDenoiser`` (the critic's trainable teacher copy)
and reads the outputs of ``net.blocks[i]`` ([B, L, dim] tokens) with forward hooks that live only for
the duration of one call. Going through the denoiser gives the critic the same conditioning as the
generator and the teacher (TI2V: clean image latent on frame 0 with timestep 0; I2V: y and clip_fea).

Sequence parallelism: between the embeddings and the head a block's output is only this rank's token
shard ([B, n, dim], padded; parallel/sequence_parallel.py). The hooked features are passed through the
model's own ``token_layout.gather`` -- what the model does to its blocks' output before the head -- so
the register heads see exactly the single-process [B, L, dim] features on every SP rank, and their
gradients are weighed as the model's own output's are: the gather's backward is a reduce-scatter
(sum), so, with the same loss on every SP rank, every parameter's gradient summed over the SP group is
sp x the single-process one (replicated heads: the full gradient on each rank; blocks: partials), which
the trainer's loss scale turns into the data-parallel mean (engines.sequence_parallel_loss_scale).
Single-process, the layout's gather is the identity.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn

from megadistill.models.wan.model import WanModel
from megadistill.models.wan.denoiser import WanDenoiser, as_wan_condition

from megadistill.models.discriminators.discriminator import Discriminator
from megadistill.models.discriminators.register_heads import RegisterHeads, RegisterHeadsConfig


class WanFeatureBackbone(nn.Module):
    """(x_t, t, cond, return_features) -> (flow [B, C, F, H, W], [hidden [B, L, dim] per chosen block])."""

    def __init__(self, denoiser: WanDenoiser):
        super().__init__()
        if not isinstance(denoiser.net, WanModel):
            # A WanMoE routes samples between two experts: a layer index names no single block.
            raise ValueError(f"the Wan feature backbone needs a single WanModel, got {type(denoiser.net).__name__}")
        self.denoiser = denoiser

    @property
    def num_layers(self) -> int:
        return len(self.denoiser.net.blocks)

    def forward(
        self, x_t: torch.Tensor, t: torch.Tensor, cond: Any, return_features: Optional[Sequence[int]] = None
    ):
        if return_features is None:
            return self.denoiser.flow(x_t, t, cond)
        layers = [int(i) for i in return_features]
        bad = [i for i in layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"feature layers {bad} out of range: the model has {self.num_layers} blocks")
        captured: dict[int, torch.Tensor] = {}
        blocks = self.denoiser.net.blocks

        def hook_for(i: int):
            def hook(_module, _inputs, output):
                captured[i] = output

            return hook

        # Removed before returning, so a gradient-checkpoint recomputation in backward captures nothing.
        handles = [blocks[i].register_forward_hook(hook_for(i)) for i in layers]
        try:
            flow = self.denoiser.flow(x_t, t, as_wan_condition(cond))
        finally:
            for h in handles:
                h.remove()
        net = self.denoiser.net
        length = num_tokens(x_t.shape, net.config.patch_size)
        return flow, [net.token_layout.gather(captured[i], length) for i in layers]


def num_tokens(latent_shape: Sequence[int], patch_size: Sequence[int]) -> int:
    """Tokens L of a latent [B, C, F, H, W] patchified by (pt, ph, pw) (the full, unsharded sequence)."""
    length = 1
    for size, patch in zip(latent_shape[2:], patch_size):
        length *= size // patch
    return length


def wan_discriminator(
    critic: WanDenoiser, layers: Sequence[int], heads: Optional[RegisterHeadsConfig] = None
) -> Discriminator:
    """A GAN critic on a Wan denoiser: register heads (default: self_forcing style, 4 heads) on ``layers``."""
    dim = critic.net.config.dim
    if heads is None:
        heads = RegisterHeadsConfig(dim=dim, num_layers=len(layers), num_heads=min(4, critic.net.config.num_heads))
    if heads.dim != dim:
        raise ValueError(f"heads.dim ({heads.dim}) must equal the Wan hidden size ({dim})")
    return Discriminator(WanFeatureBackbone(critic), RegisterHeads(heads), layers)

