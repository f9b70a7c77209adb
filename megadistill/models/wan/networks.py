"""The Wan networks of a distill run: the teacher from ``model.teacher`` (the shipped demo teacher for
preset ``demo``), generator and critic from their own checkpoints or, by default, the teacher's
weights. A Wan preset is built on the meta device and each rank reads only its tensor-parallel shards
(models/wan/loading.py): no random init, never the full model on a rank when tp > 1.
"""
from __future__ import annotations

import json
from typing import Any, Dict, Optional

import torch
from torch import nn

from .checkpoint import load_wan_checkpoint
from .config import wan_config
from .loading import load_wan
from .model import build_wan
from .run_config import DEMO, WanRoleConfig


def load_teacher(cfg: WanRoleConfig, mesh=None, dtype: Optional[torch.dtype] = None,
                 partition=None) -> tuple[nn.Module, Optional[dict]]:
    """The teacher network and, for the demo teacher, its sampling settings."""
    if cfg.preset == DEMO:
        from megadistill.demo.teacher import load_demo_teacher

        model, settings = load_demo_teacher(cfg.checkpoint or None)
        if cfg.overrides:
            model = rebuild(model, **cfg.overrides)
        return model, settings
    return load_wan(cfg.preset, cfg.checkpoint, tp_group=_tp_group(mesh), dtype=dtype, partition=partition,
                    **cfg.overrides), None


def _tp_group(mesh):
    return None if mesh is None else mesh.tp_group


def rebuild(model: nn.Module, **overrides) -> nn.Module:
    """A copy of ``model`` (same device, same compute dtype) with WanConfig fields changed (attention
    mode or back-end, checkpointing): the fields that do not change the parameters, so the weights
    carry over exactly."""
    p = next(m.weight for m in model.modules() if isinstance(m, nn.Linear))  # compute dtype (not an fp32 norm)
    new = build_wan(model.config.replace(**overrides), device=p.device, dtype=p.dtype)
    new.load_state_dict(model.state_dict())
    return new


def derive_model(cfg: WanRoleConfig, teacher_cfg: WanRoleConfig, teacher: nn.Module, mesh=None, partition=None,
                 **mode) -> nn.Module:
    """Generator / critic: the teacher's architecture and weights unless ``cfg`` names others. A Wan
    architecture loads from a checkpoint file (cfg's own, else the teacher's, read again rather than
    copied from a teacher that may be bf16 and already split) straight into this rank's TP shards."""
    if cfg.preset and cfg.preset != DEMO:  # check_inputs made sure its checkpoint is given
        return load_wan(cfg.preset, cfg.checkpoint, tp_group=_tp_group(mesh), partition=partition,
                        **{**cfg.overrides, **mode})
    if teacher_cfg.preset != DEMO:
        return load_wan(teacher_cfg.preset, cfg.checkpoint or teacher_cfg.checkpoint, tp_group=_tp_group(mesh),
                        partition=partition, **{**teacher_cfg.overrides, **cfg.overrides, **mode})
    model = rebuild(teacher, **{**cfg.overrides, **mode})
    if cfg.checkpoint:
        load_wan_checkpoint(model, cfg.checkpoint)
    return model


def generator_mode(rollout) -> Dict[str, Any]:
    """The WanConfig fields of the generator the rollout runs: block-causal for ``causal``."""
    if not rollout.causal:
        return {"num_frame_per_block": None}
    return {"num_frame_per_block": rollout.num_frame_per_block, "local_attn_size": rollout.local_attn_size,
            "sink_size": rollout.sink_size}


def role_heads(cfg: WanRoleConfig) -> int:
    """Attention heads of ``cfg``'s architecture (configs only)."""
    if cfg.preset == DEMO:
        from megadistill.demo.teacher import DEFAULT_WEIGHTS, DemoSettings, settings_path

        settings = DemoSettings.from_dict(json.loads(settings_path(cfg.checkpoint or DEFAULT_WEIGHTS).read_text()))
        return settings.model.replace(**cfg.overrides).num_heads
    return wan_config(cfg.preset, **cfg.overrides).num_heads
