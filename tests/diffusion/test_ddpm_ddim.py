"""DDPM / DDIM schedule and steps against diffusers' DDIMScheduler and DDPMScheduler (same config)."""
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from megadistill.diffusion.ddpm import DDPMSchedule
from megadistill.diffusion.samplers import ddim_sample

SCHEDULES = {
    "linear": dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "squaredcos_cap_v2": dict(beta_schedule="squaredcos_cap_v2"),
}
PREDS = ["epsilon", "v_prediction", "sample"]


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_alphas_cumprod_and_snr(name):
    ref = DDIMScheduler(**SCHEDULES[name])
    ours = DDPMSchedule(**SCHEDULES[name])
    # diffusers accumulates the product in float32: agreement to float32 rounding, not bits
    assert torch.allclose(ours.betas, ref.betas.double(), rtol=1e-5, atol=1e-9)
    assert torch.allclose(ours.alphas_cumprod, ref.alphas_cumprod.double(), rtol=2e-5, atol=1e-9)
    t = torch.tensor([0, 17, 500, 999])
    # SNR near t = 0 suffers float32 cancellation in 1 - alpha_bar: rebuild alpha_bar in float64 from
    # diffusers' betas (each exact to float32 rounding) instead
    ac = torch.cumprod(1 - ref.betas.double(), 0)[t]
    assert torch.allclose(ours.snr(t), ac / (1 - ac), rtol=1e-5)
    a, s = ours.alpha_sigma(t)
    assert torch.allclose(a**2 + s**2, torch.ones(4, dtype=torch.float64), atol=1e-15)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    # diffusers' float32 alphas_cumprod differ from ours by up to rtol 2e-5 (above), so the noised
    # samples agree to that relative precision, not to a fixed 1e-6
    assert torch.allclose(ours.add_noise(x0, eps, t), ref.add_noise(x0, eps, t), rtol=1e-4, atol=1e-5)
    v_ref = DDPMScheduler(**SCHEDULES[name], prediction_type="v_prediction").get_velocity(x0, eps, t)
    v_ours = DDPMSchedule(**SCHEDULES[name], prediction_type="v_prediction").target(x0, eps, t)
    assert torch.allclose(v_ours, v_ref, atol=1e-5)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_inference_timesteps(spacing):
    for n in (1, 3, 4, 7, 50, 1000):
        ref = DDIMScheduler(timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
        ref.set_timesteps(n)
        ours = DDPMSchedule(timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
        assert torch.equal(ours.inference_timesteps(n), ref.timesteps)


def _float64(ref, ours):
    """Give a diffusers scheduler our float64 alpha_bar so a step comparison tests formulas, not
    float32 rounding (near t = T the cosine schedule's alpha_bar ~ 1e-9 loses digits in float32)."""
    ref.alphas_cumprod = ours.alphas_cumprod.clone()
    if hasattr(ref, "final_alpha_cumprod"):
        ref.final_alpha_cumprod = torch.tensor(ours.final_alpha_cumprod, dtype=torch.float64)
    return ref


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("pred", PREDS)
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_matches_diffusers(name, pred, eta):
    cfg = dict(SCHEDULES[name], prediction_type=pred)
    ours = DDPMSchedule(**cfg)
    ref32 = DDIMScheduler(**cfg, clip_sample=False)
    ref64 = _float64(DDIMScheduler(**cfg, clip_sample=False), ours)
    n = 10
    g = torch.Generator().manual_seed(0)
    x, out, noise = (torch.randn(2, 4, 5, generator=g, dtype=torch.float64) for _ in range(3))
    for ref in (ref32, ref64):
        ref.set_timesteps(n)
    for t in ref64.timesteps[[0, 4, -1]]:  # first, middle, last (prev < 0: alpha_bar_prev = 1)
        tb = t.expand(2)
        x_prev, x0 = ours.ddim_step(out, tb, x, ours.ddim_prev_timestep(tb, n), eta, noise)
        r = ref64.step(out, t, x, eta=eta, variance_noise=noise if eta > 0 else None)
        assert torch.allclose(x0, r.pred_original_sample, rtol=0, atol=1e-10)
        assert torch.allclose(x_prev, r.prev_sample, rtol=0, atol=1e-10)
        # stock float32 scheduler, float32 tensors: same up to float32 rounding
        r = ref32.step(out.float(), t, x.float(), eta=eta, variance_noise=noise.float() if eta > 0 else None)
        assert torch.allclose(x_prev.float(), r.prev_sample, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("pred", PREDS)
def test_ddim_eta1_is_ddpm_posterior(name, pred):
    """DDIM with eta = 1 is DDPMScheduler's ancestral step (fixed_small variance), same generator draw."""
    cfg = dict(SCHEDULES[name], prediction_type=pred)
    ours = DDPMSchedule(**cfg)
    ref = _float64(DDPMScheduler(**cfg, clip_sample=False, variance_type="fixed_small"), ours)
    for n in (1000, 20):
        ref.set_timesteps(n)
        ts = ref.timesteps
        x, out = torch.randn(2, 6, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
        for i in (0, len(ts) // 2, len(ts) - 2, len(ts) - 1):
            t = ts[i]
            r = ref.step(out, t, x, generator=torch.Generator().manual_seed(i)).prev_sample
            tb = t.expand(2)
            mine, _ = ours.ddim_step(
                out, tb, x, ours.ddim_prev_timestep(tb, n), 1.0, generator=torch.Generator().manual_seed(i)
            )
            assert torch.allclose(mine, r, rtol=0, atol=1e-10), (n, i)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_sampler_loop_matches_diffusers(eta):
    cfg = dict(SCHEDULES["scaled_linear"], prediction_type="v_prediction")
    ref = DDIMScheduler(**cfg, clip_sample=False, timestep_spacing="trailing")
    ours = DDPMSchedule(**cfg, timestep_spacing="trailing")
    torch.manual_seed(0)
    a, b = 0.3 * torch.randn(8), torch.randn(8)
    model = lambda x, t: a * x + b * (t.to(x.dtype)[:, None] / 1000)  # noqa: E731
    noise = torch.randn(4, 8)
    n = 25
    ref.set_timesteps(n)
    g = torch.Generator().manual_seed(3)
    x = noise.clone()
    for t in ref.timesteps:
        x = ref.step(model(x, t.expand(4)), t, x, eta=eta, generator=g).prev_sample
    # float32 here so the eta = 1 noise is drawn in the same dtype (hence the same numbers) as diffusers
    mine = ddim_sample(model, noise, ours, n, eta=eta, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(mine, x, rtol=1e-4, atol=5e-4)


@pytest.mark.parametrize(
    "field,value",
    [("beta_schedule", "cosine"), ("prediction_type", "flow"), ("timestep_spacing", "even"), ("beta_end", 2.0)],
)
def test_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        DDPMSchedule(**{field: value})
    with pytest.raises(ValueError, match="eta"):
        DDPMSchedule().ddim_step(torch.zeros(1, 2), 10, torch.zeros(1, 2), 0, eta=1.5)
