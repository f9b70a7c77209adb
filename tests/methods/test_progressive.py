"""Progressive distillation: the target equals `stride` teacher Euler steps; stages halve the steps."""
import pytest
import torch

from megadistill.diffusion.latents import DenseLatents
from megadistill.diffusion.samplers import flow_inference_sigmas
from megadistill.methods.base import Denoiser, DistillBatch
from megadistill.methods.progressive import ProgressiveConfig, ProgressiveDistillation, teacher_multistep_target
from megadistill.models.toy.mlp import ToyFlowMLP


def _teacher():
    torch.manual_seed(0)
    return Denoiser(ToyFlowMLP(2, 3, hidden=16, depth=2))


def test_target_equals_two_teacher_euler_steps():
    teacher = _teacher()
    cond = torch.tensor([0, 1, 2, 0])
    x = torch.randn(4, 2)
    sig = torch.tensor([0.75, 0.5, 0.25], dtype=torch.float64)
    v_fn = lambda y, t: teacher.flow(y, t, cond)  # noqa: E731
    target = teacher_multistep_target(v_fn, x, sig)
    assert target.dtype == torch.float64
    with torch.no_grad():
        y = x.double()
        for a, b in [(0.75, 0.5), (0.5, 0.25)]:
            y = y + v_fn(y.float(), torch.full((4,), a * 1000, dtype=torch.float64)).double() * (b - a)
    # One student Euler step with the target flow lands exactly on the two-step teacher state.
    torch.testing.assert_close(x.double() + target * (0.25 - 0.75), y)
    # Per-sample segments give the same answer as the shared one.
    torch.testing.assert_close(teacher_multistep_target(v_fn, x, sig.expand(4, 3)), target)


def test_step_counts_and_validation():
    assert ProgressiveConfig(start_steps=64, end_steps=1).step_counts() == [64, 32, 16, 8, 4, 2, 1]
    assert ProgressiveConfig(start_steps=27, end_steps=1, stride=3).num_stages == 3
    with pytest.raises(ValueError, match="divisible"):
        ProgressiveConfig(start_steps=48, end_steps=1)
    with pytest.raises(ValueError, match="stride"):
        ProgressiveConfig(stride=1)
    # Student grids are nested in teacher grids (a student point is every stride-th teacher point).
    t, s = flow_inference_sigmas(16, 3.0), flow_inference_sigmas(8, 3.0)
    torch.testing.assert_close(t[::2], s)


def test_stages_advance_and_teacher_becomes_frozen_student():
    teacher = _teacher()
    student = _teacher()
    cfg = ProgressiveConfig(start_steps=8, end_steps=2, iterations_per_stage=3, guidance_scale=3.0)
    method = ProgressiveDistillation(cfg, generator=student, teacher=teacher, rng=torch.Generator().manual_seed(0))
    batch = DistillBatch(cond=torch.zeros(4, dtype=torch.long), uncond=torch.full((4,), 3), latents=DenseLatents(4, (2,)), real=torch.randn(4, 2))
    method.generator_loss(batch, 0)
    assert method.stage == 0 and method.teacher is teacher and method.teacher_guidance() == 3.0
    assert len(method.student_step_list()) == 4
    method.generator_loss(batch, 3)
    assert method.stage == 1 and method.teacher is not student and method.teacher_guidance() == 1.0
    assert not any(p.requires_grad for p in method.teacher.parameters())
    torch.testing.assert_close(next(method.teacher.parameters()), next(student.parameters()))
    assert method.student_step_list() == method.final_step_list() == [1000.0, 500.0]
    method.generator_loss(batch, 100)  # past the end: stays in the last stage
    assert method.stage == 1


def test_loss_is_mse_to_target_flow():
    teacher, student = _teacher(), _teacher()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    cfg = ProgressiveConfig(start_steps=4, end_steps=2, iterations_per_stage=10, guidance_scale=1.0)
    method = ProgressiveDistillation(cfg, generator=student, teacher=teacher, rng=torch.Generator().manual_seed(5))
    real = torch.randn(3, 2)
    cond = torch.tensor([0, 1, 2])
    batch = DistillBatch(cond=cond, uncond=torch.full((3,), 3), latents=DenseLatents(3, (2,)), real=real)
    loss, _ = method.generator_loss(batch, 0)
    rng = torch.Generator().manual_seed(5)
    j = torch.randint(0, 2, (3,), generator=rng)
    sig = flow_inference_sigmas(4, 1.0)
    seg = torch.stack([sig[2 * int(i): 2 * int(i) + 3] for i in j])
    eps = torch.randn(real.shape, generator=rng)
    x = (1 - seg[:, :1].float()) * real + seg[:, :1].float() * eps
    with torch.no_grad():
        target = teacher_multistep_target(lambda y, t: teacher.flow(y, t, cond), x, seg)
    v = student.flow(x, seg[:, 0] * 1000, cond)
    torch.testing.assert_close(loss, ((v.double() - target) ** 2).mean())


def test_progressive_distils_the_toy_teacher():
    """8 -> 4 -> 2 -> 1 guided-teacher Euler steps (quick budget) vs the 1-step teacher."""
    from megadistill.toylab.config import quick_config
    from megadistill.toylab.lab import evaluate_recipe, get_lab
    from megadistill.toylab.recipes import get_recipe

    lab = get_lab(quick_config())
    row = evaluate_recipe(lab, "progressive", get_recipe("progressive"), 1)
    assert row["ratio"] < 0.3, row
