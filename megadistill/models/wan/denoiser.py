"""The Wan DiT seen through the methods' ``Denoiser`` interface, with its conditioning.

``WanCondition`` is the ``cond`` / ``uncond`` a ``DistillBatch`` carries for Wan: text context plus
the image conditioning of the I2V and TI2V models. Samples are Wan latents [B, C, F, H, W].

Wan2.2 TI2V first-frame conditioning (``first_frame``) lives here rather than in each method, so the
generator, the teacher and the critic all see it the same way (as the Wan2.2-TI2V-5B DMD fork does):
latent frame 0 of the input is replaced by the clean image latent, the tokens of frame 0 get timestep
0 (per-token timesteps), and frame 0 of the x0 prediction is overwritten by the image latent. Frame 0
then carries no gradient into the generator, and score differences there are zero.

``cond`` may also be a dict of WanCondition's fields: the methods' generic helpers (``cat_batch``
stacking real and fake conditions for one GAN critic forward) and DataLoader collation handle dicts.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Mapping, Optional, Union

import torch

from megadistill.methods.base import Denoiser


@dataclass
class WanCondition:
    """context: text embeddings [B, Lt, text_dim]; clip_fea: CLIP image features [B, 257, image_dim]
    (Wan2.1 I2V); y: I2V channel condition [B, in_dim - C, F, H, W] (mask + first-frame latent);
    first_frame: TI2V clean image latent [B, C, 1, H, W]."""

    context: torch.Tensor
    clip_fea: Optional[torch.Tensor] = None
    y: Optional[torch.Tensor] = None
    first_frame: Optional[torch.Tensor] = None

    def __post_init__(self):
        if self.context.dim() != 3:
            raise ValueError(f"context must be [B, Lt, text_dim], got {list(self.context.shape)}")
        b = self.context.shape[0]
        for name in ("clip_fea", "y", "first_frame"):
            value = getattr(self, name)
            if value is not None and value.shape[0] != b:
                raise ValueError(f"{name} has batch {value.shape[0]}, context has {b}")
        if self.first_frame is not None and (self.first_frame.dim() != 5 or self.first_frame.shape[2] != 1):
            raise ValueError(f"first_frame must be one latent frame [B, C, 1, H, W], got {list(self.first_frame.shape)}")
        if self.y is not None and self.y.dim() != 5:
            raise ValueError(f"y must be [B, C_y, F, H, W], got {list(self.y.shape)}")

    @property
    def batch_size(self) -> int:
        return self.context.shape[0]

    def frames(self, start: int, end: int) -> "WanCondition":
        """The condition of latent frames [start, end) (one block of a causal rollout): ``y`` is sliced,
        the first-frame latent applies only to a block that contains frame 0."""
        y = self.y[:, :, start:end] if self.y is not None else None
        first = self.first_frame if start == 0 else None
        return replace(self, y=y, first_frame=first)


def as_wan_condition(cond: Union[WanCondition, Mapping[str, Any]]) -> WanCondition:
    """A WanCondition from itself or from a dict of its fields (None values allowed)."""
    if isinstance(cond, WanCondition):
        return cond
    if isinstance(cond, Mapping):
        known = {f.name for f in fields(WanCondition)}
        unknown = sorted(set(cond) - known)
        if unknown:
            raise ValueError(f"unknown WanCondition field(s) {unknown}; fields: {sorted(known)}")
        return WanCondition(**cond)
    raise TypeError(f"a Wan condition must be a WanCondition or a dict of its fields, got {type(cond).__name__}")


def frame0_token_timesteps(t: torch.Tensor, tokens_per_frame: int, num_tokens: int) -> torch.Tensor:
    """Per-token timesteps [B, L] equal to t [B] except 0 on the tokens of latent frame 0."""
    t_tok = t.reshape(-1, 1).expand(-1, num_tokens).clone()
    t_tok[:, :tokens_per_frame] = 0
    return t_tok


class WanDenoiser(Denoiser):
    """``net``: a WanModel / WanMoE; ``cond``: a WanCondition. See the module docstring."""

    def _tokens(self, x: torch.Tensor) -> tuple[int, int]:
        pt, ph, pw = self.net.config.patch_size
        per_frame = (x.shape[3] // ph) * (x.shape[4] // pw)
        return per_frame, per_frame * (x.shape[2] // pt)

    def network_inputs(self, x_t: torch.Tensor, t: torch.Tensor, cond: WanCondition):
        """(latents, timesteps) as the network sees them: with first-frame conditioning frame 0 replaced
        by the image latent and per-token timesteps [B, L] that are 0 on frame 0."""
        cond = as_wan_condition(cond)
        if cond.batch_size != x_t.shape[0]:
            raise ValueError(f"condition has batch {cond.batch_size}, latents have {x_t.shape[0]}")
        t = torch.as_tensor(t, device=x_t.device)
        if cond.first_frame is None:
            return x_t, t
        if t.dim() > 1:
            raise ValueError("first-frame conditioning builds per-token timesteps itself; pass t as [B]")
        x_t = torch.cat([cond.first_frame.to(x_t.dtype), x_t[:, :, 1:]], dim=2)
        per_frame, total = self._tokens(x_t)
        return x_t, frame0_token_timesteps(t.expand(x_t.shape[0]), per_frame, total)

    def flow_to_x0(self, v: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                   sigma: Optional[torch.Tensor] = None) -> torch.Tensor:
        """As Denoiser.flow_to_x0, also for per-frame timesteps t [B, F] (block-causal teacher forcing)."""
        t = torch.as_tensor(t)
        if t.dim() == 2:
            if t.shape != (x_t.shape[0], x_t.shape[2]):
                raise ValueError(f"per-frame timesteps must be [B, F] = {[x_t.shape[0], x_t.shape[2]]}, got {list(t.shape)}")
            t = t[:, None, :, None, None]  # sigma broadcasts over channels and space
            if sigma is not None:
                sigma = torch.as_tensor(sigma)[:, None, :, None, None]
        return super().flow_to_x0(v, x_t, t, sigma)

    def flow(self, x_t: torch.Tensor, t: torch.Tensor, cond: WanCondition, **kwargs) -> torch.Tensor:
        cond = as_wan_condition(cond)
        x_in, t_in = self.network_inputs(x_t, t, cond)
        return self.net(x_in, t_in, cond.context, cond.clip_fea, cond.y, **kwargs)

    def x0(self, x_t: torch.Tensor, t: torch.Tensor, cond: WanCondition,
           sigma: Optional[torch.Tensor] = None) -> torch.Tensor:
        x0 = self.flow_to_x0(self.flow(x_t, t, cond), x_t, t, sigma)
        return overwrite_first_frame(x0, cond)


def overwrite_first_frame(x0: torch.Tensor, cond: WanCondition) -> torch.Tensor:
    """x0 with latent frame 0 replaced by the TI2V image latent (unchanged without one)."""
    cond = as_wan_condition(cond)
    if cond.first_frame is None:
        return x0
    return torch.cat([cond.first_frame.to(x0.dtype), x0[:, :, 1:]], dim=2)
