"""The noise schedule of a model family's denoiser, and the config fields it fills.

Every denoiser in megadistill predicts the flow at timesteps t in [0, num_train_timesteps]
(diffusion/flow_match.py); ``shift`` is the timestep shift its training and sampling use (5 for the
upstream 480p video DiTs, 1 for the demo and toy teachers). A family gives one per run
(``ModelFamily.noise_schedule``). Method and rollout config classes name the fields it fills in
``SCHEDULE_FIELDS`` (field -> schedule attribute):
a loaded experiment takes the family's values as the defaults of those fields (``schedule_defaults``);
an explicit shift is the user's choice, an explicit ``num_train_timesteps`` other than the denoiser's
is an error (``check_schedule``). A config built in Python without a family has the generic schedule
``NoiseSchedule()`` (T = 1000, no shift) as its class defaults.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict


@dataclass(frozen=True)
class NoiseSchedule:
    """Timesteps in [0, ``num_train_timesteps``]; ``shift`` maps sigma to s*sigma / (1 + (s-1)*sigma)."""

    num_train_timesteps: int = 1000
    shift: float = 1.0

    def __post_init__(self):
        if not isinstance(self.num_train_timesteps, int) or self.num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be an int >= 1, got {self.num_train_timesteps!r}")
        if not self.shift > 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")


GENERIC = NoiseSchedule()


def schedule_fields(config_cls) -> Dict[str, str]:
    """The config class's fields the schedule fills (``SCHEDULE_FIELDS``), field -> schedule attribute."""
    return dict(getattr(config_cls, "SCHEDULE_FIELDS", {}))


def schedule_defaults(config_cls, schedule: NoiseSchedule) -> dict:
    """The family's values of ``config_cls``'s schedule fields, as a config mapping (defaults to lay
    the user's section over)."""
    return {name: getattr(schedule, attr) for name, attr in schedule_fields(config_cls).items()}


def check_schedule(config, schedule: NoiseSchedule, where: str) -> None:
    """ValueError when ``config`` feeds the denoiser timesteps of another range than the family's."""
    if "num_train_timesteps" in schedule_fields(type(config)) and config.num_train_timesteps != schedule.num_train_timesteps:
        raise ValueError(f"{where}.num_train_timesteps is {config.num_train_timesteps}, but the model family's denoiser "
                         f"takes timesteps in [0, {schedule.num_train_timesteps}]: remove the key")
