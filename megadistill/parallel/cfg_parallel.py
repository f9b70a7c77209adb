"""Classifier-free-guidance parallelism: the conditional and unconditional teacher passes of one sample
run on the two ranks of a cfg group (``ParallelMesh.cfg_group``) instead of one after the other.

``cfg_parallel(teacher, mesh.cfg_group)`` wraps any ``Denoiser``. Its ``x0_guided`` / ``flow_guided``
run ONE network pass per rank (group rank 0: ``cond``, group rank 1: ``uncond``), exchange the two
predictions with one all_gather, and combine them on both ranks exactly as ``Denoiser`` does (same
form, same scale, same order of operations), so every rank of the group holds the single-process
guided prediction. Everything else (``flow``, ``x0``, ``flow_to_x0``, ``sigma``, ``net``, any
attribute of the wrapped denoiser) is the wrapped denoiser's. When the guidance is the identity
(standard scale 1, upstream g 0) both ranks run the conditional pass and nothing is exchanged, as the
single-process denoiser runs the conditional pass alone. Either way each rank runs exactly one forward
of the network per guided call, which ZeRO-3 needs (every rank of the partition group must gather the
same parameters in the same order).

The ranks of a cfg group hold the SAME sample (the mesh seeds them from the dp coordinate), so x_t, t
and the conditions are equal on both.

Gradients: the all_gather is an autograd Function whose backward sums the gathered tensor's gradient
over the group and returns this rank's slice, so the gradients reaching x_t on the ranks of a group
add up to the gradient of the SUM of the ranks' losses. When both ranks backpropagate the same loss
(what the methods do), the group's x_t gradients therefore average to the single-process gradient --
and the generator's parameter gradients, which ZeRO averages over the cfg ranks (it reduces over the
sequence_data group: ZeRO-3 divides by dp x sp x cfg, stages 0-2 by dp x cfg; see
engines.sequence_parallel_loss_scale), come out exactly as in a single process.
(The teacher's own parameters are frozen; a caller that needs d/dx_t gets it through this path.)

In the trainer the distill job wraps its frozen teacher once (``jobs/distill.build_method``); under ZeRO-3
the wrapper is the teacher engine's root module and the network's submodules gather their partitions
as usual: both ranks run one forward each, in the same order. Tested through the trainer against a
one-process run in tests/parallel/test_parallel_training.py (cfg = 2, dp = 2, ZeRO-3).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from megadistill.diffusion.guidance import cfg, cfg_upstream
from megadistill.methods.base import Denoiser, check_guidance_form, is_unguided
from megadistill.parallel.comm import all_gather_with_grad


def combine_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float, form: str) -> torch.Tensor:
    """The guided prediction as ``Denoiser.x0_guided`` / ``flow_guided`` form it."""
    return cfg(cond, uncond, scale) if form == "standard" else cfg_upstream(cond, uncond, scale)


class CFGParallelDenoiser(nn.Module):
    """A ``Denoiser`` whose guided calls split the conditional / unconditional passes over a group of
    two ranks (see the module docstring). The wrapped denoiser is the submodule ``denoiser``."""

    def __init__(self, denoiser: Denoiser, group):
        super().__init__()
        size = dist.get_world_size(group)
        if size != 2:
            raise ValueError(f"a CFG-parallel group must have 2 ranks (conditional, unconditional), got {size}")
        self.denoiser = denoiser
        self.group = group
        self.cfg_rank = dist.get_rank(group)

    # -- the wrapped denoiser's interface, unchanged ------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "denoiser":  # not registered yet (construction, unpickling): nothing to delegate to
                raise
            return getattr(self.denoiser, name)

    def flow(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any, **kwargs) -> torch.Tensor:
        return self.denoiser.flow(x_t, t, cond, **kwargs)

    def x0(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any, sigma: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.denoiser.x0(x_t, t, cond, sigma)

    def flow_to_x0(self, v: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                   sigma: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.denoiser.flow_to_x0(v, x_t, t, sigma)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self.denoiser.sigma(t)

    # -- guided calls: one pass per rank ------------------------------------------------------------
    def _guided(self, predict, x_t: torch.Tensor, t: torch.Tensor, cond: Any, uncond: Any, scale: float,
                form: str) -> torch.Tensor:
        check_guidance_form(form, "form")
        if is_unguided(scale, form):
            return predict(x_t, t, cond)
        mine = predict(x_t, t, cond if self.cfg_rank == 0 else uncond)
        both = all_gather_with_grad(mine, self.group)
        return combine_guidance(both[0], both[1], scale, form)

    def x0_guided(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any, uncond: Any, scale: float,
                  form: str = "standard", sigma: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``Denoiser.x0_guided`` with this rank's pass only (cond on cfg rank 0, uncond on cfg rank 1)."""
        return self._guided(lambda x, t_, c: self.denoiser.x0(x, t_, c, sigma), x_t, t, cond, uncond, scale, form)

    def flow_guided(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any, uncond: Any, scale: float,
                    form: str = "standard") -> torch.Tensor:
        """``Denoiser.flow_guided`` with this rank's pass only (cond on cfg rank 0, uncond on cfg rank 1)."""
        return self._guided(self.denoiser.flow, x_t, t, cond, uncond, scale, form)

    def extra_repr(self) -> str:
        return f"cfg_rank={self.cfg_rank}"


def cfg_parallel(denoiser: Denoiser, group: Optional[Any]):
    """``denoiser`` with its guided passes split over ``group`` (the mesh's cfg group): unchanged for a
    group of one rank (or ``None``), a ``CFGParallelDenoiser`` for two; ValueError for any other size."""
    if group is None:
        return denoiser
    size = dist.get_world_size(group)
    if size == 1:
        return denoiser
    if size != 2:
        raise ValueError(f"a CFG-parallel group must have 1 or 2 ranks (conditional, unconditional), got {size}")
    return CFGParallelDenoiser(denoiser, group)
