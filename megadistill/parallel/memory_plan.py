"""Per-GPU memory plan of a distillation run (generator + critic trained, teacher frozen), before it starts.

The model-agnostic half: DeepSpeed's layout and the phases of a step. A family supplies, per role, the
exact parameter sizes of its network on one TP rank (``count_parameters`` over a meta-device build and
its tensor-parallel plan) and ESTIMATES of its activations, KV cache and no-grad forward transients
(in ``models/<family>/memory.py``, which also reads an experiment YAML into a plan).

Two kinds of numbers, kept apart in the output:

- EXACT (given DeepSpeed 0.19's layout): parameters, gradients and optimizer states. Parameter counts come
  from the real module built on the meta device, split per tensor-parallel rank by the family's plan
  (``parallel.tensor_parallel.plan_partition``, the plan ``parallelize_module`` applies), then
  partitioned exactly as DeepSpeed does it: ZeRO-3 pads every parameter to a multiple of the partition
  world and keeps ``ceil(numel / world)`` per rank (partition_parameters.py ``_padding_size``); ZeRO-1/2
  flatten the whole group, pad it to a multiple of 2 x world (stage_1_and_2.py
  ``nccl_start_alignment_factor``) and keep 1/world of it.
- ESTIMATES: activations, KV caches, DeepSpeed's working buffers (gathered parameters, buckets) and the
  no-grad forward transients. They ignore allocator fragmentation, the CUDA context (~0.5-1 GiB) and
  kernel workspaces.

Parallel layout (``mesh.py``): tp x sp x cfg x dp = world; ZeRO partitions every TP shard over the
other ranks (the sequence_data group, world / tp ranks).

Roles: the trained generator (and critic, for methods with one), the frozen teacher, and the frozen
``target`` (a copy of the generator, e.g. consistency's EMA target) when the method declares
``needs_target``.

Precision: ``bf16`` is DeepSpeed bf16: every parameter of a DeepSpeed-wrapped model is cast to bf16
(engine ``_cast_module_mixed_precision``), gradients accumulate in bf16 (DeepSpeed's default
``grad_accum_dtype`` = model dtype), fp32 master weights and AdamW's exp_avg / exp_avg_sq live in the
optimizer partition. ``fp32``: fp32 parameters and gradients, and STILL a separate fp32 master
partition: stage3.py's no-copy branch compares a torch.device with a device string, which is never
equal, so DeepSpeed 0.19 clones (measured on CPU; the comparison is the same on CUDA); ZeRO-1/2 clone
by design.
"""
from __future__ import annotations

import abc
import dataclasses
import re
from dataclasses import dataclass, field
from typing import Optional

import torch

from megadistill.parallel.mesh import ParallelConfig
from megadistill.parallel.tensor_parallel import TensorParallelPlan, plan_partition

GIB = 2**30
PRECISIONS = ("bf16", "fp32")
# How the generator's gradient forward runs: "causal" Self-Forcing rollout (block by block against a KV
# cache), "bidirectional" few-step rollout of one clip, "parallel" one full-clip forward without a
# rollout (ODE regression: the block-causal mask over all frames at once).
ROLLOUT_KINDS = ("causal", "bidirectional", "parallel")
ROLES = ("generator", "critic", "teacher", "target")
FROZEN_ROLES = ("teacher", "target")

# DeepSpeed 0.19 ZeRO defaults (element counts; configs/zero3.json sets smaller buckets).
DS_DEFAULT_REDUCE_BUCKET = 500_000_000
DS_DEFAULT_PREFETCH_BUCKET = 50_000_000
DS_DEFAULT_PERSISTENCE_THRESHOLD = 100_000
DS_DEFAULT_MAX_LIVE = 1_000_000_000
DS_DEFAULT_SUB_GROUP = 1_000_000_000


# ---------------------------------------------------------------------------------------------- inputs

def _positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class ZeroSettings:
    """The DeepSpeed ZeRO knobs that change memory (element counts, as in the ds_config)."""

    stage: int = 3
    reduce_bucket_size: int = DS_DEFAULT_REDUCE_BUCKET
    prefetch_bucket_size: int = DS_DEFAULT_PREFETCH_BUCKET
    param_persistence_threshold: int = DS_DEFAULT_PERSISTENCE_THRESHOLD
    max_live_parameters: int = DS_DEFAULT_MAX_LIVE
    sub_group_size: int = DS_DEFAULT_SUB_GROUP

    def __post_init__(self):
        if self.stage not in (0, 1, 2, 3):
            raise ValueError(f"zero stage must be 0, 1, 2 or 3, got {self.stage!r}")
        for name in ("reduce_bucket_size", "prefetch_bucket_size", "max_live_parameters", "sub_group_size"):
            _positive_int(name, int(getattr(self, name)))
        if self.param_persistence_threshold < 0:
            raise ValueError(f"param_persistence_threshold must be >= 0, got {self.param_persistence_threshold}")

    @classmethod
    def from_ds_config(cls, ds: dict) -> "ZeroSettings":
        """From a DeepSpeed config dict (its ``zero_optimization`` section; missing keys: DeepSpeed defaults)."""
        z = ds.get("zero_optimization", {}) or {}
        return cls(
            stage=int(z.get("stage", 0)),
            reduce_bucket_size=int(z.get("reduce_bucket_size", DS_DEFAULT_REDUCE_BUCKET)),
            prefetch_bucket_size=int(z.get("stage3_prefetch_bucket_size", DS_DEFAULT_PREFETCH_BUCKET)),
            param_persistence_threshold=int(z.get("stage3_param_persistence_threshold",
                                                  DS_DEFAULT_PERSISTENCE_THRESHOLD)),
            max_live_parameters=int(z.get("stage3_max_live_parameters", DS_DEFAULT_MAX_LIVE)),
            sub_group_size=int(z.get("sub_group_size", DS_DEFAULT_SUB_GROUP)),
        )


@dataclass
class RunLayout(abc.ABC):
    """What every family's plan config holds: the world and its parallel split, ZeRO, precision,
    checkpointing, the generator's forward kind, samples per micro batch and the GPU size. A family's
    config subclasses it and adds its models and sample geometry; it implements ``plan()`` and
    ``layout_fits(tp, sp)`` (whether its models split tp x sp ways), which ``suggestions`` uses."""

    batch: int = 1
    world_size: int = 8
    tp: int = 1
    sp: int = 1
    cfg: int = 1
    zero: ZeroSettings = field(default_factory=ZeroSettings)
    grad_checkpointing: bool = True
    precision: str = "bf16"
    rollout: str = "causal"
    gpu_gib: float = 80.0

    def check_layout(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.rollout not in ROLLOUT_KINDS:
            raise ValueError(f"rollout must be one of {ROLLOUT_KINDS}, got {self.rollout!r}")
        for name in ("batch", "world_size"):
            _positive_int(name, getattr(self, name))
        if not self.gpu_gib > 0:
            raise ValueError(f"gpu_gib must be > 0, got {self.gpu_gib}")

    @property
    def dp(self) -> int:
        return ParallelConfig(tp=self.tp, sp=self.sp, cfg=self.cfg).check(self.world_size)

    @property
    def zero_world(self) -> int:
        """Ranks ZeRO partitions each TP shard over: dp x sp x cfg (mesh.py's sequence_data group)."""
        return self.world_size // self.tp

    @abc.abstractmethod
    def plan(self) -> "MemoryPlan":
        """This run's plan (the family's ``plan_memory``)."""

    @abc.abstractmethod
    def layout_fits(self, tp: int, sp: int) -> bool:
        """Whether every model of the run splits tp (tensor) x sp (sequence) ways."""


# ----------------------------------------------------------------------------------- parameter counts

@dataclass(frozen=True)
class ModelParams:
    """Exact parameter sizes of one model on one TP rank: ``local`` numel of every parameter (module
    order), how many of the full model's elements TP shards / replicates, the largest block's local
    numel (ZeRO-3 gathers one block at a time)."""

    preset: str
    tp: int
    names: tuple[str, ...]
    local: tuple[int, ...]
    total: int
    sharded: int
    replicated: int
    largest_block_local: int

    @property
    def local_total(self) -> int:
        return sum(self.local)


_BLOCK = re.compile(r"^(.*?blocks\.\d+)\.")


def count_parameters(model: torch.nn.Module, tp: int, preset: str = "",
                     plan: Optional[TensorParallelPlan] = None) -> ModelParams:
    """ModelParams of a built model (meta or real) split ``tp`` ways as the family's tensor-parallel
    ``plan`` says (the one ``parallelize_module`` applies; None: every parameter replicated). A
    sharded parameter's split dim must divide by tp."""
    names, local, sharded, replicated = [], [], 0, 0
    blocks: dict[str, int] = {}
    for name, p in model.named_parameters():
        n = p.numel()
        split = None if plan is None else plan_partition(plan, name)
        if split is not None:
            dim, chunks = split
            if p.shape[dim] % (tp * chunks):
                raise ValueError(f"{preset or 'model'}: {name} {tuple(p.shape)} dim {dim} is not divisible by tp={tp}")
            sharded += n
            n //= tp
        else:
            replicated += n
        names.append(name)
        local.append(n)
        block = _BLOCK.match(name)
        if block:
            blocks[block.group(1)] = blocks.get(block.group(1), 0) + n
    return ModelParams(preset, tp, tuple(names), tuple(local), sharded + replicated, sharded, replicated,
                       max(blocks.values(), default=0))

# ------------------------------------------------------------------------- exact ZeRO partition sizes

def zero3_partition_numel(numel: int, world: int) -> int:
    """Elements of one parameter on each rank under ZeRO-3: padded up to a multiple of world, split."""
    return -(-numel // world)


def zero12_partition_numel(total: int, world: int) -> int:
    """Elements of a flattened parameter group on each rank under ZeRO-1/2: the group is padded to a
    multiple of 2 x world (4-byte start alignment of 2-byte elements per rank), then split."""
    align = 2 * world
    return -(-total // align) * align // world


@dataclass(frozen=True)
class StateBytes:
    """Per-rank bytes of one model's persistent state (exact): parameters, gradients, optimizer
    (fp32 master + AdamW exp_avg + exp_avg_sq), and ZeRO's fixed buffers (ZeRO-3 persistent full
    parameters beyond their partition, the gradient reduce bucket)."""

    params: int = 0
    grads: int = 0
    optimizer: int = 0
    zero_buffers: int = 0
    partition_numel: int = 0  # elements of this rank's (padded) optimizer partition; 0 when frozen

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.zero_buffers


def param_bytes(precision: str) -> int:
    """Bytes per parameter / gradient element: bf16 2 (DeepSpeed casts every parameter), fp32 4."""
    return 2 if precision == "bf16" else 4


def persistent_extra_numel(local: tuple[int, ...], world: int, threshold: int) -> int:
    """ZeRO-3 keeps a TRAINED model's parameters of <= threshold elements gathered from their first
    use on ("persistent"): per rank a full buffer of the padded size (partition x world) on top of
    the partition. (A frozen, optimizer-less engine releases them after each forward: measured.)"""
    return sum(zero3_partition_numel(n, world) * (world - 1) for n in local if n <= threshold)


def trained_state_bytes(mp: ModelParams, precision: str, zero: ZeroSettings, world: int) -> StateBytes:
    """A trained model's state with DeepSpeed + torch AdamW, per rank (see the module docstring).

    ZeRO-3: bf16/fp32 parameter partition, gradient partition buffer (``grad_partitions_flat_buffer``,
    accumulation dtype = parameter dtype), fp32 master partition, two fp32 Adam states;
    fixed buffers: persistent parameters and the reduce bucket. ZeRO-1/2: full parameters, fp32 master
    + states on the padded flat partition; ZeRO-2 keeps the gradient partition and a reduce bucket,
    ZeRO-1 full gradients. Stage 0: everything full, fp32 master only under bf16.
    """
    pb = param_bytes(precision)
    full = mp.local_total
    if zero.stage == 3:
        part = sum(zero3_partition_numel(n, world) for n in mp.local)
        master = 4 * part  # cloned under fp32 too (module docstring)
        extra = persistent_extra_numel(mp.local, world, zero.param_persistence_threshold)
        return StateBytes(params=pb * part, grads=pb * part, optimizer=master + 8 * part,
                          zero_buffers=pb * (extra + zero.reduce_bucket_size), partition_numel=part)
    if zero.stage in (1, 2):
        part = zero12_partition_numel(full, world)
        grads = pb * part if zero.stage == 2 else pb * full
        bucket = pb * zero.reduce_bucket_size if zero.stage == 2 else 0
        return StateBytes(params=pb * full, grads=grads, optimizer=12 * part, zero_buffers=bucket,
                          partition_numel=part)
    master = 4 * full if precision == "bf16" else 0
    return StateBytes(params=pb * full, grads=pb * full, optimizer=master + 8 * full, partition_numel=full)


def frozen_state_bytes(mp: ModelParams, precision: str, zero: ZeroSettings, world: int) -> StateBytes:
    """A frozen model (the teacher): ZeRO-3 partitions it with an optimizer-less engine (its
    persistent parameters are gathered only while it runs: see ``zero3_gathered_bytes``); stages
    0-2 keep it whole on every rank (engines.build_frozen)."""
    pb = param_bytes(precision)
    if zero.stage == 3:
        return StateBytes(params=pb * sum(zero3_partition_numel(n, world) for n in mp.local))
    return StateBytes(params=pb * mp.local_total)


def zero3_gathered_bytes(mp: ModelParams, precision: str, zero: ZeroSettings, trained: bool, world: int) -> int:
    """ESTIMATE of ZeRO-3's gathered (full) parameters while a model runs, per rank. Frozen forward:
    the block in use plus the prefetch bucket, plus its persistent parameters. Trained forward +
    backward: DeepSpeed keeps fetched parameters that are reused soon (the backward reuses them),
    up to stage3_max_live_parameters (its persistent parameters are in its static state)."""
    if zero.stage != 3:
        return 0
    if trained:
        live = max(mp.largest_block_local + zero.prefetch_bucket_size, zero.max_live_parameters)
        return param_bytes(precision) * min(mp.local_total, live)
    live = min(mp.local_total, mp.largest_block_local + zero.prefetch_bucket_size)
    return param_bytes(precision) * (live + persistent_extra_numel(mp.local, world, zero.param_persistence_threshold))


def optimizer_step_transient_bytes(state: StateBytes, precision: str, zero: ZeroSettings) -> int:
    """ESTIMATE of the extra memory of the optimizer step: under bf16 the gradient partition is
    upcast to fp32 for AdamW, one sub-group (<= sub_group_size elements) at a time under ZeRO-3, the
    whole flat partition under ZeRO-1/2. fp32 steps on the gradients as they are."""
    if precision != "bf16" or state.partition_numel == 0:
        return 0
    n = min(state.partition_numel, zero.sub_group_size) if zero.stage == 3 else state.partition_numel
    return 4 * n

# ------------------------------------------------------------------------------ activation estimates

def sp_tokens(tokens: int, sp: int) -> int:
    """Tokens after Ulysses padding (to a multiple of sp); each rank holds 1/sp of them."""
    return -(-tokens // sp) * sp


@dataclass(frozen=True)
class Activations:
    """ESTIMATE of a model's activation memory per rank: ``saved`` (kept from forward to backward),
    ``recompute`` (one block's saved set rebuilt during backward under checkpointing)."""

    saved: float = 0.0
    recompute: float = 0.0

    @property
    def peak(self) -> float:
        return self.saved + self.recompute

# ------------------------------------------------------------------------------------------- the plan

@dataclass
class RolePlan:
    role: str
    preset: str
    params: ModelParams
    state: StateBytes
    trained: bool
    activations: Activations = field(default_factory=Activations)
    kv_cache: float = 0.0
    gathered: int = 0  # ZeRO-3 working set while this model runs (estimate)
    nograd: float = 0.0  # no-grad forward transient (estimate)
    step_transient: int = 0


@dataclass
class MemoryPlan:
    config: RunLayout
    grid: tuple[int, ...]  # the family's latent grid of one sample
    tokens: int
    roles: list[RolePlan]
    phases: dict[str, float]  # dynamic bytes of each phase of a step (estimates)
    sample: str = ""  # the family's line about one sample (sizes, tokens)
    estimates: str = ""  # the family's note on what its activation estimates count

    @property
    def static_bytes(self) -> int:
        return sum(r.state.total for r in self.roles)

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    @property
    def peak_bytes(self) -> float:
        return self.static_bytes + self.phases[self.peak_phase]

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.config.gpu_gib * GIB

    @property
    def headroom_gib(self) -> float:
        return self.config.gpu_gib - self.peak_bytes / GIB


def role_plan(role: str, preset: str, params: ModelParams, cfg: RunLayout, *, activations: Activations = Activations(),
              kv_cache: float = 0.0, nograd: float = 0.0) -> RolePlan:
    """One role's plan: its exact state (trained: parameters, gradients, optimizer; frozen roles:
    parameters) and ZeRO-3 working set from ``params``, with the family's estimates."""
    trained = role not in FROZEN_ROLES
    state = (trained_state_bytes if trained else frozen_state_bytes)(params, cfg.precision, cfg.zero, cfg.zero_world)
    return RolePlan(role, preset, params, state, trained, activations=activations, kv_cache=kv_cache,
                    gathered=zero3_gathered_bytes(params, cfg.precision, cfg.zero, trained, cfg.zero_world),
                    nograd=nograd,
                    step_transient=optimizer_step_transient_bytes(state, cfg.precision, cfg.zero) if trained else 0)


def step_phases(roles: list[RolePlan]) -> dict[str, float]:
    """Dynamic bytes of each phase of one distillation step (each adds to the static state of all models):
      generator update: the rollout's saved activations + KV cache, then the no-grad critic, teacher
        and target forwards (their ZeRO-3 working sets and forward transients; the cache is gone by
        then but the activations are not, counted together as an upper bound);
      critic update (methods with a critic): the no-grad rollout (KV cache), then the critic's
        forward + backward;
      optimizer step: fp32 gradient copies."""
    by = {r.role: r for r in roles}
    gen = by["generator"]
    scorers = [by[r] for r in ("critic", "teacher", "target") if r in by]
    score = max((r.gathered + r.nograd for r in scorers), default=0.0)
    phases = {"generator update": gen.activations.peak + gen.kv_cache + gen.gathered + max(score, gen.nograd)}
    if "critic" in by:
        critic = by["critic"]
        phases["critic update"] = max(gen.kv_cache + gen.gathered + gen.nograd,
                                      critic.activations.peak + critic.gathered + critic.nograd)
    phases["optimizer step"] = float(max(r.step_transient for r in roles))
    return phases


# -------------------------------------------------------------------------------------------- advice

def suggestions(cfg: RunLayout, limit: int = 3) -> list[tuple[str, MemoryPlan]]:
    """Cheapest changes that make a plan fit: activation checkpointing, ZeRO-3, larger sp, larger tp
    (within the models' splits, ``cfg.layout_fits``, and the world size), alone or combined; fewer
    changes first, then checkpointing (recompute only) before ZeRO-3 (communication) before sp before
    tp (per-layer all-reduces on the critical path)."""
    def valid(tp, sp):
        return cfg.layout_fits(tp, sp) and cfg.world_size % (tp * sp * cfg.cfg) == 0

    candidates = []
    for ckpt in sorted({cfg.grad_checkpointing, True}):
        for stage in sorted({cfg.zero.stage, 3}):
            for sp in sorted({cfg.sp} | {s for s in (2, 4, 8, 16) if s > cfg.sp}):
                for tp in sorted({cfg.tp} | {t for t in (2, 4, 8) if t > cfg.tp}):
                    changes = [text for changed, text in (
                        (ckpt != cfg.grad_checkpointing, "gradient checkpointing on"),
                        (stage != cfg.zero.stage, "ZeRO-3"), (sp != cfg.sp, f"sp={sp}"), (tp != cfg.tp, f"tp={tp}"),
                    ) if changed]
                    if changes and valid(tp, sp):
                        cost = (len(changes), tp, sp, stage != cfg.zero.stage, ckpt != cfg.grad_checkpointing)
                        new = dataclasses.replace(cfg, grad_checkpointing=ckpt, tp=tp, sp=sp,
                                                  zero=dataclasses.replace(cfg.zero, stage=stage))
                        candidates.append((cost, ", ".join(changes), new))
    out = []
    for _, text, new in sorted(candidates, key=lambda x: x[0]):
        plan = new.plan()
        if plan.fits:
            out.append((text, plan))
            if len(out) >= limit:
                break
    return out


# -------------------------------------------------------------------------------------------- report

def _gib(x: float) -> str:
    return f"{x / GIB:8.2f}"


def format_plan(plan: MemoryPlan, advice: Optional[list[tuple[str, MemoryPlan]]] = None) -> str:
    """The printed table: per role and in total; which columns are exact and which estimates."""
    c = plan.config
    lines = [
        (f"memory plan per GPU: world {c.world_size} = tp {c.tp} x sp {c.sp} x cfg {c.cfg} x dp {c.dp}, "
         f"ZeRO-{c.zero.stage}" + (f" over {c.zero_world} ranks" if c.zero.stage else "") + f", {c.precision}, "
         f"checkpointing {'on' if c.grad_checkpointing else 'off'}, generator: {c.rollout}, batch {c.batch}"),
        (f"ZeRO buffers (elements): reduce bucket {c.zero.reduce_bucket_size:.3g}, prefetch bucket "
         f"{c.zero.prefetch_bucket_size:.3g}, persistence threshold {c.zero.param_persistence_threshold:.3g}, "
         f"max live {c.zero.max_live_parameters:.3g}"),
        plan.sample,
        "",
        (f"{'role':<10} {'preset':<17} {'params(M)':>10} {'local(M)':>9} | {'params':>8} {'grads':>8} "
         f"{'optim':>8} {'zero buf':>8} | {'activ.':>8} {'KV cache':>8} {'gathered':>8}   GiB"),
    ]
    for r in plan.roles:
        act = r.activations.peak
        lines.append(
            f"{r.role:<10} {r.preset:<17} {r.params.total / 1e6:10.1f} {r.params.local_total / 1e6:9.1f} | "
            f"{_gib(r.state.params)} {_gib(r.state.grads)} {_gib(r.state.optimizer)} {_gib(r.state.zero_buffers)} | "
            f"{_gib(act)} {_gib(r.kv_cache)} {_gib(r.gathered)}")
    lines += [
        "",
        f"static (params + grads + optimizer + ZeRO buffers, all models): {plan.static_bytes / GIB:8.2f} GiB  [exact]",
    ]
    for name, b in plan.phases.items():
        mark = "  <- peak" if name == plan.peak_phase else ""
        lines.append(f"  + {name:<17} {b / GIB:8.2f} GiB  [estimate]  = {(plan.static_bytes + b) / GIB:8.2f} GiB{mark}")
    lines += [
        "",
        ("phases: generator update = its rollout's activations + KV cache + its gathered params + the no-grad "
         "critic / teacher / target forwards; critic update = no-grad rollout, then critic forward + backward; "
         "optimizer step = fp32 gradient copies."),
        ("exact: params, grads, optim (fp32 master + AdamW states), zero buf (reduce bucket, ZeRO-3 persistent "
         "params), given DeepSpeed 0.19's partitioning."),
        ("estimates: activations (" + plan.estimates + "), KV cache, gathered ZeRO-3 params, forward "
         "transients. Not counted: CUDA context (~0.5-1 GiB), allocator fragmentation, kernel workspaces."),
        "",
    ]
    if plan.fits:
        lines.append(f"fits in {c.gpu_gib:g} GiB with {plan.headroom_gib:.1f} GiB headroom "
                     f"(peak {plan.peak_bytes / GIB:.1f} GiB)")
    else:
        lines.append(f"does not fit in {c.gpu_gib:g} GiB: needs {plan.peak_bytes / GIB:.1f} GiB")
        if advice:
            lines.append("try: " + "; or ".join(f"{text} ({p.peak_bytes / GIB:.1f} GiB)" for text, p in advice))
        elif advice is not None:
            lines.append("no change of checkpointing / ZeRO stage / sp / tp within this world size fits; "
                         "use more GPUs, a smaller video or batch")
    return "\n".join(lines)
