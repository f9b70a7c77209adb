"""The experiment config tree that ``launch/train.py`` reads (sections are typed dataclasses).

    job       what runs: ``wan`` (Wan distillation through the DeepSpeed trainer; the embedded
              default distills the shipped demo teacher), ``toylab`` (one toy-lab method through the
              trainer), ``toylab_table`` (the toy lab's table of every method; no trainer)
    run       where the run writes (its checkpoints go to ``<output_dir>/checkpoints``)
    train     the DeepSpeed trainer's loop, optimizers, EMA and checkpoints (engine/config.py)
    method    which method the trainer distills and its typed config (defaults: upstream Self-Forcing)
    wan       models, data, rollout and evaluation of the ``wan`` job
    parallel  how the ``wan`` job splits each sample across ranks: tensor parallel ``tp``, Ulysses
              sequence parallel ``sp`` and ``cfg`` (the teacher's conditional / unconditional passes
              on two ranks, DMD / SiD); the rest of the world is data parallel. Checked against the world size and the models' heads
              before anything is built (wan_job.check_inputs)
    toylab    the toy lab: teacher, data, evaluation (and the per-method budgets of the lab table)

Defaults are the upstream (Self-Forcing, Wan2.1 T2V) values; every shipped YAML in configs/ states
its deviations from them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from megadistill.engine.config import TrainConfig
from megadistill.methods.causal_diffusion import CausalDiffusionConfig
from megadistill.methods.dmd import DMDConfig
from megadistill.methods.gan import GANConfig
from megadistill.methods.ode_regression import ODERegressionConfig
from megadistill.methods.sid import SiDConfig
from megadistill.parallel.mesh import ParallelConfig
from megadistill.rollout.causal_inference import REFRESH_MODES
from megadistill.rollout.self_forcing import SelfForcingConfig
from megadistill.rollout.steps import StepListConfig
from megadistill.toylab.config import ToyLabConfig

JOBS = ("wan", "toylab", "toylab_table")
# Methods each trainer job can run: the toy lab's trainer job is score distillation (generator +
# critic + frozen teacher); the Wan job adds the GAN critic and the ODE-init stage of a causal student:
# ODE regression on teacher trajectories or causal diffusion (diffusion / teacher forcing) on real latents.
JOB_METHODS = {"toylab": ("dmd", "sid"), "wan": ("dmd", "sid", "gan", "ode_regression", "causal_diffusion")}
ROLLOUT_KINDS = ("causal", "bidirectional")
DEMO = "demo"


@dataclass
class RunConfig:
    """Where a run writes."""

    output_dir: str = "outputs/default"

    def __post_init__(self):
        if not self.output_dir:
            raise ValueError("run.output_dir must not be empty")


@dataclass
class MethodConfig:
    """The method the trainer distills; only the section named by ``name`` is used."""

    name: str = "dmd"
    student_steps: int = 4  # toylab job only (the wan job's steps are wan.rollout.steps)
    dmd: DMDConfig = field(default_factory=DMDConfig)
    sid: SiDConfig = field(default_factory=SiDConfig)
    gan: GANConfig = field(default_factory=GANConfig)
    ode_regression: ODERegressionConfig = field(default_factory=ODERegressionConfig)
    # wan job: num_frame_per_block comes from wan.rollout (the generator's block), the rest from here
    causal_diffusion: CausalDiffusionConfig = field(default_factory=CausalDiffusionConfig)

    def __post_init__(self):
        known = sorted({m for methods in JOB_METHODS.values() for m in methods})
        if self.name not in known:
            raise ValueError(f"method.name: unknown method {self.name!r}; known: {known}")
        if self.student_steps < 1:
            raise ValueError(f"method.student_steps must be >= 1, got {self.student_steps}")

    @property
    def config(self):
        """The typed config of the selected method (e.g. the ``dmd`` section)."""
        return getattr(self, self.name)


@dataclass
class WanModelConfig:
    """One network of the wan job. ``preset``: a Wan preset (models/wan/config.py) or ``demo`` (the
    shipped demo teacher's architecture); ``checkpoint``: weights to load (original or diffusers
    keys, file or folder); empty = the shipped demo teacher for ``demo``, else the teacher's weights
    (generator / critic); ``demo:<name>`` = a shipped demo asset (``demo:causal_init``), resolved to
    its path here; ``overrides``: WanConfig fields (e.g. grad_checkpointing)."""

    preset: str = ""
    checkpoint: str = ""
    overrides: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        from megadistill.demo.teacher import resolve_checkpoint

        self.checkpoint = resolve_checkpoint(self.checkpoint)


@dataclass
class WanDataConfig:
    """Prompts and their text embeddings. ``prompts``: a text file, one prompt per line (empty: the
    demo prompts); ``text_encoder``: ``demo`` or a local umT5 folder (encoded once at start);
    ``negative_prompt``: the unconditional prompt of CFG (Wan's own negative prompt for real runs);
    ``first_frames``: TI2V image latents, a safetensors file with ``latents`` [N, C, 1, H, W], one per
    prompt line; ``ode_pairs``: ODE regression trajectories from tools/generate_ode_pairs.py."""

    prompts: str = ""
    text_encoder: str = DEMO
    negative_prompt: str = ""
    first_frames: str = ""
    ode_pairs: str = ""


@dataclass
class WanRolloutConfig:
    """How the generator produces training samples: ``causal`` (Self-Forcing: block by block with a
    KV cache; the generator runs block-causally with ``num_frame_per_block``) or ``bidirectional``
    (one clip, Wan2.2 TI2V fork). ``steps`` is also the inference step list. ``inference_refresh``:
    what a causal student's cache refresh sees when sampling (evaluation, samples, launch/infer.py):
    ``noised`` x0 as in the training rollout, or ``clean`` x0 as upstream's inference pipeline (for
    students trained upstream; rollout/causal_inference.py)."""

    kind: str = "causal"
    num_frame_per_block: int = 3
    local_attn_size: Optional[int] = None
    sink_size: int = 0
    steps: StepListConfig = field(default_factory=StepListConfig)
    self_forcing: SelfForcingConfig = field(default_factory=SelfForcingConfig)
    inference_refresh: str = "noised"

    def __post_init__(self):
        if self.kind not in ROLLOUT_KINDS:
            raise ValueError(f"kind must be one of {ROLLOUT_KINDS}, got {self.kind!r}")
        if self.num_frame_per_block < 1:
            raise ValueError(f"num_frame_per_block must be >= 1, got {self.num_frame_per_block}")
        if self.inference_refresh not in REFRESH_MODES:
            raise ValueError(f"inference_refresh must be one of {REFRESH_MODES}, got {self.inference_refresh!r}")
        if self.self_forcing.cache_gradient == "upstream" and self.local_attn_size is not None:
            raise ValueError("self_forcing.cache_gradient 'upstream' reproduces upstream's training cache, which "
                             "holds every frame and never evicts; with local_attn_size use 'detached'")


@dataclass
class WanEvalConfig:
    """End-of-run evaluation (demo teacher): the student's few-step samples and the undistilled
    teacher's at the same step count, each compared with the teacher's ``teacher_steps``-step samples
    by the demo video distance; a side-by-side MP4 when ``mp4``."""

    enabled: bool = True
    num_prompts: int = 8
    samples_per_prompt: int = 8
    teacher_steps: int = 50
    seed: int = 1234
    mp4: bool = True

    def __post_init__(self):
        for name in ("num_prompts", "samples_per_prompt", "teacher_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class WanJobConfig:
    """``latent_shape``: one training sample [C, F, H, W] in the generator's latent space;
    ``discriminator_layers``: the critic blocks the GAN method's register heads read (upstream
    Self-Forcing: 13, 21, 29 of the 30-block 1.3B)."""

    latent_shape: List[int] = field(default_factory=lambda: [16, 21, 60, 104])
    discriminator_layers: List[int] = field(default_factory=lambda: [13, 21, 29])
    teacher: WanModelConfig = field(default_factory=lambda: WanModelConfig(preset=DEMO))
    generator: WanModelConfig = field(default_factory=WanModelConfig)
    critic: WanModelConfig = field(default_factory=WanModelConfig)
    data: WanDataConfig = field(default_factory=WanDataConfig)
    rollout: WanRolloutConfig = field(default_factory=WanRolloutConfig)
    eval: WanEvalConfig = field(default_factory=WanEvalConfig)

    def __post_init__(self):
        self.latent_shape = [int(s) for s in self.latent_shape]
        if len(self.latent_shape) != 4 or min(self.latent_shape) < 1:
            raise ValueError(f"latent_shape must be [C, F, H, W] with positive sizes, got {self.latent_shape}")
        if not self.teacher.preset:
            raise ValueError("teacher.preset must be set (a Wan preset or 'demo')")
        if self.teacher.preset != DEMO and not self.teacher.checkpoint:
            raise ValueError(f"teacher.checkpoint is required for preset {self.teacher.preset!r} "
                             "(only the demo teacher ships with megadistill)")
        frames = self.latent_shape[1]
        block = self.rollout.num_frame_per_block
        if self.rollout.kind == "causal" and frames % block:
            raise ValueError(f"latent_shape frames ({frames}) must be a multiple of "
                             f"rollout.num_frame_per_block ({block}) for the causal rollout")


@dataclass
class ExperimentConfig:
    job: str = "wan"
    run: RunConfig = field(default_factory=RunConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    wan: WanJobConfig = field(default_factory=WanJobConfig)
    toylab: ToyLabConfig = field(default_factory=ToyLabConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self):
        if self.job not in JOBS:
            raise ValueError(f"job must be one of {JOBS}, got {self.job!r}")
        p = self.parallel
        if self.job != "wan" and p.model_parallel > 1:
            raise ValueError(f"parallel: job {self.job!r} runs data parallel only (its toy models have no heads to "
                             f"split); set parallel.tp, parallel.sp and parallel.cfg to 1, got tp={p.tp}, sp={p.sp}, "
                             f"cfg={p.cfg}")
        allowed = JOB_METHODS.get(self.job)
        if allowed is not None and self.method.name not in allowed:
            raise ValueError(f"method.name: job {self.job!r} runs {list(allowed)}, not {self.method.name!r}")

    @property
    def uses_trainer(self) -> bool:
        return self.job in JOB_METHODS
