"""Shared fixtures of the rollout tests (loaded by path: the suite runs in importlib mode)."""
import torch

from megadistill.models.wan import build_wan
from megadistill.models.wan.denoiser import WanDenoiser


def tiny_denoiser(preset="tiny-t2v", seed=0, **overrides) -> WanDenoiser:
    torch.manual_seed(seed)
    model = build_wan(preset, text_len=16, **overrides)
    with torch.no_grad():  # the upstream init zeroes the head, which would make every output zero
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return WanDenoiser(model)
