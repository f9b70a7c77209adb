"""Typed training configs and the DeepSpeed JSON loader: bad inputs fail with the key / file named,
before any engine (or process group) is built."""
import json

import pytest

from megadistill.config import ConfigError, from_dict
from megadistill.engine import trainer as trainer_mod
from megadistill.engine.config import EMAConfig, OptimConfig, TrainConfig, load_ds_config, model_ds_config
from megadistill.engine.engines import DistInfo, warmup_factor

pytest.importorskip("deepspeed")

TRAIN = TrainConfig(micro_batch_size=2, grad_accum=3, precision="fp32")


def _write(tmp_path, data, name="ds.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return str(path)


@pytest.mark.parametrize("kwargs, field", [
    ({"lr": 0.0}, "lr"), ({"betas": (0.9, 1.0)}, "betas"), ({"weight_decay": -1.0}, "weight_decay"),
    ({"eps": 0.0}, "eps"), ({"grad_clip": -1.0}, "grad_clip"), ({"warmup_steps": -1}, "warmup_steps"),
])
def test_optim_config_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        OptimConfig(**kwargs)


@pytest.mark.parametrize("kwargs, field", [
    ({"max_steps": 0}, "max_steps"), ({"grad_accum": 0}, "grad_accum"), ({"micro_batch_size": 0}, "micro_batch_size"),
    ({"dfake_gen_update_ratio": 0}, "dfake_gen_update_ratio"), ({"save_every": -1}, "save_every"),
    ({"keep_last": -1}, "keep_last"), ({"precision": "fp16"}, "precision"), ({"seed": -1}, "seed"),
])
def test_train_config_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**kwargs)


def test_ema_config_validation():
    with pytest.raises(ValueError, match="ema.decay"):
        EMAConfig(decay=1.0)
    with pytest.raises(ValueError, match="ema.start_step"):
        EMAConfig(start_step=-1)
    assert not EMAConfig(decay=0.0).enabled and EMAConfig().enabled


def test_train_config_loads_from_yaml_dict_strictly():
    cfg = from_dict(TrainConfig, {"max_steps": 5, "generator_optim": {"lr": "1e-4", "betas": [0.0, 0.99]},
                                  "ema": {"decay": 0.95, "start_step": 0}}, "train")
    assert cfg.generator_optim.lr == 1e-4 and cfg.generator_optim.betas == (0.0, 0.99) and cfg.ema.decay == 0.95
    assert cfg.critic_optim.lr == 4e-7  # upstream lr_critic default
    with pytest.raises(ConfigError, match="train.generator_optim.lrr"):
        from_dict(TrainConfig, {"generator_optim": {"lrr": 1.0}}, "train")
    with pytest.raises(ConfigError, match="train.generator_optim"):
        from_dict(TrainConfig, {"generator_optim": {"lr": -1.0}}, "train")


def test_ds_config_is_filled_from_train_config(tmp_path):
    path = _write(tmp_path, {"zero_optimization": {"stage": 3, "overlap_comm": False}, "gradient_clipping": "auto",
                             "train_batch_size": "auto"})
    ds = load_ds_config(path, TRAIN, world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 2 * 3 * 4
    assert ds["zero_optimization"] == {"stage": 3, "overlap_comm": False}
    assert ds["bf16"] == {"enabled": False} and "gradient_clipping" not in ds
    assert model_ds_config(ds, OptimConfig(grad_clip=2.5))["gradient_clipping"] == 2.5
    assert model_ds_config(ds, None)["gradient_clipping"] == 0.0
    bf16 = load_ds_config({}, TrainConfig(precision="bf16"), world_size=1)
    assert bf16["bf16"]["enabled"] and bf16["zero_optimization"]["stage"] == 0


@pytest.mark.parametrize("data, message", [
    ({"zero_optimization": {"stage": 4}}, r"zero_optimization.stage' must be one of \[0, 1, 2, 3\], got 4"),
    ({"zero_optimization": {"stage": "3"}}, r"zero_optimization.stage"),
    ({"zero_optimization": {"stage": 3, "overlap_comms": True}}, r"zero_optimization.overlap_comms"),
    ({"train_batch_size": 16}, r"'train_batch_size' is 16 but .* gives 12"),
    ({"train_micro_batch_size_per_gpu": 4}, r"'train_micro_batch_size_per_gpu' is 4 but train.micro_batch_size gives 2"),
    ({"gradient_accumulation_steps": 1}, r"'gradient_accumulation_steps' is 1 but train.grad_accum gives 3"),
    ({"optimizer": {"type": "Adam"}}, r"'optimizer' is not allowed.*train.generator_optim"),
    ({"scheduler": {"type": "WarmupLR"}}, r"'scheduler' is not allowed"),
    ({"fp16": {"enabled": True}}, r"'fp16' is not allowed"),
    ({"bf16": {"enabled": True}}, r"'bf16.enabled' is True but train.precision is 'fp32'"),
    ({"zero_optimisation": {"stage": 2}}, r"unknown DeepSpeed key 'zero_optimisation'"),
])
def test_bad_ds_config_names_file_and_key(tmp_path, data, message):
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError, match=message) as err:
        load_ds_config(path, TRAIN, world_size=2)
    assert path in str(err.value)


def test_missing_or_broken_ds_config_file(tmp_path):
    with pytest.raises(ConfigError, match="DeepSpeed config file not found: .*nope.json"):
        load_ds_config(str(tmp_path / "nope.json"), TRAIN, world_size=1)
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_ds_config(_write(tmp_path, "{\"zero_optimization\": "), TRAIN, world_size=1)
    with pytest.raises(ConfigError, match="JSON object"):
        load_ds_config(_write(tmp_path, "[1, 2]"), TRAIN, world_size=1)


def test_warmup_factor():
    assert [warmup_factor(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0


class _NoEngines(Exception):
    pass


@pytest.fixture
def no_engines(monkeypatch):
    """A Trainer that would be world size 2 and fails loudly if it ever gets to build engines."""
    monkeypatch.setattr(trainer_mod, "init_distributed", lambda: DistInfo(0, 2, 0, None))

    def build_engines(*args, **kwargs):
        raise _NoEngines("engines were built before the configs were checked")

    monkeypatch.setattr(trainer_mod, "build_engines", build_engines)


@pytest.mark.parametrize("ds, message", [
    ({"zero_optimization": {"stage": 5}}, "zero_optimization.stage"),
    ({"train_batch_size": 3}, "train_batch_size"),
])
def test_trainer_rejects_bad_ds_config_before_engines(no_engines, ds, message):
    with pytest.raises(ConfigError, match=message):
        trainer_mod.Trainer(method=None, data=None, train=TRAIN, ds_config=ds)


def test_trainer_rejects_missing_ds_file_before_engines(no_engines, tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        trainer_mod.Trainer(method=None, data=None, train=TRAIN, ds_config=str(tmp_path / "zero3.json"))


def test_trainer_rejects_missing_or_partial_resume_checkpoint_before_engines(no_engines, tmp_path):
    missing = TrainConfig(micro_batch_size=2, grad_accum=3, resume_from=str(tmp_path / "step_000000010"))
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        trainer_mod.Trainer(method=None, data=None, train=missing, ds_config={})
    (tmp_path / "step_000000010").mkdir()
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        trainer_mod.Trainer(method=None, data=None, train=missing, ds_config={})


def test_trainer_rejects_checkpoint_of_other_world_size_before_engines(no_engines, tmp_path):
    ckpt = tmp_path / "step_000000004"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text(json.dumps({"world_size": 8, "step": 4}))
    (ckpt / "COMPLETE").write_text("{}")
    with pytest.raises(ValueError, match="written by 8 ranks, this run has 2"):
        trainer_mod.Trainer(method=None, data=None, train=TRAIN, ds_config={}, checkpoint_dir=str(tmp_path))
