"""ODE regression: pairs stored at exactly the training step list; loss on the right states."""
import pytest
import torch

from megadistill.diffusion.latents import DenseLatents
from megadistill.diffusion.flow_match import warp_step_list
from megadistill.methods.base import Denoiser, DistillBatch
from megadistill.methods.ode_regression import (
    ODERegression, ODERegressionConfig, check_trajectory_steps, generate_ode_pairs, ode_regression_loss,
)
from megadistill.models.toy.mlp import ToyFlowMLP


def test_pairs_are_stored_at_exactly_the_warped_step_list():
    # Upstream's 48-step shift-8 run stored indices [0, 12, 24, 36] = [1000, 960, 888.9, 727.3], not
    # the warped list; here the grid is built to contain every step.
    steps = warp_step_list([1000, 750, 500, 250], 5.0).tolist()
    visited = []
    c = torch.tensor([0.3, -0.7], dtype=torch.float64)

    def v_fn(x, t):
        visited.append(float(t[0]))
        return c.expand_as(x)

    noise = torch.randn(3, 2, dtype=torch.float64)
    traj, stored = generate_ode_pairs(v_fn, noise, steps, num_inference_steps=48, shift=8.0)
    assert stored.tolist() == steps and traj.shape == (3, 5, 2)
    for s in steps:
        assert any(abs(v - s) < 1e-6 for v in visited)
    # A constant field integrates exactly: x(sigma) = noise + c (sigma - 1).
    for k, s in enumerate(steps):
        torch.testing.assert_close(traj[:, k], noise + c * (s / 1000 - 1))
    torch.testing.assert_close(traj[:, -1], noise - c)


def test_pairs_match_a_plain_euler_run_on_the_same_grid():
    torch.manual_seed(0)
    net = Denoiser(ToyFlowMLP(2, 2, hidden=16, depth=2)).double()
    cond = torch.tensor([0, 1, 1])
    v_fn = lambda x, t: net.flow(x, t, cond)  # noqa: E731
    noise = torch.randn(3, 2, dtype=torch.float64)
    traj, _ = generate_ode_pairs(v_fn, noise, [1000.0, 500.0], num_inference_steps=4, shift=1.0)
    x = noise
    with torch.no_grad():  # grid 1, .75, .5, .25, 0 already contains 0.5
        for a, b in [(1.0, 0.75), (0.75, 0.5)]:
            x = x + v_fn(x, torch.full((3,), a * 1000, dtype=torch.float64)) * (b - a)
    torch.testing.assert_close(traj[:, 1], x)


def test_stored_steps_must_match_training_list():
    check_trajectory_steps(torch.tensor([1000.0, 750.0]), [1000, 750])
    with pytest.raises(ValueError, match="training step list"):
        check_trajectory_steps(torch.tensor([1000.0, 960.0, 888.9, 727.3]), [1000.0, 937.5, 833.33, 625.0])


def test_loss_uses_the_indexed_state_and_skips_t0():
    torch.manual_seed(0)
    gen = Denoiser(ToyFlowMLP(2, 2, hidden=16, depth=2)).double()
    steps = torch.tensor([1000.0, 500.0, 0.0], dtype=torch.float64)
    traj = torch.randn(4, 4, 2, dtype=torch.float64)
    cond = torch.tensor([0, 1, 0, 1])
    index = torch.tensor([0, 1, 2, 1])
    err, t = ode_regression_loss(gen, traj, steps, cond, index)
    for b in range(4):
        x0 = gen.x0(traj[b:b + 1, index[b]], steps[index[b]].reshape(1), cond[b:b + 1])
        assert float(err[b].detach()) == pytest.approx(float(((x0.detach() - traj[b:b + 1, -1]) ** 2).mean()))
    method = ODERegression(ODERegressionConfig(step_list=[1000.0, 500.0, 0.0]), generator=gen,
                           rng=torch.Generator().manual_seed(0))
    batch = DistillBatch(cond=cond, latents=DenseLatents(4, (2,)), trajectory=traj, trajectory_steps=steps,
                         dtype=torch.float64)
    loss, logs = method.generator_loss(batch, 0)
    rng = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 3, (4,), generator=rng)
    err, t = ode_regression_loss(gen, traj, steps, cond, idx)
    torch.testing.assert_close(loss, err[t != 0].mean())
    with pytest.raises(ValueError, match="training step list"):
        method.generator_loss(DistillBatch(cond=cond, latents=DenseLatents(4, (2,)), trajectory=traj,
                                           trajectory_steps=torch.tensor([1000.0, 400.0, 0.0])), 0)


def test_ode_regression_distils_the_toy_teacher():
    """1-step student regressed on guided-teacher ODE pairs (quick budget). Measured: ratio 0.10."""
    from megadistill.toylab.config import quick_config
    from megadistill.toylab.lab import evaluate_recipe, get_lab
    from megadistill.toylab.recipes import get_recipe

    lab = get_lab(quick_config())
    row = evaluate_recipe(lab, "ode_regression", get_recipe("ode_regression"), 1)
    assert row["ratio"] < 0.25, row
