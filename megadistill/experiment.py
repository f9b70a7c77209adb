"""The experiment config tree that ``launch/train.py`` reads (sections are typed dataclasses).

    run       where the run writes (its checkpoints go to ``<output_dir>/checkpoints``)
    toylab    the toy lab: teacher, data, evaluation (and the per-method budgets of the lab table)
    train     the DeepSpeed trainer's loop, optimizers (``train.generator_optim`` /
              ``train.critic_optim``), EMA and checkpoints (engine/config.py)
    method    which method the trainer distills, its student step count and its typed config
"""
from __future__ import annotations

from dataclasses import dataclass, field
from megadistill.engine.config import EMAConfig, OptimConfig, TrainConfig
from megadistill.methods.dmd import DMDConfig
from megadistill.methods.sid import SiDConfig
from megadistill.toylab.config import ToyLabConfig

# The toy lab's score settings (toylab/recipes_core.py): standard CFG at the lab's scale 4, no timestep
# shift, continuous noising (the sharpening signal of a 2-D mixture lives at low noise).
_TOY_SCORE = dict(guidance_scale=4.0, guidance_form="standard", timestep_shift=1.0, snap_noise_to_grid=False)

# Methods the trainer runs on the toy lab: score distillation (generator + critic + frozen teacher).
TRAINER_METHODS = ("dmd", "sid")


@dataclass
class RunConfig:
    """Where a run writes and how it is seeded."""

    output_dir: str = "outputs/default"

    def __post_init__(self):
        if not self.output_dir:
            raise ValueError("run.output_dir must not be empty")


@dataclass
class MethodConfig:
    """The method the trainer distills; only the section named by ``name`` is used."""

    name: str = "dmd"
    student_steps: int = 4
    dmd: DMDConfig = field(default_factory=lambda: DMDConfig(**_TOY_SCORE))
    sid: SiDConfig = field(default_factory=lambda: SiDConfig(**_TOY_SCORE))

    def __post_init__(self):
        if self.name not in TRAINER_METHODS:
            raise ValueError(f"method.name: unknown method {self.name!r}; known: {sorted(TRAINER_METHODS)}")
        if self.student_steps < 1:
            raise ValueError(f"method.student_steps must be >= 1, got {self.student_steps}")

    @property
    def config(self):
        """The typed config of the selected method (e.g. the ``dmd`` section)."""
        return getattr(self, self.name)


def _toy_train() -> TrainConfig:
    """DMD recipe settings of the toy lab on the trainer (fp32 for CPU, Adam without decay), a quarter
    of its steps: ~2 min on 2 CPU cores for a 4-step ratio of ~0.34 (the lab recipe: 0.17 at 2000)."""
    return TrainConfig(
        max_steps=500, micro_batch_size=256, dfake_gen_update_ratio=5, precision="fp32", save_every=250,
        keep_last=2, log_every=50,
        generator_optim=OptimConfig(lr=3e-4, betas=(0.0, 0.999), weight_decay=0.0),
        critic_optim=OptimConfig(lr=1e-3, betas=(0.0, 0.999), weight_decay=0.0),
        ema=EMAConfig(decay=0.99, start_step=0),
    )


@dataclass
class ExperimentConfig:
    run: RunConfig = field(default_factory=RunConfig)
    toylab: ToyLabConfig = field(default_factory=ToyLabConfig)
    train: TrainConfig = field(default_factory=_toy_train)
    method: MethodConfig = field(default_factory=MethodConfig)
