"""A discriminator = a backbone (a trainable copy of the teacher) + register-token heads.

Backbone protocol (the toy ``ToyFlowMLP`` and every family's DiT feature backbone follow it):
    backbone(x_t, t, cond, return_features=[layer indices]) -> (flow, [hidden_state [B, L, D], ...])
One forward gives the logits, the hidden states the heads read (SeedVR2's feature matching uses
them, taken before the heads) and the backbone's own flow prediction, so a critic that is also a
score network (Self-Forcing's fake score) can add its denoising loss without a second forward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Sequence

import torch
import torch.nn as nn

from .register_heads import RegisterHeads


@dataclass
class DiscriminatorOutput:
    logits: torch.Tensor  # [B, num_classes]
    features: List[torch.Tensor]  # one [B, L, D] per chosen layer
    flow: torch.Tensor  # the backbone's prediction for x_t


class Discriminator(nn.Module):
    def __init__(self, backbone: nn.Module, heads: RegisterHeads, layers: Sequence[int]):
        super().__init__()
        layers = [int(i) for i in layers]
        if len(layers) != heads.cfg.num_layers:
            raise ValueError(f"layers {layers} must have one entry per head (num_layers={heads.cfg.num_layers})")
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers must be distinct, got {layers}")
        self.backbone = backbone
        self.heads = heads
        self.layers = layers

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> DiscriminatorOutput:
        flow, feats = self.backbone(x_t, t, cond, return_features=self.layers)
        return DiscriminatorOutput(logits=self.heads(feats, t), features=list(feats), flow=flow)
