"""The YAML + override config loader: strict keys, types, files; errors name the dotted key."""
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from megadistill.config import ConfigError, apply_overrides, dump_config, from_dict, load_config, parse_override, to_dict


@dataclass
class Optim:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.0, 0.999)
    clip: Optional[float] = None

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass
class Exp:
    name: str = "x"
    steps: int = 10
    use_ema: bool = False
    kind: Literal["dmd", "sid"] = "dmd"
    step_list: list[int] = field(default_factory=lambda: [1000, 750])
    optim: Optim = field(default_factory=Optim)


def test_defaults_and_roundtrip():
    cfg = from_dict(Exp, {})
    assert cfg == Exp()
    assert from_dict(Exp, to_dict(cfg)) == cfg


def test_nested_values_are_typed():
    cfg = from_dict(Exp, {"steps": 3, "optim": {"lr": 2, "betas": [0.9, 0.99], "clip": 1.0}})
    assert cfg.steps == 3 and cfg.optim.lr == 2.0 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == (0.9, 0.99) and cfg.optim.clip == 1.0


def test_unknown_key_names_dotted_path_and_suggests():
    with pytest.raises(ConfigError, match=r"unknown config key 'optim\.lrr'.*did you mean 'lr'"):
        from_dict(Exp, {"optim": {"lrr": 1.0}})


@pytest.mark.parametrize(
    "data, key",
    [
        ({"steps": "ten"}, "steps"),
        ({"steps": 1.5}, "steps"),
        ({"steps": True}, "steps"),
        ({"use_ema": 1}, "use_ema"),
        ({"kind": "gan"}, "kind"),
        ({"step_list": [1000, "a"]}, r"step_list\[1\]"),
        ({"optim": {"betas": [0.9]}}, "optim.betas"),
        ({"optim": 3}, "optim"),
    ],
)
def test_wrong_types_name_the_key(data, key):
    with pytest.raises(ConfigError, match=key):
        from_dict(Exp, data)


def test_validation_in_post_init_is_reported_with_section():
    with pytest.raises(ConfigError, match=r"optim.*lr must be > 0"):
        from_dict(Exp, {"optim": {"lr": -1}})


def test_overrides_parse_yaml_values():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    assert parse_override("a=true") == (["a"], True)
    with pytest.raises(ConfigError, match="key.path=value"):
        parse_override("novalue")


def test_override_scientific_float_and_unknown_key():
    cfg = load_config(Exp, None, ["optim.lr=1e-3", "steps=7", "optim.clip=null"])
    assert cfg.optim.lr == pytest.approx(1e-3) and cfg.steps == 7 and cfg.optim.clip is None
    with pytest.raises(ConfigError, match=r"'optim\.nope'"):
        apply_overrides(Exp, {}, ["optim.nope=1"])
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides(Exp, {}, ["steps.x=1"])


def test_yaml_file_missing_bad_and_good(tmp_path):
    with pytest.raises(ConfigError, match="not found: .*missing.yaml"):
        load_config(Exp, str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Exp, str(bad))
    good = tmp_path / "good.yaml"
    good.write_text("name: run1\noptim:\n  lr: 1e-5\n")
    cfg = load_config(Exp, str(good), ["steps=2"])
    assert (cfg.name, cfg.steps, cfg.optim.lr) == ("run1", 2, 1e-5)
    typo = tmp_path / "typo.yaml"
    typo.write_text("stepz: 3\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: unknown config key 'stepz'"):
        load_config(Exp, str(typo))


def test_dump_is_loadable_yaml(tmp_path):
    cfg = load_config(Exp, None, ["name=abc", "optim.betas=[0.5, 0.6]"])
    p = tmp_path / "dump.yaml"
    p.write_text(dump_config(cfg))
    assert load_config(Exp, str(p)) == cfg


@dataclass
class Parent:
    # The parent's factory differs from Optim's own defaults: a partial section must keep it.
    optim: Optim = field(default_factory=lambda: Optim(lr=0.5, clip=2.0))


def test_partial_section_keeps_the_parents_default_factory(tmp_path):
    cfg = load_config(Parent, None, ["optim.betas=[0.1, 0.2]"])
    assert (cfg.optim.lr, cfg.optim.clip, cfg.optim.betas) == (0.5, 2.0, (0.1, 0.2))
    p = tmp_path / "partial.yaml"
    p.write_text("optim:\n  clip: 3.0\n")
    cfg = load_config(Parent, str(p))
    assert (cfg.optim.lr, cfg.optim.clip) == (0.5, 3.0)


def test_derived_defaults_follow_a_changed_field_through_the_loader(tmp_path):
    """A file that sets only ``num_training_frames`` moves the frame range with it: the loader lays
    files over the default tree, so a default resolved into another field would stick at 21."""
    from megadistill.experiment import ExperimentConfig

    path = tmp_path / "x.yaml"
    path.write_text("data:\n  latent_shape: [3, 9, 16, 16]\nrollout:\n  self_forcing: {num_training_frames: 9}\n")
    cfg = load_config(ExperimentConfig, str(path))
    assert cfg.rollout.self_forcing.frame_range() == (9, 9)
