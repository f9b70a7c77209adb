"""The score networks' flow -> x0 sigma (``score_sigma``), checked with an oracle network.

The oracle knows the clean sample x and predicts the exact flow of x_t at the noise level x_t was
made with, v = (x_t - x) / sigma_noise. With ``exact`` the teacher's x0 is then x itself; with
``upstream`` (Self-Forcing: shift-8 grid while x_t is noised on the shift-5 grid) it is off by the
ratio of the two grid sigmas, largest at the clamp t = 20.
"""
import pytest
import torch
from torch import nn

from megadistill.diffusion.latents import DenseLatents
from megadistill.diffusion.flow_match import FlowMatchSchedule
from megadistill.methods.base import DistillBatch, Denoiser
from megadistill.methods.dmd import DMD, DMDConfig
from megadistill.methods.score_distillation import add_score_noise, critic_denoising_loss, score_noise_sigma, score_sigma


class Oracle(nn.Module):
    def __init__(self, x, cfg):
        super().__init__()
        self.x, self.cfg = x, cfg

    def forward(self, x_t, t, cond):
        sigma = score_noise_sigma(self.cfg, t).view(-1, 1)
        return ((x_t.double() - self.x.double()) / sigma).float()


def method_and_inputs(score, snap=True):
    cfg = DMDConfig(score_sigma=score, snap_noise_to_grid=snap, guidance_scale=0.0, timestep_shift=5.0)  # Self-Forcing's
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([20.0, 172.4, 833.3, 980.0], dtype=torch.float64)
    eps = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    oracle = Denoiser(Oracle(x, cfg))
    method = DMD(cfg, generator=None, teacher=oracle, critic=oracle, rollout=None)
    x_t = add_score_noise(cfg, x, eps, t)
    return method, cfg, x, x_t, t, eps


@pytest.mark.parametrize("snap", [True, False], ids=["grid", "continuous"])
def test_exact_score_sigma_recovers_the_clean_sample(snap):
    method, cfg, x, x_t, t, _ = method_and_inputs("exact", snap)
    batch = DistillBatch(cond=None, uncond=None, latents=DenseLatents(4, (8,)))
    x0 = method.real_x0(x_t, t, batch)
    torch.testing.assert_close(x0, x, rtol=0, atol=2e-6)


def test_upstream_score_sigma_is_the_shift_8_grid():
    method, cfg, x, x_t, t, eps = method_and_inputs("upstream")
    batch = DistillBatch(cond=None, uncond=None, latents=DenseLatents(4, (8,)))
    x0 = method.real_x0(x_t, t, batch)
    # x0 = x_t - sigma_8 v = x_t - (sigma_8 / sigma_5)(x_t - x): independent grids from the schedule
    ratio = FlowMatchSchedule(shift=8.0).sigma_at(t) / FlowMatchSchedule(shift=5.0).sigma_at(t)
    expected = x_t.double() - ratio.view(-1, 1) * (x_t.double() - x.double())
    torch.testing.assert_close(x0.double(), expected, rtol=0, atol=2e-6)
    assert abs(float(ratio[0]) - 1) > 0.15  # t = 20: 19% off
    assert abs(float(ratio[-1]) - 1) < 1e-3

    # upstream's critic target: the critic's x0 turned back into a flow at the noise sigma, so the
    # critic's flow is scaled by sigma_8 / sigma_5
    flow = (x_t.double() - x0.double()) / score_noise_sigma(cfg, t).view(-1, 1)
    got = critic_denoising_loss(method.critic, x, x_t, t, eps, None, "flow",
                                sigma=score_sigma(cfg, t), noise_sigma=score_noise_sigma(cfg, t))
    want = ((ratio.view(-1, 1) * (eps.double() - x.double()) - (eps.double() - x.double())) ** 2).mean()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(((flow - (eps.double() - x.double())) ** 2).mean(), want, rtol=1e-4, atol=1e-9)


def test_score_sigma_config_is_checked():
    with pytest.raises(ValueError, match="score_sigma"):
        DMDConfig(score_sigma="grid")
    with pytest.raises(ValueError, match="upstream_score_shift"):
        DMDConfig(upstream_score_shift=0.0)
