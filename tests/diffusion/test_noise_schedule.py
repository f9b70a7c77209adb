"""The family's noise schedule fills every method's and the rollout's schedule fields of a loaded
config: the demo teacher's recorded shift (read here from its settings file), a Wan preset's 5,
``model.shift``, the toy teacher's shift, and a family with another timestep range defined here. An
explicit shift wins; an explicit num_train_timesteps other than the family's is refused."""
import json
from pathlib import Path

import pytest

from megadistill.config import ConfigError, load_config
from megadistill.diffusion.noise_schedule import NoiseSchedule, schedule_fields
from megadistill.experiment import ExperimentConfig
from megadistill.methods import METHODS
from megadistill.models.registry import register_family
from megadistill.models.toy.family import ToyFamily

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DEMO_SETTINGS = Path(__file__).resolve().parents[2] / "megadistill" / "demo" / "assets" / "demo_teacher.json"
WAN = str(CONFIGS / "wan2.1_t2v_1.3b_self_forcing_dmd.yaml")
DEMO = str(CONFIGS / "demo_dmd.yaml")
TOY = str(CONFIGS / "toylab_dmd.yaml")


def bound(cfg) -> dict:
    """Every schedule field of the built method section and of rollout.steps, by its schedule attribute."""
    out = {}
    for section, where in ((cfg.method.config, "method"), (cfg.rollout.steps, "rollout.steps")):
        for name, attr in schedule_fields(type(section)).items():
            out[f"{where}.{name}"] = (attr, getattr(section, name))
    return out


def expect(cfg, schedule: NoiseSchedule) -> None:
    for key, (attr, value) in bound(cfg).items():
        assert value == getattr(schedule, attr), (cfg.method.name, key, value)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_takes_the_demo_teachers_recorded_shift(method):
    recorded = json.loads(DEMO_SETTINGS.read_text())["shift"]
    overrides = [f"method.name={method}"]
    cfg = load_config(ExperimentConfig, DEMO, overrides)
    expect(cfg, NoiseSchedule(shift=recorded))
    # model.shift moves every field at once.
    cfg = load_config(ExperimentConfig, DEMO, overrides + ["model.shift=2.5"])
    expect(cfg, NoiseSchedule(shift=2.5))


@pytest.mark.parametrize("method", ["dmd", "causal_diffusion", "apt", "consistency", "progressive"])
def test_a_wan_preset_runs_on_shift_5_and_an_explicit_shift_wins(method):
    cfg = load_config(ExperimentConfig, WAN, [f"method.name={method}"])
    expect(cfg, NoiseSchedule(shift=5.0))
    name = next(n for n, a in schedule_fields(type(cfg.method.config)).items() if a == "shift")
    cfg = load_config(ExperimentConfig, WAN, [f"method.name={method}", f"method.{method}.{name}=3.0"])
    assert getattr(cfg.method.config, name) == 3.0 and cfg.rollout.steps.shift == 5.0


def test_the_toy_family_schedule_is_its_teachers_shift():
    cfg = load_config(ExperimentConfig, TOY, ["model.shift=2.0", "method.name=sid"])
    expect(cfg, NoiseSchedule(shift=2.0))


def test_a_timestep_range_other_than_the_familys_is_refused():
    for key in ("method.dmd.num_train_timesteps=2000", "rollout.steps.num_train_timesteps=2000"):
        with pytest.raises(ConfigError, match=r"num_train_timesteps is 2000, but the model family's denoiser takes "
                                              r"timesteps in \[0, 1000\]"):
            load_config(ExperimentConfig, DEMO, [key])


class HalfRangeToy(ToyFamily):
    """The toy family on timesteps in [0, 500] with shift 3 (its steps inside that range)."""

    rollout_defaults = {**ToyFamily.rollout_defaults, "steps": {"steps": [500.0, 250.0], "warp": False,
                                                                "grid": False}}

    def noise_schedule(self, model_cfg) -> NoiseSchedule:
        return NoiseSchedule(num_train_timesteps=500, shift=3.0)


@pytest.mark.parametrize("method", ["dmd", "causal_diffusion"])
def test_a_family_with_another_timestep_range_binds_every_field(method):
    register_family("half_range_toy", HalfRangeToy())
    cfg = load_config(ExperimentConfig, None, ["model.family=half_range_toy", f"method.name={method}"])
    expect(cfg, NoiseSchedule(num_train_timesteps=500, shift=3.0))
    with pytest.raises(ConfigError, match=r"num_train_timesteps is 1000, but .* \[0, 500\]"):
        load_config(ExperimentConfig, None, ["model.family=half_range_toy", f"method.name={method}",
                                             f"method.{method}.num_train_timesteps=1000"])
