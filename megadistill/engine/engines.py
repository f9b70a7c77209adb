"""DeepSpeed engines for the generator and the critic, and the frozen teacher partitioned by ZeRO-3.

Each trained model gets its own engine: its own AdamW, warmup LR schedule and clip norm, with the
ZeRO stage of the (validated) ds_config. The teacher has no optimizer state: under stage 3 it is
wrapped in a DeepSpeed engine without optimizer, which partitions its parameters across ranks and
gathers them module by module on use; under stages 0-2 it stays a plain frozen module.

The engines wrap the very modules the method holds (``method.generator`` etc.): ZeRO-3 installs its
gather/release hooks on the modules themselves, so the method keeps calling them directly and never
needs to know about DeepSpeed.

``init_distributed`` works under the ``deepspeed`` launcher, ``torchrun`` (both set RANK/WORLD_SIZE)
and plain ``python`` (it then starts a one-process group itself), with NCCL on GPU and gloo on CPU.

With a ``ParallelMesh`` that puts several ranks on one sample (tp, sp or cfg > 1) every engine gets the
mesh as DeepSpeed's ``mpu``: ZeRO then partitions parameters and reduces gradients over the mesh's
sequence_data group (dp x sp x cfg at fixed tp), never mixes different TP shards, and counts dp alone
in the batch size. How DeepSpeed 0.19 weighs the SP ranks depends on the reduction path
(``sequence_parallel_loss_scale``); the trainer scales each rank's loss so that every path gives the
mean over the dp replicas' samples (both paths average over the cfg ranks, which is right as it is:
trainer.py). Under ZeRO-3 a module
not built partitioned is converted with ``deepspeed.zero.Init(module=...)`` over that group before
``deepspeed.initialize`` (left to DeepSpeed, it would be partitioned over the dp group alone).
Full weights (``full_state_dict`` / ``load_full_state_dict``) are gathered / cut across TP as well.
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import os
import socket
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from .config import OptimConfig, model_ds_config, zero_stage


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _skip_cpu_shm_kernel() -> None:
    """On CPU DeepSpeed would JIT-compile its shared-memory all-reduce kernel (minutes on first use,
    needs a C++ toolchain) for a speed-up of inference-style all-reduce only; gloo does our
    collectives. MEGADISTILL_DS_SHM=1 keeps DeepSpeed's default."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu" or os.environ.get("MEGADISTILL_DS_SHM") == "1":
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed(timeout_minutes: float = 30.0) -> DistInfo:
    """Join (or, under plain ``python``, create) the default process group; idempotent."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    _skip_cpu_shm_kernel()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        if dist.is_initialized():  # someone else made the group: trust it
            os.environ.update(RANK=str(dist.get_rank()), WORLD_SIZE=str(dist.get_world_size()))
        else:  # plain `python`: a one-process group, so every code path is the distributed one
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    accel = get_accelerator()
    if accel.device_name() != "cpu":
        accel.set_device(local_rank)
    deepspeed.init_distributed(
        dist_backend=accel.communication_backend_name(),
        auto_mpi_discovery=False,
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )
    device = torch.device(accel.device_name(local_rank) if accel.device_name() != "cpu" else "cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def model_init_context(ds: Dict[str, Any], mesh=None):
    """Context to construct models in so that, under ZeRO-3, each parameter is partitioned as soon as
    its module is built (``deepspeed.zero.Init``): no rank ever holds a full 14B teacher. Under stages
    0-2 it does nothing. Needs the process group (``init_distributed``) and a validated ds_config.

    Inside it, a module's own ``__init__`` code that touches a submodule's weights after building it
    (``nn.init.zeros_(self.proj.weight)``) sees an empty partition and does nothing: load real weights
    afterwards with ``load_full_state_dict``. With a ``mesh`` the partitions span its sequence_data
    group (tensor parallelism must be applied before partitioning: build TP models outside, then
    ``build_engines`` converts them)."""
    if zero_stage(ds) != 3:
        return contextlib.nullcontext()
    import deepspeed

    _skip_cpu_shm_kernel()
    return deepspeed.zero.Init(config_dict_or_path=model_ds_config(ds, None), **_zero_init_kwargs(mesh))


def _mpu(mesh):
    """The mesh as DeepSpeed's mpu when several ranks share a sample (tp, sp or cfg > 1), else None (plain
    data parallel)."""
    from megadistill.parallel.parallelize import uses_model_parallel

    return mesh if uses_model_parallel(mesh) else None


def _zero_init_kwargs(mesh) -> Dict[str, Any]:
    return mesh.zero_init_kwargs() if _mpu(mesh) is not None else {}


def partition_for_zero3(module: nn.Module, ds: Dict[str, Any], mesh=None) -> None:
    """Partition a built module's parameters (ZeRO-3) over the group its engine will reduce over: with
    a sample-splitting mesh, DeepSpeed would otherwise convert it over the dp group alone. Parameters
    already partitioned (built inside ``model_init_context``) are left as they are."""
    if zero_stage(ds) != 3 or _mpu(mesh) is None or all(hasattr(p, "ds_id") for p in module.parameters()):
        return
    import deepspeed

    _skip_cpu_shm_kernel()
    deepspeed.zero.Init(module=module, config_dict_or_path=model_ds_config(ds, None), **mesh.zero_init_kwargs())


def zero3_partitioner(ds: Dict[str, Any], mesh=None):
    """``partition`` for a family's network loading: under ZeRO-3, partition each block as soon as it is
    loaded, over the group ``partition_for_zero3`` would use (so no rank ever holds a full model);
    None under stages 0-2."""
    if zero_stage(ds) != 3:
        return None
    import deepspeed

    _skip_cpu_shm_kernel()
    config, kwargs = model_ds_config(ds, None), _zero_init_kwargs(mesh)
    return lambda module: deepspeed.zero.Init(module=module, config_dict_or_path=config, **kwargs)


def sequence_parallel_loss_scale(ds: Dict[str, Any], sp: int) -> float:
    """What each rank of an SP group multiplies its (full, identical) loss by before backward, so that
    DeepSpeed's gradient reduction over the sequence_data group yields the mean over dp replicas.

    Each SP rank's gradients are partials whose sum over the SP group is the gradient of the loss
    (sequence_parallel.py). DeepSpeed 0.19 (read from the source, measured for ZeRO-3 and ZeRO-2 in
    tests/parallel/test_parallel_training.py):
    - ZeRO-3 with ``reduce_scatter`` (the default): ``reduce_scatter_coalesced`` divides by the size of
      the whole sequence_data group, i.e. AVERAGES over dp x sp x cfg: backpropagate the full loss (1).
    - stages 0-2: every path divides by (sequence_data size / sp), i.e. SUMS over SP (and averages over
      dp x cfg): loss / sp.
    - ZeRO-3 without ``reduce_scatter`` sums over SP for buckets up to ``reduce_bucket_size`` and
      averages for larger ones: no single scale is right, so it is refused.
    """
    if sp == 1:
        return 1.0
    if zero_stage(ds) != 3:
        return 1.0 / sp
    if not ds.get("zero_optimization", {}).get("reduce_scatter", True):
        raise ValueError("sequence parallelism under ZeRO-3 needs zero_optimization.reduce_scatter=true: without it "
                         "DeepSpeed 0.19 weighs the SP ranks' gradients differently per bucket size")
    return 1.0


def warmup_factor(step: int, warmup_steps: int) -> float:
    """LR multiplier at optimizer step ``step`` (0-based): linear ramp (step + 1) / warmup, then 1."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)


def build_optimizer(params: Sequence[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    params = list(params)
    if not params:
        raise ValueError("optimizer has no trainable parameters")
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(warmup_factor, warmup_steps=cfg.warmup_steps))


def _check_params_belong(module: nn.Module, params: Sequence[nn.Parameter], role: str) -> None:
    owned = {id(p) for p in module.parameters()}
    stray = sum(id(p) not in owned for p in params)
    if stray:
        raise ValueError(f"{stray} of the {role} parameters do not belong to the {role} module")


def build_train_engine(module: nn.Module, params: Sequence[nn.Parameter], optim: OptimConfig, ds: Dict[str, Any],
                       role: str, mesh=None):
    """A DeepSpeed engine training ``params`` (a subset of ``module``'s) with AdamW + warmup."""
    import deepspeed

    _skip_cpu_shm_kernel()
    params = list(params)
    _check_params_belong(module, params, role)
    partition_for_zero3(module, ds, mesh)
    optimizer = build_optimizer(params, optim)
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=build_lr_scheduler(optimizer, optim),
        config=model_ds_config(ds, optim), mpu=_mpu(mesh),
    )
    return engine


def build_frozen(module: nn.Module, ds: Dict[str, Any], device: torch.device, mesh=None):
    """Freeze ``module``; under ZeRO-3 partition it with an optimizer-less engine (returned), else
    move it to the device and precision of the trained models and return None."""
    import deepspeed

    for p in module.parameters():
        p.requires_grad_(False)
    module.eval()
    if zero_stage(ds) == 3:
        _skip_cpu_shm_kernel()
        partition_for_zero3(module, ds, mesh)
        engine, _, _, _ = deepspeed.initialize(model=module, config=model_ds_config(ds, None), mpu=_mpu(mesh))
        engine.eval()
        return engine
    dtype = torch.bfloat16 if ds.get("bf16", {}).get("enabled") else None
    module.to(device=device, dtype=dtype)
    return None


@dataclass
class Engines:
    generator: Any  # deepspeed.DeepSpeedEngine
    critic: Optional[Any]
    teacher: Optional[Any]  # optimizer-less engine under ZeRO-3, else None (plain module)
    ds_config: Dict[str, Any]
    target: Optional[Any] = None  # the method's frozen generator copy (e.g. an EMA target), as the teacher

    @property
    def zero_stage(self) -> int:
        return zero_stage(self.ds_config)

    def trained(self) -> Dict[str, Any]:
        """role -> engine of every model with optimizer state (what a checkpoint holds)."""
        out = {"generator": self.generator}
        if self.critic is not None:
            out["critic"] = self.critic
        return out


FROZEN_ROLES = ("teacher", "target")


def method_modules(method) -> Dict[str, Optional[nn.Module]]:
    """The generator / critic / teacher / target modules a method holds (methods/base.py attribute
    names; ``target`` is a frozen copy of the generator that the method updates itself)."""
    return {
        "generator": method.generator,
        "critic": getattr(method, "critic", None),
        **{role: getattr(method, role, None) for role in FROZEN_ROLES},
    }


def build_engines(
    method,
    ds: Dict[str, Any],
    generator_optim: OptimConfig,
    critic_optim: OptimConfig,
    device: torch.device,
    mesh=None,
) -> Engines:
    """Engines for ``method``'s models from a validated ds_config (see config.load_ds_config); with
    a ``mesh`` (``ParallelMesh``) the models must already be parallelized (the family's ``parallelize``)."""
    modules = method_modules(method)
    generator = build_train_engine(modules["generator"], method.generator_parameters(), generator_optim, ds,
                                   "generator", mesh)
    critic = None
    if method.has_critic:
        if modules["critic"] is None:
            raise ValueError(f"method {method.name!r} has a critic but no .critic module")
        critic = build_train_engine(modules["critic"], method.critic_parameters(), critic_optim, ds, "critic", mesh)
    frozen = {role: build_frozen(modules[role], ds, device, mesh) if modules[role] is not None else None
              for role in FROZEN_ROLES}
    return Engines(generator, critic, frozen["teacher"], ds, target=frozen["target"])


def begin_micro_batch(engine) -> None:
    """What ``engine.forward`` does before a forward, for models the method calls directly.

    DeepSpeed's ZeRO optimizers count micro-steps at the start of ``engine.forward``; without that
    count ZeRO-3 overwrites instead of accumulating the gradient partitions of earlier micro-batches
    (a run with grad_accum k then trains on its last micro-batch only). Methods call the modules,
    not the engines, so the trainer calls this once per micro-batch, before the loss.
    """
    clear = getattr(getattr(engine, "optimizer", None), "clear_backward_seen_flag", None)
    if clear is not None:
        clear()


def set_requires_grad(params: List[nn.Parameter], flag: bool) -> None:
    for p in params:
        p.requires_grad_(flag)


@torch.no_grad()
def full_state_dict(module: nn.Module) -> Dict[str, torch.Tensor]:
    """Full CPU copies of ``module``'s parameters on every rank (a collective gather under ZeRO-3,
    and across the TP group of tensor-parallel layers)."""
    from megadistill.parallel.parallelize import gather_tensor_parallel

    named = list(module.named_parameters())
    if any(hasattr(p, "ds_id") for _, p in named):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            local = {n: p.detach().clone().cpu() for n, p in named}
    else:
        local = {n: p.detach().clone().cpu() for n, p in named}
    return gather_tensor_parallel(module, local)


@torch.no_grad()
def load_full_state_dict(module: nn.Module, state: Dict[str, torch.Tensor], strict: bool = True) -> None:
    """Copy full tensors into ``module``'s parameters (each TP rank takes its shard of a
    tensor-parallel layer's); under ZeRO-3 one parameter at a time is gathered, written on rank 0 of
    its partition group and re-partitioned (every rank must call it; that rank's ``state`` wins)."""
    from megadistill.parallel.parallelize import shard_tensor_parallel

    named = dict(module.named_parameters())
    missing, unexpected = sorted(set(named) - set(state)), sorted(set(state) - set(named))
    if strict and (missing or unexpected):
        raise KeyError(f"state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    state = shard_tensor_parallel(module, state)
    for name, p in named.items():
        if name not in state:
            continue
        if hasattr(p, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                p.copy_(state[name].to(p.dtype))
        else:
            p.copy_(state[name].to(device=p.device, dtype=p.dtype))
