"""The toy lab: teacher, reference distribution, evaluation and the benchmark table.

``get_lab(cfg)`` trains the teacher once per (data, teacher, eval, guidance, shift, seed) and caches
it in-process; every recipe and test shares it. The target of distillation is the guided teacher
(standard CFG ``cfg.guidance_scale``) sampled with ``eval.reference_steps`` Euler steps; students
are run without CFG (guidance is distilled into them).

Distances are per-class sliced W1 (distance.py) averaged over classes. ``noise_floor`` is the
distance between two independent reference sets, the best any sampler can score.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from megadistill.diffusion.latents import DenseLatents
from megadistill.diffusion.samplers import euler_flow_sample, few_step_sample, flow_inference_sigmas
from megadistill.methods.base import Denoiser, DistillBatch, freeze

from .config import ToyLabConfig
from .data import random_labels
from .distance import per_class_distance, projection_directions
from .teacher import train_teacher

SAMPLERS = ("renoise", "euler")


def student_step_list(num_steps: int, shift: float) -> List[float]:
    """Timesteps of an N-step student: the N-step Euler grid (shifted) without its terminal 0."""
    return [float(s) * 1000.0 for s in flow_inference_sigmas(num_steps, shift)[:-1]]


def sample_with(
    denoiser: Denoiser,
    noise: torch.Tensor,
    cond: torch.Tensor,
    step_list: List[float],
    sampler: str,
    uncond: Optional[torch.Tensor] = None,
    guidance_scale: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Run a few-step sampler: ``renoise`` (DMD / Self-Forcing x0 + fresh noise) or ``euler`` (flow ODE)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    with torch.no_grad():
        if sampler == "euler":
            sigmas = torch.tensor([t / 1000.0 for t in step_list] + [0.0], dtype=torch.float64)
            v_fn = lambda x, t: denoiser.flow_guided(x, t, cond, uncond, guidance_scale)  # noqa: E731
            return euler_flow_sample(v_fn, noise, sigmas)
        x0_fn = lambda x, t: denoiser.x0_guided(x, t, cond, uncond, guidance_scale)  # noqa: E731
        return few_step_sample(x0_fn, noise, step_list, generator=generator)


@dataclass
class TrainedStudent:
    """What a recipe returns: the student, its inference step list and sampler, training logs."""

    denoiser: Denoiser
    step_list: List[float]
    sampler: str = "renoise"
    logs: List[Dict[str, float]] = field(default_factory=list)


class ToyLab:
    def __init__(self, cfg: ToyLabConfig):
        self.cfg = cfg
        t0 = time.perf_counter()
        net = train_teacher(cfg.data, cfg.teacher, cfg.seed)
        self.teacher = freeze(Denoiser(net))
        self.teacher_train_seconds = time.perf_counter() - t0
        self.null_class = net.null_class
        self.num_classes = cfg.data.num_classes
        self.directions = projection_directions(cfg.data.dim, cfg.eval.num_projections, cfg.eval.seed)
        n = cfg.eval.samples_per_class
        # Fixed evaluation noise shared by every sampler under test, so differences are not noise.
        g = torch.Generator().manual_seed(cfg.eval.seed)
        self.eval_labels = torch.arange(self.num_classes).repeat_interleave(n)
        self.eval_noise = torch.randn(len(self.eval_labels), cfg.data.dim, generator=g)
        self.reference = self.split(self.teacher_reference_samples(cfg.eval.seed + 1))
        self.noise_floor = per_class_distance(
            self.reference, self.split(self.teacher_reference_samples(cfg.eval.seed + 2)), self.directions
        )
        self._teacher_distance: Dict[int, float] = {}
        self._target_pool: Optional[torch.Tensor] = None
        self._target_labels: Optional[torch.Tensor] = None

    # ---- sampling --------------------------------------------------------------------------------
    def uncond_like(self, cond: torch.Tensor) -> torch.Tensor:
        return torch.full_like(cond, self.null_class)

    def teacher_reference_samples(self, seed: int, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Guided teacher, ``reference_steps`` Euler steps, from noise drawn with ``seed``."""
        labels = self.eval_labels if labels is None else labels
        noise = torch.randn(len(labels), self.cfg.data.dim, generator=torch.Generator().manual_seed(seed))
        steps = student_step_list(self.cfg.eval.reference_steps, self.cfg.shift)
        return sample_with(
            self.teacher, noise, labels, steps, "euler", self.uncond_like(labels), self.cfg.guidance_scale
        )

    def split(self, samples: torch.Tensor) -> Dict[int, torch.Tensor]:
        return {c: samples[self.eval_labels == c] for c in range(self.num_classes)}

    def student_samples(self, student: TrainedStudent) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.cfg.eval.seed + 3)
        return sample_with(
            student.denoiser, self.eval_noise, self.eval_labels, student.step_list, student.sampler, generator=g
        )

    # ---- distances -------------------------------------------------------------------------------
    def distance(self, samples: torch.Tensor) -> float:
        """Mean per-class sliced W1 between samples (in eval_labels order) and the reference."""
        return per_class_distance(self.split(samples), self.reference, self.directions)

    def teacher_distance(self, num_steps: int) -> float:
        """The undistilled guided teacher with ``num_steps`` Euler steps vs the reference."""
        if num_steps not in self._teacher_distance:
            steps = student_step_list(num_steps, self.cfg.shift)
            samples = sample_with(
                self.teacher, self.eval_noise, self.eval_labels, steps, "euler",
                self.uncond_like(self.eval_labels), self.cfg.guidance_scale,
            )
            self._teacher_distance[num_steps] = self.distance(samples)
        return self._teacher_distance[num_steps]

    # ---- training inputs -------------------------------------------------------------------------
    def target_pool(self) -> tuple:
        """Clean 'real' samples for methods that need them: guided-teacher reference-quality samples
        drawn from seeds disjoint from the evaluation reference (the distillation target)."""
        if self._target_pool is None:
            g = torch.Generator().manual_seed(self.cfg.seed + 17)
            labels = random_labels(self.cfg.data, 16384, g)
            self._target_labels = labels
            self._target_pool = self.teacher_reference_samples(self.cfg.seed + 18, labels)
        return self._target_pool, self._target_labels

    def make_batch(
        self, batch_size: int, generator: torch.Generator, with_real: bool = False
    ) -> DistillBatch:
        """Random class labels (and matching real samples from the target pool when asked)."""
        if with_real:
            pool, labels = self.target_pool()
            idx = torch.randint(0, len(pool), (batch_size,), generator=generator)
            cond, real = labels[idx], pool[idx]
        else:
            cond, real = random_labels(self.cfg.data, batch_size, generator), None
        return DistillBatch(
            cond=cond, uncond=self.uncond_like(cond), latents=DenseLatents(batch_size, (self.cfg.data.dim,)), real=real,
        )

    def copy_teacher(self) -> Denoiser:
        """A trainable copy of the teacher (students and critics start from it, as upstream)."""
        student = copy.deepcopy(self.teacher)
        for p in student.parameters():
            p.requires_grad_(True)
        return student.train()


_LABS: Dict[str, ToyLab] = {}


def _lab_key(cfg: ToyLabConfig) -> str:
    return repr((cfg.seed, cfg.data, cfg.teacher, cfg.eval, cfg.guidance_scale, cfg.shift))


def get_lab(cfg: ToyLabConfig) -> ToyLab:
    """The lab for cfg, built once per process (the teacher is the expensive part)."""
    key = _lab_key(cfg)
    if key not in _LABS:
        _LABS[key] = ToyLab(cfg)
    return _LABS[key]


def evaluate_recipe(
    lab: ToyLab, name: str, recipe: Callable, num_steps: int, cfg: Optional[ToyLabConfig] = None
) -> Dict[str, object]:
    """Train one student with ``recipe`` and measure it. ``cfg`` carries the budgets (default: the
    lab's own config; the cached lab may have been built by a config that differs only in budgets)."""
    cfg = cfg or lab.cfg
    torch.manual_seed(cfg.seed + 100 * num_steps)
    t0 = time.perf_counter()
    student = recipe(lab, cfg, num_steps)
    wall = time.perf_counter() - t0
    dist = lab.distance(lab.student_samples(student))
    base = lab.teacher_distance(num_steps)
    return {
        "method": name, "steps": num_steps, "distance": dist, "teacher_distance": base,
        "ratio": dist / base, "wall_s": wall,
    }


def recipe_ratio(name: str, num_steps: int, cfg: ToyLabConfig) -> float:
    """Ratio of one method's student at ``cfg``'s budgets (the lab itself is cached across budgets)."""
    from .recipes import get_recipe

    return float(evaluate_recipe(get_lab(cfg), name, get_recipe(name), num_steps, cfg)["ratio"])


def run_lab(cfg: ToyLabConfig, progress: Optional[Callable[[Dict[str, object]], None]] = None) -> List[Dict[str, object]]:
    """Distill the lab teacher with every configured method at every student step count."""
    from .recipes import get_recipe

    lab = get_lab(cfg)
    rows = []
    for name in cfg.method_names():
        recipe = get_recipe(name)
        # A recipe may train only some step counts (APT is a one-step method by definition).
        supported = getattr(recipe, "supported_steps", None)
        for num_steps in cfg.student_steps:
            if supported is not None and num_steps not in supported:
                continue
            row = evaluate_recipe(lab, name, recipe, num_steps, cfg)
            rows.append(row)
            if progress is not None:
                progress(row)
    return rows


def format_table(rows: List[Dict[str, object]], noise_floor: Optional[float] = None) -> str:
    lines = [
        "| method | student steps | SW1(student, teacher-50) | SW1(teacher same steps, teacher-50) | ratio | wall s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['steps']} | {r['distance']:.4f} | {r['teacher_distance']:.4f} | "
            f"{r['ratio']:.3f} | {r['wall_s']:.1f} |"
        )
    if noise_floor is not None:
        lines.append("")
        lines.append(f"Noise floor (two independent teacher-50 sample sets): SW1 = {noise_floor:.4f}")
    return "\n".join(lines)
