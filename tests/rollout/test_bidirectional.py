"""Bidirectional rollout and few-step inference on tiny Wan models (fp32).

Checks: TI2V frame 0 untouched and gradient-free (through the DMD / SiD losses), gradient only at the
exit step, exit step shared / noise per rank, training and inference on the same step list, and the
nominal timesteps reported for ts_schedule.
"""
import copy

import pytest
import torch

from megadistill.diffusion.latents import DenseLatents
from megadistill.diffusion.flow_match import shift_sigma
from megadistill.methods.base import DistillBatch, freeze
from megadistill.methods.dmd import DMD, DMDConfig
from megadistill.methods.sid import SiD, SiDConfig
from megadistill.models.wan import build_wan
from megadistill.models.wan.denoiser import first_frame_gradient_mask
from megadistill.rollout.bidirectional import BidirectionalRollout, bidirectional_generate
from megadistill.rollout.steps import StepListConfig
from megadistill.models.wan.denoiser import WanCondition, WanDenoiser

B, F, H, W = 2, 3, 4, 4


def _wan(preset, **overrides):
    """A tiny Wan whose output head is not zero (Wan initialises it to zero: every flow would be 0)."""
    net = build_wan(preset, **overrides)
    torch.nn.init.normal_(net.head.head.weight, std=0.1)
    return net


def _ti2v_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    cond = WanCondition(context=torch.randn(B, 5, 32, generator=g),
                        first_frame=torch.randn(B, 48, 1, H, W, generator=g))
    uncond = WanCondition(context=torch.zeros(B, 5, 32), first_frame=cond.first_frame)
    return DistillBatch(cond=cond, uncond=uncond, latents=DenseLatents(B, (48, F, H, W), frame_dim=2))


def _t2v_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    cond = WanCondition(context=torch.randn(B, 5, 32, generator=g))
    return DistillBatch(cond=cond, uncond=WanCondition(context=torch.zeros(B, 5, 32)), latents=DenseLatents(B, (16, F, H, W), frame_dim=2))


class TimestepSpy(torch.nn.Module):
    """Wraps a net: records (timesteps, grad enabled) per call."""

    def __init__(self, net):
        super().__init__()
        self.net, self.config, self.calls = net, net.config, []

    def forward(self, x, t, *args):
        t_row = t if t.dim() == 1 else t[:, -1]  # TI2V per-token t: the last token is not in frame 0
        self.calls.append((float(t_row[0]), torch.is_grad_enabled()))
        return self.net(x, t, *args)


class KeepOutput:
    """A rollout wrapper that keeps the last output so a test can inspect the samples' gradient."""

    def __init__(self, rollout):
        self.rollout, self.out = rollout, None
        self.step_list = rollout.step_list

    def __call__(self, generator, batch, *, grad):
        self.out = self.rollout(generator, batch, grad=grad)
        if grad:
            self.out.samples.retain_grad()
        return self.out


def test_step_list_is_the_warped_list_on_the_shifted_grid():
    steps = StepListConfig(shift=5.0)  # [1000, 750, 500, 250], warp, Self-Forcing's shift 5
    expected = [1000.0 * float(shift_sigma(torch.tensor(s / 1000.0, dtype=torch.float64), 5.0))
                for s in (1000, 750, 500, 250)]  # closed form 5s / (1 + 4s): 1000, 937.5, 833.3, 625
    rollout = BidirectionalRollout(steps)
    assert rollout.step_list == pytest.approx(expected, abs=1e-4)  # the grid is float32, as upstream
    assert rollout.step_list == steps.timesteps()


@pytest.mark.parametrize("method_cls, cfg",
                         [(DMD, DMDConfig(guidance_scale=2.0)), (SiD, SiDConfig(guidance_scale=2.0))])
def test_ti2v_frame0_is_untouched_and_gets_no_gradient(method_cls, cfg):
    torch.manual_seed(0)
    teacher = freeze(WanDenoiser(_wan("tiny-ti2v")))
    gen, critic = copy.deepcopy(teacher).requires_grad_(True), copy.deepcopy(teacher).requires_grad_(True)
    rollout = KeepOutput(BidirectionalRollout(StepListConfig(), torch.Generator().manual_seed(1),
                                              torch.Generator().manual_seed(2)))
    method = method_cls(cfg, generator=gen, teacher=teacher, critic=critic, rollout=rollout,
                        rng=torch.Generator().manual_seed(3))
    batch = _ti2v_batch()
    loss, _ = method.generator_loss(batch, 0)
    loss.backward()
    out = rollout.out
    assert torch.equal(out.samples[:, :, :1].detach(), batch.cond.first_frame)
    assert out.gradient_mask.dtype == torch.bool and out.gradient_mask.shape == (1, 1, F, 1, 1)
    assert torch.equal(out.gradient_mask.flatten(), torch.tensor([False, True, True]))
    grad = out.samples.grad
    assert torch.count_nonzero(grad[:, :, 0]) == 0
    assert torch.count_nonzero(grad[:, :, 1:]) > 0.9 * grad[:, :, 1:].numel()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in gen.parameters())


def test_t2v_and_i2v_rollouts_have_no_gradient_mask():
    torch.manual_seed(0)
    steps = StepListConfig()
    t2v = WanDenoiser(_wan("tiny-t2v"))
    out = BidirectionalRollout(steps, torch.Generator().manual_seed(0))(t2v, _t2v_batch(), grad=False)
    assert out.gradient_mask is None and out.samples.shape == (B, 16, F, H, W)
    i2v = WanDenoiser(_wan("tiny-i2v"))
    cond = WanCondition(context=torch.randn(B, 5, 32), clip_fea=torch.randn(B, 257, 48), y=torch.randn(B, 20, F, H, W))
    out = BidirectionalRollout(steps, torch.Generator().manual_seed(0))(
        i2v, DistillBatch(cond=cond, latents=DenseLatents(B, (16, F, H, W), frame_dim=2)), grad=True)
    assert out.gradient_mask is None and out.samples.requires_grad


def test_gradient_only_at_the_exit_step_and_nominal_timesteps():
    torch.manual_seed(0)
    steps = StepListConfig()
    spy = TimestepSpy(_wan("tiny-t2v"))
    den = WanDenoiser(spy)
    rollout = BidirectionalRollout(steps, torch.Generator().manual_seed(5), torch.Generator().manual_seed(6))
    seen_exits = set()
    for _ in range(12):
        spy.calls.clear()
        out = rollout(den, _t2v_batch(), grad=True)
        k = out.exit_index
        seen_exits.add(k)
        # steps 0..k-1 without grad, the exit step k with grad, nothing after it
        assert [t for t, _ in spy.calls] == pytest.approx(steps.timesteps()[:k + 1])
        assert [g for _, g in spy.calls] == [False] * k + [True]
        assert out.samples.requires_grad
        # ts_schedule gets the nominal (un-warped) timesteps of the exit step and the next one
        assert out.denoised_timestep_from == steps.steps[k]
        assert out.denoised_timestep_to == (steps.steps[k + 1] if k + 1 < len(steps.steps) else 0.0)
    assert seen_exits == {0, 1, 2, 3}
    spy.calls.clear()
    out = BidirectionalRollout(steps, torch.Generator().manual_seed(5), last_step_only=True)(den, _t2v_batch(),
                                                                                             grad=False)
    assert out.exit_index == 3 and not out.samples.requires_grad and not any(g for _, g in spy.calls)


def test_exit_step_is_shared_and_noise_is_per_rank():
    torch.manual_seed(0)
    den = WanDenoiser(_wan("tiny-t2v"))
    steps = StepListConfig()
    rank0 = BidirectionalRollout(steps, torch.Generator().manual_seed(42), torch.Generator().manual_seed(100))
    rank1 = BidirectionalRollout(steps, torch.Generator().manual_seed(42), torch.Generator().manual_seed(101))
    again0 = BidirectionalRollout(steps, torch.Generator().manual_seed(42), torch.Generator().manual_seed(100))
    exits = []
    with torch.no_grad():
        for _ in range(6):
            a, b, c = (r(den, _t2v_batch(), grad=False) for r in (rank0, rank1, again0))
            assert a.exit_index == b.exit_index == c.exit_index
            assert (a.samples - b.samples).abs().mean() > 0.1  # different noise per rank
            assert torch.equal(a.samples, c.samples)  # same seeds: reproducible
            exits.append(a.exit_index)
    assert len(set(exits)) > 1


@pytest.mark.parametrize("preset", ["tiny-t2v", "tiny-ti2v"])
def test_inference_and_training_run_the_same_steps_and_agree(preset):
    torch.manual_seed(0)
    steps = StepListConfig()
    spy = TimestepSpy(_wan(preset))
    den = WanDenoiser(spy)
    batch = _ti2v_batch() if preset == "tiny-ti2v" else _t2v_batch()
    rollout = BidirectionalRollout(steps, torch.Generator().manual_seed(0), torch.Generator().manual_seed(9),
                                   last_step_only=True)
    with torch.no_grad():
        trained = rollout(den, batch, grad=False).samples
    train_steps = [t for t, _ in spy.calls]
    spy.calls.clear()
    g = torch.Generator().manual_seed(9)
    noise = torch.randn((B, *batch.latents.sample_shape), generator=g)
    sampled = bidirectional_generate(den, batch.cond, noise, steps, noise_generator=g)
    assert train_steps == [t for t, _ in spy.calls] == steps.timesteps()
    torch.testing.assert_close(sampled, trained, rtol=0, atol=0)
    if preset == "tiny-ti2v":
        assert torch.equal(sampled[:, :, :1], batch.cond.first_frame)


def test_gradient_mask_needs_two_frames():
    assert first_frame_gradient_mask(4).expand(2, 3, 4, 5, 5)[:, :, 0].any().item() is False
    with pytest.raises(ValueError, match="at least 2 latent frames"):
        first_frame_gradient_mask(1)


def test_critic_denoising_loss_leaves_out_the_masked_conditioning_frame():
    from megadistill.methods.score_distillation import critic_denoising_loss
    from megadistill.models.wan import build_wan
    from megadistill.models.wan.denoiser import WanCondition, WanDenoiser

    torch.manual_seed(0)
    critic = WanDenoiser(build_wan("tiny-ti2v", text_len=8))
    x, eps = torch.randn(2, 48, 3, 4, 4), torch.randn(2, 48, 3, 4, 4)
    t = torch.tensor([400.0, 700.0])
    x_t = (1 - t / 1000).view(-1, 1, 1, 1, 1) * x + (t / 1000).view(-1, 1, 1, 1, 1) * eps
    cond = WanCondition(torch.randn(2, 8, 32), first_frame=x[:, :, :1])
    mask = first_frame_gradient_mask(3)
    for kind in ("flow", "x0"):
        got = critic_denoising_loss(critic, x, x_t, t, eps, cond, kind, mask)
        with torch.no_grad():
            pred = critic.flow(x_t, t, cond) if kind == "flow" else critic.x0(x_t, t, cond)
        target = eps - x if kind == "flow" else x
        expected = ((pred.double() - target.double()) ** 2)[:, :, 1:].mean()
        torch.testing.assert_close(got.detach(), expected, rtol=1e-6, atol=0)  # two float32 forwards
        unmasked = critic_denoising_loss(critic, x, x_t, t, eps, cond, kind)
        assert not torch.allclose(unmasked, got)
