"""Self-Forcing training rollout on tiny block-causal Wan models.

Independent references: the single-block case against ``FewStepRollout`` (the bidirectional few-step
rollout through the parallel forward), the clean-context cache against a fresh forward of the
re-noised block, and the gradient structure against a record of every model call.
"""
from pathlib import Path

import pytest
import torch

from megadistill.diffusion.latents import DenseLatents
from megadistill.methods.base import DistillBatch, FewStepRollout, masked_mean
from megadistill.models.wan import CrossAttnCache, new_kv_cache
from megadistill.rollout.self_forcing import RolloutPlan, SelfForcingConfig, SelfForcingRollout
from megadistill.rollout.steps import StepListConfig
from megadistill.models.wan.denoiser import WanCondition
from tests.helpers.scripts import load_module

_fixtures = load_module("rollout_fixtures", Path(__file__).parent / "rollout_fixtures.py")
tiny_denoiser = _fixtures.tiny_denoiser

H = W = 4
FSL = (H // 2) * (W // 2)
STEPS = StepListConfig()  # warped [1000, 937.5, 833.3, 625.0]


def make_batch(denoiser, frames, b=2, seed=1) -> DistillBatch:
    c = denoiser.net.config
    g = torch.Generator().manual_seed(seed)
    context = torch.randn(b, 16, c.text_dim, generator=g)
    cond = WanCondition(context)
    if c.model_type == "i2v":
        cond = WanCondition(context, clip_fea=torch.randn(b, 257, c.image_dim, generator=g),
                            y=torch.randn(b, c.condition_dim, frames, H, W, generator=g))
    return DistillBatch(cond=cond, latents=DenseLatents(b, (c.out_dim, frames, H, W), frame_dim=2))


def rollout_for(cfg, shared=0, noise=1, **kwargs):
    return SelfForcingRollout(STEPS, cfg, generator=torch.Generator().manual_seed(shared),
                              noise_generator=torch.Generator().manual_seed(noise), **kwargs)


def weighted_loss(x):
    return (x * torch.linspace(-1, 1, x.numel()).view_as(x)).sum()


def record_calls(monkeypatch, denoiser):
    """(timestep, start_frame, grad enabled, input requires grad) of every KV-cache model call."""
    calls = []
    step = denoiser.net.forward_causal_step

    def recording(x, t, *args, start_frame=0, **kwargs):
        calls.append((float(t[0]), start_frame, torch.is_grad_enabled(), x.requires_grad))
        return step(x, t, *args, start_frame=start_frame, **kwargs)

    monkeypatch.setattr(denoiser.net, "forward_causal_step", recording)
    return calls


def recording_run(run, record):
    def recording(generator, batch, plan, *, grad):
        record.append(plan)
        return run(generator, batch, plan, grad=grad)
    return recording


# ------------------------------------------------------------------------------------------- config

@pytest.mark.parametrize("kwargs,match", [
    (dict(num_training_frames=0), "num_training_frames must be a positive int"),
    (dict(num_training_frames=6, min_frames=3), r"min_frames \(3\) must be >= num_training_frames"),
    (dict(num_training_frames=6, min_frames=9, max_frames=6), r"max_frames \(6\) must be >= min_frames"),
    (dict(last_step_only=1), "last_step_only must be a bool"),
    (dict(context_noise=-1.0), "context_noise must be a timestep >= 0"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SelfForcingConfig(**kwargs)
    cfg = SelfForcingConfig(num_training_frames=6)
    assert cfg.frame_range() == (6, 6) and (cfg.min_frames, cfg.max_frames) == (None, None)
    with pytest.raises(ValueError, match=r"max_frames \(8\) must be a multiple"):
        SelfForcingConfig(num_training_frames=6, max_frames=8).check_blocks(3)
    with pytest.raises(ValueError, match="context_noise"):
        SelfForcingRollout(STEPS, SelfForcingConfig(context_noise=1001.0))


# ------------------------------------------------------------------------------------------- one block = FewStepRollout

@pytest.mark.parametrize("preset", ["tiny-t2v", "tiny-i2v"])
def test_single_block_equals_few_step_rollout(preset):
    """One block covering the video is the bidirectional case: same exit step (same shared seed),
    same samples, same denoised timestep range and the same parameter gradients (exit step only)."""
    exits = set()
    for seed in range(8):
        grads, outs = [], []
        for which in ("self_forcing", "few_step"):
            denoiser = tiny_denoiser(preset, num_frame_per_block=2)
            batch = make_batch(denoiser, frames=2)
            shared, noise = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(100 + seed)
            if which == "self_forcing":
                rollout = SelfForcingRollout(STEPS, SelfForcingConfig(num_training_frames=2), shared, noise)
            else:
                rollout = FewStepRollout(STEPS.timesteps(), schedule=STEPS.schedule(), generator=shared,
                                         noise_generator=noise)
            out = rollout(denoiser, batch, grad=True)
            weighted_loss(out.samples).backward()
            outs.append(out)
            grads.append({n: p.grad for n, p in denoiser.net.named_parameters()})
        ours, reference = outs
        assert ours.exit_index == reference.exit_index
        exits.add(ours.exit_index)
        assert (ours.denoised_timestep_from, ours.denoised_timestep_to) == \
               (reference.denoised_timestep_from, reference.denoised_timestep_to)
        assert ours.gradient_mask is None
        torch.testing.assert_close(ours.samples, reference.samples, rtol=1e-5, atol=1e-5)
        for name, g in grads[1].items():
            torch.testing.assert_close(grads[0][name], g, rtol=1e-4, atol=1e-6, msg=name)
    assert exits == {0, 1, 2, 3}  # every exit step was compared


def test_denoised_timestep_range_of_every_exit_matches_few_step_rollout():
    rollout = rollout_for(SelfForcingConfig(num_training_frames=2))
    for i in range(4):
        reference = FewStepRollout(STEPS.timesteps()[:i + 1], last_step_only=True, schedule=STEPS.schedule())
        expected_from = reference._nominal(STEPS.timesteps()[i])
        expected_to = 0.0 if i == 3 else reference._nominal(STEPS.timesteps()[i + 1])
        assert rollout.denoised_timestep_range(RolloutPlan(2, (i,))) == (expected_from, expected_to)
    assert [rollout.denoised_timestep_range(RolloutPlan(2, (i,)))[0] for i in range(4)] == [1000, 750, 500, 250]
    per_block = rollout_for(SelfForcingConfig(num_training_frames=2, same_step_across_blocks=False))
    assert per_block.denoised_timestep_range(RolloutPlan(2, (1,))) == (None, None)  # as upstream


# ------------------------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("same_step", [True, False])
def test_gradient_only_at_the_exit_step_of_blocks_in_the_window(monkeypatch, same_step):
    denoiser = tiny_denoiser(num_frame_per_block=2)
    calls = record_calls(monkeypatch, denoiser)
    cfg = SelfForcingConfig(num_training_frames=4, min_frames=8, max_frames=8, same_step_across_blocks=same_step)
    rollout = rollout_for(cfg, shared=3)
    plan = rollout.draw_plan(2)
    out = rollout.run(denoiser, make_batch(denoiser, 8), plan, grad=True)
    timesteps = STEPS.timesteps()

    expected = []  # (t, start, grad, input requires grad) of every call, written out
    for b, exit_index in enumerate(plan.exit_indices):
        expected += [(timesteps[i], 2 * b, False, False) for i in range(exit_index)]
        expected.append((timesteps[exit_index], 2 * b, b >= 2, False))  # blocks 2, 3 hold the last 4 frames
        if b < 3:
            expected.append((0.0, 2 * b, False, False))  # the clean-context refresh
    assert calls == expected
    if same_step:
        assert len(set(plan.exit_indices)) == 1

    assert [x.requires_grad for x in out.blocks] == [False, False, True, True]
    samples = out.last_frames(4)
    assert samples.requires_grad and samples.shape == (2, 16, 4, H, W)
    params = list(denoiser.net.parameters())
    # a loss on frames before the window reaches no parameter
    earlier = torch.cat(out.blocks[:2], dim=2)
    assert not earlier.requires_grad
    grads = torch.autograd.grad(weighted_loss(samples), params, allow_unused=True)
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0

    calls.clear()
    out = rollout(denoiser, make_batch(denoiser, 8), grad=False)
    assert not out.samples.requires_grad and not any(grad for _, _, grad, _ in calls)


def test_grad_checkpointing_gives_the_same_samples_and_gradients():
    results = []
    for ckpt in (False, True):
        denoiser = tiny_denoiser(num_frame_per_block=2, grad_checkpointing=ckpt)
        rollout = rollout_for(SelfForcingConfig(num_training_frames=4, min_frames=6, max_frames=6), shared=5)
        out = rollout(denoiser, make_batch(denoiser, 6), grad=True)
        weighted_loss(out.samples).backward()
        results.append((out.samples.detach(), {n: p.grad.clone() for n, p in denoiser.net.named_parameters()}))
    (s0, g0), (s1, g1) = results
    torch.testing.assert_close(s1, s0, rtol=0, atol=0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-7, msg=name)


# ------------------------------------------------------------------------------------------- plan sync

def test_shared_generator_syncs_the_plan_and_the_noise_generator_does_not():
    """Two ranks: same shared seed, different noise seeds. Every call picks the same frame count and
    exit steps on both (the ZeRO-3 requirement) and produces different samples."""
    cfg = SelfForcingConfig(num_training_frames=4, min_frames=4, max_frames=10, same_step_across_blocks=False)
    denoiser = tiny_denoiser(num_frame_per_block=2)
    ranks = [rollout_for(cfg, shared=11, noise=1), rollout_for(cfg, shared=11, noise=2)]
    plans = [[], []]
    for rank, record in zip(ranks, plans):
        rank.run = recording_run(rank.run, record)
    batch = make_batch(denoiser, 10)
    for _ in range(6):
        out0, out1 = (rank(denoiser, batch, grad=False) for rank in ranks)
        assert out0.exit_index == out1.exit_index == plans[0][-1].exit_indices[0]
        assert out0.samples.shape == out1.samples.shape == (2, 16, 4, H, W)
        assert (out0.samples - out1.samples).abs().max() > 1e-2  # per-rank noise
    assert plans[0] == plans[1]
    assert len({p.num_frames for p in plans[0]}) > 1  # the frame count is drawn ...
    assert all(p.num_frames in (4, 6, 8, 10) for p in plans[0])  # ... over whole blocks in [min, max]
    assert any(len(set(p.exit_indices)) > 1 for p in plans[0])  # per-block exits
    other = rollout_for(cfg, shared=12, noise=1)
    assert [other.draw_plan(2) for _ in range(6)] != plans[0]


# ------------------------------------------------------------------------------------------- cache refresh

@pytest.mark.parametrize("context_noise", [0.0, 300.0])
def test_cache_refresh_writes_the_clean_context(context_noise):
    denoiser = tiny_denoiser(num_frame_per_block=2)
    net = denoiser.net
    batch = make_batch(denoiser, 4)
    cfg = SelfForcingConfig(num_training_frames=4, context_noise=context_noise)
    rollout = rollout_for(cfg, noise=21)
    out = rollout.run(denoiser, batch, RolloutPlan(4, (0, 0)), grad=True)

    # replay the per-rank noise: the video's noise, then (exit at step 0: no re-noising) block 0's refresh eps
    g = torch.Generator().manual_seed(21)
    noise = torch.randn(2, 16, 4, H, W, generator=g)
    eps = torch.randn(2, 16, 2, H, W, generator=g)
    t_ctx = torch.full((2,), context_noise, dtype=torch.float64)
    clean = STEPS.schedule().add_noise(out.blocks[0].detach(), eps, t_ctx)
    if context_noise == 0:
        assert 0 < (clean - out.blocks[0]).abs().max() < 0.1  # snapped to sigma ~ 0.005, as upstream

    def fresh_keys(x, t):
        cache = new_kv_cache(net, 2, FSL, max_frames=2)
        with torch.no_grad():
            net.forward_causal_step(x, t, batch.cond.context, cache, CrossAttnCache(), start_frame=0)
        return cache

    expected = fresh_keys(clean, t_ctx)
    noisy = fresh_keys(noise[:, :, :2], torch.full((2,), STEPS.timesteps()[0], dtype=torch.float64))
    for layer, ref, first_pass in zip(out.stream.cache.kv, expected, noisy):
        torch.testing.assert_close(layer.k[:, :2 * FSL], ref.k[:, :2 * FSL], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.v[:, :2 * FSL], ref.v[:, :2 * FSL], rtol=1e-5, atol=1e-6)
        assert (layer.k[:, :2 * FSL] - first_pass.k[:, :2 * FSL]).abs().max() > 1e-3  # overwritten
    assert out.stream.cache.kv[0].global_end_index == 4 * FSL


# ------------------------------------------------------------------------------------------- longer than the window

def test_longer_video_reencodes_the_first_frame_and_masks_its_block():
    denoiser = tiny_denoiser(num_frame_per_block=2)
    cfg = SelfForcingConfig(num_training_frames=4, min_frames=8, max_frames=8)
    seen = []

    def reencode(frames):
        seen.append((frames.shape, frames.requires_grad, torch.is_grad_enabled()))
        return frames[:, :, -1:] * 0.5 + 1.0  # a stand-in for decode -> last pixel frame -> encode

    batch = make_batch(denoiser, 8)
    out = rollout_for(cfg, shared=2, noise=3, reencode_first_frame=reencode)(denoiser, batch, grad=True)
    video = rollout_for(cfg, shared=2, noise=3).run(denoiser, batch, RolloutPlan(8, (out.exit_index,) * 4),
                                                    grad=False).video
    assert seen == [(torch.Size([2, 16, 5, H, W]), False, False)]  # frames [0, n - window + 1), no grad
    torch.testing.assert_close(out.samples[:, :, :1], video[:, :, 4:5] * 0.5 + 1.0)
    torch.testing.assert_close(out.samples[:, :, 1:], video[:, :, 5:], rtol=0, atol=0)
    assert out.gradient_mask.tolist() == [[[[[False]], [[False]], [[True]], [[True]]]]]
    torch.testing.assert_close(masked_mean(out.samples, out.gradient_mask), out.samples[:, :, 2:].mean())

    plain = rollout_for(cfg, shared=2, noise=3)(denoiser, batch, grad=True)
    assert plain.gradient_mask is None
    torch.testing.assert_close(plain.samples, video[:, :, 4:], rtol=0, atol=0)
    seen.clear()
    exact = rollout_for(SelfForcingConfig(num_training_frames=4), reencode_first_frame=reencode)
    assert exact(denoiser, make_batch(denoiser, 4), grad=True).gradient_mask is None and not seen
    bad = rollout_for(cfg, reencode_first_frame=lambda frames: frames[:, :, -2:])
    with pytest.raises(ValueError, match="one latent frame"):
        bad(denoiser, batch, grad=False)


# ------------------------------------------------------------------------------------------- errors

def test_rollout_errors():
    causal = tiny_denoiser(num_frame_per_block=2)
    rollout = rollout_for(SelfForcingConfig(num_training_frames=4))
    with pytest.raises(ValueError, match="must be max_frames = 4"):
        rollout(causal, make_batch(causal, 6), grad=False)
    with pytest.raises(ValueError, match="channels"):
        rollout(causal, DistillBatch(cond=make_batch(causal, 4).cond, latents=DenseLatents(2, (8, 4, H, W), frame_dim=2)),
                grad=False)
    with pytest.raises(ValueError, match=r"num_training_frames \(4\) must be a multiple"):
        rollout(tiny_denoiser(num_frame_per_block=3), make_batch(causal, 4), grad=False)
    with pytest.raises(ValueError, match="num_frame_per_block"):
        rollout(tiny_denoiser(), make_batch(causal, 4), grad=False)
    ti2v = tiny_denoiser("tiny-ti2v", num_frame_per_block=2)
    cond = WanCondition(torch.randn(2, 16, 32), first_frame=torch.randn(2, 48, 1, H, W))
    with pytest.raises(ValueError, match="first_frame"):
        rollout(ti2v, DistillBatch(cond=cond, latents=DenseLatents(2, (48, 4, H, W), frame_dim=2)), grad=False)
    with pytest.raises(ValueError, match="does not match whole blocks"):
        rollout.run(causal, make_batch(causal, 4), RolloutPlan(4, (0,)), grad=False)
