"""Register-token cross-attention classifier heads on a backbone's intermediate hidden states.

One learnable register token per chosen backbone layer queries that layer's hidden states
[B, L, D] (L = tokens; the toy MLP gives L = 1, a video DiT L = F*H*W) with cross-attention. The
per-layer tokens are concatenated and mapped to logits. Two styles:

  * ``self_forcing`` (Self-Forcing ``GanAttentionBlock`` + ``cls_pred_branch``):
        token = reg + CA(q = reg, kv = LN(h));  token = token + FFN(LN(token))
        concat tokens (+ an optional time-embedding token) -> LN -> Linear -> SiLU -> Linear(num_classes)
  * ``apt`` (Seaweed-APT / SeedVR2: cross-attention-only blocks, outputs concatenated, normalised,
    projected to the logit):
        token = reg + CA(q = reg, kv = LN(h))
        concat tokens (+ optional time token) -> LN -> Linear(num_classes)

Register tokens are RMS-normalised before use (as upstream ``RegisterTokens``); q and k get RMSNorm
(as DiT qk_norm), so the heads stay well conditioned on backbones with large activations.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

HEAD_STYLES = ("self_forcing", "apt")


@dataclass
class RegisterHeadsConfig:
    """dim: backbone hidden size D; num_layers: number of feature layers the heads read."""

    dim: int
    num_layers: int = 3
    num_heads: int = 4
    ffn_dim: int = 0  # 0 -> 4 * dim (self_forcing style only)
    hidden_dim: int = 0  # classifier hidden width; 0 -> dim (self_forcing style only)
    num_classes: int = 1
    style: str = "self_forcing"
    time_embedding: bool = False  # append a learned embedding of t as one more token
    eps: float = 1e-6

    def __post_init__(self):
        if self.dim < 1:
            raise ValueError(f"dim must be >= 1, got {self.dim}")
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
        if self.num_heads < 1 or self.dim % self.num_heads:
            raise ValueError(f"num_heads must divide dim, got num_heads={self.num_heads}, dim={self.dim}")
        if self.ffn_dim < 0 or self.hidden_dim < 0:
            raise ValueError(f"ffn_dim and hidden_dim must be >= 0, got {self.ffn_dim}, {self.hidden_dim}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.style not in HEAD_STYLES:
            raise ValueError(f"style must be one of {HEAD_STYLES}, got {self.style!r}")


class RegisterCrossAttention(nn.Module):
    """Multi-head attention of a few query tokens over a sequence, with RMS qk-norm."""

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """query [B, Q, D], context [B, L, D] -> [B, Q, D]."""
        b, q_len, d = query.shape
        h = self.num_heads

        def split(x):  # [B, N, D] -> [B, h, N, D/h]
            return x.view(b, x.shape[1], h, d // h).transpose(1, 2)

        q = split(self.norm_q(self.q(query)))
        k = split(self.norm_k(self.k(context)))
        v = split(self.v(context))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.o(out.transpose(1, 2).reshape(b, q_len, d))


class RegisterHeadBlock(nn.Module):
    """One layer's head: token = reg + CA(reg, LN(h)); with an FFN, token = token + FFN(LN(token))."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: Optional[int], eps: float = 1e-6):
        super().__init__()
        self.norm_kv = nn.LayerNorm(dim, eps=eps)
        self.cross_attn = RegisterCrossAttention(dim, num_heads, eps)
        self.ffn = None
        if ffn_dim:
            self.norm_ffn = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
            self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))

    def forward(self, hidden: torch.Tensor, register: torch.Tensor) -> torch.Tensor:
        """hidden [B, L, D], register [B, 1, D] -> token [B, 1, D]."""
        token = register + self.cross_attn(register, self.norm_kv(hidden))
        if self.ffn is not None:
            token = token + self.ffn(self.norm_ffn(token))
        return token


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [B, dim] of timesteps t [B] (cos | sin halves, the DiT convention)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64, device=t.device) / half)
    args = t.double().reshape(-1, 1) * freqs.reshape(1, -1)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class RegisterHeads(nn.Module):
    """Per-layer register-token heads + classifier: features (list of [B, L, D]) -> logits [B, num_classes]."""

    def __init__(self, cfg: RegisterHeadsConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.registers = nn.Parameter(torch.randn(cfg.num_layers, d) * 0.02)
        self.register_norm = nn.RMSNorm(d, eps=cfg.eps)
        ffn_dim = (cfg.ffn_dim or 4 * d) if cfg.style == "self_forcing" else None
        self.blocks = nn.ModuleList(
            RegisterHeadBlock(d, cfg.num_heads, ffn_dim, cfg.eps) for _ in range(cfg.num_layers)
        )
        self.time_mlp = None
        if cfg.time_embedding:
            self.time_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        n_tokens = cfg.num_layers + int(cfg.time_embedding)
        width = n_tokens * d
        if cfg.style == "self_forcing":
            hidden = cfg.hidden_dim or d
            self.classifier = nn.Sequential(
                nn.LayerNorm(width, eps=cfg.eps), nn.Linear(width, hidden), nn.SiLU(),
                nn.Linear(hidden, cfg.num_classes),
            )
        else:
            self.classifier = nn.Sequential(nn.LayerNorm(width, eps=cfg.eps), nn.Linear(width, cfg.num_classes))

    def forward(self, features: Sequence[torch.Tensor], t: Optional[torch.Tensor] = None) -> torch.Tensor:
        if len(features) != self.cfg.num_layers:
            raise ValueError(f"expected {self.cfg.num_layers} feature maps, got {len(features)}")
        b = features[0].shape[0]
        regs = self.register_norm(self.registers)
        tokens = []
        for i, (block, h) in enumerate(zip(self.blocks, features)):
            if h.dim() != 3 or h.shape[0] != b or h.shape[-1] != self.cfg.dim:
                raise ValueError(f"feature {i} must be [B={b}, L, D={self.cfg.dim}], got {tuple(h.shape)}")
            reg = regs[i].to(h.dtype).expand(b, 1, -1)
            tokens.append(block(h, reg))
        if self.time_mlp is not None:
            if t is None:
                raise ValueError("time_embedding=True needs the timesteps t")
            emb = timestep_embedding(t.reshape(-1).expand(b) if t.numel() == 1 else t, self.cfg.dim)
            tokens.append(self.time_mlp(emb.to(tokens[0].dtype)).unsqueeze(1))
        return self.classifier(torch.cat(tokens, dim=1).reshape(b, -1))
