"""Typed training configs and the DeepSpeed JSON loader that checks them against each other.

``TrainConfig`` (steps, batch, alternation, precision, checkpoints, EMA) and one ``OptimConfig`` per
trained model are the single source of truth for the optimisation. The DeepSpeed JSON only says *how*
to shard (ZeRO stage and its knobs, communication): ``load_ds_config`` rejects anything that would be
a second, conflicting source (an ``optimizer``/``scheduler`` section, batch sizes that disagree with
the TrainConfig and the world size, fp16) and fills in the batch and clipping keys, so a bad file
fails in seconds with the file and key named, before any engine or process group exists.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Literal, Optional, Tuple, Union

from megadistill.config import ConfigError

PRECISIONS = ("fp32", "bf16")

# Top-level DeepSpeed keys this trainer passes through unchanged. Anything else is most likely a typo
# (DeepSpeed itself silently ignores unknown top-level keys).
PASSTHROUGH_DS_KEYS = frozenset({
    "zero_optimization", "steps_per_print", "wall_clock_breakdown", "memory_breakdown", "dump_state",
    "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "communication_data_type",
    "seq_parallel_communication_data_type", "prescale_gradients", "gradient_predivide_factor",
    "gradient_allreduce_op", "disable_allgather", "sparse_gradients", "activation_checkpointing",
    "flops_profiler", "comms_logger", "tensorboard", "wandb", "csv_monitor", "checkpoint", "data_types",
    "aio", "timers", "compile", "torch_autocast", "bf16",
})
# Keys the loader derives from the TrainConfig; in the file they may be absent, "auto" or consistent.
DERIVED_DS_KEYS = frozenset({
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
})
REJECTED_DS_KEYS = {
    "optimizer": "optimizers are built from the experiment config (train.generator_optim / train.critic_optim)",
    "scheduler": "LR schedules are built from the experiment config (train.*_optim.warmup_steps)",
    "fp16": "fp16 is not supported (loss scaling); use train.precision: bf16 or fp32",
    "amp": "apex AMP is not supported; use train.precision: bf16 or fp32",
}
ZERO_STAGES = (0, 1, 2, 3)


@dataclass
class OptimConfig:
    """AdamW + linear warmup for one trained model (defaults: Self-Forcing generator)."""

    lr: float = 2e-6
    betas: Tuple[float, float] = (0.0, 0.999)
    weight_decay: float = 0.01
    eps: float = 1e-8
    grad_clip: float = 10.0  # global grad-norm clip of this model; 0 disables
    warmup_steps: int = 0  # linear LR warmup over this many optimizer steps, then constant

    def __post_init__(self):
        self.betas = tuple(float(b) for b in self.betas)
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0 disables), got {self.grad_clip}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclass
class EMAConfig:
    """EMA of the generator: starts (as a copy) at ``start_step``, then ema = d ema + (1 - d) w."""

    decay: float = 0.99  # 0 disables the EMA (upstream ema_weight)
    start_step: int = 200

    def __post_init__(self):
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"ema.decay must be in [0, 1) (0 disables), got {self.decay}")
        if self.start_step < 0:
            raise ValueError(f"ema.start_step must be >= 0, got {self.start_step}")

    @property
    def enabled(self) -> bool:
        return self.decay > 0


@dataclass
class TrainConfig:
    """The optimisation loop. A step = one critic update (+ one generator update every
    ``dfake_gen_update_ratio`` steps), each over ``grad_accum`` micro-batches per rank."""

    max_steps: int = 1000
    micro_batch_size: int = 1  # per rank and micro-batch
    grad_accum: int = 1
    dfake_gen_update_ratio: int = 5  # generator updated when step % ratio == 0 (methods with a critic)
    seed: int = 0
    precision: Literal["fp32", "bf16"] = "bf16"
    save_every: int = 50  # optimizer steps between checkpoints; 0 = only at exit
    keep_last: int = 3  # complete checkpoints kept; 0 keeps all
    resume: bool = True  # auto-resume from the latest complete checkpoint in the checkpoint dir
    resume_from: str = ""  # an explicit checkpoint directory to resume from instead (must be complete)
    log_every: int = 10  # console line every this many steps (and at the last); 0 = never
    tensorboard: bool = True  # TensorBoard scalars / samples when the Trainer has a log_dir
    progress_bar: bool = True  # tqdm bar on rank 0
    sample_every: int = 0  # Trainer.sample_fn every this many steps (and at the end); 0 = never
    generator_optim: OptimConfig = field(default_factory=OptimConfig)
    critic_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=4e-7))
    ema: EMAConfig = field(default_factory=EMAConfig)

    def __post_init__(self):
        for name in ("max_steps", "micro_batch_size", "grad_accum", "dfake_gen_update_ratio"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("save_every", "keep_last", "log_every", "sample_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")


def read_ds_json(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"DeepSpeed config file not found: {path}")
    with open(path) as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"DeepSpeed config {path} must hold a JSON object at the top level")
    return data


def _check_derived(where: str, ds: Dict[str, Any], key: str, expected: Union[int, float], why: str) -> None:
    value = ds.get(key, "auto")
    if value == "auto":
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != expected:
        raise ConfigError(f"{where}: '{key}' is {value!r} but {why} gives {expected}; remove it or set \"auto\"")


def _check_zero_section(where: str, zero: Any) -> int:
    if not isinstance(zero, dict):
        raise ConfigError(f"{where}: 'zero_optimization' must be an object, got {zero!r}")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in ZERO_STAGES:
        raise ConfigError(f"{where}: 'zero_optimization.stage' must be one of {list(ZERO_STAGES)}, got {stage!r}")
    # DeepSpeed's own schema (extra keys forbidden) catches typos in the ZeRO section without building
    # anything; deepspeed is a hard dependency of the engine.
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from pydantic import ValidationError

    try:
        DeepSpeedZeroConfig(**zero)
    except ValidationError as e:
        problems = "; ".join(f"zero_optimization.{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"{where}: {problems}") from None
    return stage


def validate_ds_config(ds: Dict[str, Any], train: TrainConfig, world_size: int, where: str = "ds_config") -> Dict[str, Any]:
    """Check a DeepSpeed config against ``train`` and ``world_size`` (the data-parallel replicas: the world
    size, or dp under a mesh); return a filled-in copy.

    The copy has the batch keys set (micro batch, grad accumulation, global batch) and no
    ``gradient_clipping`` (set per model by ``model_ds_config``).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not isinstance(ds, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(ds).__name__}")
    for key in ds:
        if key in REJECTED_DS_KEYS and not (key == "fp16" and isinstance(ds[key], dict) and not ds[key].get("enabled", False)):
            raise ConfigError(f"{where}: '{key}' is not allowed here: {REJECTED_DS_KEYS[key]}")
        if key not in PASSTHROUGH_DS_KEYS and key not in DERIVED_DS_KEYS and key not in REJECTED_DS_KEYS:
            known = sorted(PASSTHROUGH_DS_KEYS | DERIVED_DS_KEYS)
            raise ConfigError(f"{where}: unknown DeepSpeed key '{key}' (known: {', '.join(known)})")
    stage = _check_zero_section(where, ds.get("zero_optimization", {"stage": 0}))

    micro, accum = train.micro_batch_size, train.grad_accum
    _check_derived(where, ds, "train_micro_batch_size_per_gpu", micro, "train.micro_batch_size")
    _check_derived(where, ds, "gradient_accumulation_steps", accum, "train.grad_accum")
    _check_derived(
        where, ds, "train_batch_size", micro * accum * world_size,
        f"train.micro_batch_size ({micro}) x train.grad_accum ({accum}) x data-parallel replicas ({world_size})",
    )
    bf16 = ds.get("bf16", {})
    if not isinstance(bf16, dict):
        raise ConfigError(f"{where}: 'bf16' must be an object, got {bf16!r}")
    if "enabled" in bf16 and bf16["enabled"] != "auto" and bool(bf16["enabled"]) != (train.precision == "bf16"):
        raise ConfigError(f"{where}: 'bf16.enabled' is {bf16['enabled']!r} but train.precision is {train.precision!r}")

    out = copy.deepcopy(ds)
    out.pop("gradient_clipping", None)
    out.pop("fp16", None)
    out["zero_optimization"] = dict(out.get("zero_optimization", {}), stage=stage)
    out["train_micro_batch_size_per_gpu"] = micro
    out["gradient_accumulation_steps"] = accum
    out["train_batch_size"] = micro * accum * world_size
    out["bf16"] = dict(bf16, enabled=train.precision == "bf16")
    out.setdefault("steps_per_print", 2**62)  # our own logger reports; silence DeepSpeed's
    return out


def load_ds_config(source: Union[str, Dict[str, Any]], train: TrainConfig, world_size: int) -> Dict[str, Any]:
    """Read (path) or take (dict) a DeepSpeed config and validate it; errors name the file and key."""
    if isinstance(source, (str, os.PathLike)):
        return validate_ds_config(read_ds_json(str(source)), train, world_size, where=str(source))
    return validate_ds_config(source, train, world_size)


def zero_stage(ds: Dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def model_ds_config(ds: Dict[str, Any], optim: Optional[OptimConfig]) -> Dict[str, Any]:
    """Per-model copy of a validated config: the model's clip norm; none for frozen (no optimizer)."""
    out = copy.deepcopy(ds)
    out["gradient_clipping"] = float(optim.grad_clip) if optim is not None else 0.0
    return out
