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

A block-causal Wan (config.num_frame_per_block) streams: ``WanDenoiser`` is a ``CausalDenoiser``
(rollout/causal_denoiser.py) over the network's ``forward_causal_step`` and its KV caches.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, List, Mapping, Optional, Tuple, Union

import torch

from megadistill.methods.base import Denoiser
from megadistill.models.wan.kv_cache import CrossAttnCache, KVCache, new_kv_cache
from megadistill.models.wan.model import WanModel


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

    def generated_mask(self, cond: WanCondition, samples: torch.Tensor) -> Optional[torch.Tensor]:
        """With TI2V first-frame conditioning every latent frame but frame 0 (the image latent)."""
        if as_wan_condition(cond).first_frame is None:
            return None
        if samples.dim() != 5:
            raise ValueError(f"Wan samples are [B, C, F, H, W], got {list(samples.shape)}")
        return first_frame_gradient_mask(samples.shape[2], samples.device)

    # -- CausalDenoiser: block-by-block generation against the network's KV caches -------------------
    def causal_block_frames(self) -> int:
        return causal_network(self).config.num_frame_per_block

    def check_causal(self, cond: WanCondition, sample_shape: Tuple[int, ...], batch_size: int) -> None:
        net = causal_network(self)
        if len(sample_shape) != 4:
            raise ValueError(f"sample shape must be (C, F, H, W), got {tuple(sample_shape)}")
        c, f, h, w = sample_shape
        if c != net.config.out_dim:
            raise ValueError(f"samples have {c} channels, the model generates {net.config.out_dim}")
        _, ph, pw = net.config.patch_size
        if h % ph or w % pw:
            raise ValueError(f"latent size (H, W) = {(h, w)} must be a multiple of the patch size {(ph, pw)}")
        check_causal_condition(cond, batch_size, f)

    def new_causal_cache(self, batch_size: int, latent_hw: Tuple[int, int], max_frames: int,
                         device: Optional[torch.device], cache_gradient: str) -> "WanCausalCache":
        net = causal_network(self)
        if cache_gradient == "upstream" and net.config.local_attn_size is not None:
            raise ValueError("cache_gradient 'upstream' reproduces upstream's training cache, which holds every "
                             "frame and never evicts; a model with a local window needs the detached cache gradient")
        _, ph, pw = net.config.patch_size
        frame_seq_len = (latent_hw[0] // ph) * (latent_hw[1] // pw)
        kv = new_kv_cache(net, batch_size, frame_seq_len, max_frames=max_frames, device=device,
                          grad_history=cache_gradient == "upstream")
        return WanCausalCache(kv, CrossAttnCache())

    def causal_flow(self, x: torch.Tensor, t: torch.Tensor, cond: WanCondition, cache: "WanCausalCache",
                    start_frame: int) -> torch.Tensor:
        cond = as_wan_condition(cond).frames(start_frame, start_frame + x.shape[2])
        return causal_network(self).forward_causal_step(x, t, cond.context, cache.kv, cache.cross,
                                                        start_frame=start_frame, clip_fea=cond.clip_fea, y=cond.y)


@dataclass
class WanCausalCache:
    """One streamed video's caches: per-layer self-attention ``KVCache`` and the context cache."""

    kv: List[KVCache]
    cross: CrossAttnCache


def causal_network(denoiser: Denoiser) -> WanModel:
    """The block-causal WanModel behind ``denoiser`` (clear error for anything else)."""
    net = denoiser.net
    if not isinstance(net, WanModel):
        raise ValueError(f"causal generation needs a WanModel as denoiser.net, got {type(net).__name__} "
                         "(WanMoE has no KV-cache step)")
    if not net.config.is_causal:
        raise ValueError("causal generation needs a block-causal WanModel: set config.num_frame_per_block "
                         "(e.g. build_wan(..., num_frame_per_block=3))")
    return net


def check_causal_condition(cond: WanCondition, batch_size: int, num_frames: int) -> None:
    if not isinstance(cond, WanCondition):
        raise ValueError(f"cond must be a WanCondition, got {type(cond).__name__}")
    if cond.batch_size != batch_size:
        raise ValueError(f"condition has batch {cond.batch_size}, latents have {batch_size}")
    if cond.first_frame is not None:
        # TI2V puts a clean frame 0 with per-token timestep 0 inside the first block; the causal
        # rollout would have to give that block mixed timesteps in every step and the refresh.
        raise ValueError("first_frame (Wan2.2 TI2V) conditioning is not supported by causal generation; "
                         "use the bidirectional rollout")
    if cond.y is not None and cond.y.shape[2] < num_frames:
        raise ValueError(f"the I2V condition y covers {cond.y.shape[2]} latent frames, {num_frames} are generated")


def first_frame_gradient_mask(num_frames: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """bool [1, 1, F, 1, 1]: every latent frame but frame 0 (broadcasts over [B, C, F, H, W])."""
    if num_frames < 2:
        raise ValueError(f"first-frame conditioning needs at least 2 latent frames, got {num_frames}")
    mask = torch.ones(1, 1, num_frames, 1, 1, dtype=torch.bool, device=device)
    mask[:, :, 0] = False
    return mask


def overwrite_first_frame(x0: torch.Tensor, cond: WanCondition) -> torch.Tensor:
    """x0 with latent frame 0 replaced by the TI2V image latent (unchanged without one)."""
    cond = as_wan_condition(cond)
    if cond.first_frame is None:
        return x0
    return torch.cat([cond.first_frame.to(x0.dtype), x0[:, :, 1:]], dim=2)
