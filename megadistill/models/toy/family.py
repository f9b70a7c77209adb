"""The toy family: the toy lab's class-conditional 2-D flow-matching MLP (models/toy/mlp.py) as a
model family of the distill job. The teacher is trained at start (seconds; every rank trains the same
seeded teacher and rank 0's weights are broadcast), generator and critic start from its weights, and
rank 0 measures the student's per-class sliced W1 to the guided teacher's 50-step samples next to the
undistilled teacher's at the same step count (the toy lab's measure, megadistill/toylab/lab.py).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

import torch
import torch.distributed as dist
from torch import nn

from megadistill.methods.base import Denoiser, MethodNeeds
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

    def __post_init__(self):
        if self.guidance_scale <= 0 or self.shift <= 0:
            raise ValueError(f"guidance_scale and shift must be > 0, got {self.guidance_scale}, {self.shift}")


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

    def check_inputs(self, cfg, needs: MethodNeeds) -> None:
        if needs.trajectory:
            raise ValueError(f"method {cfg.method.name} trains on stored teacher trajectories, which the toy family "
                             "does not make yet")

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
        return Networks(copy.deepcopy(data.teacher), data.copy_teacher(), critic)

    def denoiser(self, network: nn.Module) -> Denoiser:
        return network  # the lab's networks are Denoisers already

    def batches(self, cfg, needs: MethodNeeds, data) -> Callable:
        micro, real = cfg.train.micro_batch_size, needs.real
        return lambda g: data.make_batch(micro, g, with_real=real)

    def network_config(self, network: nn.Module) -> Dict[str, Any]:
        net = network.net
        return {"dim": net.dim, "num_classes": net.num_classes, "hidden": net.hidden, "depth": net.depth,
                "time_dim": net.time_dim}

    def evaluator(self, cfg, data, networks: Networks) -> Optional[Evaluator]:
        return ToyEvaluator(data, cfg.rollout.steps.timesteps())


class ToyEvaluator(Evaluator):
    """The undistilled teacher's distance at the student's step count is measured here, on the unsplit
    teacher (under ZeRO-3 the trainer partitions the teacher it is handed)."""

    def __init__(self, lab, step_list):
        self.lab, self.step_list = lab, list(step_list)
        self.teacher_distance = lab.teacher_distance(len(self.step_list))

    def finish(self, student: nn.Module, summary: RunSummary) -> Dict[str, Any]:
        from megadistill.toylab.lab import TrainedStudent

        distance = self.lab.distance(self.lab.student_samples(TrainedStudent(student.eval(), self.step_list, "renoise")))
        return {**dataclasses.asdict(summary), "student_steps": len(self.step_list), "distance": distance,
                "teacher_distance": self.teacher_distance, "ratio": distance / self.teacher_distance,
                "noise_floor": self.lab.noise_floor}

    def final_line(self, r: Dict[str, Any]) -> str:
        n = r["student_steps"]
        return (f"final: {r['method']} {n}-step student ({r['evaluated']}, step {r['step']}, ZeRO-{r['zero_stage']}, "
                f"{r['world_size']} rank(s)): SW1 to teacher-50 {r['distance']:.4f} | undistilled teacher {n}-step "
                f"{r['teacher_distance']:.4f} | ratio {r['ratio']:.3f} (noise floor {r['noise_floor']:.4f}; "
                f"{r['total_seconds']:.0f} s)")
