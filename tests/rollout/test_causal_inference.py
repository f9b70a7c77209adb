"""Streaming few-step inference with a block-causal Wan against an independent parallel reference.

The reference (``parallel_generate``) never touches a KV cache: for every step of every block it runs
the parallel block-causal ``model.forward`` on cat(previous blocks' x0, re-noised at context_noise for
the ``noised`` refresh or as they are for ``clean``, current block state) with per-frame timesteps
[B, F] and keeps the current block's x0. Both draw the same re-noising eps in the same order, so they
must agree to float32 round-off.
"""
from pathlib import Path

import pytest
import torch

import megadistill.models.wan.denoiser as wan_denoiser
from megadistill.diffusion.latents import DenseLatents
from megadistill.methods.base import DistillBatch
from megadistill.models.wan import build_wan
from megadistill.rollout.causal_inference import CausalStream, causal_generate
from megadistill.rollout.self_forcing import RolloutPlan, SelfForcingConfig, SelfForcingRollout
from megadistill.rollout.steps import StepListConfig
from megadistill.models.wan.denoiser import WanCondition, WanDenoiser
from tests.helpers.scripts import load_module

_fixtures = load_module("rollout_fixtures", Path(__file__).parent / "rollout_fixtures.py")
tiny_denoiser = _fixtures.tiny_denoiser

H = W = 4
FSL = (H // 2) * (W // 2)  # tokens per latent frame
STEPS = StepListConfig()  # [1000, 750, 500, 250] warped with shift 5


def condition(denoiser, b=2, f=6, seed=1) -> WanCondition:
    c = denoiser.net.config
    g = torch.Generator().manual_seed(seed)
    context = torch.randn(b, 16, c.text_dim, generator=g)
    if c.model_type != "i2v":
        return WanCondition(context)
    return WanCondition(context, clip_fea=torch.randn(b, 257, c.image_dim, generator=g),
                        y=torch.randn(b, c.condition_dim, f, H, W, generator=g))


def parallel_generate(denoiser, cond, noise, steps, generator, context_noise=0.0, exit_index=None, refresh="noised"):
    """Block by block with the parallel forward only (see the module docstring); x0 of each block at
    step ``exit_index`` (default: the last step)."""
    model, schedule, timesteps = denoiser.net, steps.schedule(), steps.timesteps()
    exit_index = len(timesteps) - 1 if exit_index is None else exit_index
    b, _, f = noise.shape[:3]
    nfpb = model.config.num_frame_per_block
    context, outs = noise[:, :, :0], []

    def full(value, frames):
        return torch.full((b, frames), float(value), dtype=torch.float64)

    for s in range(0, f, nfpb):
        e = min(s + nfpb, f)
        x = noise[:, :, s:e]
        for i in range(exit_index + 1):
            x_in = torch.cat([context, x], dim=2)
            t = torch.cat([full(context_noise, s), full(timesteps[i], e - s)], dim=1)
            y = None if cond.y is None else cond.y[:, :, :e]
            v = model(x_in, t, cond.context, cond.clip_fea, y)
            x0 = denoiser.flow_to_x0(v, x_in, t)[:, :, s:]
            if i < exit_index:
                eps = torch.randn(x0.shape, generator=generator)
                x = schedule.add_noise(x0, eps, full(timesteps[i + 1], 1)[:, 0])
        outs.append(x0)
        if refresh == "noised":
            x0 = schedule.add_noise(x0, torch.randn(x0.shape, generator=generator), full(context_noise, 1)[:, 0])
        context = torch.cat([context, x0], dim=2)
    return torch.cat(outs, dim=2)


def _noise(denoiser, b, f, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, denoiser.net.config.out_dim, f, H, W, generator=g), g


@pytest.mark.parametrize("refresh", ["clean", "noised"])
@pytest.mark.parametrize("preset,frames,nfpb,context_noise", [
    ("tiny-t2v", 6, 2, 0.0),
    ("tiny-t2v", 7, 3, 150.0),  # a shorter last block; a noisy context
    ("tiny-i2v", 4, 2, 0.0),    # y sliced per block, CLIP features in the context cache
])
def test_streaming_equals_parallel_block_causal_forward(preset, frames, nfpb, context_noise, refresh):
    denoiser = tiny_denoiser(preset, num_frame_per_block=nfpb)
    cond = condition(denoiser, f=frames)
    noise, g = _noise(denoiser, 2, frames, seed=3)
    with torch.no_grad():
        streamed = causal_generate(denoiser, cond, noise, STEPS, g, context_noise=context_noise, refresh=refresh)
        noise, g = _noise(denoiser, 2, frames, seed=3)
        reference = parallel_generate(denoiser, cond, noise, STEPS, g, context_noise=context_noise, refresh=refresh)
    assert streamed.shape == noise.shape
    torch.testing.assert_close(streamed, reference, rtol=1e-5, atol=1e-5)
    # every block matters: the result is not the noise-free x0 of one step, and frames differ
    assert (streamed[:, :, -1] - streamed[:, :, 0]).abs().max() > 1e-3


@pytest.mark.parametrize("exit_index", [0, 1, 2])
def test_every_step_equals_the_parallel_forward(exit_index):
    """The x0 of each block at each intermediate step (a Self-Forcing rollout exiting there, whose
    context is refreshed from those x0) equals the parallel reference stopped at that step."""
    denoiser = tiny_denoiser(num_frame_per_block=2)
    cond = condition(denoiser)
    cfg = SelfForcingConfig(num_training_frames=6)
    rollout = SelfForcingRollout(STEPS, cfg, noise_generator=torch.Generator().manual_seed(4))
    batch = DistillBatch(cond=cond, latents=DenseLatents(2, (16, 6, H, W), frame_dim=2))
    with torch.no_grad():
        streamed = rollout.run(denoiser, batch, RolloutPlan(6, (exit_index,) * 3), grad=False).video
        noise, g = _noise(denoiser, 2, 6, seed=4)
        reference = parallel_generate(denoiser, cond, noise, STEPS, g, exit_index=exit_index)
    torch.testing.assert_close(streamed, reference, rtol=1e-5, atol=1e-5)


def test_local_window_streams_past_the_window_with_a_bounded_cache(monkeypatch):
    denoiser = tiny_denoiser(num_frame_per_block=2, local_attn_size=3, sink_size=1)
    frames = 11  # > sink + window = 4 frames
    caches = []

    def recording_new_kv_cache(*args, **kwargs):
        caches.append(new_kv_cache(*args, **kwargs))
        return caches[-1]

    new_kv_cache = wan_denoiser.new_kv_cache
    monkeypatch.setattr(wan_denoiser, "new_kv_cache", recording_new_kv_cache)
    cond = condition(denoiser, f=frames)
    noise, g = _noise(denoiser, 2, frames, seed=5)
    with torch.no_grad():
        streamed = causal_generate(denoiser, cond, noise, STEPS, g, progress=True)
        noise, g = _noise(denoiser, 2, frames, seed=5)
        reference = parallel_generate(denoiser, cond, noise, STEPS, g)
        unwindowed = tiny_denoiser(num_frame_per_block=2)
        noise, g = _noise(denoiser, 2, frames, seed=5)
        full = parallel_generate(unwindowed, cond, noise, STEPS, g)
    (cache,) = caches[0][:1]
    assert cache.capacity == (1 + 3) * FSL  # sink + window, whatever the length
    assert cache.evicted_tokens > 0
    torch.testing.assert_close(streamed, reference, rtol=1e-5, atol=1e-5)
    assert (reference[:, :, -1] - full[:, :, -1]).abs().max() > 1e-3  # the window hides early frames


def _record_timesteps(monkeypatch, denoiser):
    calls = []
    step = denoiser.net.forward_causal_step

    def recording(x, t, *args, **kwargs):
        calls.append(float(t[0]))
        return step(x, t, *args, **kwargs)

    monkeypatch.setattr(denoiser.net, "forward_causal_step", recording)
    return calls


def test_inference_and_training_run_the_same_step_list(monkeypatch):
    steps = StepListConfig(steps=[1000, 750, 500, 250], warp=True, shift=5.0)
    expected = steps.timesteps()
    assert expected == pytest.approx([1000.0, 937.5, 833.333, 625.0], abs=1e-3)  # the warped list
    denoiser = tiny_denoiser(num_frame_per_block=2)
    cond = condition(denoiser, f=4)
    calls = _record_timesteps(monkeypatch, denoiser)
    noise, g = _noise(denoiser, 2, 4, seed=6)
    causal_generate(denoiser, cond, noise, steps, g, context_noise=0.0)
    inference = list(calls)
    calls.clear()
    rollout = SelfForcingRollout(steps, SelfForcingConfig(num_training_frames=4, last_step_only=True),
                                 noise_generator=g)
    rollout(denoiser, DistillBatch(cond=cond, latents=DenseLatents(2, (16, 4, H, W), frame_dim=2)), grad=False)
    training = list(calls)
    # per block: the 4 steps, then the refresh at t = 0 (after the first block only)
    assert inference == training == expected + [0.0] + expected


def test_rollout_with_last_step_only_equals_causal_generate():
    """The training rollout is inference with the training refresh (x0 re-noised to context_noise)."""
    denoiser = tiny_denoiser(num_frame_per_block=2)
    cond = condition(denoiser)
    cfg = SelfForcingConfig(num_training_frames=6, last_step_only=True, context_noise=50.0)
    rollout = SelfForcingRollout(STEPS, cfg, generator=torch.Generator().manual_seed(0),
                                 noise_generator=torch.Generator().manual_seed(7))
    out = rollout(denoiser, DistillBatch(cond=cond, latents=DenseLatents(2, (16, 6, H, W), frame_dim=2)), grad=False)
    noise, g = _noise(denoiser, 2, 6, seed=7)
    expected = causal_generate(denoiser, cond, noise, STEPS, g, context_noise=50.0, refresh="noised")
    assert torch.equal(out.samples, expected)


def test_causal_generation_errors():
    noise = torch.randn(2, 16, 4, H, W)
    bidirectional = tiny_denoiser()
    with pytest.raises(ValueError, match="num_frame_per_block"):
        causal_generate(bidirectional, condition(bidirectional), noise, STEPS)
    moe = WanDenoiser(build_wan("tiny-a14b", text_len=16, num_frame_per_block=2))
    with pytest.raises(ValueError, match="WanMoE"):
        causal_generate(moe, condition(moe), noise, STEPS)
    ti2v = tiny_denoiser("tiny-ti2v", num_frame_per_block=2)
    cond = WanCondition(torch.randn(2, 16, 32), first_frame=torch.randn(2, 48, 1, H, W))
    with pytest.raises(ValueError, match="first_frame"):
        causal_generate(ti2v, cond, torch.randn(2, 48, 4, H, W), STEPS)
    i2v = tiny_denoiser("tiny-i2v", num_frame_per_block=2)
    with pytest.raises(ValueError, match="covers 2 latent frames"):
        causal_generate(i2v, condition(i2v, f=2), noise, STEPS)
    causal = tiny_denoiser(num_frame_per_block=2)
    with pytest.raises(ValueError, match="batch 1"):
        causal_generate(causal, condition(causal, b=1), noise, STEPS)
    with pytest.raises(ValueError, match="context_noise"):
        CausalStream(causal, condition(causal), STEPS, batch_size=2, sample_shape=(16, 4, H, W),
                     context_noise=-1.0)
