"""Evaluation of a distill run on the demo teacher (rank 0): before training, the teacher's
``eval.teacher_steps``-step samples (the reference), a second reference set from other noise (the
floor of the distance) and the undistilled teacher at the student's step count; the generator's samples
as training starts; after training the student's samples from the same noise. The final line compares
the student's distance to the reference with the undistilled teacher's; a side-by-side MP4 is written.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from megadistill.models.family import Evaluator, RunSummary
from megadistill.rollout.config import generate

from .denoiser import WanDenoiser
from .prompts import PromptSet

log = logging.getLogger("megadistill.distill")


class DemoEvaluator(Evaluator):
    def __init__(self, cfg, teacher: nn.Module, settings, prompts: PromptSet):
        from megadistill.demo.evaluation import EVAL_PROMPTS, compare, eval_prompts
        from megadistill.demo.teacher import teacher_sample

        self.cfg, e = cfg, cfg.eval
        # The demo's evaluation prompts cover every colour, shape and direction; a custom prompt list
        # is evaluated on its first prompts.
        pool = EVAL_PROMPTS if all(p in prompts.prompts for p in EVAL_PROMPTS) else prompts.prompts
        self.prompts: List[str] = eval_prompts(e.samples_per_prompt, list(pool)[:e.num_prompts])
        idx = torch.tensor([prompts.prompts.index(p) for p in self.prompts])
        self.cond = prompts.condition(idx)
        g = torch.Generator().manual_seed(e.seed)
        shape = (len(self.prompts), *cfg.data.latent_shape)
        # The reference gets its own noise; the compared samplers (a second teacher run: the floor, the
        # undistilled teacher, the student) share another, so none of them is favoured by starting from
        # the reference's noise (a few-step Euler run from the same noise lands near the same video).
        reference_noise, self.noise = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        few = len(cfg.rollout.steps.steps)
        self.reference = teacher_sample(teacher, self.prompts, reference_noise, e.teacher_steps, settings)
        second = teacher_sample(teacher, self.prompts, self.noise, e.teacher_steps, settings)
        self.teacher_few = teacher_sample(teacher, self.prompts, self.noise, few, settings)
        self.floor = compare(second, self.reference, self.prompts)
        self.teacher = compare(self.teacher_few, self.reference, self.prompts)
        self.initial: Optional[Dict[str, float]] = None
        self._compare = compare
        log.info(f"evaluation reference ready: undistilled teacher {few}-step distance "
                 f"{self.teacher['feature']:.4f}, floor {self.floor['feature']:.4f}")

    def samples(self, student: nn.Module) -> torch.Tensor:
        """The generator's few-step samples of the evaluation set (the training step list, fixed noise)."""
        with torch.no_grad():
            return generate(self.cfg.rollout, WanDenoiser(student.eval()), self.cond, self.noise,
                            torch.Generator().manual_seed(self.cfg.eval.seed + 1))

    def start(self, generator: nn.Module) -> None:
        """What training starts from: the measure of what distillation changed."""
        self.initial = self._compare(self.samples(generator), self.reference, self.prompts)
        log.info(f"generator before training: {len(self.cfg.rollout.steps.steps)}-step distance "
                 f"{self.initial['feature']:.4f}")

    def finish(self, student: nn.Module, summary: RunSummary) -> Dict[str, Any]:
        from megadistill.data.video_io import tile_videos, upscale_nearest, viewable_factor, write_mp4

        cfg = self.cfg
        samples = self.samples(student)
        scores = self._compare(samples, self.reference, self.prompts)
        result = {
            "method": summary.method, "rollout": cfg.rollout.kind, "student_steps": len(cfg.rollout.steps.steps),
            "evaluated": summary.evaluated, "step": summary.step, "world_size": summary.world_size,
            "zero_stage": summary.zero_stage, "teacher_steps": cfg.eval.teacher_steps,
            "student": scores, "teacher": self.teacher, "floor": self.floor, "initial": self.initial,
            "ratio": scores["feature"] / self.teacher["feature"],
        }
        if cfg.eval.mp4:
            # One row per prompt (its first sample): teacher-50 | undistilled teacher few-step | student.
            per = cfg.eval.samples_per_prompt
            rows = [tile_videos([self.reference[i], self.teacher_few[i], samples[i]])
                    for i in range(0, len(samples), per)]
            grid = torch.cat(rows, dim=2).clamp(-1, 1)
            path = os.path.join(cfg.run.output_dir, "samples_teacher_vs_student.mp4")
            os.makedirs(cfg.run.output_dir, exist_ok=True)
            write_mp4(path, upscale_nearest(grid, viewable_factor(grid.shape[-2], grid.shape[-1])))
            result["mp4"] = path
        return result

    def final_line(self, r: Dict[str, Any]) -> str:
        n, s, t, f = r["student_steps"], r["student"], r["teacher"], r["floor"]
        before = f"; student before training {r['initial']['feature']:.4f}" if r.get("initial") else ""
        return (f"final: {r['method']} {n}-step {r['rollout']} student ({r['evaluated']}, step {r['step']}, "
                f"ZeRO-{r['zero_stage']}, {r['world_size']} rank(s)): distance to teacher-{r['teacher_steps']} "
                f"{s['feature']:.4f} | undistilled teacher {n}-step {t['feature']:.4f} | ratio {r['ratio']:.3f} "
                f"(floor {f['feature']:.4f}{before}; attributes right: student {s['accuracy']:.2f}, teacher "
                f"{n}-step {t['accuracy']:.2f}, teacher-{r['teacher_steps']} {f['accuracy']:.2f}; "
                f"{r['total_seconds']:.0f} s)")
