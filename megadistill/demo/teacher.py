"""The demo teacher: a tiny bidirectional Wan T2V DiT trained on the procedural set, shipped in the repo.

Architecture: the ``tiny-t2v`` Wan preset with in_dim = out_dim = 3 (the demo's latent space is its
pixel space, an identity VAE), the prompt encoder's text_dim / text_len, and spatial patches of
4 x 4: a 9 x 16 x 16 video is 9 x 4 x 4 = 144 tokens, about 4x cheaper per forward than 2 x 2
patches (576 tokens) at equal width, which is what lets the default job distill it on a 2-core CPU
in minutes. The temporal patch stays 1, as block-causal mode needs; ``demo_student_config()`` is the
same network with ``num_frame_per_block=3`` (three causal blocks of three frames), so the teacher's
weights load into the student unchanged.

Shipped asset: ``assets/demo_teacher.safetensors`` (original Wan key names, float32) and
``assets/demo_teacher.json`` (model config, prompt encoder, video geometry, sampling settings and a
record of the training run), both written by ``tools/train_demo_teacher.py``.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from megadistill.diffusion.guidance import cfg
from megadistill.diffusion.samplers import euler_flow_sample, flow_inference_sigmas
from megadistill.models.wan import WanConfig, WanModel, build_wan, load_wan_checkpoint, save_wan_checkpoint, wan_config

from .text import PromptEncoder
from .videos import VideoSetConfig

ASSET_DIR = Path(__file__).resolve().parent / "assets"
DEFAULT_WEIGHTS = ASSET_DIR / "demo_teacher.safetensors"
TRAIN_TOOL = "tools/train_demo_teacher.py"
# A checkpoint path ``demo:<name>`` names a shipped asset, so configs work from any working directory
# and from an installed package: ``demo:causal_init`` is the causal student's starting point
# (configs/demo_causal_init.yaml), ``demo:teacher`` the teacher.
ASSET_PREFIX = "demo:"


def resolve_checkpoint(path: str) -> str:
    """``demo:<name>`` -> the path of ``assets/demo_<name>.safetensors``; any other path unchanged."""
    if not path.startswith(ASSET_PREFIX):
        return path
    name = path[len(ASSET_PREFIX):]
    shipped = sorted(p.stem[len("demo_"):] for p in ASSET_DIR.glob("demo_*.safetensors"))
    if name not in shipped:
        raise ValueError(f"{path}: no shipped demo asset {name!r}; shipped: {shipped}")
    return str(ASSET_DIR / f"demo_{name}.safetensors")

TEXT_DIM = 32
TEXT_LEN = 8
TEXT_SEED = 0


def demo_teacher_config(**overrides) -> WanConfig:
    """The bidirectional demo teacher (about 1.1 M parameters)."""
    fields = dict(in_dim=3, out_dim=3, patch_size=(1, 4, 4), dim=128, ffn_dim=384, num_heads=4, num_layers=4,
                  text_dim=TEXT_DIM, text_len=TEXT_LEN)
    return wan_config("tiny-t2v", **{**fields, **overrides})


def demo_student_config(**overrides) -> WanConfig:
    """The 4-step causal student: the teacher's network in block-causal mode, 3 frames per block."""
    return demo_teacher_config(**{"num_frame_per_block": 3, **overrides})


@dataclass
class DemoSettings:
    """Everything besides the weights that sampling the teacher needs, stored as JSON beside them.

    ``shift``: timestep shift of the Euler sampler's sigma grid; ``cfg_scale``: classifier-free
    guidance in the STANDARD form uncond + s (cond - uncond) (upstream Wan's g is s - 1), the
    unconditional prompt being "" (see text.py); ``num_steps``: the reference (teacher) step count.
    ``training``: a record of the run that produced the weights (hyper-parameters, metrics).
    """

    model: WanConfig = field(default_factory=demo_teacher_config)
    video: VideoSetConfig = field(default_factory=VideoSetConfig)
    text_dim: int = TEXT_DIM
    text_len: int = TEXT_LEN
    text_seed: int = TEXT_SEED
    shift: float = 1.0
    cfg_scale: float = 3.0
    num_steps: int = 50
    training: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.shift <= 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")
        if self.cfg_scale < 0:
            raise ValueError(f"cfg_scale must be >= 0, got {self.cfg_scale}")
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if self.model.text_dim != self.text_dim or self.model.text_len < self.text_len:
            raise ValueError(f"model text_dim / text_len ({self.model.text_dim}, {self.model.text_len}) do not fit "
                             f"the prompt encoder's ({self.text_dim}, {self.text_len})")
        if (self.model.in_dim, self.model.out_dim) != (3, 3):
            raise ValueError(f"the demo denoises RGB pixels: model in_dim and out_dim must be 3, got "
                             f"{(self.model.in_dim, self.model.out_dim)}")

    def encoder(self) -> PromptEncoder:
        return PromptEncoder(self.text_dim, self.text_len, self.text_seed)

    def latent_shape(self, batch: int) -> tuple[int, int, int, int, int]:
        """[B, 3, F, H, W]: the demo's latents are its pixels."""
        return (batch,) + self.video.shape

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["model"]["patch_size"] = list(self.model.patch_size)
        d["video"] = {k: list(v) if isinstance(v, tuple) else v for k, v in d["video"].items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DemoSettings":
        d = dict(d)
        video = {k: tuple(v) if isinstance(v, list) else v for k, v in d.pop("video").items()}
        return cls(model=WanConfig(**d.pop("model")), video=VideoSetConfig(**video), **d)


def settings_path(weights: Union[str, Path]) -> Path:
    """The settings JSON beside a weights file: demo_teacher.safetensors -> demo_teacher.json."""
    return Path(weights).with_suffix(".json")


def save_demo_teacher(model: WanModel, settings: DemoSettings, path: Union[str, Path] = DEFAULT_WEIGHTS) -> list[Path]:
    """Write the weights (Wan checkpoint saver, original keys) and the settings JSON; returns both paths."""
    path = Path(path)
    if model.config != settings.model:
        raise ValueError(f"the model's config differs from settings.model:\n{model.config}\n{settings.model}")
    written = save_wan_checkpoint(model, path)
    settings_path(path).write_text(json.dumps(settings.to_dict(), indent=2) + "\n")
    return written + [settings_path(path)]


def load_demo_teacher(path: Optional[Union[str, Path]] = None) -> tuple[WanModel, DemoSettings]:
    """The shipped demo teacher (eval mode, float32, CPU) and its settings."""
    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    cfg_path = settings_path(path)
    for p in (path, cfg_path):
        if not p.exists():
            raise FileNotFoundError(f"demo teacher file {p} is missing; train it with `python {TRAIN_TOOL}` "
                                    f"(writes {DEFAULT_WEIGHTS.name} and {settings_path(DEFAULT_WEIGHTS).name})")
    settings = DemoSettings.from_dict(json.loads(cfg_path.read_text()))
    model = build_wan(settings.model)
    load_wan_checkpoint(model, path)
    return model.eval(), settings


def demo_noise(batch: int, settings: DemoSettings, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Standard normal latents [B, 3, F, H, W] for the demo geometry."""
    return torch.randn(settings.latent_shape(batch), generator=generator)


def guided_flow(model: torch.nn.Module, context: torch.Tensor, uncond: torch.Tensor,
                cfg_scale: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """v_fn(x_t, t) = standard CFG of the model's flow, cond and uncond in one batched forward."""
    if cfg_scale == 1.0:
        return lambda x, t: model(x, t, context)

    def v_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([context, uncond]))
        v_c, v_u = v.chunk(2)
        return cfg(v_c, v_u, cfg_scale)

    return v_fn


@torch.no_grad()
def teacher_sample(model: torch.nn.Module, prompts: Sequence[str], noise: torch.Tensor, num_steps: int,
                   settings: DemoSettings, encoder: Optional[PromptEncoder] = None) -> torch.Tensor:
    """Euler flow sampling with CFG from ``noise`` [B, 3, F, H, W] (sigma 1) to videos [B, 3, F, H, W].

    The sigma grid is ``flow_inference_sigmas(num_steps, settings.shift)``: the reference is
    ``settings.num_steps`` (50) steps, the undistilled few-step baseline the same call with 4.
    Outputs are not clipped (pixels in about [-1, 1]).
    """
    if noise.shape[0] != len(prompts):
        raise ValueError(f"{len(prompts)} prompts for a noise batch of {noise.shape[0]}")
    encoder = encoder if encoder is not None else settings.encoder()
    context = encoder.encode(prompts).to(noise.device)
    uncond = encoder.negative(len(prompts)).to(noise.device)
    v_fn = guided_flow(model, context, uncond, settings.cfg_scale)
    sigmas = flow_inference_sigmas(num_steps, settings.shift)
    return euler_flow_sample(v_fn, noise.float(), sigmas, settings.model.num_train_timesteps)
