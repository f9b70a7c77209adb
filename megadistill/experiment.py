"""The experiment config tree that ``launch/train.py`` reads (sections are typed dataclasses)."""
from __future__ import annotations

from dataclasses import dataclass, field

from megadistill.toylab.config import ToyLabConfig


@dataclass
class RunConfig:
    """Where a run writes and how it is seeded."""

    output_dir: str = "outputs/default"

    def __post_init__(self):
        if not self.output_dir:
            raise ValueError("run.output_dir must not be empty")


@dataclass
class ExperimentConfig:
    run: RunConfig = field(default_factory=RunConfig)
    toylab: ToyLabConfig = field(default_factory=ToyLabConfig)
