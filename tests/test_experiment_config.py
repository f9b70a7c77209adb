"""The experiment tree's method / toylab rules: only the selected method's section is built and
printed; other methods' sections are key-checked; ``toylab`` belongs to job toylab_table; a section
of the single-family releases is refused with where its keys went."""
from pathlib import Path

import pytest
import yaml

from megadistill.config import ConfigError, dump_config, load_config
from megadistill.experiment import ExperimentConfig
from megadistill.methods.sid import SiDConfig

TOY = str(Path(__file__).resolve().parents[1] / "configs" / "toylab_dmd.yaml")


def test_only_the_selected_method_is_built_and_printed():
    cfg = load_config(ExperimentConfig, TOY, ["method.name=sid", "method.sid.guidance_scale=3.0"])
    assert isinstance(cfg.method.config, SiDConfig) and cfg.method.config.guidance_scale == 3.0
    printed = yaml.safe_load(dump_config(cfg))
    assert sorted(printed["method"]) == ["name", "sid"] and "toylab" not in printed
    again = load_config(ExperimentConfig, None, [f"{k}={v}" for k, v in [("method.name", "sid")]])
    assert again.method.config == SiDConfig()  # defaults of the class when no section is given


def test_other_methods_sections_are_key_checked_not_built():
    with pytest.raises(ConfigError, match=r"method.dmd.guidance_scle'; did you mean 'guidance_scale'"):
        load_config(ExperimentConfig, TOY, ["method.name=sid", "method.dmd.guidance_scle=1"])
    with pytest.raises(ConfigError, match="method.foo"):
        load_config(ExperimentConfig, TOY, ["method.foo.x=1"])
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        load_config(ExperimentConfig, TOY, ["method.name=nope"])


def test_toylab_section_only_for_its_job(tmp_path):
    with pytest.raises(ConfigError, match="read only by job toylab_table"):
        load_config(ExperimentConfig, TOY, ["toylab.seed=1"])
    table = load_config(ExperimentConfig, None, ["job=toylab_table", "toylab.seed=1"])
    assert table.toylab.seed == 1 and "toylab" in yaml.safe_load(dump_config(table))


def test_single_family_sections_are_refused_with_the_new_keys(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("wan:\n  teacher: {preset: demo}\n")
    with pytest.raises(ConfigError, match=r"config section 'wan' is gone: its keys moved to model: \{family: wan"):
        load_config(ExperimentConfig, str(old))
