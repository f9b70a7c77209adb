"""The experiment config tree that ``launch/train.py`` reads (sections are typed dataclasses).

    job       what runs: ``distill`` (a method through the DeepSpeed trainer on the model family
              ``model.family`` names; the embedded default distills the shipped demo teacher) or
              ``toylab_table`` (the toy lab's table of every method; no trainer)
    run       where the run writes (its checkpoints go to ``<output_dir>/checkpoints``)
    train     the DeepSpeed trainer's loop, optimizers, EMA and checkpoints (engine/config.py)
    method    ``name`` of the method the trainer distills and its section ``method.<name>``, typed by the
              method's config class (defaults: upstream Self-Forcing); only that section is built and
              printed
    model     ``family`` (models/registry.py) and the networks: ``teacher``, ``generator``, ``critic``,
              typed by the family (Wan: models/wan/run_config.py)
    data      what batches draw from, typed by the family
    rollout   how the generator makes its training samples and the inference step list (rollout/config.py)
    eval      the end-of-run evaluation, typed by the family
    parallel  how each sample is split across ranks: tensor parallel ``tp``, Ulysses sequence parallel
              ``sp`` and ``cfg`` (the teacher's conditional / unconditional passes on two ranks); the
              rest of the world is data parallel. Checked against the world size and the models' heads
              before anything is built (jobs/distill.py check_inputs)
    toylab    the toy lab table (job toylab_table only)

Defaults are the upstream Self-Forcing values, except what a loaded config
(``load_config``) takes from its model family: its ``rollout_defaults`` and its noise schedule (the
shift and timestep range of the method's and the rollout's schedule fields, diffusion/noise_schedule.py).
An ExperimentConfig built in Python keeps the section classes' defaults (the generic schedule). Every
shipped YAML in configs/ states its deviations from them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from megadistill.config import ConfigError, check_keys, from_dict, merge_onto, to_dict
from megadistill.diffusion.noise_schedule import NoiseSchedule, check_schedule, schedule_defaults
from megadistill.engine.config import TrainConfig
from megadistill.methods import METHODS
from megadistill.models.registry import DEFAULT_FAMILY, MOVED_JOBS, MOVED_SECTIONS, get_family
from megadistill.parallel.mesh import ParallelConfig
from megadistill.rollout.config import RolloutConfig
from megadistill.rollout.steps import StepListConfig
from megadistill.toylab.config import ToyLabConfig

JOBS = ("distill", "toylab_table")
DEFAULT_METHOD = "dmd"


@dataclass
class RunConfig:
    """Where a run writes."""

    output_dir: str = "outputs/default"

    def __post_init__(self):
        if not self.output_dir:
            raise ValueError("run.output_dir must not be empty")


@dataclass
class MethodConfig:
    """``method``: ``name`` (a key of ``methods.METHODS``) and that method's section, typed by its
    config class (``config``); ``method.<name>`` in YAML. Sections of other methods may stay in a file
    (switch with ``method.name=...``): their keys are checked, they are neither built nor printed."""

    name: str = DEFAULT_METHOD
    config: Any = None

    def __post_init__(self):
        if self.name not in METHODS:
            raise ConfigError(f"method.name: unknown method {self.name!r}; known: {sorted(METHODS)}")
        cls = METHODS[self.name][1]
        if self.config is None:
            self.config = cls()
        elif not isinstance(self.config, cls):
            raise ConfigError(f"method.{self.name} is a {type(self.config).__name__}, expected {cls.__name__}")

    @classmethod
    def from_section(cls, data: dict) -> "MethodConfig":
        """The ``method`` mapping of a config file: ``name`` and sections named after methods."""
        if not isinstance(data, dict):
            raise ConfigError(f"config section 'method' must be a mapping, got {type(data).__name__}")
        name = data.get("name", DEFAULT_METHOD)
        if not isinstance(name, str) or name not in METHODS:
            raise ConfigError(f"method.name: unknown method {name!r}; known: {sorted(METHODS)}")
        for key, section in data.items():
            if key == "name" or key == name:
                continue
            if key not in METHODS:
                raise ConfigError(f"unknown config key 'method.{key}': neither 'name' nor a method "
                                  f"(known: {sorted(METHODS)})")
            check_keys(METHODS[key][1], section, f"method.{key}")
        return cls(name, from_dict(METHODS[name][1], data.get(name) or {}, f"method.{name}"))

    def config_dict(self) -> dict:
        return {"name": self.name, self.name: to_dict(self.config)}


def _typed(cls, value, where: str):
    """A family-typed section: a mapping (from YAML) built as ``cls``, or an instance kept."""
    if isinstance(value, cls):
        return value
    if dataclasses.is_dataclass(value):
        raise ConfigError(f"config section '{where}' is a {type(value).__name__}, the model family wants {cls.__name__}")
    return from_dict(cls, value or {}, where)


def _user_schedule(family: str, model: dict):
    """The family's noise schedule for the user's ``model`` mapping, or None when that mapping does not
    build (the config's own build then says why)."""
    try:
        return get_family(family).noise_schedule(from_dict(get_family(family).model_config, model, "model"))
    except (ConfigError, FileNotFoundError, TypeError, ValueError):
        return None


@dataclass
class ExperimentConfig:
    job: str = "distill"
    run: RunConfig = field(default_factory=RunConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method: Any = field(default_factory=MethodConfig)
    model: Any = field(default_factory=dict)
    data: Any = field(default_factory=dict)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    eval: Any = field(default_factory=dict)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    toylab: Any = None

    def __post_init__(self):
        if self.job in MOVED_JOBS:
            raise ValueError(f"job {self.job!r} is now {MOVED_JOBS[self.job]} (one model-agnostic job)")
        if self.job not in JOBS:
            raise ValueError(f"job must be one of {JOBS}, got {self.job!r}")
        if not isinstance(self.method, MethodConfig):
            self.method = MethodConfig.from_section(self.method)
        if self.job == "toylab_table":
            self.toylab = _typed(ToyLabConfig, self.toylab, "toylab")
        elif self.toylab:
            raise ConfigError("config section 'toylab' is read only by job toylab_table (this job is "
                              f"{self.job!r}): remove it, or set job: toylab_table")
        else:
            self.toylab = None
        name = self.model.get("family", DEFAULT_FAMILY) if isinstance(self.model, dict) else self.model.family
        try:
            family = get_family(name)
        except ValueError as e:
            raise ConfigError(f"model.family: {e}") from None
        self.model = _typed(family.model_config, self.model, "model")
        self.data = _typed(family.data_config, self.data, "data")
        self.eval = _typed(family.eval_config, self.eval, "eval")
        if self.job == "distill":
            schedule = self.schedule
            try:
                check_schedule(self.method.config, schedule, f"method.{self.method.name}")
                check_schedule(self.rollout.steps, schedule, "rollout.steps")
            except ValueError as e:
                raise ConfigError(str(e)) from None
            family.validate(self)

    @property
    def schedule(self) -> NoiseSchedule:
        """The model family's noise schedule for this run's teacher (ModelFamily.noise_schedule)."""
        try:
            return self.family.noise_schedule(self.model)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(str(e)) from None

    @property
    def family(self):
        """The ModelFamily ``model.family`` names."""
        return get_family(self.model.family)

    @property
    def uses_trainer(self) -> bool:
        return self.job == "distill"

    def config_dict(self) -> dict:
        """Every section, the ``toylab`` one only for job toylab_table."""
        out = {f.name: to_dict(getattr(self, f.name)) for f in dataclasses.fields(self)}
        if self.toylab is None:
            out.pop("toylab")
        return out

    @classmethod
    def _default_tree(cls, family: str) -> dict:
        """Every section's defaults, the family-typed ones of ``family`` (built section by section: a
        whole ExperimentConfig of generic defaults need not fit the family's noise schedule)."""
        tree = {}
        for f in dataclasses.fields(cls):
            tree[f.name] = to_dict(f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
        fam = get_family(family)
        for key, section in (("model", fam.model_config), ("data", fam.data_config), ("eval", fam.eval_config)):
            tree[key] = to_dict(from_dict(section, {"family": family} if key == "model" else {}, key))
        tree.pop("toylab")
        return tree

    @classmethod
    def config_defaults(cls, data: dict) -> dict:
        """The default tree for the user's ``data`` (load_config): the family-typed sections hold the
        defaults of the family the user names. A key of the single-family releases is refused with
        where it went."""
        for key, moved in MOVED_SECTIONS.items():
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
        tree = cls._default_tree(family)
        tree["method"] = {}  # the selected method's section takes its class's defaults when it is built
        schedule = _user_schedule(family, merge_onto(tree["model"], model if isinstance(model, dict) else {}))
        if schedule is not None:  # the family's noise schedule under the method's and the rollout's fields
            tree["rollout"]["steps"] = merge_onto(tree["rollout"]["steps"], schedule_defaults(StepListConfig, schedule))
            section = data.get("method")
            name = section.get("name", DEFAULT_METHOD) if isinstance(section, dict) else DEFAULT_METHOD
            if name in METHODS:
                tree["method"] = {name: schedule_defaults(METHODS[name][1], schedule)}
        tree["rollout"] = merge_onto(tree["rollout"], rollout)
        if data.get("job") == "toylab_table":
            tree["toylab"] = to_dict(ToyLabConfig())
        return tree
