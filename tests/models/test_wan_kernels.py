"""``model.kernels`` reaches every Wan network of a run as built-in back-ends (not a flag read at
forward time), a role's own override wins, and a bad name fails at config load."""
from pathlib import Path

import pytest

from megadistill.config import ConfigError, load_config
from megadistill.experiment import ExperimentConfig
from megadistill.methods import method_needs
from megadistill.ops.attention import resolve_backend

DEMO = str(Path(__file__).resolve().parents[2] / "configs" / "demo_dmd.yaml")


def networks(*overrides):
    cfg = load_config(ExperimentConfig, DEMO, list(overrides))
    need = method_needs(cfg.method.name, cfg.method.config)
    nets = cfg.family.build_networks(cfg, need, cfg.family.prepare_data(cfg, None), None, None)
    return {"teacher": nets.teacher, "generator": nets.generator, "critic": nets.critic}


def backends(net):
    return {id(b.self_attn.core.backend) for b in net.blocks} | {id(b.cross_attn.backend) for b in net.blocks}


def test_model_kernels_build_every_network_with_the_named_backend():
    sdpa, flex, auto = (id(resolve_backend(n)) for n in ("sdpa", "flex", "auto"))
    default = networks()
    assert all(net.config.attention == "auto" and backends(net) == {auto} for net in default.values())
    chosen = networks("model.kernels.attention=sdpa")
    assert all(net.config.attention == "sdpa" and backends(net) == {sdpa} for net in chosen.values())
    mixed = networks("model.kernels.attention=sdpa", "model.critic.overrides={attention: flex}")
    assert backends(mixed["critic"]) == {flex} and backends(mixed["generator"]) == {sdpa}
    assert backends(mixed["teacher"]) == {sdpa}


def test_an_unknown_backend_fails_at_load():
    with pytest.raises(ConfigError, match=r"model.kernels.*unknown back-end 'flesh'"):
        load_config(ExperimentConfig, DEMO, ["model.kernels.attention=flesh"])
