"""The Wan half of the memory planner: Wan presets and video sizes in, per-role footprints out.

``PlanConfig`` (a ``RunLayout`` with the models as Wan presets and the video in pixels or latents)
plans with ``plan_memory``: exact parameter counts from each preset built on the meta device and split
by Wan's ``TP_PLAN`` (parallel/memory_plan.py does DeepSpeed's partitioning and the phases of a step),
and ESTIMATES of what a Wan block saves for backward, counted term by term from blocks.py /
attention.py / rope.py / norms.py, of the KV caches and of the no-grad forward transients.
``plan_from_experiment`` reads an experiment YAML; what the method needs (teacher, critic, target,
generator forward) comes from its class.

Ulysses SP splits the tokens of one sample over sp ranks (padded to a multiple of sp); attention sees
all tokens with heads / sp per rank, so per-rank attention tensors shrink by sp too.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch

from megadistill.models.wan.config import PRESETS, WanConfig, wan_config
from megadistill.parallel.memory_plan import (Activations, MemoryPlan, ModelParams, RunLayout, count_parameters,
                                              role_plan, sp_tokens, step_phases)
from megadistill.parallel.mesh import ParallelConfig

ROLES = ("generator", "critic", "teacher", "target")

# Wan VAE strides (frames, height, width): Wan2.1 (16 latent channels) 4x8x8, Wan2.2 TI2V (48) 4x16x16.
VAE_STRIDE_WAN21 = (4, 8, 8)
VAE_STRIDE_WAN22 = (4, 16, 16)

ESTIMATES = ("saved tensors of each Wan block; with checkpointing block inputs + one recomputed block. "
             "Measured on an H100 (tools/bench_wan_step.py, Wan 1.3B, 240p-480p): peak allocated ran 2.3-4.1 GiB "
             "above the activation estimate; keep that much headroom")


def _positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


@dataclass
class PlanConfig(RunLayout):
    """One run to plan. ``latent``: (F, H, W) latent frames and size; or give ``frames``, ``height``,
    ``width`` in pixels (converted with the generator's VAE stride). Presets: models/wan/config.py;
    ``critic`` / ``teacher`` / ``target`` None = no such model (``target``: a frozen copy of the
    generator, for methods that declare ``needs_target``). The run's layout fields: ``RunLayout``."""

    generator: str = "wan2.1-t2v-1.3b"
    critic: Optional[str] = "wan2.1-t2v-1.3b"
    teacher: Optional[str] = "wan2.1-t2v-14b"
    target: Optional[str] = None
    frames: Optional[int] = 81
    height: Optional[int] = 480
    width: Optional[int] = 832
    latent: Optional[tuple[int, int, int]] = None
    num_frame_per_block: int = 3
    local_attn_size: Optional[int] = None  # latent frames of the generator's attention window (None: all)
    sink_size: int = 0

    def __post_init__(self):
        self.check_layout()
        for role in ROLES:
            preset = getattr(self, role)
            if preset is None and role == "generator":
                raise ValueError("generator preset must be set")
            if preset is not None and preset not in PRESETS:
                raise ValueError(f"{role}: unknown Wan preset {preset!r}; known presets: {', '.join(PRESETS)}")
        _positive_int("num_frame_per_block", self.num_frame_per_block)
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

    def latent_grid(self) -> tuple[int, int, int]:
        gen = wan_config(self.generator)
        if self.latent is not None:
            grid = self.latent
        else:
            grid = latent_grid(self.frames, self.height, self.width, vae_stride(gen))
        token_grid(grid, gen.patch_size)
        return grid

    def plan(self) -> MemoryPlan:
        return plan_memory(self)

    def layout_fits(self, tp: int, sp: int) -> bool:
        return all(m.num_heads % (tp * sp) == 0 and m.ffn_dim % tp == 0 for m in self.model_configs().values())


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

@functools.lru_cache(maxsize=None)
def _meta_model(preset: str) -> torch.nn.Module:
    from megadistill.models.wan.model import build_wan

    return build_wan(preset, device="meta")


@functools.lru_cache(maxsize=None)
def model_parameters(preset: str, tp: int = 1) -> ModelParams:
    """ModelParams of a Wan preset, built (once) on the meta device: no memory, real module structure."""
    from megadistill.models.wan.parallelize import TP_PLAN

    return count_parameters(_meta_model(preset), tp, preset, TP_PLAN)

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

def plan_memory(cfg: PlanConfig) -> MemoryPlan:
    """The per-GPU memory plan of ``cfg`` (phases: ``parallel.memory_plan.step_phases``).
    The generator's gradient forward is the causal rollout (``causal_activations``) or one full
    clip (``bidirectional`` rollout, ``parallel`` ODE regression: ``bidirectional_activations``).
    """
    c = cfg
    grid = c.latent_grid()
    gen_cfg = wan_config(c.generator)
    tgrid = token_grid(grid, gen_cfg.patch_size)
    frame_tokens, tokens = tgrid[1] * tgrid[2], tgrid[0] * tgrid[1] * tgrid[2]
    cb = 2 if c.precision == "bf16" else 4
    roles = []
    for role, mcfg in c.model_configs().items():
        preset = getattr(c, role)
        mp = model_parameters(preset, c.tp)
        activations, kv_cache = Activations(), 0.0
        if role == "generator" and c.rollout == "causal":
            window = c.local_attn_size
            activations = causal_activations(mcfg, frame_tokens, tgrid[0], c.num_frame_per_block, c.batch, c.tp,
                                             c.sp, cb, c.grad_checkpointing, window, c.sink_size)
            cache_frames = tgrid[0] if window is None else c.sink_size + window
            kv_cache = kv_cache_bytes(mcfg, frame_tokens, cache_frames, c.batch, c.tp, c.sp, cb)
        elif role in ("generator", "critic"):
            activations = bidirectional_activations(mcfg, tokens, c.batch, c.tp, c.sp, cb, c.grad_checkpointing)
        roles.append(role_plan(role, preset, mp, c, activations=activations, kv_cache=kv_cache,
                               nograd=nograd_forward_bytes(mcfg, tokens, c.batch, c.tp, c.sp, cb)))
    F, H, W = grid
    sample = (f"video: latent {F}x{H}x{W}" + (f" (pixels {c.frames}x{c.height}x{c.width})" if c.latent is None else "")
              + f" -> {tokens} tokens per sample ({-(-tokens // c.sp)} per SP rank)")
    return MemoryPlan(c, grid, tokens, roles, step_phases(roles), sample=sample, estimates=ESTIMATES)


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
        target=preset(model.generator) if need.target else None,
        latent=tuple(exp.data.latent_shape[1:]), frames=None, height=None, width=None,
        batch=exp.train.micro_batch_size, precision=exp.train.precision, grad_checkpointing=ckpt,
        rollout="parallel" if need.generator_forward == "parallel" else rollout.kind,
        num_frame_per_block=rollout.num_frame_per_block,
        local_attn_size=rollout.local_attn_size, sink_size=rollout.sink_size,
    )
    base.update(fields)
    return PlanConfig(**base)
