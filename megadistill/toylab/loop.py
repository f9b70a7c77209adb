"""Generic distillation loop: alternating critic / generator updates with Adam and gradient clipping.

Upstream order (Self-Forcing trainer): the generator is updated when step % critic_ratio == 0,
the critic on every step, each on its own fresh batch. Methods without a critic update the
generator every step. Both optimizers' gradients are cleared before every backward because
some generator losses (SiD) backpropagate through the critic as well.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from megadistill.methods.base import DistillationMethod, DistillBatch
from megadistill.methods.consistency import update_ema

from .config import LoopConfig


def _adam(params, lr: float, betas) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr, betas=(float(betas[0]), float(betas[1])))


def train_distillation(
    method: DistillationMethod,
    make_batch: Callable[[int], DistillBatch],
    loop: LoopConfig,
    log_every: int = 0,
    ema: Optional[nn.Module] = None,
) -> List[Dict[str, float]]:
    """Train ``method`` for ``loop.iterations`` steps; returns the logs of every ``log_every``-th step.

    ``ema`` (a copy of the generator, optional) tracks it with decay ``loop.ema_decay`` after every
    generator update, like upstream's generator_ema.
    """
    gen_params = method.generator_parameters()
    critic_params = method.critic_parameters() if method.has_critic else []
    opt_g = _adam(gen_params, loop.lr, loop.betas)
    opt_c = _adam(critic_params, loop.lr_critic, loop.betas) if critic_params else None
    every = loop.critic_ratio if method.has_critic else 1
    history: List[Dict[str, float]] = []

    def zero():
        opt_g.zero_grad(set_to_none=True)
        if opt_c is not None:
            opt_c.zero_grad(set_to_none=True)

    for step in range(loop.iterations):
        logs: Dict[str, float] = {"step": float(step)}
        if step % every == 0:
            zero()
            loss, g_logs = method.generator_loss(make_batch(step), step)
            loss.backward()
            logs["generator_grad_norm"] = float(torch.nn.utils.clip_grad_norm_(gen_params, loop.grad_clip))
            opt_g.step()
            if ema is not None:
                update_ema(ema, method.student(), loop.ema_decay)
            logs.update({f"generator/{k}": v for k, v in g_logs.items()})
        if opt_c is not None:
            zero()
            loss, c_logs = method.critic_loss(make_batch(step), step)
            loss.backward()
            logs["critic_grad_norm"] = float(torch.nn.utils.clip_grad_norm_(critic_params, loop.grad_clip))
            opt_c.step()
            logs.update({f"critic/{k}": v for k, v in c_logs.items()})
        if log_every and step % log_every == 0:
            history.append(logs)
    zero()
    return history
