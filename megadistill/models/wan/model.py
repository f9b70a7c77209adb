"""WanModel: the bidirectional Wan2.1 / Wan2.2 DiT (T2V, I2V, TI2V), WanMoE (Wan2.2 A14B) and build_wan.

Forward (upstream ``WanModel.forward`` with batched tensors instead of lists):
  x [B, C, F, H, W] (+ y on channels for I2V) -> Conv3d patches -> [B, L, dim]
  t [B] or [B, L] -> float64 sinusoid -> float32 time MLP: e [B, 1|L, dim], e0 [B, 1|L, 6, dim]
  context [B, <=text_len, text_dim] zero-padded to text_len -> text MLP; clip_fea -> img_emb (I2V 2.1)
  blocks (3D RoPE, full-width q/k RMSNorm) -> head (adaLN from e) -> unpatchify -> float32 [B, out, F, H, W]

Block-causal mode (config.num_frame_per_block) is the same module: ``forward`` attends under the
block-causal metadata (``ops.block_causal.BlockCausal``), and ``forward_causal_step`` runs one block of frames against per-layer KV caches
(``kv_cache.py``), the Self-Forcing rollout.

Both forwards pass the tokens through ``token_layout`` (``TokenLayout``: the identity) after the
embeddings and before the head; sequence parallelism swaps it (and each self-attention ``core``) from
outside the model to shard the tokens between those two points.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from megadistill.models.wan.blocks import WanBlock, WanHead
from megadistill.models.wan.config import WanConfig, wan_config
from megadistill.models.wan.embeddings import FP32Linear, ImageProjection, run_fp32, sinusoidal_embedding, unpatchify
from megadistill.models.wan.kv_cache import CrossAttnCache, KVCache
from megadistill.models.wan.rope import rope_grid
from megadistill.ops.attention import resolve_backend
from megadistill.ops.block_causal import BlockCausal

# Parameters computed in float32 anyway; keeping their storage float32 loses nothing in a bf16 model.
FP32_PARAM_PATTERNS = ("time_embedding.", "time_projection.", "modulation", "head.", "norm")


class TokenLayout:
    """Where the blocks' tokens live: here all of them in this process (the identity).

    ``scatter`` runs once per forward after the embeddings, RoPE table and mask are built for the
    full sequence; ``gather`` runs before the head and returns the full sequence. A sequence-parallel
    layout shards tokens, per-token modulation rows and RoPE rows in between, and may hand the
    self-attention cores what they need through ``mask``.
    """

    def scatter(self, tokens: torch.Tensor, e0: torch.Tensor, freqs: torch.Tensor, mask):
        """tokens [B, L, dim], e0 [B, R, 6, dim], freqs [L, head_dim / 2], mask -> the same four, laid out."""
        return tokens, e0, freqs, mask

    def gather(self, tokens: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """The blocks' output tokens -> [B, L, dim], the full sequence of L = ``num_tokens``."""
        return tokens


class WanModel(nn.Module):
    """One Wan DiT. Parameter names are the original Wan checkpoint keys."""

    def __init__(self, config: WanConfig):
        super().__init__()
        self.config = config
        c = config
        self.grad_checkpointing = c.grad_checkpointing
        self.token_layout = TokenLayout()
        self.patch_embedding = nn.Conv3d(c.in_dim, c.dim, kernel_size=c.patch_size, stride=c.patch_size)
        self.text_embedding = nn.Sequential(
            nn.Linear(c.text_dim, c.dim), nn.GELU(approximate="tanh"), nn.Linear(c.dim, c.dim))
        self.time_embedding = nn.Sequential(FP32Linear(c.freq_dim, c.dim), nn.SiLU(), FP32Linear(c.dim, c.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), FP32Linear(c.dim, 6 * c.dim))
        backend = resolve_backend(c.attention)  # one back-end for every attention call of this model
        self.blocks = nn.ModuleList([
            WanBlock(c.dim, c.ffn_dim, c.num_heads, c.qk_norm, c.cross_attn_norm, c.eps,
                     image_branch=c.image_dim is not None, fused_qkv=c.fused_qkv, backend=backend)
            for _ in range(c.num_layers)
        ])
        self.head = WanHead(c.dim, c.out_dim, c.patch_size, c.eps)
        if c.image_dim is not None:
            self.img_emb = ImageProjection(c.image_dim, c.dim)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """Upstream initialisation: Xavier linears with zero bias, N(0, 0.02) text/time MLPs, zero head."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        for seq in (self.text_embedding, self.time_embedding):
            for m in seq:
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)

    def time_embed(self, t: torch.Tensor, batch: int, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """t [B] or [B, R] -> e [B, 1|R, dim] and e0 [B, 1|R, 6, dim], both float32.

        R must divide L = num_tokens; each timestep covers L / R consecutive tokens: R = L per token
        (Wan2.2 TI2V), R = F per latent frame (upstream CausalWanModel's [B, F]).
        """
        if t.dim() == 0:
            t = t.expand(batch)
        if not (t.shape == (batch,) or (t.dim() == 2 and t.shape[0] == batch and 0 < t.shape[1] <= num_tokens
                                        and num_tokens % t.shape[1] == 0)):
            raise ValueError(f"timesteps must be [B] = [{batch}], per token [B, L] = [{batch}, {num_tokens}] or "
                             f"[B, R] with R dividing L (R = frames: per frame), got {list(t.shape)}")
        rows = 1 if t.dim() == 1 else t.shape[1]
        e = run_fp32(self.time_embedding, sinusoidal_embedding(self.config.freq_dim, t).float())
        e0 = run_fp32(self.time_projection, e)
        return e.view(batch, rows, -1), e0.view(batch, rows, 6, -1)

    def embed_context(self, context: torch.Tensor) -> torch.Tensor:
        """Text embeddings [B, Lt <= text_len, text_dim] -> [B, text_len, dim].

        Upstream zero-pads the trimmed T5 output to text_len BEFORE the projection and attends to all
        text_len tokens; padding here reproduces that for inputs shorter than text_len.
        """
        c = self.config
        if context.dim() != 3 or context.shape[-1] != c.text_dim or context.shape[1] > c.text_len:
            raise ValueError(f"context must be [B, <= {c.text_len}, {c.text_dim}], got {list(context.shape)}")
        if context.shape[1] < c.text_len:
            context = F.pad(context, (0, 0, 0, c.text_len - context.shape[1]))
        return self.text_embedding(context.to(self.text_embedding[0].weight.dtype))

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                clip_fea: Optional[torch.Tensor] = None, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Flow prediction [B, out_dim, F, H, W] (float32).

        x: noisy latents [B, C, F, H, W]; t: timesteps in [0, num_train_timesteps], [B], per token
        [B, L] with L = (F/pt)(H/ph)(W/pw), or per frame [B, F/pt]; context: text embeddings [B, text_len, text_dim];
        clip_fea: CLIP image features [B, 257, image_dim] (Wan2.1 I2V); y: I2V condition
        [B, in_dim - C, F, H, W] (mask + first-frame latent), concatenated on channels.

        In block-causal mode (config.num_frame_per_block) this is the parallel training forward
        (teacher forcing / CausVid / ODE regression): all frames at once under the block-causal mask.
        """
        c = self.config
        tokens, e, e0, grid = self._embed_inputs(x, t, y)
        num_tokens = tokens.shape[1]
        context = self.embed_context(context)
        context_img = self._embed_image(clip_fea)
        freqs = rope_grid(grid, c.head_dim, c.rope_theta, device=tokens.device)
        mask = None
        if c.is_causal:
            mask = BlockCausal(grid[0], grid[1] * grid[2], c.num_frame_per_block, c.local_attn_size, c.sink_size)
        tokens, e0, freqs, mask = self.token_layout.scatter(tokens, e0, freqs, mask)

        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, e0, freqs, context, context_img, mask, use_reentrant=False)
            else:
                tokens = block(tokens, e0, freqs, context, context_img, mask)

        tokens = self.token_layout.gather(tokens, num_tokens)
        return unpatchify(self.head(tokens, e), grid, c.patch_size, c.out_dim).float()

    def forward_causal_step(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                            kv_cache: list[KVCache], crossattn_cache: Optional[CrossAttnCache] = None,
                            start_frame: int = 0, clip_fea: Optional[torch.Tensor] = None,
                            y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Incremental forward of one block of frames against the KV cache -> flow [B, out_dim, Fb, H, W].

        x: latents of frames [start_frame, start_frame + Fb) [B, C, Fb, H, W]; t: [B], per token
        [B, Fb*(H/2)*(W/2)] or per frame [B, Fb]; kv_cache: ``new_kv_cache(model, ...)``, one per
        layer, updated in place (RoPE uses absolute frame positions, so the keys are cached already
        rotated); crossattn_cache: a ``CrossAttnCache()`` shared by the calls of one rollout (context
        and clip_fea are projected on its first use only); y: the I2V condition for these frames.

        Calling it block after block, each block once, gives the parallel block-causal forward's
        output for that block. Calling it again with the same start_frame overwrites that block's cache
        slot (the rollout's clean-context refresh).
        """
        c = self.config
        if len(kv_cache) != len(self.blocks):
            raise ValueError(f"kv_cache has {len(kv_cache)} layers, the model has {len(self.blocks)}")
        if start_frame < 0:
            raise ValueError(f"start_frame must be >= 0, got {start_frame}")
        tokens, e, e0, grid = self._embed_inputs(x, t, y)
        cross = crossattn_cache if crossattn_cache is not None else CrossAttnCache()
        context_kv = cross.get(lambda: self.project_context(context, clip_fea))
        freqs = rope_grid(grid, c.head_dim, c.rope_theta, frame_offset=start_frame, device=tokens.device)
        frame_seq_len, num_tokens = grid[1] * grid[2], tokens.shape[1]
        ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        tokens, e0, freqs, mask = self.token_layout.scatter(tokens, e0, freqs, None)

        for block, ckv, cache in zip(self.blocks, context_kv, kv_cache):
            # The cache is touched only outside the (possibly recomputed) block: begin() evicts and
            # reserves the slot, commit() writes it; a recomputation reads the snapshot of the past.
            step = cache.begin(start_frame * frame_seq_len, num_tokens, snapshot=ckpt)
            if ckpt:
                tokens = checkpoint(block, tokens, e0, freqs, None, None, mask, ckv, step, use_reentrant=False)
            else:
                tokens = block(tokens, e0, freqs, None, None, mask, ckv, step)
            step.commit()

        tokens = self.token_layout.gather(tokens, num_tokens)
        return unpatchify(self.head(tokens, e), grid, c.patch_size, c.out_dim).float()

    def project_context(self, context: torch.Tensor, clip_fea: Optional[torch.Tensor] = None
                        ) -> list[tuple[torch.Tensor, ...]]:
        """Every block's cross-attention keys/values for this context (the cross-attention cache)."""
        context = self.embed_context(context)
        context_img = self._embed_image(clip_fea)
        return [block.cross_attn.project_context(context, context_img) for block in self.blocks]

    def _embed_inputs(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor]):
        """Patch tokens [B, L, dim], time embeddings e, e0 and the token grid (F, H, W) / patch."""
        c = self.config
        x = self._concat_condition(x, y)
        b, _, f, h, w = x.shape
        pt, ph, pw = c.patch_size
        if f % pt or h % ph or w % pw:
            raise ValueError(f"latent size (F, H, W) = {(f, h, w)} must be a multiple of patch_size {c.patch_size}")
        grid = (f // pt, h // ph, w // pw)
        tokens = self.patch_embedding(x.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        e, e0 = self.time_embed(torch.as_tensor(t, device=tokens.device), b, tokens.shape[1])
        return tokens, e, e0, grid

    def _concat_condition(self, x: torch.Tensor, y: Optional[torch.Tensor]) -> torch.Tensor:
        c = self.config
        if x.dim() != 5:
            raise ValueError(f"latents must be [B, C, F, H, W], got {list(x.shape)}")
        if c.model_type == "i2v":
            if y is None:
                raise ValueError("i2v model needs the condition y [B, in_dim - out_dim, F, H, W]")
            if y.shape[0] != x.shape[0] or y.shape[2:] != x.shape[2:]:
                raise ValueError(f"y {list(y.shape)} must match latents {list(x.shape)} except in channels")
            x = torch.cat([x, y.to(x.dtype)], dim=1)
        elif y is not None:
            raise ValueError(f"model_type {c.model_type!r} takes no condition y")
        if x.shape[1] != c.in_dim:
            raise ValueError(f"latents (+ y) have {x.shape[1]} channels, the model expects in_dim = {c.in_dim}")
        return x

    def _embed_image(self, clip_fea: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if self.config.image_dim is None:
            if clip_fea is not None:
                raise ValueError("clip_fea given but this model has no CLIP image branch (image_dim is None)")
            return None
        if clip_fea is None:
            raise ValueError("this I2V model needs clip_fea [B, 257, image_dim]")
        return self.img_emb(clip_fea.to(self.img_emb.proj[1].weight.dtype))


class WanMoE(nn.Module):
    """Wan2.2 A14B: two experts of one config; the high-noise expert runs for t >= boundary * T.

    A sample's noise level is its timestep ([B]) or its noisiest token ([B, L]). A batch that straddles
    the boundary is split by sample, each part going to its expert.
    """

    def __init__(self, config: WanConfig):
        super().__init__()
        if config.expert_boundary is None:
            raise ValueError("WanMoE needs config.expert_boundary")
        self.config = config
        expert = config.replace(expert_boundary=None)
        self.high_noise_model = WanModel(expert)
        self.low_noise_model = WanModel(expert)

    @property
    def boundary_timestep(self) -> float:
        return self.config.expert_boundary * self.config.num_train_timesteps

    def is_high_noise(self, t: torch.Tensor) -> torch.Tensor:
        """Boolean [B]: which samples go to the high-noise expert."""
        t = torch.as_tensor(t)
        level = t if t.dim() <= 1 else t.amax(dim=1)
        return level >= self.boundary_timestep

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                clip_fea: Optional[torch.Tensor] = None, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        high = self.is_high_noise(t)
        if high.all():
            return self.high_noise_model(x, t, context, clip_fea, y)
        if not high.any():
            return self.low_noise_model(x, t, context, clip_fea, y)

        def part(model, sel):
            pick = (lambda v: None if v is None else v[sel])
            return model(x[sel], t[sel], context[sel], pick(clip_fea), pick(y))

        out_high, out_low = part(self.high_noise_model, high), part(self.low_noise_model, ~high)
        out = out_high.new_empty((x.shape[0],) + out_high.shape[1:])
        out[high] = out_high
        out[~high] = out_low
        return out


def cast_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast to ``dtype`` except the parameters Wan computes in float32 (norms, modulation, time MLPs, head)."""
    for name, p in model.named_parameters():
        keep = any(pat in name for pat in FP32_PARAM_PATTERNS)
        p.data = p.data.to(torch.float32 if keep else dtype)
    return model


def build_wan(preset: Union[str, WanConfig], *, device: Optional[Union[str, torch.device]] = None,
              dtype: Optional[torch.dtype] = None, **overrides) -> Union[WanModel, WanMoE]:
    """A Wan model by preset name (or config) with field overrides.

    ``device="meta"`` builds without allocating (real sizes, for sharded initialisation or counting);
    ``dtype`` casts with the float32 exceptions of ``cast_model``. A config with ``expert_boundary``
    (Wan2.2 A14B) gives a WanMoE.
    """
    if isinstance(preset, WanConfig):
        config = preset.replace(**overrides) if overrides else preset
    else:
        config = wan_config(preset, **overrides)
    ctx = torch.device(device) if device is not None else contextlib.nullcontext()
    with ctx:
        model = WanMoE(config) if config.expert_boundary is not None else WanModel(config)
    if dtype is not None:
        cast_model(model, dtype)
    return model
