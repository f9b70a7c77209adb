"""The lab itself: a usable teacher, a meaningful reference, an honest evaluation pipeline."""
import torch

from megadistill.toylab.config import quick_config
from megadistill.toylab.data import mode_centers
from megadistill.toylab.lab import TrainedStudent, evaluate_recipe, get_lab, student_step_list


def test_teacher_reference_and_baselines():
    lab = get_lab(quick_config())
    # Guided 50-step samples sit on their own class's modes (CFG keeps them off the other classes').
    centers = mode_centers(lab.cfg.data).float()
    for c, x in lab.reference.items():
        own = torch.cdist(x, centers[c]).min(dim=1).values
        assert (own < 0.25).float().mean() > 0.95
    # Fewer teacher steps are worse; the noise floor is far below the 1-step teacher.
    d1, d2, d4 = (lab.teacher_distance(n) for n in (1, 2, 4))
    assert d1 > d2 > d4 > lab.noise_floor
    assert lab.noise_floor < 0.1 * d1


def test_evaluate_recipe_on_the_teacher_itself_gives_ratio_one():
    lab = get_lab(quick_config())

    def teacher_as_student(lab_, cfg, num_steps):
        # The guided teacher wrapped as an unguided "student" would not be the same sampler, so
        # compare the exact sampler the baseline uses: guided Euler through sample_with's CFG.
        class Guided(torch.nn.Module):
            def __init__(self, d):
                super().__init__()
                self.d = d

            def flow_guided(self, x, t, cond, uncond, scale, form="standard"):
                return self.d.flow_guided(x, t, cond, lab_.uncond_like(cond), cfg.guidance_scale)

        return TrainedStudent(Guided(lab_.teacher), student_step_list(num_steps, cfg.shift), "euler")

    row = evaluate_recipe(lab, "teacher", teacher_as_student, 2)
    assert abs(row["ratio"] - 1.0) < 1e-9 and row["steps"] == 2
