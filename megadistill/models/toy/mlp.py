"""ToyFlowMLP: a class-conditional flow-prediction MLP for low-dimensional data.

It plays the role of a video DiT in the toy lab: same calling convention as a video family's denoiser
(x_t, timestep in [0, 1000], condition) -> flow v = eps - x0, and it can return per-block hidden
states shaped like transformer tokens ([B, 1, hidden]) so discriminator heads written for a DiT's
[B, L, D] features run on it unchanged.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of timesteps t [B] (any float dtype, values in [0, 1000]) -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class ResidualBlock(nn.Module):
    """h + MLP(LN(h) * (1 + scale) + shift), modulated by the (time, class) embedding (adaLN)."""

    def __init__(self, hidden: int, mult: int = 2):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False)
        self.modulation = nn.Linear(hidden, 2 * hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, mult * hidden), nn.SiLU(), nn.Linear(mult * hidden, hidden))
        # Zero-init the modulation so every block starts as a plain pre-norm residual MLP.
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(emb).chunk(2, dim=-1)
        return h + self.mlp(self.norm(h) * (1 + scale) + shift)


class ToyFlowMLP(nn.Module):
    """Conditional flow-prediction MLP.

    forward(x_t [B, dim], t [B] in [0, 1000], cond LongTensor [B]) -> v [B, dim].
    cond == num_classes (``null_class``) is the unconditional / dropped label used for CFG.
    With ``return_features=(i, j, ...)`` it also returns the hidden states after those residual
    blocks, each as [B, 1, hidden].
    """

    def __init__(self, dim: int = 2, num_classes: int = 4, hidden: int = 256, depth: int = 4, time_dim: int = 64):
        super().__init__()
        if dim < 1 or num_classes < 1 or hidden < 1 or depth < 1 or time_dim < 2:
            raise ValueError(
                f"ToyFlowMLP needs positive sizes, got dim={dim}, num_classes={num_classes}, "
                f"hidden={hidden}, depth={depth}, time_dim={time_dim}"
            )
        self.dim, self.num_classes, self.hidden, self.depth, self.time_dim = dim, num_classes, hidden, depth, time_dim
        self.null_class = num_classes
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.class_embed = nn.Embedding(num_classes + 1, hidden)
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList([ResidualBlock(hidden) for _ in range(depth)])
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, dim)

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor,
        return_features: Optional[Sequence[int]] = None,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, List[torch.Tensor]]]:
        if x_t.dim() != 2 or x_t.shape[1] != self.dim:
            raise ValueError(f"x_t must be [B, {self.dim}], got {tuple(x_t.shape)}")
        batch = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device)
        if t.dim() == 0:
            t = t.expand(batch)
        cond = torch.as_tensor(cond, dtype=torch.long, device=x_t.device)
        if cond.dim() == 0:
            cond = cond.expand(batch)
        wanted = set(return_features or ())
        bad = [i for i in wanted if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"return_features indices {bad} outside [0, {self.depth})")

        dtype = self.inp.weight.dtype
        emb = self.time_mlp(timestep_embedding(t, self.time_dim).to(dtype)) + self.class_embed(cond)
        emb = nn.functional.silu(emb)
        h = self.inp(x_t.to(dtype))
        feats = {}
        for i, block in enumerate(self.blocks):
            h = block(h, emb)
            if i in wanted:
                feats[i] = h.unsqueeze(1)
        v = self.out(self.out_norm(h)).to(x_t.dtype)
        if return_features is None:
            return v
        return v, [feats[i] for i in return_features]
