"""GAN method: wiring against independent recomputation, and the toy-lab proof that it distills."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megadistill.diffusion.latents import DenseLatents
from megadistill.methods.base import Denoiser, DistillBatch, RolloutOutput
from megadistill.methods.gan import GANConfig, GANDistillation
from megadistill.models.discriminators.discriminator import Discriminator
from megadistill.models.discriminators.register_heads import RegisterHeads, RegisterHeadsConfig
from megadistill.models.toy.mlp import ToyFlowMLP
from megadistill.toylab.config import quick_config
from megadistill.toylab.lab import recipe_ratio


class SpyBackbone(nn.Module):
    """A small backbone following the discriminator protocol that records its inputs."""

    def __init__(self, dim=2, hidden=8):
        super().__init__()
        self.lin = nn.Linear(dim, hidden)
        self.out = nn.Linear(hidden, dim)
        self.calls = []

    def forward(self, x, t, cond, return_features=None):
        self.calls.append((x.detach().clone(), t.detach().clone(), cond.clone()))
        h = torch.tanh(self.lin(x) + (t.float() / 1000.0)[:, None] + cond.float()[:, None])
        return self.out(h), [h.unsqueeze(1) * (i + 1) for i in range(len(return_features))]


class FixedNoiseRollout:
    """One-step rollout from fixed noise, so the fake samples can be recomputed by the test."""

    step_list = [1000.0]

    def __init__(self, z):
        self.z = z

    def __call__(self, generator, batch, *, grad):
        t = torch.full((batch.batch_size,), 1000.0, dtype=torch.float64)
        with torch.set_grad_enabled(grad):
            return RolloutOutput(generator.x0(self.z, t, batch.cond), 1000.0, 0.0)


def _setup(cfg, b=6):
    torch.manual_seed(0)
    gen = Denoiser(ToyFlowMLP(dim=2, num_classes=3, hidden=16, depth=2))
    spy = SpyBackbone()
    disc = Discriminator(spy, RegisterHeads(RegisterHeadsConfig(dim=8, num_layers=2, num_heads=2)), [0, 1])
    z = torch.randn(b, 2)
    method = GANDistillation(
        cfg, generator=gen, critic=disc, rollout=FixedNoiseRollout(z), rng=torch.Generator().manual_seed(3)
    )
    cond = torch.randint(0, 3, (b,))
    batch = DistillBatch(
        cond=cond, uncond=torch.full_like(cond, 3), latents=DenseLatents(b, (2,)), real=torch.randn(b, 2)
    )
    return method, batch, spy, z


def _check_pairing(spy, real, fake, b):
    """One 2B call; fakes first; same t and the same eps for the pair."""
    x, t, cond = spy.calls[0]
    assert x.shape[0] == 2 * b and torch.equal(t[:b], t[b:]) and torch.equal(cond[:b], cond[b:])
    sigma = (t[:b] / 1000.0).float()[:, None]
    eps_real = (x[b:] - (1 - sigma) * real) / sigma
    eps_fake = (x[:b] - (1 - sigma) * fake) / sigma
    torch.testing.assert_close(eps_fake, eps_real, atol=1e-4, rtol=1e-4)
    return x, t, cond, sigma, eps_real


@pytest.mark.parametrize("loss", ["non_saturating", "relativistic", "hinge"])
def test_generator_loss_wiring_and_frozen_critic(loss):
    cfg = GANConfig(loss=loss, gan_g_weight=0.3, timestep_shift=1.0, snap_noise_to_grid=False)
    method, batch, spy, z = _setup(cfg)
    value, logs = method.generator_loss(batch, 0)
    value.backward()
    b = batch.batch_size
    with torch.no_grad():
        fake = method.generator.x0(z, torch.full((b,), 1000.0, dtype=torch.float64), batch.cond)
        x, t, cond, _, _ = _check_pairing(spy, batch.real, fake, b)
        logits = method.critic(x, t, cond).logits
    d_f, d_r = logits[:b], logits[b:]
    want = {"non_saturating": F.softplus(-d_f).mean(), "relativistic": F.softplus(-(d_f - d_r)).mean(),
            "hinge": -d_f.mean()}[loss]
    assert value.item() == pytest.approx(0.3 * want.item(), rel=1e-5)
    assert all(p.grad is None for p in method.critic.parameters())  # D frozen in the G step
    assert all(p.requires_grad for p in method.critic.parameters())  # ... and unfrozen after
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.generator.parameters())


def test_critic_loss_total_and_denoising_term():
    cfg = GANConfig(
        loss="relativistic", gan_d_weight=0.5, r1_weight=2.0, r2_weight=3.0, critic_denoising_weight=0.7,
        timestep_shift=1.0, snap_noise_to_grid=False,
    )
    method, batch, spy, z = _setup(cfg)
    value, logs = method.critic_loss(batch, 0)
    b = batch.batch_size
    fake = method.generator.x0(z, torch.full((b,), 1000.0, dtype=torch.float64), batch.cond).detach()
    x, t, cond, _, eps = _check_pairing(spy, batch.real, fake, b)
    assert len(spy.calls) == 3  # the 2B batch, then the R1 and R2 perturbed inputs
    # R1 perturbs the noisy reals, R2 the noisy fakes, by sigma * N(0, I) with sigma = 0.01, at the same t
    d1, d2 = spy.calls[1][0] - x[b:], spy.calls[2][0] - x[:b]
    assert 0 < d1.abs().max() < 0.06 and 0 < d2.abs().max() < 0.06
    assert torch.equal(spy.calls[1][1], t[:b]) and torch.equal(spy.calls[2][1], t[:b])
    with torch.no_grad():
        v_fake = method.critic(x, t, cond).flow[:b]
    denoise = ((v_fake.double() - (eps.double() - fake.double())) ** 2).mean().item()
    assert logs["critic_denoising_loss"] == pytest.approx(denoise, rel=1e-3)
    total = 0.5 * logs["gan_d_loss"] + 0.5 * (logs["r1"] + logs["r2"]) + 0.7 * logs["critic_denoising_loss"]
    assert value.item() == pytest.approx(total, rel=1e-5)
    value.backward()
    assert method.critic.heads.registers.grad is not None
    assert all(p.grad is None for p in method.generator.parameters())  # the critic step never trains G


def test_gan_needs_real_samples_and_validates_config():
    method, batch, _, _ = _setup(GANConfig(timestep_shift=1.0))
    batch.real = None
    with pytest.raises(ValueError, match="batch.real"):
        method.generator_loss(batch, 0)
    with pytest.raises(ValueError, match="loss"):
        GANConfig(loss="wasserstein")
    with pytest.raises(ValueError, match="r1_sigma"):
        GANConfig(r1_sigma=0.0)


# Measured (OMP_NUM_THREADS=1, quick lab (shared by the toy-lab tests), budget_scale 0.5 = 300 iterations): 1-step
# ratio 0.27 (default lab: 0.23); the same recipe with the generator loss sign flipped (default lab): 4.6. Threshold with margin. (The 4-step
# GAN needs the full budget and its generator EMA to be reliably below 1: bench only.)
GAN_1STEP_MAX_RATIO = 0.5


def test_gan_distills_the_toy_teacher_one_step():
    ratio = recipe_ratio("gan", 1, quick_config())
    assert ratio < GAN_1STEP_MAX_RATIO, ratio


def test_generator_ema_wrapper_follows_its_generator():
    from megadistill.toylab.recipes_adversarial import GeneratorEMA

    cfg = GANConfig(timestep_shift=1.0, snap_noise_to_grid=False)
    method, batch, _, _ = _setup(cfg)
    tracked = GeneratorEMA(method, decay=0.9, start_step=1)
    assert tracked.has_critic and tracked.critic_parameters() == method.critic_parameters()

    def bump():  # stands in for an optimiser step
        with torch.no_grad():
            for p in method.generator.parameters():
                p.add_(1.0)

    bump()
    tracked.generator_loss(batch, 0)  # before start_step: the EMA copies the generator
    for p_e, p_g in zip(tracked.ema.parameters(), method.generator.parameters()):
        torch.testing.assert_close(p_e, p_g)
    before = [p.clone() for p in tracked.ema.parameters()]
    bump()
    ema = tracked.finalize()
    for p_e, p_old, p_g in zip(ema.parameters(), before, method.generator.parameters()):
        torch.testing.assert_close(p_e, 0.9 * p_old + 0.1 * p_g)
