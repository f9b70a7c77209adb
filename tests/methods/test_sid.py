"""SiD: loss value against a hand-written formula, gradients through both scores, detached normaliser."""
import pytest
import torch

from megadistill.diffusion.latents import DenseLatents
from megadistill.methods.base import Denoiser, DistillBatch, RolloutOutput
from megadistill.methods.sid import SiD, SiDConfig, sid_loss
from megadistill.models.toy.mlp import ToyFlowMLP


@pytest.mark.parametrize("alpha", [1.0, 1.2])
def test_sid_loss_matches_hand_formula(alpha):
    g = torch.Generator().manual_seed(0)
    x, r, f = (torch.randn(2, 3, generator=g) for _ in range(3))
    total = 0.0
    for b in range(2):
        norm = sum(abs(float(x[b, i]) - float(r[b, i])) for i in range(3)) / 3
        for i in range(3):
            rb, fb, xb = float(r[b, i]), float(f[b, i]), float(x[b, i])
            total += (rb - fb) * ((rb - xb) - alpha * (rb - fb)) / norm
    loss = sid_loss(x, r, f, alpha)
    assert loss.dtype == torch.float64
    assert float(loss) == pytest.approx(total / 6, rel=1e-6)


def test_sid_gradients_reach_both_scores_and_normaliser_is_detached():
    g = torch.Generator().manual_seed(1)
    x, r, f = (torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    alpha = 1.0
    sid_loss(x, r, f, alpha).backward()
    norm = (x - r).abs().mean(dim=1, keepdim=True).detach()
    n = x.numel()
    # With r, f held fixed and the normaliser detached, dL/dx = -(r - f) / norm / N.
    torch.testing.assert_close(x.grad, -(r - f).detach() / norm / n)
    # dL/df = [-(r - x) + 2 alpha (r - f)] / norm / N; dL/dr = [(r - x) + (r - f) - 2 alpha (r - f)] / norm / N.
    rd, fd, xd = r.detach(), f.detach(), x.detach()
    torch.testing.assert_close(f.grad, (-(rd - xd) + 2 * alpha * (rd - fd)) / norm / n)
    torch.testing.assert_close(r.grad, ((rd - xd) + (rd - fd) - 2 * alpha * (rd - fd)) / norm / n)


def test_sid_generator_loss_backpropagates_through_teacher_and_critic_inputs():
    torch.manual_seed(0)
    teacher = Denoiser(ToyFlowMLP(2, 3, hidden=16, depth=2)).double()
    for p in teacher.parameters():
        p.requires_grad_(False)
    critic = Denoiser(ToyFlowMLP(2, 3, hidden=16, depth=2)).double()
    x = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)

    class Fixed:
        def __call__(self, generator, batch, *, grad):
            return RolloutOutput(x, 1000.0, 0.0)

    batch = DistillBatch(cond=torch.zeros(4, dtype=torch.long), uncond=torch.full((4,), 3), latents=DenseLatents(4, (2,)), dtype=torch.float64)
    cfg = SiDConfig(timestep_shift=1.0, snap_noise_to_grid=False)
    method = SiD(cfg, generator=teacher, teacher=teacher, critic=critic, rollout=Fixed(),
                 rng=torch.Generator().manual_seed(3))
    loss, _ = method.generator_loss(batch, 0)
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    # The fake score is not under no_grad: its parameters receive gradient (cleared by the loop).
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in critic.parameters())


def test_sid_config_validation():
    with pytest.raises(ValueError, match="alpha"):
        SiDConfig(alpha=-1.0)
def test_sid_distils_the_toy_teacher():
    """1-step SiD student vs the 1-step guided teacher on the toy lab (quick budget).

    Measured (quick_config, seed 0): ratio 0.28; see the report for the flipped-sign run."""
    from megadistill.toylab.config import quick_config
    from megadistill.toylab.lab import evaluate_recipe, get_lab
    from megadistill.toylab.recipes import get_recipe

    lab = get_lab(quick_config())
    row = evaluate_recipe(lab, "sid", get_recipe("sid"), 1)
    assert row["ratio"] < 0.5, row
