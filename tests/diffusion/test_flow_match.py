"""FlowMatch: the upstream training grid (Self-Forcing FlowMatchScheduler), warping, and the inference
grid + Euler sampler against diffusers' FlowMatchEulerDiscreteScheduler."""
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from megadistill.diffusion.flow_match import (
    FlowMatchSchedule,
    add_noise_continuous,
    flow_target,
    shift_sigma,
    shift_timestep,
    warp_step_list,
)
from megadistill.diffusion.samplers import diffusers_flow_sigmas, euler_flow_sample, flow_inference_sigmas


def _upstream_grid(shift, n=1000):
    """Transcription of upstream set_timesteps(n, training=True, shift, sigma_min=0, extra_one_step=True)."""
    sigmas = torch.linspace(1.0, 0.0, n + 1)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    timesteps = sigmas * n
    y = torch.exp(-2 * ((timesteps - n / 2) / n) ** 2)
    y = y - y.min()
    return sigmas, timesteps, y * (n / y.sum())


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0, 8.0])
def test_training_grid_bit_identical_to_upstream(shift):
    s = FlowMatchSchedule(shift=shift)
    sig, ts, w = _upstream_grid(shift)
    assert torch.equal(s.sigmas.float(), sig) and torch.equal(s.timesteps.float(), ts)
    probe = torch.linspace(0, 1000, 257, dtype=torch.float64)
    idx = torch.argmin((ts.double()[None] - probe[:, None]).abs(), dim=1)
    assert torch.equal(s.grid_index(probe), idx)
    assert torch.allclose(s.training_weight(probe), w.double()[idx], rtol=0, atol=0)


def test_training_grid_facts_shift5():
    s = FlowMatchSchedule(shift=5.0)
    assert s.timesteps[0].item() == 1000.0 and len(s.timesteps) == 1000
    # t = 0 snaps to the last grid point: sigma = 5e-3 / 1.004, so "clean" context gets a little noise.
    assert s.sigma_at(torch.tensor([0.0])).item() == pytest.approx(0.005 / 1.004, rel=1e-6)
    w = s.training_weight(s.timesteps)
    assert w.sum().item() == pytest.approx(1000.0, rel=1e-6)
    assert w.min().item() == 0.0
    assert abs(s.timesteps[w.argmax()].item() - 500.0) < 2.0


def test_add_noise_snaps_and_matches_upstream_dtype():
    torch.manual_seed(0)
    s = FlowMatchSchedule(shift=5.0)
    x0, eps = torch.randn(4, 3, 8), torch.randn(4, 3, 8)
    t = torch.tensor([0.0, 250.3, 612.0, 1000.0])
    sigma = s.sigmas[torch.stack([(s.timesteps - ti).abs().argmin() for ti in t.double()])]
    ref = (1 - sigma.float()[:, None, None]) * x0 + sigma.float()[:, None, None] * eps
    assert torch.equal(s.add_noise(x0, eps, t), ref)
    # bf16 inputs: upstream blends in float32 (float32 sigma promotes) and casts to the noise dtype.
    xb, eb = x0.bfloat16(), eps.bfloat16()
    ref_b = ((1 - sigma.float()[:, None, None]) * xb + sigma.float()[:, None, None] * eb).bfloat16()
    assert torch.equal(s.add_noise(xb, eb, t), ref_b)
    # the training target is the flow, independent of t
    assert torch.equal(flow_target(x0, eps), eps - x0)


def test_step_is_euler_on_the_grid():
    s = FlowMatchSchedule(shift=5.0)
    x, v = torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    t = s.timesteps[[10, 999]]
    out = s.step(v, t, x)
    expect = torch.stack([x[0] + v[0] * (s.sigmas[11] - s.sigmas[10]), x[1] - v[1] * s.sigmas[999]])
    assert torch.allclose(out, expect, rtol=0, atol=1e-15)
    assert torch.allclose(s.step(v, t, x, to_final=True), x - v * s.sigmas[[10, 999]][:, None], atol=1e-15)


def test_warp_step_list_shift5():
    w = warp_step_list([1000, 750, 500, 250], shift=5.0)
    assert w.tolist() == pytest.approx([1000.0, 937.5, 2500.0 / 3, 625.0], rel=1e-6)
    # warping == the continuous timestep shift on exact grid points
    assert torch.allclose(w, shift_timestep(torch.tensor([1000.0, 750, 500, 250], dtype=torch.float64), 5.0), rtol=1e-6)
    with pytest.raises(ValueError):
        warp_step_list([1001], shift=5.0)


def test_continuous_form():
    x0, eps = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    sig = torch.tensor([0.0, 0.37, 1.0], dtype=torch.float64)
    xt = add_noise_continuous(x0, eps, sig)
    assert torch.allclose(xt, (1 - sig[:, None]) * x0 + sig[:, None] * eps, atol=0)
    assert shift_sigma(0.0, 5.0) == 0.0 and shift_sigma(1.0, 5.0) == 1.0
    # inference grid: N steps, shifted, terminal 0
    g = flow_inference_sigmas(4, shift=5.0)
    assert g.tolist() == pytest.approx([1.0, 0.9375, 2.5 / 3, 0.625, 0.0])


def test_schedule_validation():
    for kw in ({"shift": 0.0}, {"num_train_timesteps": 0}, {"sigma_min": 0.5, "sigma_max": 0.4}):
        with pytest.raises(ValueError, match=next(iter(kw)).split("_")[0]):
            FlowMatchSchedule(**kw)


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
@pytest.mark.parametrize("n", [4, 50])
def test_inference_grid_and_euler_match_diffusers(shift, n):
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    ref.set_timesteps(n)
    sig = diffusers_flow_sigmas(n, shift)
    assert torch.allclose(ref.sigmas.double(), sig, rtol=0, atol=1e-7)
    assert torch.allclose(ref.timesteps.double(), sig[:-1] * 1000, rtol=0, atol=1e-4)

    # same (affine, time-dependent) model through both loops
    torch.manual_seed(1)
    a, b = torch.randn(6), torch.randn(6)
    model = lambda x, t: a * x + b * (t.float()[:, None] / 1000)  # noqa: E731
    noise = torch.randn(3, 6)
    x = noise.clone()
    for t in ref.timesteps:
        x = ref.step(model(x, t.expand(3)), t, x).prev_sample
    ours = euler_flow_sample(model, noise.double(), sig)
    assert torch.allclose(ours.float(), x, rtol=1e-4, atol=1e-5)
