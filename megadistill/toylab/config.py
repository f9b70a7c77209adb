"""Typed configuration of the toy lab (embedded as section ``toylab`` of the experiment config).

A plain tree of dataclasses with defaults; every field is an int, float, bool, str, list or a
nested dataclass so the generic YAML loader can fill it. Per-method training budgets are
``LoopConfig`` sections named after the method; a method without a section uses ``loop``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import List


@dataclass
class ToyDataConfig:
    """Class-conditional mixture of Gaussians: ``num_classes * modes_per_class`` modes on a ring.

    Class k owns the modes at angles 2 pi (k + num_classes j) / (num_classes modes_per_class), so
    the classes interleave and the unconditional distribution is the whole ring: CFG matters.
    """

    dim: int = 2
    num_classes: int = 4
    modes_per_class: int = 3
    radius: float = 1.5
    mode_std: float = 0.05

    def __post_init__(self):
        if self.dim < 2:
            raise ValueError(f"data.dim must be >= 2 (modes lie on a ring in the first two dims), got {self.dim}")
        if self.num_classes < 1 or self.modes_per_class < 1:
            raise ValueError(
                f"data.num_classes and data.modes_per_class must be >= 1, got {self.num_classes}, {self.modes_per_class}"
            )
        if self.radius <= 0 or self.mode_std <= 0:
            raise ValueError(f"data.radius and data.mode_std must be > 0, got {self.radius}, {self.mode_std}")


@dataclass
class TeacherConfig:
    """Flow-matching training of the teacher ToyFlowMLP (label dropout makes it usable with CFG)."""

    hidden: int = 64
    depth: int = 3
    iterations: int = 2000
    batch_size: int = 512
    lr: float = 2e-3
    label_dropout: float = 0.1

    def __post_init__(self):
        if self.hidden < 1 or self.depth < 1 or self.iterations < 1 or self.batch_size < 1:
            raise ValueError(
                "teacher.hidden, teacher.depth, teacher.iterations and teacher.batch_size must be >= 1, got "
                f"{self.hidden}, {self.depth}, {self.iterations}, {self.batch_size}"
            )
        if self.lr <= 0:
            raise ValueError(f"teacher.lr must be > 0, got {self.lr}")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"teacher.label_dropout must be in [0, 1), got {self.label_dropout}")


@dataclass
class EvalConfig:
    """Reference = guided teacher, ``reference_steps`` Euler steps; distance = sliced W1 per class."""

    samples_per_class: int = 4000
    reference_steps: int = 50
    num_projections: int = 256
    seed: int = 1234

    def __post_init__(self):
        if self.samples_per_class < 2 or self.reference_steps < 1 or self.num_projections < 1:
            raise ValueError(
                "eval.samples_per_class >= 2, eval.reference_steps >= 1 and eval.num_projections >= 1 required, got "
                f"{self.samples_per_class}, {self.reference_steps}, {self.num_projections}"
            )


@dataclass
class LoopConfig:
    """Generic distillation loop: generator every ``critic_ratio`` steps, critic every step."""

    iterations: int = 1500
    batch_size: int = 256
    lr: float = 1e-4
    lr_critic: float = 1e-3
    betas: List[float] = field(default_factory=lambda: [0.0, 0.999])
    critic_ratio: int = 5
    grad_clip: float = 10.0
    # Decay of the generator EMA that recipes evaluate (0 = evaluate the raw generator).
    ema_decay: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"loop.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.iterations < 1 or self.batch_size < 1 or self.critic_ratio < 1:
            raise ValueError(
                "loop.iterations, loop.batch_size and loop.critic_ratio must be >= 1, got "
                f"{self.iterations}, {self.batch_size}, {self.critic_ratio}"
            )
        if self.lr <= 0 or self.lr_critic <= 0:
            raise ValueError(f"loop.lr and loop.lr_critic must be > 0, got {self.lr}, {self.lr_critic}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"loop.betas must be two values in [0, 1), got {self.betas}")
        if self.grad_clip <= 0:
            raise ValueError(f"loop.grad_clip must be > 0, got {self.grad_clip}")


def _loop(**kw) -> LoopConfig:
    return LoopConfig(**kw)


@dataclass
class ToyLabConfig:
    seed: int = 0
    data: ToyDataConfig = field(default_factory=ToyDataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # Standard CFG scale (u + s (c - u)) of the teacher whose 50-step samples are the target.
    guidance_scale: float = 4.0
    # Timestep shift of every step list in the lab (student and teacher baselines).
    shift: float = 1.0
    student_steps: List[int] = field(default_factory=lambda: [1, 4])
    # Methods to run; empty = every registered recipe.
    methods: List[str] = field(default_factory=list)
    # Multiplies every iteration budget (tests run the lab cheaper with < 1).
    budget_scale: float = 1.0
    # Progressive distillation starts from this many guided teacher Euler steps (halved per stage).
    progressive_start_steps: int = 32
    loop: LoopConfig = field(default_factory=LoopConfig)
    dmd: LoopConfig = field(default_factory=lambda: _loop(iterations=2000, lr=3e-4, lr_critic=1e-3, ema_decay=0.99))
    sid: LoopConfig = field(default_factory=lambda: _loop(iterations=2000, lr=3e-4, lr_critic=1e-3, ema_decay=0.99))
    ode_regression: LoopConfig = field(default_factory=lambda: _loop(iterations=1500, lr=1e-3, betas=[0.9, 0.999]))
    # For progressive distillation ``iterations`` is per stage.
    progressive: LoopConfig = field(default_factory=lambda: _loop(iterations=400, lr=1e-3, betas=[0.9, 0.999]))

    def __post_init__(self):
        if not self.student_steps or any(n < 1 for n in self.student_steps):
            raise ValueError(f"student_steps must be a non-empty list of ints >= 1, got {self.student_steps}")
        if self.guidance_scale <= 0:
            raise ValueError(f"guidance_scale must be > 0, got {self.guidance_scale}")
        if self.shift <= 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")
        if self.progressive_start_steps < 2:
            raise ValueError(f"progressive_start_steps must be >= 2, got {self.progressive_start_steps}")
        if self.budget_scale <= 0:
            raise ValueError(f"budget_scale must be > 0, got {self.budget_scale}")
        if self.methods:
            from .recipes import known_recipes

            known = known_recipes()
            unknown = [m for m in self.methods if m not in known]
            if unknown:
                raise ValueError(f"methods: unknown method(s) {unknown}; known: {sorted(known)}")

    def method_names(self) -> List[str]:
        from .recipes import known_recipes

        return list(self.methods) if self.methods else sorted(known_recipes())

    def loop_for(self, name: str) -> LoopConfig:
        """The method's own budget section (or ``loop``), iterations scaled by ``budget_scale``."""
        section = getattr(self, name, None)
        loop = section if isinstance(section, LoopConfig) else self.loop
        return replace(loop, iterations=max(1, round(loop.iterations * self.budget_scale)))


def quick_config(**overrides) -> ToyLabConfig:
    """A cheaper lab for tests and smoke runs: smaller teacher budget, fewer evaluation samples,
    half the distillation budgets. Keyword overrides replace top-level fields."""
    base = dict(
        teacher=TeacherConfig(iterations=1000),
        eval=EvalConfig(samples_per_class=1000, num_projections=128),
        budget_scale=0.5,
        progressive_start_steps=8,
    )
    base.update(overrides)
    return ToyLabConfig(**base)
