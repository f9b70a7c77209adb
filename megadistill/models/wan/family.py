"""The Wan family (Wan2.1 / Wan2.2 DiTs and the shipped demo teacher) as the generic distill job asks
for it: config sections (run_config.py), input checks, networks (networks.py), prompts and batches
(prompts.py, batches.py), the parallel plan (parallelize_wan) and the demo evaluation (demo_eval.py).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
from typing import Any, Callable, Dict, Optional

import torch
from torch import nn

from megadistill.diffusion.noise_schedule import NoiseSchedule
from megadistill.methods.base import MethodNeeds
from megadistill.models.family import Evaluator, ModelFamily, Networks

from .denoiser import WanDenoiser
from .run_config import DEMO, SHIFT, WanDataConfig, WanEvalConfig, WanModelsConfig, WanRoleConfig

ROLES = ("teacher", "generator", "critic")


class WanFamily(ModelFamily):
    name = "wan"
    model_config = WanModelsConfig
    data_config = WanDataConfig
    eval_config = WanEvalConfig
    causal = True

    def noise_schedule(self, model_cfg: WanModelsConfig) -> NoiseSchedule:
        """``model.shift``, else the demo teacher's recorded shift (its settings JSON), else ``SHIFT``."""
        if model_cfg.shift is not None:
            return NoiseSchedule(shift=model_cfg.shift)
        if model_cfg.teacher.preset != DEMO:
            return NoiseSchedule(shift=SHIFT)
        from megadistill.demo.teacher import DEFAULT_WEIGHTS, DemoSettings, settings_path

        path = settings_path(model_cfg.teacher.checkpoint or DEFAULT_WEIGHTS)
        if not path.exists():
            raise FileNotFoundError(f"model.teacher: the demo teacher's settings {path} are missing "
                                    "(tools/train_demo_teacher.py writes them)")
        return NoiseSchedule(shift=DemoSettings.from_dict(json.loads(path.read_text())).shift)

    # ------------------------------------------------------------------ checks
    def validate(self, cfg) -> None:
        frames, block = cfg.data.latent_shape[1], cfg.rollout.num_frame_per_block
        if cfg.rollout.causal and frames % block:
            raise ValueError(f"data.latent_shape frames ({frames}) must be a multiple of "
                             f"rollout.num_frame_per_block ({block}) for the causal rollout")

    def check_inputs(self, cfg, needs: MethodNeeds) -> None:
        from .config import wan_config

        model, data = cfg.model, cfg.data

        def exists(path: str, key: str) -> None:
            if path and not os.path.exists(path):
                raise FileNotFoundError(f"{key}: not found: {path}")

        for role in ROLES:
            m: WanRoleConfig = getattr(model, role)
            if m.preset and m.preset != DEMO:
                wan_config(m.preset, **m.overrides)  # unknown preset / field -> ValueError naming it
                if not m.checkpoint:
                    raise ValueError(f"model.{role}.checkpoint is required: preset {m.preset!r} names its own "
                                     "architecture, so the teacher's weights cannot be used")
            exists(m.checkpoint, f"model.{role}.checkpoint")
        if model.teacher.preset == DEMO:
            from megadistill.demo.teacher import DEFAULT_WEIGHTS, DemoSettings, settings_path

            if not model.teacher.checkpoint:
                for path in (DEFAULT_WEIGHTS, settings_path(DEFAULT_WEIGHTS)):
                    exists(str(path), "model.teacher (the shipped demo teacher; tools/train_demo_teacher.py writes it)")
            weights = model.teacher.checkpoint or DEFAULT_WEIGHTS
            settings = DemoSettings.from_dict(json.loads(settings_path(weights).read_text()))
            if list(settings.latent_shape(1)[1:]) != data.latent_shape:
                raise ValueError(f"data.latent_shape {data.latent_shape} is not the demo teacher's video shape "
                                 f"{list(settings.latent_shape(1)[1:])}")
        exists(data.prompts, "data.prompts")
        exists(data.first_frames, "data.first_frames")
        exists(data.ode_pairs, "data.ode_pairs")
        if data.text_encoder != DEMO:
            exists(data.text_encoder, "data.text_encoder")
        name = cfg.method.name
        if needs.trajectory and not data.ode_pairs:
            raise ValueError(f"method {name} needs data.ode_pairs (tools/generate_ode_pairs.py writes them)")
        if needs.real and data.text_encoder != DEMO and not data.ode_pairs:
            raise ValueError(f"method {name} needs real clean latents: set data.ode_pairs (their clean ends are "
                             "the real data, as in Self-Forcing's GAN) or use the demo data set")
        if needs.real and data.text_encoder == DEMO and not data.ode_pairs:
            from megadistill.demo.videos import VideoSetConfig

            if list(VideoSetConfig().shape) != data.latent_shape:
                raise ValueError(f"method {name} trains on the demo's videos {list(VideoSetConfig().shape)} "
                                 f"(no data.ode_pairs), but data.latent_shape is {data.latent_shape}")
        if cfg.eval.enabled and model.teacher.preset != DEMO:
            raise ValueError("eval: the end-of-run video distance is defined for the demo teacher; "
                             "set eval.enabled=false")

    def model_heads(self, cfg, needs: MethodNeeds) -> Dict[str, int]:
        """Heads of every network the run builds (generator and critic without a preset of their own
        have the teacher's architecture)."""
        from .networks import role_heads

        model = cfg.model
        out = {f"model.teacher ({model.teacher.preset})": role_heads(model.teacher)}
        for role in ["generator"] + (["critic"] if needs.critic else []):
            m: WanRoleConfig = getattr(model, role)
            if m.preset and m.preset != DEMO:
                out[f"model.{role} ({m.preset})"] = role_heads(m)
        return out

    # ------------------------------------------------------------------ build
    def prepare_data(self, cfg, mesh):
        """The prompts encoded (every rank encodes the same list), first: a umT5-XXL encoder is freed
        before the DiTs load."""
        from .prompts import encode_prompts

        text_len = None
        if cfg.data.text_encoder != DEMO:
            from .config import wan_config

            text_len = wan_config(cfg.model.teacher.preset, **cfg.model.teacher.overrides).text_len
        return encode_prompts(cfg.data, text_len)

    def build_networks(self, cfg, needs: MethodNeeds, data, mesh, partition) -> Networks:
        from .networks import derive_model, generator_mode, load_teacher

        teacher_cfg, generator_cfg, critic_cfg = (cfg.model.with_kernels(getattr(cfg.model, r)) for r in ROLES)
        teacher, settings = load_teacher(teacher_cfg, mesh, partition=partition)
        generator = derive_model(generator_cfg, teacher_cfg, teacher, mesh, partition, **generator_mode(cfg.rollout))
        critic = derive_model(critic_cfg, teacher_cfg, teacher, mesh, partition) if needs.critic else None
        target = derive_model(generator_cfg, teacher_cfg, teacher, mesh, partition,
                              **generator_mode(cfg.rollout)) if needs.target else None
        return Networks(teacher, generator, critic, teacher_settings=settings, target=target)

    def denoiser(self, network: nn.Module) -> WanDenoiser:
        return WanDenoiser(network)

    def critic(self, network: nn.Module, cfg, critic_kind: str) -> nn.Module:
        if critic_kind != "discriminator":
            return super().critic(network, cfg, critic_kind)
        from .discriminator import wan_discriminator

        layers = cfg.model.discriminator_layers
        if max(layers) >= network.config.num_layers:
            raise ValueError(f"model.discriminator_layers {layers}: the critic has {network.config.num_layers} blocks")
        return wan_discriminator(WanDenoiser(network), layers)

    def parallelize(self, network: nn.Module, mesh) -> None:
        from .parallelize import parallelize_wan

        parallelize_wan(network, mesh)

    def batches(self, cfg, needs: MethodNeeds, data) -> Callable:
        from .batches import make_batches

        return make_batches(cfg, needs, data)

    def network_config(self, network: nn.Module) -> Dict[str, Any]:
        return dataclasses.asdict(network.config)

    def evaluator(self, cfg, data, networks: Networks) -> Optional[Evaluator]:
        if not cfg.eval.enabled or networks.teacher_settings is None:
            return None
        from .demo_eval import DemoEvaluator

        return DemoEvaluator(cfg, networks.teacher, networks.teacher_settings, data)

    def sampler(self, cfg, method, data) -> Optional[Callable]:
        """The generator's few-step samples for the first prompts, fixed noise (demo teacher only: real
        runs decode latents with the VAE offline). Every rank gathers (ZeRO-3) and samples the same;
        rank 0's are logged."""
        if cfg.model.teacher.preset != DEMO:
            return None
        from megadistill.engine.engines import full_state_dict, load_full_state_dict
        from megadistill.rollout.config import generate

        count = min(4, len(data.prompts))
        idx = torch.arange(count)
        noise = torch.randn((count, *cfg.data.latent_shape), generator=torch.Generator().manual_seed(cfg.eval.seed))
        plain = None

        def sample(trainer) -> Dict[str, torch.Tensor]:
            nonlocal plain
            weights = full_state_dict(method.generator)
            if plain is None:
                plain = self.plain_copy(method.generator.net)
            load_full_state_dict(WanDenoiser(plain), weights)
            video = generate(cfg.rollout, WanDenoiser(plain.eval()), data.condition(idx), noise,
                             torch.Generator().manual_seed(cfg.eval.seed + 1))
            return {"samples/generator": video.clamp(-1, 1)}

        return sample

    def plain_copy(self, network: nn.Module) -> nn.Module:
        """A single-process copy: ZeRO-3 partitions and TP / SP layers are not copied, the architecture
        is rebuilt instead (weights loaded by the caller)."""
        if _partitioned(network) or _parallelized(network):
            from .model import build_wan

            return build_wan(network.config)
        return copy.deepcopy(network)


def _partitioned(module: nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in module.parameters())


def _parallelized(net: nn.Module) -> bool:
    """True when tensor or sequence parallelism was applied to a WanModel / WanMoE."""
    from .parallelize import is_parallelized

    return is_parallelized(net)
