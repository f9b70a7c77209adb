"""One Wan DiT block (self-attention, cross-attention, FFN with adaLN modulation) and the output head.

Parameter names are those of the original Wan code (``self_attn.q``, ``norm3``, ``modulation``, ...),
so original checkpoints load without renaming.

Precision follows upstream run under autocast: the modulation, the norms' statistics, the gated
residual adds and the head are float32; the projections run in the compute dtype (the parameters'
dtype, or autocast's). The residual stream therefore becomes float32 after the first gated add,
exactly as upstream (bf16 output * float32 gate promotes to float32).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from megadistill.models.wan.attention import SelfAttentionCore
from megadistill.models.wan.embeddings import FP32Linear
from megadistill.models.wan.kv_cache import KVCacheStep
from megadistill.models.wan.norms import WanLayerNorm, WanRMSNorm
from megadistill.ops.attention import Backend, attention, resolve_backend
from megadistill.ops.modulate import gated_residual, modulate
from megadistill.ops.rope import apply_rope


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, L, H*D] -> [B, L, H, D]."""
    return x.unflatten(-1, (num_heads, -1))


class WanSelfAttention(nn.Module):
    """Self-attention with full-width q/k RMSNorm and 3D RoPE.

    ``fused_qkv`` holds one Linear(dim, 3 dim) (one GEMM instead of three); the checkpoint loader
    builds its weight from separate q/k/v tensors and the saver splits it back. ``core`` (KV cache +
    attention, ``SelfAttentionCore``) is what sequence parallelism swaps; RoPE stays outside it.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, eps: float = 1e-6,
                 fused_qkv: bool = False, backend: Optional[Backend] = None):
        super().__init__()
        self.dim, self.num_heads, self.fused_qkv = dim, num_heads, fused_qkv
        if fused_qkv:
            self.qkv = nn.Linear(dim, 3 * dim)
        else:
            self.q = nn.Linear(dim, dim)
            self.k = nn.Linear(dim, dim)
            self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps=eps) if qk_norm else nn.Identity()
        self.norm_k = WanRMSNorm(dim, eps=eps) if qk_norm else nn.Identity()
        self.core = SelfAttentionCore(backend or resolve_backend("auto"))

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as [B, L, H, D]; q and k normalised over all heads, before RoPE."""
        x = x.to(self.o.weight.dtype)
        if self.fused_qkv:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        h = self.num_heads
        return _heads(self.norm_q(q), h), _heads(self.norm_k(k), h), _heads(v, h)

    def forward(self, x: torch.Tensor, freqs: torch.Tensor, mask=None,
                kv_cache: Optional[KVCacheStep] = None) -> torch.Tensor:
        """``mask``: see ``attention``. ``kv_cache``: this call's step of a KV cache; the keys are
        rotated (absolute positions in ``freqs``) before they are cached, and the call attends to the
        cached past plus its own tokens."""
        q, k, v = self.project(x)
        q, k = apply_rope(q, freqs), apply_rope(k, freqs)
        out = self.core(q, k, v, mask, kv_cache)
        return self.o(out.flatten(2).to(self.o.weight.dtype))


class WanCrossAttention(nn.Module):
    """Cross-attention to the text tokens (no RoPE), plus Wan2.1 I2V's separate CLIP-image keys/values.

    With the image branch the output is o(attn(q, k, v) + attn(q, k_img, v_img)). ``project_context``
    is split out so a caller can compute the context keys/values once and reuse them (cross-attention
    cache of the causal rollout).
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, eps: float = 1e-6,
                 image_branch: bool = False, backend: Optional[Backend] = None):
        super().__init__()
        self.dim, self.num_heads, self.image_branch = dim, num_heads, image_branch
        self.backend = backend or resolve_backend("auto")
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps=eps) if qk_norm else nn.Identity()
        self.norm_k = WanRMSNorm(dim, eps=eps) if qk_norm else nn.Identity()
        if image_branch:
            self.k_img = nn.Linear(dim, dim)
            self.v_img = nn.Linear(dim, dim)
            self.norm_k_img = WanRMSNorm(dim, eps=eps) if qk_norm else nn.Identity()

    def project_context(self, context: torch.Tensor, context_img: Optional[torch.Tensor] = None
                        ) -> tuple[torch.Tensor, ...]:
        """(k, v) or (k, v, k_img, v_img), each [B, Lc, H, D]."""
        h, dtype = self.num_heads, self.o.weight.dtype
        context = context.to(dtype)
        kv = (_heads(self.norm_k(self.k(context)), h), _heads(self.v(context), h))
        if not self.image_branch:
            if context_img is not None:
                raise ValueError("this model has no image branch (image_dim is None) but got CLIP features")
            return kv
        if context_img is None:
            raise ValueError("the image branch needs the projected CLIP features (clip_fea)")
        context_img = context_img.to(dtype)
        return kv + (_heads(self.norm_k_img(self.k_img(context_img)), h), _heads(self.v_img(context_img), h))

    def forward(self, x: torch.Tensor, context_kv: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x = x.to(self.o.weight.dtype)
        q = _heads(self.norm_q(self.q(x)), self.num_heads)
        out = attention(q, context_kv[0], context_kv[1], backend=self.backend)
        if self.image_branch:
            out = out + attention(q, context_kv[2], context_kv[3], backend=self.backend)
        return self.o(out.flatten(2).to(self.o.weight.dtype))


class WanBlock(nn.Module):
    """Upstream ``WanAttentionBlock``. Note the names: norm3 is the (affine) cross-attention norm and
    norm2 the (plain) FFN norm; diffusers swaps the two."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, qk_norm: bool = True,
                 cross_attn_norm: bool = True, eps: float = 1e-6, image_branch: bool = False,
                 fused_qkv: bool = False, backend: Optional[Backend] = None):
        super().__init__()
        self.norm1 = WanLayerNorm(dim, eps)
        self.self_attn = WanSelfAttention(dim, num_heads, qk_norm, eps, fused_qkv, backend)
        self.norm3 = WanLayerNorm(dim, eps, elementwise_affine=True) if cross_attn_norm else nn.Identity()
        self.cross_attn = WanCrossAttention(dim, num_heads, qk_norm, eps, image_branch, backend)
        self.norm2 = WanLayerNorm(dim, eps)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor, freqs: torch.Tensor, context: Optional[torch.Tensor],
                context_img: Optional[torch.Tensor] = None, mask=None,
                context_kv: Optional[tuple[torch.Tensor, ...]] = None,
                kv_cache: Optional[KVCacheStep] = None) -> torch.Tensor:
        """x [B, L, dim]; e [B, R, 6, dim] float32 (modulation rows, R = 1, F or L: see ``modulate``);
        context [B, text_len, dim] and context_img [B, 257, dim] (I2V 2.1) as embedded by the model,
        or ``context_kv`` already projected (a rollout's cross-attention cache; context is then None)
        with a KV-cache step. Every call goes through ``forward`` so that ZeRO-3's module hooks gather
        this block's own parameters (``modulation``) before ``run`` reads them."""
        if context_kv is None:
            context_kv = self.cross_attn.project_context(context, context_img)
        return self.run(x, e, freqs, context_kv, mask, kv_cache)

    def run(self, x: torch.Tensor, e: torch.Tensor, freqs: torch.Tensor, context_kv: tuple[torch.Tensor, ...],
            mask=None, kv_cache: Optional[KVCacheStep] = None) -> torch.Tensor:
        """The block with the context keys/values already projected (``project_context``, cached by a
        rollout) and optionally a KV-cache step for the self-attention."""
        shift, scale, gate, c_shift, c_scale, c_gate = (self.modulation.float().unsqueeze(0) + e).unbind(2)

        y = self.self_attn(modulate(self.norm1(x).float(), shift, scale), freqs, mask, kv_cache)
        x = gated_residual(x, y.float(), gate)

        x = x + self.cross_attn(self.norm3(x), context_kv)

        ffn_in = modulate(self.norm2(x).float(), c_shift, c_scale).to(self.ffn[0].weight.dtype)
        return gated_residual(x, self.ffn(ffn_in).float(), c_gate)


class WanHead(nn.Module):
    """Output head: adaLN (shift, scale from the time embedding before SiLU) then Linear, all float32."""

    def __init__(self, dim: int, out_dim: int, patch_size: tuple[int, int, int], eps: float = 1e-6):
        super().__init__()
        self.norm = WanLayerNorm(dim, eps)
        self.head = FP32Linear(dim, out_dim * patch_size[0] * patch_size[1] * patch_size[2])
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x [B, L, dim]; e [B, R, dim] float32 (R = 1, F or L) -> [B, L, prod(patch) * out_dim] float32."""
        shift, scale = (self.modulation.float().unsqueeze(0) + e.unsqueeze(2)).unbind(2)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.head(modulate(self.norm(x).float(), shift, scale))
