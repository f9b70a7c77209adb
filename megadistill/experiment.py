"""The experiment config tree that ``launch/train.py`` reads (sections are typed dataclasses).

    job       what runs: ``distill`` (a method through the DeepSpeed trainer on the model family
              ``model.family`` names; the embedded default distills the shipped demo teacher) or
              ``toylab_table`` (the toy lab's table of every method; no trainer)
    run       where the run writes (its checkpoints go to ``<output_dir>/checkpoints``)
    train     the DeepSpeed trainer's loop, optimizers, EMA and checkpoints (engine/config.py)
    method    which method the trainer distills and its typed config (defaults: upstream Self-Forcing)
    model     ``family`` (models/registry.py) and the networks: ``teacher``, ``generator``, ``critic``,
              typed by the family (Wan: models/wan/run_config.py)
    data      what batches draw from, typed by the family
    rollout   how the generator makes its training samples and the inference step list (rollout/config.py)
    eval      the end-of-run evaluation, typed by the family
    parallel  how each sample is split across ranks: tensor parallel ``tp``, Ulysses sequence parallel
              ``sp`` and ``cfg`` (the teacher's conditional / unconditional passes on two ranks); the
              rest of the world is data parallel. Checked against the world size and the models' heads
              before anything is built (jobs/distill.py check_inputs)
    toylab    the toy lab table (job toylab_table)

Defaults are the upstream (Self-Forcing, Wan2.1 T2V) values; every shipped YAML in configs/ states
its deviations from them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from megadistill.config import ConfigError, from_dict, merge_onto, to_dict
from megadistill.engine.config import TrainConfig
from megadistill.methods.causal_diffusion import CausalDiffusionConfig
from megadistill.methods.dmd import DMDConfig
from megadistill.methods.gan import GANConfig
from megadistill.methods.ode_regression import ODERegressionConfig
from megadistill.methods.sid import SiDConfig
from megadistill.models.registry import get_family
from megadistill.parallel.mesh import ParallelConfig
from megadistill.rollout.config import RolloutConfig
from megadistill.toylab.config import ToyLabConfig

JOBS = ("distill", "toylab_table")
DEFAULT_FAMILY = "wan"
# What the config of the single-family releases had, and where it went (the message of a refused key).
RENAMED = {
    "wan": "model: {family: wan, teacher, generator, critic, discriminator_layers}; "
           "data: {latent_shape, prompts, text_encoder, negative_prompt, first_frames, ode_pairs}; "
           "rollout: {...}; eval: {...} (wan.X.Y -> model.X.Y for teacher / generator / critic / "
           "discriminator_layers, data.Y for wan.latent_shape and wan.data.Y, rollout.Y, eval.Y)",
}
OLD_JOBS = {"wan": "job: distill with model.family: wan", "toylab": "job: distill with model.family: toy"}


@dataclass
class RunConfig:
    """Where a run writes."""

    output_dir: str = "outputs/default"

    def __post_init__(self):
        if not self.output_dir:
            raise ValueError("run.output_dir must not be empty")


@dataclass
class MethodConfig:
    """The method the trainer distills; only the section named by ``name`` is used."""

    name: str = "dmd"
    dmd: DMDConfig = field(default_factory=DMDConfig)
    sid: SiDConfig = field(default_factory=SiDConfig)
    gan: GANConfig = field(default_factory=GANConfig)
    ode_regression: ODERegressionConfig = field(default_factory=ODERegressionConfig)
    # num_frame_per_block comes from rollout (the generator's block), the rest from here
    causal_diffusion: CausalDiffusionConfig = field(default_factory=CausalDiffusionConfig)

    def __post_init__(self):
        known = [f.name for f in dataclasses.fields(self) if f.name != "name"]
        if self.name not in known:
            raise ValueError(f"method.name: unknown method {self.name!r}; known: {known}")

    @property
    def config(self):
        """The typed config of the selected method (e.g. the ``dmd`` section)."""
        return getattr(self, self.name)


def _typed(cls, value, where: str):
    """A family-typed section: a mapping (from YAML) built as ``cls``, or an instance kept."""
    if isinstance(value, cls):
        return value
    if dataclasses.is_dataclass(value):
        raise ConfigError(f"config section '{where}' is a {type(value).__name__}, the model family wants {cls.__name__}")
    return from_dict(cls, value or {}, where)


@dataclass
class ExperimentConfig:
    job: str = "distill"
    run: RunConfig = field(default_factory=RunConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    model: Any = field(default_factory=dict)
    data: Any = field(default_factory=dict)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    eval: Any = field(default_factory=dict)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    toylab: ToyLabConfig = field(default_factory=ToyLabConfig)

    def __post_init__(self):
        if self.job in OLD_JOBS:
            raise ValueError(f"job {self.job!r} is now {OLD_JOBS[self.job]} (one model-agnostic job)")
        if self.job not in JOBS:
            raise ValueError(f"job must be one of {JOBS}, got {self.job!r}")
        name = self.model.get("family", DEFAULT_FAMILY) if isinstance(self.model, dict) else self.model.family
        try:
            family = get_family(name)
        except ValueError as e:
            raise ConfigError(f"model.family: {e}") from None
        self.model = _typed(family.model_config, self.model, "model")
        self.data = _typed(family.data_config, self.data, "data")
        self.eval = _typed(family.eval_config, self.eval, "eval")
        if self.job == "distill":
            family.validate(self)

    @property
    def family(self):
        """The ModelFamily ``model.family`` names."""
        return get_family(self.model.family)

    @property
    def uses_trainer(self) -> bool:
        return self.job == "distill"

    @classmethod
    def config_defaults(cls, data: dict) -> dict:
        """The default tree for the user's ``data`` (load_config): the family-typed sections hold the
        defaults of the family the user names. A key of the single-family releases is refused with
        where it went."""
        for key, moved in RENAMED.items():
            if key in data:
                raise ConfigError(f"config section '{key}' is gone: its keys moved to {moved}")
        model = data.get("model")
        family = model.get("family", DEFAULT_FAMILY) if isinstance(model, dict) else DEFAULT_FAMILY
        if not isinstance(family, str):
            raise ConfigError(f"config key 'model.family' must be a string, got {family!r}")
        try:
            rollout = get_family(family).rollout_defaults
        except ValueError as e:
            raise ConfigError(f"model.family: {e}") from None
        tree = to_dict(cls(model={"family": family}))
        tree["rollout"] = merge_onto(tree["rollout"], rollout)
        return tree
