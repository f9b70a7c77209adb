"""The toy family: the toy lab's class-conditional 2-D flow-matching MLP (models/toy/mlp.py) as a
model family of the distill job. The teacher is trained at start (seconds; every rank trains the same
seeded teacher and rank 0's weights are broadcast), generator, critic and target start from its
weights, and rank 0 measures the student's per-class sliced W1 to the guided teacher's 50-step samples
next to the undistilled teacher's at the same step count (the toy lab's measure,
megadistill/toylab/lab.py), sampling the student as its method says (``student_sampling``).

Real samples are the lab's target pool (guided-teacher reference-quality samples); a method that
trains on stored trajectories gets a pool of the guided teacher's ODE trajectories at the rollout's
steps, made once at start; a discriminator critic is the critic's backbone with register heads on
``model.discriminator_layers``.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from megadistill.diffusion.noise_schedule import NoiseSchedule
from megadistill.methods import get_method
from megadistill.methods.base import Denoiser, DistillBatch, MethodNeeds
from megadistill.models.discriminators.register_heads import HEAD_STYLES
from megadistill.models.family import Evaluator, ModelFamily, Networks, RunSummary
from megadistill.toylab.config import EvalConfig, TeacherConfig, ToyDataConfig, ToyLabConfig


@dataclass
class ToyModelsConfig:
    """``model`` with ``family: toy``: the teacher ToyFlowMLP and its flow-matching training
    (``teacher``), its seed, and how the distillation target samples: standard CFG at
    ``guidance_scale`` with Euler steps on the grid of ``shift``. Generator and critic are copies of the
    teacher."""

    family: str = "toy"
    seed: int = 0
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    guidance_scale: float = 4.0
    shift: float = 1.0
    # Discriminator critics (gan, apt): register heads on these residual blocks' outputs (empty: the
    # last two), in this head style (models/discriminators/register_heads.py).
    discriminator_layers: List[int] = field(default_factory=list)
    discriminator_style: str = "self_forcing"
    # Stored guided-teacher ODE trajectories for methods that train on them (ode_regression).
    trajectory_pool: int = 8192

    def __post_init__(self):
        if self.guidance_scale <= 0 or self.shift <= 0:
            raise ValueError(f"guidance_scale and shift must be > 0, got {self.guidance_scale}, {self.shift}")
        if self.discriminator_style not in HEAD_STYLES:
            raise ValueError(f"discriminator_style must be one of {HEAD_STYLES}, got {self.discriminator_style!r}")
        bad = [i for i in self.discriminator_layers if not 0 <= i < self.teacher.depth]
        if bad:
            raise ValueError(f"discriminator_layers {bad}: the teacher has {self.teacher.depth} blocks (0..{self.teacher.depth - 1})")
        if self.trajectory_pool < 1:
            raise ValueError(f"trajectory_pool must be >= 1, got {self.trajectory_pool}")

    def feature_layers(self) -> List[int]:
        return list(self.discriminator_layers) or list(range(max(0, self.teacher.depth - 2), self.teacher.depth))


def lab_config(cfg) -> ToyLabConfig:
    """The toy lab a run's ``model``, ``data`` and ``eval`` sections describe."""
    m = cfg.model
    return ToyLabConfig(seed=m.seed, data=cfg.data, teacher=m.teacher, eval=cfg.eval,
                        guidance_scale=m.guidance_scale, shift=m.shift)


class ToyFamily(ModelFamily):
    name = "toy"
    model_config = ToyModelsConfig
    data_config = ToyDataConfig
    eval_config = EvalConfig
    causal = False
    # A 2-D sample has no grid worth snapping to: continuous re-noising at the lab's Euler steps.
    rollout_defaults = {"kind": "bidirectional", "steps": {"steps": [1000.0, 750.0, 500.0, 250.0], "warp": False,
                                                           "grid": False}}


    def noise_schedule(self, model_cfg) -> NoiseSchedule:
        """The teacher samples on the grid of ``model.shift``: the methods' schedule fields default to it."""
        return NoiseSchedule(shift=model_cfg.shift)

    def check_inputs(self, cfg, needs: MethodNeeds) -> None:
        """The toy family reads no files (its teacher is trained at start); nothing to check here."""

    def prepare_data(self, cfg, mesh):
        from megadistill.toylab.lab import get_lab

        lab = get_lab(lab_config(cfg))  # every rank trains the same (seeded) teacher ...
        if dist.is_initialized():  # ... and rank 0's weights win, whatever the ranks' thread counts did
            with torch.no_grad():
                for p in lab.teacher.parameters():
                    dist.broadcast(p.data, src=0)
        return lab

    def build_networks(self, cfg, needs: MethodNeeds, data, mesh, partition) -> Networks:
        critic = data.copy_teacher() if needs.critic else None
        target = data.copy_teacher() if needs.target else None
        return Networks(copy.deepcopy(data.teacher), data.copy_teacher(), critic, target=target)

    def denoiser(self, network: nn.Module) -> Denoiser:
        return network  # the lab's networks are Denoisers already

    def critic(self, network: nn.Module, cfg, critic_kind: str) -> nn.Module:
        if critic_kind != "discriminator":
            return super().critic(network, cfg, critic_kind)
        from megadistill.models.discriminators.discriminator import Discriminator
        from megadistill.models.discriminators.register_heads import RegisterHeads, RegisterHeadsConfig

        # Small heads (FFN width = hidden, no time token: the backbone's features carry t through adaLN).
        backbone, layers = network.net, cfg.model.feature_layers()
        heads = RegisterHeads(RegisterHeadsConfig(dim=backbone.hidden, num_layers=len(layers), num_heads=4,
                                                  ffn_dim=backbone.hidden, style=cfg.model.discriminator_style))
        return Discriminator(backbone, heads, layers)

    def batches(self, cfg, needs: MethodNeeds, data) -> Callable:
        micro, real = cfg.train.micro_batch_size, needs.real
        if not needs.trajectory:
            return lambda g: data.make_batch(micro, g, with_real=real)
        labels, trajectory, stored = trajectory_pool(data, cfg.model, cfg.rollout.steps.timesteps())

        def make_batch(g: torch.Generator) -> DistillBatch:
            batch = data.make_batch(micro, g, with_real=real)
            idx = torch.randint(0, len(labels), (micro,), generator=g)
            cond = labels[idx]
            return dataclasses.replace(batch, cond=cond, uncond=data.uncond_like(cond), trajectory=trajectory[idx],
                                       trajectory_steps=stored)

        return make_batch

    def network_config(self, network: nn.Module) -> Dict[str, Any]:
        net = network.net
        return {"dim": net.dim, "num_classes": net.num_classes, "hidden": net.hidden, "depth": net.depth,
                "time_dim": net.time_dim}

    def evaluator(self, cfg, data, networks: Networks) -> Optional[Evaluator]:
        method_cls, _ = get_method(cfg.method.name)
        return ToyEvaluator(data, cfg.rollout.steps.timesteps(), method_cls.student_sampling)


def trajectory_pool(lab, model: ToyModelsConfig, step_list) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(labels [N], trajectories [N, K + 1, dim], stored steps [K]): the guided teacher's Euler ODE from
    seeded noise over the lab's reference steps, recorded at ``step_list`` and at the end (the same on
    every rank: the teacher and the seed are)."""
    from megadistill.methods.ode_regression import generate_ode_pairs, guided_flow_fn
    from megadistill.toylab.data import random_labels

    g = torch.Generator().manual_seed(model.seed + 2000)
    labels = random_labels(lab.cfg.data, model.trajectory_pool, g)
    noise = torch.randn(model.trajectory_pool, lab.cfg.data.dim, generator=g)
    v_fn = guided_flow_fn(lab.teacher, labels, lab.uncond_like(labels), model.guidance_scale)
    with torch.no_grad():
        trajectory, stored = generate_ode_pairs(v_fn, noise, step_list, lab.cfg.eval.reference_steps, model.shift)
    return labels, trajectory, stored


class ToyEvaluator(Evaluator):
    """The undistilled teacher's distance at the student's step count is measured here, on the unsplit
    teacher (under ZeRO-3 the trainer partitions the teacher it is handed)."""

    def __init__(self, lab, step_list, sampling: str = "renoise"):
        self.lab, self.step_list, self.sampling = lab, list(step_list), sampling
        self.teacher_distance = lab.teacher_distance(len(self.step_list))

    def finish(self, student: nn.Module, summary: RunSummary) -> Dict[str, Any]:
        from megadistill.toylab.lab import TrainedStudent

        trained = TrainedStudent(student.eval(), self.step_list, self.sampling)
        distance = self.lab.distance(self.lab.student_samples(trained))
        return {**dataclasses.asdict(summary), "student_steps": len(self.step_list), "distance": distance,
                "teacher_distance": self.teacher_distance, "ratio": distance / self.teacher_distance,
                "noise_floor": self.lab.noise_floor}

    def final_line(self, r: Dict[str, Any]) -> str:
        n = r["student_steps"]
        return (f"final: {r['method']} {n}-step student ({r['evaluated']}, step {r['step']}, ZeRO-{r['zero_stage']}, "
                f"{r['world_size']} rank(s)): SW1 to teacher-50 {r['distance']:.4f} | undistilled teacher {n}-step "
                f"{r['teacher_distance']:.4f} | ratio {r['ratio']:.3f} (noise floor {r['noise_floor']:.4f}; "
                f"{r['total_seconds']:.0f} s)")
