"""The Wan family's config sections of a distill run: ``model`` (teacher / generator / critic),
``data`` (prompts, text encoder, latent shape, TI2V first frames, ODE pairs) and ``eval`` (the demo
teacher's video distance). Only this family's code reads them (models/wan/family.py).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from megadistill.ops.kernels import KernelsConfig

DEMO = "demo"
# Timestep shift of the Wan presets' schedule: Self-Forcing trains Wan2.1 T2V with timestep_shift 5
# (reference/self-forcing.md).
SHIFT = 5.0


@dataclass
class WanRoleConfig:
    """One network. ``preset``: a Wan preset (models/wan/config.py) or ``demo`` (the shipped demo
    teacher's architecture); empty for generator / critic = the teacher's architecture.
    ``checkpoint``: weights to load (original or diffusers keys, file or folder); empty = the shipped
    demo teacher for ``demo``, else the teacher's weights (generator / critic); ``demo:<name>`` = a
    shipped demo asset (``demo:causal_init``), resolved to its path here. ``overrides``: WanConfig
    fields that do not change the weights (e.g. grad_checkpointing)."""

    preset: str = ""
    checkpoint: str = ""
    overrides: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        from megadistill.demo.teacher import resolve_checkpoint

        self.checkpoint = resolve_checkpoint(self.checkpoint)


@dataclass
class WanModelsConfig:
    """``model`` with ``family: wan``. ``discriminator_layers``: the critic blocks a discriminator
    critic (GAN, APT) reads with its register heads (upstream Self-Forcing: 13, 21, 29 of the
    30-block 1.3B). ``shift``: the run's noise-schedule shift, the default of every method and rollout
    shift (None: the teacher's, ``SHIFT`` for a Wan preset, the recorded one for the demo teacher).
    ``kernels``: the op back-ends every network is built with (ops/kernels.py; a role's own
    ``overrides.attention`` wins for that role)."""

    family: str = "wan"
    teacher: WanRoleConfig = field(default_factory=lambda: WanRoleConfig(preset=DEMO))
    generator: WanRoleConfig = field(default_factory=WanRoleConfig)
    critic: WanRoleConfig = field(default_factory=WanRoleConfig)
    discriminator_layers: List[int] = field(default_factory=lambda: [13, 21, 29])
    shift: Optional[float] = None
    kernels: KernelsConfig = field(default_factory=KernelsConfig)

    def with_kernels(self, role: WanRoleConfig) -> WanRoleConfig:
        """``role`` with the run's kernel choices as WanConfig overrides (the role's own win); a choice
        that is the built default adds nothing, so no network is rebuilt for it."""
        kernels = {"attention": self.kernels.attention} if self.kernels.attention != "auto" else {}
        return dataclasses.replace(role, overrides={**kernels, **role.overrides}) if kernels else role

    def __post_init__(self):
        if self.shift is not None and not self.shift > 0:
            raise ValueError(f"shift must be > 0 (or null: the teacher's), got {self.shift}")
        if not self.teacher.preset:
            raise ValueError("teacher.preset must be set (a Wan preset or 'demo')")
        if self.teacher.preset != DEMO and not self.teacher.checkpoint:
            raise ValueError(f"teacher.checkpoint is required for preset {self.teacher.preset!r} "
                             "(only the demo teacher ships with megadistill)")


@dataclass
class WanDataConfig:
    """``latent_shape``: one training sample [C, F, H, W] in the generator's latent space;
    ``prompts``: a text file, one prompt per line (empty: the demo prompts); ``text_encoder``: ``demo``
    or a local umT5 folder (encoded once at start); ``negative_prompt``: the unconditional prompt of CFG
    (Wan's own negative prompt for real runs); ``first_frames``: TI2V image latents, a safetensors file
    with ``latents`` [N, C, 1, H, W], one per prompt line; ``ode_pairs``: ODE regression trajectories
    from tools/generate_ode_pairs.py (their clean ends are the real data of a GAN critic)."""

    latent_shape: List[int] = field(default_factory=lambda: [16, 21, 60, 104])
    prompts: str = ""
    text_encoder: str = DEMO
    negative_prompt: str = ""
    first_frames: str = ""
    ode_pairs: str = ""

    def __post_init__(self):
        self.latent_shape = [int(s) for s in self.latent_shape]
        if len(self.latent_shape) != 4 or min(self.latent_shape) < 1:
            raise ValueError(f"latent_shape must be [C, F, H, W] with positive sizes, got {self.latent_shape}")


@dataclass
class WanEvalConfig:
    """End-of-run evaluation (demo teacher): the student's few-step samples and the undistilled
    teacher's at the same step count, each compared with the teacher's ``teacher_steps``-step samples
    by the demo video distance; a side-by-side MP4 when ``mp4``."""

    enabled: bool = True
    num_prompts: int = 8
    samples_per_prompt: int = 8
    teacher_steps: int = 50
    seed: int = 1234
    mp4: bool = True

    def __post_init__(self):
        for name in ("num_prompts", "samples_per_prompt", "teacher_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
