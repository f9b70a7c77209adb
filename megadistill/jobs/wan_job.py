"""The ``wan`` job: distill a Wan teacher into a few-step (causal or bidirectional) student through
the DeepSpeed trainer, then evaluate and write samples.

Models: the teacher loads from ``wan.teacher`` (the shipped demo teacher for preset ``demo``); the
generator and the critic start from their own checkpoints or, by default, from the teacher's
weights. The generator runs block-causally (``wan.rollout.kind: causal``, Self-Forcing) or
bidirectionally; teacher and critic are bidirectional. Prompts are encoded once at start (every rank
encodes the same list) and the trainer draws prompt indices per rank.

Methods: DMD / SiD (teacher + critic), GAN (critic with register heads), and the ODE-init stage of a
causal student: ODE regression on stored teacher trajectories, or causal diffusion (diffusion /
teacher forcing) on real clean latents (the clean ends of ``wan.data.ode_pairs``, or the demo's
videos), which uses neither teacher nor critic (the teacher still provides the initial weights and
the demo evaluation).

Parallelism (``parallel: {tp, sp, cfg}``): Wan checkpoints load on the meta device straight into this
rank's tensor-parallel shards (``models/wan/loading.py``: no random init, no full copy per rank) and,
under ZeRO-3, each block is partitioned over the mesh's sequence_data group as soon as it is read;
then ``parallelize_wan`` applies Ulysses sequence parallelism (and splits the demo's small models,
which load whole). With ``cfg: 2`` the frozen
teacher's guided calls run the conditional pass on one rank of each cfg group and the unconditional
pass on the other (``teacher_denoiser``); only DMD and SiD with a guidance that is not the identity
call a guided teacher, so any other cfg = 2 run is refused (``check_parallel``). All ranks of one
tp x sp x cfg group work on one sample: the data stream and every per-rank random stream are seeded
from the dp rank. The GAN critic's block features are gathered over the SP group (models/wan/discriminator.py).

Evaluation (demo teacher): before training, on rank 0, the teacher's ``teacher_steps``-step samples
(the reference), a second reference set from other noise (the floor of the distance) and the
undistilled teacher at the student's step count; after training the student's samples (EMA weights
when the EMA has started) from the same noise. The final line compares the student's distance to the
reference with the undistilled teacher's, and a side-by-side MP4 is written.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from megadistill.engine.data_source import SeededBatchSource
from megadistill.engine.engines import full_state_dict, init_distributed, load_full_state_dict, zero3_partitioner
from megadistill.engine.trainer import Trainer
from megadistill.config import to_dict
from megadistill.experiment import DEMO, ExperimentConfig, WanJobConfig, WanModelConfig
from megadistill.methods import get_method, method_needs
from megadistill.methods.base import DistillBatch, MethodNeeds
from megadistill.models.wan import build_wan, load_wan_checkpoint
from megadistill.parallel.cfg_parallel import cfg_parallel
from megadistill.parallel.mesh import ParallelMesh
from megadistill.models.wan.loading import load_wan
from megadistill.parallel.parallelize import check_parallel_sizes, parallelize_wan, tensor_parallel_layout
from megadistill.models.wan.denoiser import WanCondition, WanDenoiser

log = logging.getLogger("megadistill.wan_job")
RESULT_FILE = "result.json"


def needs(cfg: ExperimentConfig) -> MethodNeeds:
    """What the configured method needs (declared by its class)."""
    return method_needs(cfg.method.name, cfg.method.config)


# ---------------------------------------------------------------------------------------- models
def load_teacher(cfg: WanModelConfig, mesh: Optional[ParallelMesh] = None, dtype: Optional[torch.dtype] = None,
                 partition=None) -> tuple[nn.Module, Optional[dict]]:
    """The teacher network and, for the demo teacher, its sampling settings. A Wan preset is built on
    the meta device and each rank reads only its tensor-parallel shards of the checkpoint
    (models/wan/loading.py): no random init, never the full model on a rank when tp > 1."""
    if cfg.preset == DEMO:
        from megadistill.demo.teacher import load_demo_teacher

        model, settings = load_demo_teacher(cfg.checkpoint or None)
        if cfg.overrides:
            model = _rebuild(model, **cfg.overrides)
        return model, settings
    return load_wan(cfg.preset, cfg.checkpoint, tp_group=_tp_group(mesh), dtype=dtype, partition=partition,
                    **cfg.overrides), None


def _tp_group(mesh: Optional[ParallelMesh]):
    return None if mesh is None else mesh.tp_group


def _rebuild(model: nn.Module, **overrides) -> nn.Module:
    """A copy of ``model`` with WanConfig fields changed (attention mode, checkpointing): the fields
    that do not change the parameters, so the weights carry over exactly."""
    new = build_wan(model.config.replace(**overrides))
    new.load_state_dict(model.state_dict())
    return new


def derive_model(cfg: WanModelConfig, teacher_cfg: WanModelConfig, teacher: nn.Module,
                 mesh: Optional[ParallelMesh] = None, partition=None, **mode) -> nn.Module:
    """Generator / critic: the teacher's architecture and weights unless ``cfg`` names others. A Wan
    architecture loads from a checkpoint file (cfg's own, else the teacher's, read again rather than
    copied from a teacher that may be bf16 and already split) straight into this rank's TP shards."""
    if cfg.preset and cfg.preset != DEMO:  # check_inputs made sure its checkpoint is given
        return load_wan(cfg.preset, cfg.checkpoint, tp_group=_tp_group(mesh), partition=partition,
                        **{**cfg.overrides, **mode})
    if teacher_cfg.preset != DEMO:
        return load_wan(teacher_cfg.preset, cfg.checkpoint or teacher_cfg.checkpoint, tp_group=_tp_group(mesh),
                        partition=partition, **{**teacher_cfg.overrides, **cfg.overrides, **mode})
    model = _rebuild(teacher, **{**cfg.overrides, **mode})
    if cfg.checkpoint:
        load_wan_checkpoint(model, cfg.checkpoint)
    return model


def generator_mode(job: WanJobConfig) -> Dict[str, Any]:
    r = job.rollout
    if r.kind == "bidirectional":
        return {"num_frame_per_block": None}
    return {"num_frame_per_block": r.num_frame_per_block, "local_attn_size": r.local_attn_size,
            "sink_size": r.sink_size}


# ---------------------------------------------------------------------------------------- text
@dataclass
class PromptSet:
    prompts: List[str]
    context: torch.Tensor  # [N, Lt, text_dim]
    negative: torch.Tensor  # [1, Lt, text_dim]
    first_frames: Optional[torch.Tensor] = None  # [N, C, 1, H, W] TI2V image latents

    def condition(self, idx: torch.Tensor) -> WanCondition:
        first = self.first_frames[idx] if self.first_frames is not None else None
        return WanCondition(self.context[idx], first_frame=first)

    def uncondition(self, idx: torch.Tensor) -> WanCondition:
        """CFG's unconditional branch: the negative prompt, the same image conditioning."""
        first = self.first_frames[idx] if self.first_frames is not None else None
        return WanCondition(self.negative.expand(len(idx), -1, -1), first_frame=first)


def load_first_frames(path: str, num_prompts: int, latent_shape: Sequence[int]) -> torch.Tensor:
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"wan.data.first_frames: file not found: {path}")
    tensors = load_file(path)
    if "latents" not in tensors:
        raise ValueError(f"wan.data.first_frames: {path} has no 'latents' tensor (has {sorted(tensors)})")
    latents = tensors["latents"].float()
    c, _, h, w = latent_shape
    if latents.shape != (num_prompts, c, 1, h, w):
        raise ValueError(f"wan.data.first_frames: latents are {list(latents.shape)}, expected one image latent "
                         f"per prompt [{num_prompts}, {c}, 1, {h}, {w}]")
    return latents


def read_prompts(path: str) -> List[str]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"wan.data.prompts: prompt file not found: {path}")
    with open(path) as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ValueError(f"wan.data.prompts: {path} holds no prompts")
    return prompts


def encode_prompts(job: WanJobConfig) -> PromptSet:
    prompt_set = _encode(job)
    if job.data.first_frames:
        prompt_set.first_frames = load_first_frames(job.data.first_frames, len(prompt_set.prompts), job.latent_shape)
    return prompt_set


def _encode(job: WanJobConfig) -> PromptSet:
    data = job.data
    if data.text_encoder == DEMO:
        from megadistill.demo.videos import all_prompts

        return encode_prompt_list(job, read_prompts(data.prompts) if data.prompts else all_prompts())
    if not data.prompts:
        raise ValueError("wan.data.prompts is required with a umT5 text encoder")
    from megadistill.models.wan.config import wan_config

    text_len = wan_config(job.teacher.preset, **job.teacher.overrides).text_len
    return encode_prompt_list(job, read_prompts(data.prompts), text_len)


def encode_prompt_list(job: WanJobConfig, prompts: List[str], text_len: Optional[int] = None) -> PromptSet:
    """``prompts`` and ``wan.data.negative_prompt`` encoded by the run's text encoder: the demo's, or
    umT5 from a local folder to ``text_len`` tokens (the DiT's; Wan: 512), bf16 on GPU as upstream,
    float32 on CPU."""
    data = job.data
    if data.text_encoder == DEMO:
        from megadistill.demo.text import PromptEncoder

        encoder = PromptEncoder()
        return PromptSet(prompts, encoder.encode(prompts), encoder.encode([data.negative_prompt]))
    from megadistill.models.wan.text_encoder import WanTextEncoder

    encoder = WanTextEncoder.from_pretrained(data.text_encoder, negative_prompt=data.negative_prompt, text_len=text_len,
                                             dtype="bfloat16" if torch.cuda.is_available() else "float32")
    context = torch.cat([encoder.encode(prompts[i:i + 16]) for i in range(0, len(prompts), 16)])
    return PromptSet(prompts, context.float(), encoder.negative_embedding(1).float())


# ---------------------------------------------------------------------------------------- data
class PromptBatches:
    """``make_batch(generator)`` for the trainer's SeededBatchSource: prompt indices drawn per rank,
    plus the real videos a GAN critic needs (demo: rendered for the drawn prompts)."""

    def __init__(self, prompts: PromptSet, job: WanJobConfig, micro_batch: int, needs_real: bool):
        self.prompts, self.job, self.micro = prompts, job, micro_batch
        self.needs_real = needs_real

    def __call__(self, generator: torch.Generator) -> DistillBatch:
        idx = torch.randint(0, len(self.prompts.prompts), (self.micro,), generator=generator)
        real = None
        if self.needs_real:
            from megadistill.demo.videos import render_videos

            real = render_videos([self.prompts.prompts[i] for i in idx.tolist()], generator)
        return DistillBatch(
            cond=self.prompts.condition(idx), uncond=self.prompts.uncondition(idx), batch_size=self.micro,
            sample_shape=tuple(self.job.latent_shape), real=real,
        )


# ---------------------------------------------------------------------------------------- rollout
def build_rollout(job: WanJobConfig, shared: torch.Generator, noise: torch.Generator):
    r = job.rollout
    if r.kind == "causal":
        from megadistill.rollout.self_forcing import SelfForcingRollout

        return SelfForcingRollout(r.steps, r.self_forcing, generator=shared, noise_generator=noise)
    from megadistill.rollout.bidirectional import BidirectionalRollout

    return BidirectionalRollout(r.steps, generator=shared, noise_generator=noise)


def generate(job: WanJobConfig, denoiser: WanDenoiser, cond: WanCondition, noise: torch.Tensor,
             generator: torch.Generator) -> torch.Tensor:
    """Few-step inference with the training step list (causal streaming or bidirectional)."""
    r = job.rollout
    if r.kind == "causal":
        from megadistill.rollout.causal_inference import causal_generate

        return causal_generate(denoiser, cond, noise, r.steps, generator,
                               context_noise=r.self_forcing.context_noise, refresh=r.inference_refresh)
    from megadistill.rollout.bidirectional import bidirectional_generate

    return bidirectional_generate(denoiser, cond, noise, r.steps, generator)


# ---------------------------------------------------------------------------------------- method
def teacher_denoiser(teacher: nn.Module, mesh: Optional[ParallelMesh] = None):
    """The frozen teacher as the methods see it: a WanDenoiser whose guided calls (``x0_guided`` /
    ``flow_guided``) split the conditional and unconditional passes over ``mesh.cfg_group`` when
    parallel.cfg = 2 (parallel/cfg_parallel.py); the plain WanDenoiser otherwise."""
    return cfg_parallel(WanDenoiser(teacher), mesh.cfg_group if mesh is not None else None)


def build_method(cfg: ExperimentConfig, generator: nn.Module, teacher: nn.Module, critic: nn.Module, rollout,
                 rng: torch.Generator, mesh: Optional[ParallelMesh] = None):
    """The configured method on Wan denoisers (GAN: register heads on the critic's blocks; ODE
    regression: the student's step list, per-block indices for a causal student; causal diffusion:
    the generator's causal block; DMD / SiD: the teacher CFG-parallel over ``mesh`` (``teacher_denoiser``))."""
    job, name = cfg.wan, cfg.method.name
    method_cls, _ = get_method(name)
    if name == "causal_diffusion":  # real-data training: no teacher, no critic, no rollout
        cd_cfg = dataclasses.replace(cfg.method.causal_diffusion, num_frame_per_block=job.rollout.num_frame_per_block)
        return method_cls(cd_cfg, generator=WanDenoiser(generator), rng=rng)
    if name == "ode_regression":
        causal = job.rollout.kind == "causal"
        ode_cfg = dataclasses.replace(cfg.method.ode_regression, step_list=job.rollout.steps.timesteps(),
                                      num_frame_per_block=job.rollout.num_frame_per_block if causal else None)
        return method_cls(ode_cfg, generator=WanDenoiser(generator), rng=rng)
    if name == "gan":
        from megadistill.models.wan.discriminator import wan_discriminator

        layers = job.discriminator_layers
        if max(layers) >= critic.config.num_layers:
            raise ValueError(f"wan.discriminator_layers {layers}: the critic has {critic.config.num_layers} blocks")
        return method_cls(cfg.method.gan, generator=WanDenoiser(generator),
                          critic=wan_discriminator(WanDenoiser(critic), layers), rollout=rollout, rng=rng)
    return method_cls(cfg.method.config, generator=WanDenoiser(generator), teacher=teacher_denoiser(teacher, mesh),
                      critic=WanDenoiser(critic), rollout=rollout, rng=rng)


class ODEPairBatches:
    """``make_batch(generator)`` from stored teacher trajectories: for ODE regression the trajectory
    and its prompt; with ``real_only`` (the GAN critic's real data, as Self-Forcing's GAN uses its
    ODE set) only the clean end as ``real``."""

    def __init__(self, prompts: PromptSet, path: str, micro_batch: int, latent_shape: Sequence[int],
                 real_only: bool = False, step_list: Optional[Sequence[float]] = None):
        self.real_only = real_only
        from megadistill.data.ode_pairs import load_ode_pairs, shard_paths

        pairs = load_ode_pairs(shard_paths(path))
        self.trajectory, self.steps, self.prompt_index = pairs["trajectory"], pairs["steps"], pairs["prompt_index"]
        if tuple(self.trajectory.shape[2:]) != tuple(latent_shape):
            raise ValueError(f"wan.data.ode_pairs: trajectories are {list(self.trajectory.shape[2:])} per state, "
                             f"wan.latent_shape is {list(latent_shape)}")
        if step_list is not None and [round(float(t), 3) for t in self.steps] != [round(t, 3) for t in step_list]:
            raise ValueError(f"wan.data.ode_pairs were stored at steps {[float(t) for t in self.steps]}, the student "
                             f"trains at {step_list} (wan.rollout.steps); regenerate them with the same steps")
        if int(self.prompt_index.max()) >= len(prompts.prompts):
            raise ValueError(f"wan.data.ode_pairs index prompt {int(self.prompt_index.max())}, but the prompt list "
                             f"has {len(prompts.prompts)}: use the prompt list the pairs were generated from")
        self.prompts, self.micro = prompts, micro_batch

    def __call__(self, generator: torch.Generator) -> DistillBatch:
        idx = torch.randint(0, self.trajectory.shape[0], (self.micro,), generator=generator)
        prompt_idx = self.prompt_index[idx].long()
        trajectory = self.trajectory[idx].float()
        stored = {"real": trajectory[:, -1]} if self.real_only else \
            {"trajectory": trajectory, "trajectory_steps": self.steps}
        return DistillBatch(cond=self.prompts.condition(prompt_idx), uncond=self.prompts.uncondition(prompt_idx),
                            batch_size=self.micro, sample_shape=tuple(self.trajectory.shape[2:]), **stored)


def make_batches(cfg: ExperimentConfig, prompts: PromptSet):
    """The batches of the configured method. Real clean latents (GAN critic, causal diffusion): the
    clean ends of ``wan.data.ode_pairs`` when given, else the demo's procedural videos rendered for the
    drawn prompts (the demo's latents are its pixels)."""
    micro, pairs, need = cfg.train.micro_batch_size, cfg.wan.data.ode_pairs, needs(cfg)
    needs_real = need.real
    if need.trajectory or (needs_real and pairs):
        return ODEPairBatches(prompts, pairs, micro, cfg.wan.latent_shape, real_only=needs_real,
                              step_list=None if needs_real else cfg.wan.rollout.steps.timesteps())
    return PromptBatches(prompts, cfg.wan, micro, needs_real=needs_real)


def sampler(job: WanJobConfig, method, prompts: PromptSet):
    """``sample_fn`` for the trainer's sample videos: the generator's few-step samples for the first
    prompts, fixed noise. Every rank gathers (ZeRO-3) and samples the same; rank 0's are logged."""
    count = min(4, len(prompts.prompts))
    idx = torch.arange(count)
    noise = torch.randn((count, *job.latent_shape), generator=torch.Generator().manual_seed(job.eval.seed))
    plain = None

    def sample(trainer: Trainer) -> Dict[str, torch.Tensor]:
        nonlocal plain
        weights = full_state_dict(method.generator)
        if plain is None:  # a plain single-process copy: ZeRO-3 partitions and TP / SP layers are not copied
            plain = build_wan(method.generator.net.config) if _partitioned(method.generator) or \
                _parallelized(method.generator.net) else copy.deepcopy(method.generator.net)
        load_full_state_dict(WanDenoiser(plain), weights)
        video = generate(job, WanDenoiser(plain.eval()), prompts.condition(idx), noise,
                         torch.Generator().manual_seed(job.eval.seed + 1))
        return {"samples/generator": video.clamp(-1, 1)}

    return sample


def _partitioned(module: nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in module.parameters())


def _parallelized(net: nn.Module) -> bool:
    """True when tensor or sequence parallelism was applied to a WanModel / WanMoE."""
    from megadistill.parallel.sequence_parallel import UlyssesTokenLayout

    return bool(tensor_parallel_layout(net)) or \
        any(isinstance(getattr(m, "token_layout", None), UlyssesTokenLayout) for m in net.modules())


# ---------------------------------------------------------------------------------------- evaluation
@dataclass
class EvalSet:
    """The demo evaluation's fixed inputs and the teacher's side, computed once before training."""

    prompts: List[str]
    cond: WanCondition
    noise: torch.Tensor  # the compared samplers' noise (not the reference's)
    reference: torch.Tensor  # the teacher at teacher_steps
    teacher_few: torch.Tensor  # the undistilled teacher at the student's step count, same noise
    floor: Dict[str, float]  # a second teacher_steps set (other noise) vs the reference
    teacher: Dict[str, float]  # teacher_few vs the reference
    initial: Optional[Dict[str, float]] = None  # the generator before training (its init), same sampler


def student_samples(job: WanJobConfig, ev: EvalSet, student: nn.Module) -> torch.Tensor:
    """The generator's few-step samples of the evaluation set (the training step list, fixed noise)."""
    with torch.no_grad():
        return generate(job, WanDenoiser(student.eval()), ev.cond, ev.noise,
                        torch.Generator().manual_seed(job.eval.seed + 1))


def prepare_eval(teacher: nn.Module, settings, prompts: PromptSet, job: WanJobConfig) -> EvalSet:
    from megadistill.demo.evaluation import compare, eval_prompts
    from megadistill.demo.teacher import teacher_sample

    from megadistill.demo.evaluation import EVAL_PROMPTS

    e = job.eval
    # The demo's evaluation prompts cover every colour, shape and direction; a custom prompt list
    # is evaluated on its first prompts.
    pool = EVAL_PROMPTS if all(p in prompts.prompts for p in EVAL_PROMPTS) else prompts.prompts
    names = eval_prompts(e.samples_per_prompt, list(pool)[:e.num_prompts])
    idx = torch.tensor([prompts.prompts.index(p) for p in names])
    g = torch.Generator().manual_seed(e.seed)
    shape = (len(names), *job.latent_shape)
    # The reference gets its own noise; the compared samplers (a second teacher run: the floor, the
    # undistilled teacher, the student) share another, so none of them is favoured by starting from
    # the reference's noise (a few-step Euler run from the same noise lands near the same video).
    reference_noise, noise = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    few = len(job.rollout.steps.steps)
    reference = teacher_sample(teacher, names, reference_noise, e.teacher_steps, settings)
    second = teacher_sample(teacher, names, noise, e.teacher_steps, settings)
    teacher_few = teacher_sample(teacher, names, noise, few, settings)
    return EvalSet(names, prompts.condition(idx), noise, reference, teacher_few,
                   compare(second, reference, names), compare(teacher_few, reference, names))


def final_line(r: Dict[str, Any]) -> str:
    n, s, t, f = r["student_steps"], r["student"], r["teacher"], r["floor"]
    before = f"; student before training {r['initial']['feature']:.4f}" if r.get("initial") else ""
    return (f"final: {r['method']} {n}-step {r['rollout']} student ({r['evaluated']}, step {r['step']}, "
            f"ZeRO-{r['zero_stage']}, {r['world_size']} rank(s)): distance to teacher-{r['teacher_steps']} "
            f"{s['feature']:.4f} | undistilled teacher {n}-step {t['feature']:.4f} | ratio {r['ratio']:.3f} "
            f"(floor {f['feature']:.4f}{before}; attributes right: student {s['accuracy']:.2f}, teacher {n}-step "
            f"{t['accuracy']:.2f}, teacher-{r['teacher_steps']} {f['accuracy']:.2f}; {r['total_seconds']:.0f} s)")


# ---------------------------------------------------------------------------------------- the job
def check_inputs(cfg: ExperimentConfig) -> None:
    """Every file and name the job will read, checked before any process group or model exists."""
    from megadistill.models.wan.config import wan_config

    job = cfg.wan

    def exists(path: str, key: str) -> None:
        if path and not os.path.exists(path):
            raise FileNotFoundError(f"wan.{key}: not found: {path}")

    for role in ("teacher", "generator", "critic"):
        m: WanModelConfig = getattr(job, role)
        if m.preset and m.preset != DEMO:
            wan_config(m.preset, **m.overrides)  # unknown preset / field -> ValueError naming it
            if not m.checkpoint:
                raise ValueError(f"wan.{role}.checkpoint is required: preset {m.preset!r} names its own "
                                 "architecture, so the teacher's weights cannot be used")
        exists(m.checkpoint, f"{role}.checkpoint")
    if job.teacher.preset == DEMO and not job.teacher.checkpoint:
        from megadistill.demo.teacher import DEFAULT_WEIGHTS, settings_path

        for path in (DEFAULT_WEIGHTS, settings_path(DEFAULT_WEIGHTS)):
            exists(str(path), "teacher (the shipped demo teacher; tools/train_demo_teacher.py writes it)")
    if job.teacher.preset == DEMO:
        from megadistill.demo.teacher import DEFAULT_WEIGHTS, DemoSettings, settings_path

        weights = job.teacher.checkpoint or DEFAULT_WEIGHTS
        settings = DemoSettings.from_dict(json.loads(settings_path(weights).read_text()))
        if list(settings.latent_shape(1)[1:]) != job.latent_shape:
            raise ValueError(f"wan.latent_shape {job.latent_shape} is not the demo teacher's video shape "
                             f"{list(settings.latent_shape(1)[1:])}")
    exists(job.data.prompts, "data.prompts")
    exists(job.data.first_frames, "data.first_frames")
    exists(job.data.ode_pairs, "data.ode_pairs")
    if job.data.text_encoder != DEMO:
        exists(job.data.text_encoder, "data.text_encoder")
    name, need = cfg.method.name, needs(cfg)
    if need.trajectory and not job.data.ode_pairs:
        raise ValueError(f"method {name} needs wan.data.ode_pairs (tools/generate_ode_pairs.py writes them)")
    if name == "causal_diffusion" and job.rollout.kind != "causal":
        raise ValueError("method causal_diffusion trains a block-causal generator (the ODE-init stage of a "
                         f"causal student): set wan.rollout.kind=causal, not {job.rollout.kind!r}")
    if need.real and job.data.text_encoder != DEMO and not job.data.ode_pairs:
        raise ValueError(f"method {name} needs real clean latents: set wan.data.ode_pairs (their clean ends are "
                         "the real data, as in Self-Forcing's GAN) or use the demo data set")
    if need.real and job.data.text_encoder == DEMO and not job.data.ode_pairs:
        from megadistill.demo.videos import VideoSetConfig

        if list(VideoSetConfig().shape) != job.latent_shape:
            raise ValueError(f"method {cfg.method.name} trains on the demo's videos {list(VideoSetConfig().shape)} "
                             f"(no wan.data.ode_pairs), but wan.latent_shape is {job.latent_shape}")
    if job.eval.enabled and job.teacher.preset != DEMO:
        raise ValueError("wan.eval: the end-of-run video distance is defined for the demo teacher; "
                         "set wan.eval.enabled=false")
    check_parallel(cfg)


def model_heads(cfg: ExperimentConfig) -> Dict[str, int]:
    """'wan.<role> (<preset>)' -> attention heads of every network the job builds (generator and critic
    without a preset of their own have the teacher's architecture); reads configs only."""
    from megadistill.models.wan.config import wan_config

    job = cfg.wan

    def heads(m: WanModelConfig) -> int:
        if m.preset == DEMO:
            from megadistill.demo.teacher import DEFAULT_WEIGHTS, DemoSettings, settings_path

            settings = DemoSettings.from_dict(json.loads(settings_path(m.checkpoint or DEFAULT_WEIGHTS).read_text()))
            return settings.model.replace(**m.overrides).num_heads
        return wan_config(m.preset, **m.overrides).num_heads

    out = {f"wan.teacher ({job.teacher.preset})": heads(job.teacher)}
    roles = ["generator"] + (["critic"] if needs(cfg).critic else [])
    for role in roles:
        m: WanModelConfig = getattr(job, role)
        if m.preset and m.preset != DEMO:
            out[f"wan.{role} ({m.preset})"] = heads(m)
    return out


def check_parallel(cfg: ExperimentConfig) -> int:
    """``parallel`` against the launcher's world size (WORLD_SIZE, 1 under plain python) and every
    model's heads, before any process group exists; returns dp."""
    p = cfg.parallel
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    dp = check_parallel_sizes(p, world_size, model_heads(cfg) if p.tp * p.sp > 1 else {})
    if p.cfg > 1:
        check_cfg_parallel(cfg)
    resume = _resume_checkpoint(cfg)
    if resume is not None:
        from megadistill.engine import checkpoint as ckpt

        sizes = {"tp": p.tp, "sp": p.sp, "cfg": p.cfg, "dp": dp}
        saved = ckpt.read_trainer_state(resume)
        layout = saved.get("parallel", {"tp": 1, "sp": 1, "cfg": 1, "dp": saved["world_size"]})
        if layout != sizes:
            raise ValueError(f"checkpoint {resume} was written with parallel sizes {layout}, this run has {sizes}: "
                             "resume with the same parallel sizes (or set train.resume=false / another run.output_dir)")
    return dp


def check_cfg_parallel(cfg: ExperimentConfig) -> None:
    """parallel.cfg = 2 only where it pays: a method that calls the teacher's guided passes every step
    with a guidance that is not the identity. Anything else would leave the second rank of every cfg
    group computing exactly what the first computes (the same sample, one conditional pass each) --
    half the ranks wasted -- so it is refused, pointing at the ranks' better use (data parallel)."""
    from megadistill.methods.base import is_unguided

    name = cfg.method.name
    if not needs(cfg).guided_teacher:
        raise ValueError(f"parallel.cfg=2 splits the teacher's conditional and unconditional passes over two ranks, "
                         f"but method {name} makes no guided teacher call: set parallel.cfg=1 (the ranks then "
                         f"train data parallel)")
    m = cfg.method.config
    if is_unguided(m.guidance_scale, m.guidance_form):
        raise ValueError(f"parallel.cfg=2 with method.{name}.guidance_scale={m.guidance_scale} "
                         f"({m.guidance_form} form): the guidance is the identity, the teacher runs its conditional "
                         f"pass only, so there is nothing to split: set parallel.cfg=1")


def _resume_checkpoint(cfg: ExperimentConfig) -> Optional[str]:
    """The checkpoint the trainer will resume from, if any (as Trainer._resume_path finds it)."""
    from megadistill.engine import checkpoint as ckpt

    if cfg.train.resume_from:
        return cfg.train.resume_from if ckpt.is_complete(cfg.train.resume_from) else None
    if cfg.train.resume:
        return ckpt.find_latest(os.path.join(cfg.run.output_dir, "checkpoints"))
    return None


def run(cfg: ExperimentConfig, ds: dict) -> int:
    job = cfg.wan
    start = time.perf_counter()
    info = init_distributed()
    rank = info.rank
    mesh = ParallelMesh(cfg.parallel)
    prompts = encode_prompts(job)  # first: a umT5-XXL encoder is freed before the DiTs load
    partition = zero3_partitioner(ds, mesh)  # ZeRO-3: each block partitioned as soon as it is loaded
    teacher, settings = load_teacher(job.teacher, mesh, partition=partition)
    generator = derive_model(job.generator, job.teacher, teacher, mesh, partition, **generator_mode(job))
    critic = (derive_model(job.critic, job.teacher, teacher, mesh, partition)
              if needs(cfg).critic else None)
    evaluate = job.eval.enabled and settings is not None
    ev = prepare_eval(teacher, settings, prompts, job) if evaluate and rank == 0 else None
    if evaluate and rank == 0:
        log.info(f"evaluation reference ready: undistilled teacher {len(job.rollout.steps.steps)}-step distance "
                 f"{ev.teacher['feature']:.4f}, floor {ev.floor['feature']:.4f}")

    student = copy.deepcopy(generator) if rank == 0 and evaluate else None  # plain copy to evaluate in
    if ev is not None:  # what training starts from: the measure of what distillation changed
        from megadistill.demo.evaluation import compare

        ev.initial = compare(student_samples(job, ev, student), ev.reference, ev.prompts)
        log.info(f"generator before training: {len(job.rollout.steps.steps)}-step distance {ev.initial['feature']:.4f}")
    # Rank 0's single-process evaluation above ran on the plain models; from here on they are split.
    for net in (teacher, generator, critic):
        if net is not None:
            parallelize_wan(net, mesh)
    rng, rollout_rng = torch.Generator(), torch.Generator()
    method = build_method(cfg, generator, teacher, critic, build_rollout(job, rollout_rng, rng), rng, mesh)
    del teacher  # the method holds it if it uses it (DMD / SiD); otherwise it is freed here
    # One sample stream per tp x sp x cfg group: seeded from the dp coordinate (mesh.rank_seed).
    data = SeededBatchSource(make_batches(cfg, prompts), mesh.rank_seed(cfg.train.seed, "data"))
    models = {"generator": generator, "critic": critic}
    metadata = {"config": to_dict(cfg), "model_configs": {
        role: dataclasses.asdict(m.config) for role, m in models.items() if m is not None}}
    trainer = Trainer(method, data, cfg.train, ds, os.path.join(cfg.run.output_dir, "checkpoints"),
                      generators={"method": rng}, shared_generators={"rollout": rollout_rng},
                      log_dir=os.path.join(cfg.run.output_dir, "logs"), metadata=metadata,
                      sample_fn=sampler(job, method, prompts) if settings is not None else None, mesh=mesh)
    trainer.train()
    if trainer.step < cfg.train.max_steps:  # preempted: the checkpoint is saved, the grace period is short
        return 0

    use_ema = trainer.ema is not None and trainer.ema.started
    weights = trainer.ema.gather() if use_ema else full_state_dict(method.generator)
    if rank == 0 and evaluate:
        load_full_state_dict(WanDenoiser(student), weights)
        result = finish_eval(cfg, ev, student, trainer, use_ema, info.world_size, start)
        print(final_line(result), flush=True)
    dist.barrier()
    return 0


def finish_eval(cfg: ExperimentConfig, ev: EvalSet, student: nn.Module, trainer: Trainer, use_ema: bool,
                world_size: int, start: float) -> Dict[str, Any]:
    from megadistill.data.video_io import tile_videos, upscale_nearest, viewable_factor, write_mp4
    from megadistill.demo.evaluation import compare

    job = cfg.wan
    samples = student_samples(job, ev, student)
    scores = compare(samples, ev.reference, ev.prompts)
    result = {
        "method": cfg.method.name, "rollout": job.rollout.kind, "student_steps": len(job.rollout.steps.steps),
        "evaluated": "ema" if use_ema else "generator", "step": trainer.step, "world_size": world_size,
        "zero_stage": trainer.engines.zero_stage, "teacher_steps": job.eval.teacher_steps,
        "student": scores, "teacher": ev.teacher, "floor": ev.floor, "initial": ev.initial,
        "ratio": scores["feature"] / ev.teacher["feature"], "total_seconds": time.perf_counter() - start,
    }
    os.makedirs(cfg.run.output_dir, exist_ok=True)
    if job.eval.mp4:
        # One row per prompt (its first sample): teacher-50 | undistilled teacher few-step | student.
        per = job.eval.samples_per_prompt
        rows = [tile_videos([ev.reference[i], ev.teacher_few[i], samples[i]]) for i in range(0, len(samples), per)]
        grid = torch.cat(rows, dim=2).clamp(-1, 1)
        path = os.path.join(cfg.run.output_dir, "samples_teacher_vs_student.mp4")
        write_mp4(path, upscale_nearest(grid, viewable_factor(grid.shape[-2], grid.shape[-1])))
        result["mp4"] = path
    with open(os.path.join(cfg.run.output_dir, RESULT_FILE), "w") as f:
        json.dump(result, f, indent=2)
    return result
