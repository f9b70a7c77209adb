"""Classifier-free guidance.

Standard form (diffusers, DMD2 image): out = u + s (c - u); s = 1 is the conditional model.
Upstream video-distillation form (Self-Forcing / CausVid / FastVideo ``real_guidance_scale``):
out = c + g (c - u), which IS the standard form with s = g + 1 (Self-Forcing's guidance_scale 3.0
is CFG 4.0). Configs say which form they mean; ``upstream_to_standard`` converts.
"""
from __future__ import annotations

from typing import Callable

import torch


def cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Standard CFG: uncond + scale * (cond - uncond)."""
    return uncond + scale * (cond - uncond)


def upstream_to_standard(g: float) -> float:
    """The upstream x_c + g (x_c - x_u) equals standard CFG with scale g + 1."""
    return g + 1.0


def cfg_upstream(cond: torch.Tensor, uncond: torch.Tensor, g: float) -> torch.Tensor:
    """Upstream form cond + g (cond - uncond) (== cfg(cond, uncond, g + 1))."""
    return cfg(cond, uncond, upstream_to_standard(g))


GUIDANCE_FORMS = ("standard", "upstream")


def guided(
    fn_cond: Callable[..., torch.Tensor],
    fn_uncond: Callable[..., torch.Tensor],
    scale: float,
    form: str = "standard",
) -> Callable[..., torch.Tensor]:
    """Wrap two model callables (same signature, e.g. ``fn(x_t, t)``) into one guided callable.

    ``form="standard"``: uncond + scale (cond - uncond); ``form="upstream"``: cond + scale (cond -
    uncond). When guidance is a no-op (standard 1, upstream 0) the unconditional model is not called.
    CFG is linear, so it applies to any prediction type (x0, eps, v, flow) at a shared x_t.
    """
    if form not in GUIDANCE_FORMS:
        raise ValueError(f"form must be one of {GUIDANCE_FORMS}, got {form!r}")
    s = scale if form == "standard" else upstream_to_standard(scale)
    if s == 1.0:
        return fn_cond

    def fn(*args, **kwargs) -> torch.Tensor:
        return cfg(fn_cond(*args, **kwargs), fn_uncond(*args, **kwargs), s)

    return fn
