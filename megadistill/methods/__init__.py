"""Distillation objectives (one file each) behind the small interface in methods/base.py.

``METHODS`` maps a method name to (method class, config dataclass). Every class is constructed as
``cls(config, generator=..., teacher=..., critic=..., rollout=..., rng=...)``; methods ignore the
keywords they do not use. ``method_needs(name, config)``: what that method needs from a job
(``MethodNeeds``, declared by the class).
"""
from __future__ import annotations

from typing import Dict, Tuple, Type

from .apt import APTConfig, APTDistillation
from .base import DistillationMethod, MethodNeeds
from .causal_diffusion import CausalDiffusion, CausalDiffusionConfig
from .consistency import ConsistencyConfig, ConsistencyDistillation
from .dmd import DMD, DMDConfig
from .gan import GANConfig, GANDistillation
from .ode_regression import ODERegression, ODERegressionConfig
from .progressive import ProgressiveConfig, ProgressiveDistillation
from .sid import SiD, SiDConfig

METHODS: Dict[str, Tuple[Type[DistillationMethod], type]] = {
    "dmd": (DMD, DMDConfig),
    "sid": (SiD, SiDConfig),
    "ode_regression": (ODERegression, ODERegressionConfig),
    "causal_diffusion": (CausalDiffusion, CausalDiffusionConfig),
    "progressive": (ProgressiveDistillation, ProgressiveConfig),
    "gan": (GANDistillation, GANConfig),
    "apt": (APTDistillation, APTConfig),
    "consistency": (ConsistencyDistillation, ConsistencyConfig),
}


def get_method(name: str) -> Tuple[Type[DistillationMethod], type]:
    if name not in METHODS:
        raise ValueError(f"unknown distillation method {name!r}; known: {sorted(METHODS)}")
    return METHODS[name]


def method_needs(name: str, config=None) -> MethodNeeds:
    """What method ``name`` with ``config`` needs from the job (``DistillationMethod.needs``)."""
    return get_method(name)[0].needs(config)
