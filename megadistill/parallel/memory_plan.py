"""Per-GPU memory plan of a distillation run (generator + critic trained, teacher frozen), before it starts.

Two kinds of numbers, kept apart in the output:

- EXACT (given DeepSpeed 0.19's layout): parameters, gradients and optimizer states. Parameter counts come
  from the real module (``build_wan(preset, device="meta")``), split per tensor-parallel rank by the
  TP rule below, then partitioned exactly as DeepSpeed does it: ZeRO-3 pads every parameter to a
  multiple of the partition world and keeps ``ceil(numel / world)`` per rank (partition_parameters.py
  ``_padding_size``); ZeRO-1/2 flatten the whole group, pad it to a multiple of 2 x world
  (stage_1_and_2.py ``nccl_start_alignment_factor``) and keep 1/world of it.
- ESTIMATES: activations (the tensors a Wan block saves for backward, counted term by term from
  blocks.py / attention.py / rope.py / norms.py), KV caches and DeepSpeed's working buffers (gathered
  parameters, buckets), and the no-grad forward transients. They ignore allocator fragmentation, the
  CUDA context (~0.5-1 GiB) and kernel workspaces.

Parallel layout (``mesh.py``): tp x sp x cfg x dp = world; ZeRO partitions every TP shard over the
other ranks (the sequence_data group, world / tp ranks). Ulysses SP splits the tokens of one sample
over sp ranks (padded to a multiple of sp); attention sees all tokens with heads / sp per rank, so
per-rank attention tensors shrink by sp too.

Precision: ``bf16`` is DeepSpeed bf16: every parameter of a DeepSpeed-wrapped model is cast to bf16
(engine ``_cast_module_mixed_precision``), gradients accumulate in bf16 (DeepSpeed's default
``grad_accum_dtype`` = model dtype), fp32 master weights and AdamW's exp_avg / exp_avg_sq live in the
optimizer partition. ``fp32``: fp32 parameters and gradients, and STILL a separate fp32 master
partition: stage3.py's no-copy branch compares a torch.device with a device string, which is never
equal, so DeepSpeed 0.19 clones (measured on CPU; the comparison is the same on CUDA); ZeRO-1/2 clone
by design.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from dataclasses import dataclass, field
from typing import Optional

import torch

from megadistill.models.wan.config import PRESETS, WanConfig, wan_config
from megadistill.parallel.mesh import ParallelConfig
from megadistill.parallel.tensor_parallel import TensorParallelPlan, plan_partition

GIB = 2**30
PRECISIONS = ("bf16", "fp32")
# How the generator's gradient forward runs: "causal" Self-Forcing rollout (block by block against a KV
# cache), "bidirectional" few-step rollout of one clip, "parallel" one full-clip forward without a
# rollout (ODE regression: the block-causal mask over all frames at once).
ROLLOUT_KINDS = ("causal", "bidirectional", "parallel")
ROLES = ("generator", "critic", "teacher")

# Wan VAE strides (frames, height, width): Wan2.1 (16 latent channels) 4x8x8, Wan2.2 TI2V (48) 4x16x16.
VAE_STRIDE_WAN21 = (4, 8, 8)
VAE_STRIDE_WAN22 = (4, 16, 16)

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
class PlanConfig:
    """One run to plan. ``latent``: (F, H, W) latent frames and size; or give ``frames``, ``height``,
    ``width`` in pixels (converted with the generator's VAE stride). Presets: models/wan/config.py;
    ``critic`` / ``teacher`` None = no such model. ``batch``: samples per sample-group (micro batch)."""

    generator: str = "wan2.1-t2v-1.3b"
    critic: Optional[str] = "wan2.1-t2v-1.3b"
    teacher: Optional[str] = "wan2.1-t2v-14b"
    frames: Optional[int] = 81
    height: Optional[int] = 480
    width: Optional[int] = 832
    latent: Optional[tuple[int, int, int]] = None
    batch: int = 1
    world_size: int = 8
    tp: int = 1
    sp: int = 1
    cfg: int = 1
    zero: ZeroSettings = field(default_factory=ZeroSettings)
    grad_checkpointing: bool = True
    precision: str = "bf16"
    rollout: str = "causal"
    num_frame_per_block: int = 3
    local_attn_size: Optional[int] = None  # latent frames of the generator's attention window (None: all)
    sink_size: int = 0
    gpu_gib: float = 80.0

    def __post_init__(self):
        for role, preset in (("generator", self.generator), ("critic", self.critic), ("teacher", self.teacher)):
            if preset is None and role == "generator":
                raise ValueError("generator preset must be set")
            if preset is not None and preset not in PRESETS:
                raise ValueError(f"{role}: unknown Wan preset {preset!r}; known presets: {', '.join(PRESETS)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.rollout not in ROLLOUT_KINDS:
            raise ValueError(f"rollout must be one of {ROLLOUT_KINDS}, got {self.rollout!r}")
        for name in ("batch", "world_size", "num_frame_per_block"):
            _positive_int(name, getattr(self, name))
        if not self.gpu_gib > 0:
            raise ValueError(f"gpu_gib must be > 0, got {self.gpu_gib}")
        parallel = ParallelConfig(tp=self.tp, sp=self.sp, cfg=self.cfg)
        for role, cfg in self.model_configs().items():
            parallel.check(self.world_size, cfg.num_heads, model=f"{role} ({getattr(self, role)})")
            if cfg.ffn_dim % self.tp:
                raise ValueError(f"{role} ({getattr(self, role)}): ffn_dim {cfg.ffn_dim} is not divisible by "
                                 f"tp={self.tp}")
        if self.latent is None:
            for name in ("frames", "height", "width"):
                if getattr(self, name) is None:
                    raise ValueError(f"{name} must be set (or give latent = (F, H, W))")
                _positive_int(name, getattr(self, name))
        else:
            self.latent = tuple(int(s) for s in self.latent)
            if len(self.latent) != 3 or min(self.latent) < 1:
                raise ValueError(f"latent must be three positive ints (F, H, W), got {self.latent}")
        grid = self.latent_grid()  # raises on sizes the VAE / patching cannot take
        if self.rollout == "causal":
            if grid[0] % self.num_frame_per_block:
                raise ValueError(f"{grid[0]} latent frames are not a multiple of num_frame_per_block "
                                 f"({self.num_frame_per_block}) for the causal rollout")
            if self.local_attn_size is not None and self.local_attn_size < self.num_frame_per_block:
                raise ValueError(f"local_attn_size must be >= num_frame_per_block, got {self.local_attn_size}")

    def model_configs(self) -> dict[str, WanConfig]:
        return {role: wan_config(getattr(self, role)) for role in ROLES if getattr(self, role) is not None}

    @property
    def dp(self) -> int:
        return ParallelConfig(tp=self.tp, sp=self.sp, cfg=self.cfg).check(self.world_size)

    @property
    def zero_world(self) -> int:
        """Ranks ZeRO partitions each TP shard over: dp x sp x cfg (mesh.py's sequence_data group)."""
        return self.world_size // self.tp

    def latent_grid(self) -> tuple[int, int, int]:
        gen = wan_config(self.generator)
        if self.latent is not None:
            grid = self.latent
        else:
            grid = latent_grid(self.frames, self.height, self.width, vae_stride(gen))
        token_grid(grid, gen.patch_size)
        return grid


# ------------------------------------------------------------------------------------------- geometry

def vae_stride(cfg: WanConfig) -> tuple[int, int, int]:
    """VAE compression (frames, height, width) of the model's latent space: the Wan2.2 VAE (48 latent
    channels, TI2V 5B) compresses 4x16x16, the Wan2.1 VAE (16 channels) 4x8x8."""
    return VAE_STRIDE_WAN22 if cfg.out_dim == 48 else VAE_STRIDE_WAN21


def latent_grid(frames: int, height: int, width: int, stride: tuple[int, int, int]) -> tuple[int, int, int]:
    """Pixel video -> latent (F, H, W): the causal VAE keeps the first frame and packs every ``st``
    following ones, so frames must be 1 + k st; height and width must be multiples of their stride."""
    st, sh, sw = stride
    if (frames - 1) % st:
        raise ValueError(f"frames must be 1 + {st} k (the VAE packs {st} frames after the first), got {frames}")
    if height % sh or width % sw:
        raise ValueError(f"height and width must be multiples of {sh} and {sw} (VAE stride), got {height}x{width}")
    return 1 + (frames - 1) // st, height // sh, width // sw


def token_grid(latent: tuple[int, int, int], patch: tuple[int, int, int]) -> tuple[int, int, int]:
    """Latent (F, H, W) -> DiT token grid, each dim divided by the patch size (must divide)."""
    if any(s % p for s, p in zip(latent, patch)):
        raise ValueError(f"latent size {tuple(latent)} must be a multiple of the patch size {tuple(patch)}")
    return tuple(s // p for s, p in zip(latent, patch))


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


@functools.lru_cache(maxsize=None)
def _meta_model(preset: str) -> torch.nn.Module:
    from megadistill.models.wan.model import build_wan

    return build_wan(preset, device="meta")


@functools.lru_cache(maxsize=None)
def model_parameters(preset: str, tp: int = 1) -> ModelParams:
    """ModelParams of a Wan preset, built (once) on the meta device: no memory, real module structure."""
    from megadistill.models.wan.parallelize import TP_PLAN

    return count_parameters(_meta_model(preset), tp, preset, TP_PLAN)


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

@dataclass(frozen=True)
class BlockShape:
    """One block call on one rank: ``q_tokens`` query tokens of the sample (all ranks of the SP group
    together, padded to a multiple of sp), ``kv_tokens`` key/value tokens self-attention sees,
    ``ctx_tokens`` text tokens; sizes of the model."""

    q_tokens: int
    kv_tokens: int
    ctx_tokens: int
    dim: int
    ffn_dim: int
    num_heads: int


def sp_tokens(tokens: int, sp: int) -> int:
    """Tokens after Ulysses padding (to a multiple of sp); each rank holds 1/sp of them."""
    return -(-tokens // sp) * sp


def block_saved_bytes(s: BlockShape, tp: int, sp: int, compute_bytes: int, per_token_modulation: bool) -> float:
    """ESTIMATE of the bytes one Wan block saves for backward, per rank and sample (blocks.py as
    written: residual stream float32, projections in the compute dtype c; checked term by term
    against the tensors autograd saves, ``saved_tensors_hooks``).

    Per query token, in channels x bytes:
      residual stream, full width on every TP rank (/ sp):
        norm1 input 4, modulate(norm1) 4, its cast for q/k/v c, y.float() for the gate 4,
        norm3 input 4, its cast for cross q c, norm2 input 4, modulate(norm2) 4, its cast for ffn c,
        ffn output .float() for the gate 4                                       -> 32 + 3c
      self-attention, head-split (/ tp sp): q and k RMSNorm (float32 copy 4 + normalised c) x2,
        SDPA q c and output c (the o projection reads the output in place)     -> 8 + 4c
        plus keys/values c x2 per KEY token (kv_tokens; the cached past in block-causal steps)
      cross-attention, head-split: q RMSNorm 4 + c, SDPA q c, output c           -> 4 + 3c
        plus per text token: k RMSNorm 4 + c, SDPA k, v c x2                       -> 4 + 3c
      FFN hidden (/ tp sp): GELU input c + output c per ffn channel              -> 2c ffn_dim
      per-token timesteps (TI2V): the block's float32 [L, 6, dim] modulation sum and two (1 + scale)
        tensors                                                                    -> 32
    RoPE saves only its (shared) table: ``rope_table_bytes``. Softmax statistics: 4 bytes per head
    and token. SDPA is assumed to be a flash kernel (no L x L matrix saved).
    """
    c = compute_bytes
    tok, kv, ctx = s.q_tokens / sp, s.kv_tokens / sp, s.ctx_tokens
    d, f, heads = s.dim, s.ffn_dim, s.num_heads
    residual = (32 + 3 * c) * d * tok
    self_attn = (8 + 4 * c) * d / tp * tok + 2 * c * d / tp * kv + 4 * heads / tp * tok
    cross = (4 + 3 * c) * d / tp * tok + (4 + 3 * c) * d / tp * ctx + 4 * heads / tp * tok
    ffn = 2 * c * f / tp * tok
    modulation = 32 * d * tok if per_token_modulation else 0
    return residual + self_attn + cross + ffn + modulation


def outside_blocks_saved_bytes(cfg: WanConfig, tokens: int, sp: int, compute_bytes: int) -> float:
    """ESTIMATE of what one forward call saves outside the blocks: the head's float32 norm input,
    modulated input and Linear input (12 bytes per channel and token), the complex128 RoPE table all
    blocks share (8 bytes per head channel and token) and, with bf16 parameters, the float32 copies
    of the time MLP and head weights that ``run_fp32`` / FP32Linear make on every call."""
    d = cfg.dim
    fp32_copies = 0
    if compute_bytes != 4:
        fp32_copies = 4 * (cfg.freq_dim * d + d * d + 6 * d * d + d * cfg.out_dim * math.prod(cfg.patch_size))
    return (12 * d + 8 * cfg.head_dim) * tokens / sp + fp32_copies


@dataclass(frozen=True)
class Activations:
    """ESTIMATE of a model's activation memory per rank: ``saved`` (kept from forward to backward),
    ``recompute`` (one block's saved set rebuilt during backward under checkpointing)."""

    saved: float = 0.0
    recompute: float = 0.0

    @property
    def peak(self) -> float:
        return self.saved + self.recompute


def bidirectional_activations(cfg: WanConfig, tokens: int, batch: int, tp: int, sp: int, compute_bytes: int,
                              checkpointing: bool) -> Activations:
    """Forward + backward of a full clip (critic / bidirectional generator). With checkpointing each
    block keeps only its input (float32 residual, 4 bytes per channel) and one block is recomputed
    at a time during backward."""
    L = sp_tokens(tokens, sp)
    shape = BlockShape(L, L, cfg.text_len, cfg.dim, cfg.ffn_dim, cfg.num_heads)
    per_block = block_saved_bytes(shape, tp, sp, compute_bytes, cfg.model_type == "ti2v")
    outside = outside_blocks_saved_bytes(cfg, L, sp, compute_bytes)
    if checkpointing:
        inputs = 4 * cfg.dim * L / sp * cfg.num_layers
        return Activations(batch * (inputs + outside), batch * per_block)
    return Activations(batch * (per_block * cfg.num_layers + outside))


def causal_activations(cfg: WanConfig, frame_tokens: int, frames: int, frames_per_block: int, batch: int,
                       tp: int, sp: int, compute_bytes: int, checkpointing: bool,
                       window_frames: Optional[int] = None, sink_frames: int = 0) -> Activations:
    """Self-Forcing rollout of the generator: every block's exit step runs with gradient (the
    gradient window covers the whole video, upstream's default), attending to the cached past
    (at most sink + window frames) plus itself; the other steps run under no_grad.

    Without checkpointing each block call saves its block's activations with the keys/values of
    past + own tokens (``torch.cat``, kv_cache.py). With checkpointing it saves its input and one
    block is recomputed at a time during backward; the snapshot of the visible past it keeps for the
    recomputation is a view of the cache (copy-on-write, kv_cache.py), copied only when a local
    window's eviction later shifts the rows under it (then at most sink + window frames per layer).
    """
    blocks = frames // frames_per_block
    q = frames_per_block * frame_tokens
    evicts = window_frames is not None and blocks * frames_per_block > sink_frames + window_frames
    saved, biggest = 0.0, 0.0
    for j in range(blocks):
        past_frames = j * frames_per_block
        if window_frames is not None:
            past_frames = min(past_frames, sink_frames + window_frames - frames_per_block)
        kv = q + past_frames * frame_tokens
        shape = BlockShape(sp_tokens(q, sp), sp_tokens(kv, sp), cfg.text_len, cfg.dim, cfg.ffn_dim, cfg.num_heads)
        per_block = block_saved_bytes(shape, tp, sp, compute_bytes, cfg.model_type == "ti2v")
        outside = outside_blocks_saved_bytes(cfg, sp_tokens(q, sp), sp, compute_bytes)
        if checkpointing:
            copied = evicts and j < blocks - 1 and past_frames > sink_frames
            snapshot = copied * 2 * compute_bytes * cfg.dim / tp * sp_tokens(past_frames * frame_tokens, sp) / sp
            saved += (4 * cfg.dim * sp_tokens(q, sp) / sp + snapshot) * cfg.num_layers + outside
            biggest = max(biggest, per_block)
        else:
            saved += per_block * cfg.num_layers + outside
    return Activations(batch * saved, batch * biggest)


def kv_cache_bytes(cfg: WanConfig, frame_tokens: int, cache_frames: int, batch: int, tp: int, sp: int,
                   compute_bytes: int) -> float:
    """Causal rollout caches per rank: self-attention k and v of every layer over ``cache_frames``
    frames (heads split over tp x sp), plus the cross-attention cache (text k, v per layer; heads
    split over tp only)."""
    self_kv = cfg.num_layers * 2 * batch * sp_tokens(cache_frames * frame_tokens, sp) * cfg.dim / (tp * sp)
    cross_kv = cfg.num_layers * 2 * batch * cfg.text_len * cfg.dim / tp
    return compute_bytes * (self_kv + cross_kv)


def nograd_forward_bytes(cfg: WanConfig, tokens: int, batch: int, tp: int, sp: int, compute_bytes: int) -> float:
    """ESTIMATE of a no-grad forward's transient peak (teacher, critic's fake score, no-grad rollout
    steps): the float32 residual, its normalised / modulated copies and the FFN hidden of one block."""
    L = sp_tokens(tokens, sp) / sp
    return batch * L * (4 * 4 * cfg.dim + 2 * compute_bytes * cfg.ffn_dim / tp)


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
    config: PlanConfig
    grid: tuple[int, int, int]  # latent (F, H, W)
    tokens: int
    roles: list[RolePlan]
    phases: dict[str, float]  # dynamic bytes of each phase of a step (estimates)

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


def plan_memory(cfg: PlanConfig) -> MemoryPlan:
    """The per-GPU memory plan of ``cfg``.

    Phases of one distillation step (each adds to the static state of all three models):
      generator update: the rollout's saved activations + KV cache, then the no-grad critic and
        teacher scores (their ZeRO-3 working sets and forward transients; the cache is gone by then
        but the activations are not, counted together as an upper bound);
      critic update (methods with a critic): the no-grad rollout (KV cache), then the critic's
        forward + backward;
      optimizer step: fp32 gradient copies.
    The generator's gradient forward is the causal rollout (``causal_activations``) or one full
    clip (``bidirectional`` rollout, ``parallel`` ODE regression: ``bidirectional_activations``).
    """
    c = cfg
    grid = c.latent_grid()
    gen_cfg = wan_config(c.generator)
    tgrid = token_grid(grid, gen_cfg.patch_size)
    frame_tokens, tokens = tgrid[1] * tgrid[2], tgrid[0] * tgrid[1] * tgrid[2]
    cb, world = param_bytes(c.precision), c.zero_world
    roles = []
    for role, mcfg in c.model_configs().items():
        preset = getattr(c, role)
        mp = model_parameters(preset, c.tp)
        trained = role != "teacher"
        state = (trained_state_bytes if trained else frozen_state_bytes)(mp, c.precision, c.zero, world)
        rp = RolePlan(role, preset, mp, state, trained,
                      gathered=zero3_gathered_bytes(mp, c.precision, c.zero, trained, world),
                      nograd=nograd_forward_bytes(mcfg, tokens, c.batch, c.tp, c.sp, cb),
                      step_transient=optimizer_step_transient_bytes(state, c.precision, c.zero) if trained else 0)
        if role == "generator" and c.rollout == "causal":
            window = c.local_attn_size
            rp.activations = causal_activations(mcfg, frame_tokens, tgrid[0], c.num_frame_per_block, c.batch, c.tp,
                                                c.sp, cb, c.grad_checkpointing, window, c.sink_size)
            cache_frames = tgrid[0] if window is None else c.sink_size + window
            rp.kv_cache = kv_cache_bytes(mcfg, frame_tokens, cache_frames, c.batch, c.tp, c.sp, cb)
        elif trained:
            rp.activations = bidirectional_activations(mcfg, tokens, c.batch, c.tp, c.sp, cb, c.grad_checkpointing)
        roles.append(rp)

    by = {r.role: r for r in roles}
    gen = by["generator"]
    scorers = [by[r] for r in ("critic", "teacher") if r in by]
    score = max((r.gathered + r.nograd for r in scorers), default=0.0)
    phases = {"generator update": gen.activations.peak + gen.kv_cache + gen.gathered + max(score, gen.nograd)}
    if "critic" in by:
        critic = by["critic"]
        phases["critic update"] = max(gen.kv_cache + gen.gathered + gen.nograd,
                                      critic.activations.peak + critic.gathered + critic.nograd)
    phases["optimizer step"] = float(max(r.step_transient for r in roles))
    return MemoryPlan(c, grid, tokens, roles, phases)


# -------------------------------------------------------------------------------------------- advice

def suggestions(cfg: PlanConfig, limit: int = 3) -> list[tuple[str, MemoryPlan]]:
    """Cheapest changes that make a plan fit: activation checkpointing, ZeRO-3, larger sp, larger tp
    (within the head counts and the world size), alone or combined; fewer changes first, then
    checkpointing (recompute only) before ZeRO-3 (communication) before sp before tp (per-layer
    all-reduces on the critical path)."""
    models = cfg.model_configs().values()

    def valid(tp, sp):
        return (all(m.num_heads % (tp * sp) == 0 and m.ffn_dim % tp == 0 for m in models)
                and cfg.world_size % (tp * sp * cfg.cfg) == 0)

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
        plan = plan_memory(new)
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
    F, H, W = plan.grid
    lines = [
        (f"memory plan per GPU: world {c.world_size} = tp {c.tp} x sp {c.sp} x cfg {c.cfg} x dp {c.dp}, "
         f"ZeRO-{c.zero.stage}" + (f" over {c.zero_world} ranks" if c.zero.stage else "") + f", {c.precision}, "
         f"checkpointing {'on' if c.grad_checkpointing else 'off'}, generator: {c.rollout}, batch {c.batch}"),
        (f"ZeRO buffers (elements): reduce bucket {c.zero.reduce_bucket_size:.3g}, prefetch bucket "
         f"{c.zero.prefetch_bucket_size:.3g}, persistence threshold {c.zero.param_persistence_threshold:.3g}, "
         f"max live {c.zero.max_live_parameters:.3g}"),
        (f"video: latent {F}x{H}x{W}" + (f" (pixels {c.frames}x{c.height}x{c.width})" if c.latent is None else "")
         + f" -> {plan.tokens} tokens per sample ({-(-plan.tokens // c.sp)} per SP rank)"),
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
         "critic / teacher scores; critic update = no-grad rollout, then critic forward + backward; "
         "optimizer step = fp32 gradient copies."),
        ("exact: params, grads, optim (fp32 master + AdamW states), zero buf (reduce bucket, ZeRO-3 persistent "
         "params), given DeepSpeed 0.19's partitioning."),
        ("estimates: activations (saved tensors of each Wan block; with checkpointing block inputs + one "
         "recomputed block), KV cache, gathered ZeRO-3 params, forward transients. Not counted: CUDA context "
         "(~0.5-1 GiB), allocator fragmentation, kernel workspaces. Measured on an H100 "
         "(tools/bench_wan_step.py, Wan 1.3B, 240p-480p): peak allocated ran 2.3-4.1 GiB above the activation "
         "estimate; keep that much headroom."),
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


def plan_from_experiment(path: str, **fields) -> PlanConfig:
    """A PlanConfig from an experiment YAML of a Wan-family distill run (models, latent shape, micro
    batch, precision, checkpointing, rollout); ``fields`` (PlanConfig fields: world_size, tp, zero, ...)
    override or complete it. An empty generator / critic preset is the teacher's (as in the job)."""
    from megadistill.config import load_config
    from megadistill.experiment import ExperimentConfig
    from megadistill.methods import method_needs
    from megadistill.models.wan.run_config import DEMO

    exp = load_config(ExperimentConfig, path)
    if exp.job != "distill" or exp.model.family != "wan":
        raise ValueError(f"{path}: the memory plan covers Wan-family distill runs, got job {exp.job!r} with "
                         f"model.family {exp.model.family!r}")
    model, rollout = exp.model, exp.rollout

    def preset(m):
        if m.preset == DEMO:
            raise ValueError(f"{path}: the demo model has no preset to plan; set a Wan preset")
        return m.preset or model.teacher.preset

    def overrides(m):  # a model without its own preset is rebuilt from the teacher's config (networks.derive_model)
        return m.overrides if m.preset else {**model.teacher.overrides, **m.overrides}

    need = method_needs(exp.method.name, exp.method.config)  # what the method class declares
    trained = (model.generator, model.critic) if need.critic else (model.generator,)
    ckpt = all(bool(overrides(m).get("grad_checkpointing", False)) for m in trained)
    base = dict(
        generator=preset(model.generator), critic=preset(model.critic) if need.critic else None,
        teacher=preset(model.teacher) if need.teacher else None,
        latent=tuple(exp.data.latent_shape[1:]), frames=None, height=None, width=None,
        batch=exp.train.micro_batch_size, precision=exp.train.precision, grad_checkpointing=ckpt,
        rollout="parallel" if need.generator_forward == "parallel" else rollout.kind,
        num_frame_per_block=rollout.num_frame_per_block,
        local_attn_size=rollout.local_attn_size, sink_size=rollout.sink_size,
    )
    base.update(fields)
    return PlanConfig(**base)
