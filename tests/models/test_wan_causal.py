"""Block-causal Wan: the KV-cache rollout against the parallel forward, the flex back-end against sdpa."""
import warnings

import pytest
import torch

from megadistill.models.wan import CrossAttnCache, KVCache, build_wan, new_kv_cache

FSL = 4  # tokens per latent frame: latents 4 x 4 -> 2 x 2 patches


def _model(preset="tiny-t2v", seed=0, **overrides):
    torch.manual_seed(seed)
    model = build_wan(preset, text_len=16, **overrides)
    with torch.no_grad():  # the upstream init zeroes the head, which would make every output zero
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _inputs(model, b=2, f=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, model.config.out_dim, f, 4, 4, generator=g)
    context = torch.randn(b, 16, model.config.text_dim, generator=g)
    return x, context


def _blocks(num_frames, nfpb):
    return [(a, min(a + nfpb, num_frames)) for a in range(0, num_frames, nfpb)]


def _block_timesteps(blocks, b=2, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(b, generator=g) * 1000 for _ in blocks]


def _per_token(ts, blocks):
    return torch.cat([t[:, None].expand(-1, (e - s) * FSL) for t, (s, e) in zip(ts, blocks)], dim=1)


def _rollout(model, x, context, ts, blocks, caches=None, y=None, **step_kwargs):
    caches = caches if caches is not None else new_kv_cache(model, x.shape[0], FSL, max_frames=x.shape[2])
    cross = CrossAttnCache()
    outs = [model.forward_causal_step(x[:, :, s:e], t, context, caches, cross, start_frame=s,
                                      y=None if y is None else y[:, :, s:e], **step_kwargs)
            for t, (s, e) in zip(ts, blocks)]
    return torch.cat(outs, dim=2), caches


# ------------------------------------------------------------------------------------------- the mask
# The mask itself against a brute-force rule: tests/ops/test_attention.py.

def test_a_shorter_call_leaves_no_mask_behind_for_a_longer_one():
    model = _model(num_frame_per_block=2)
    x, context = _inputs(model, f=6)
    blocks = _blocks(6, 2)
    ts = _block_timesteps(blocks)
    with torch.no_grad():
        model(x[:, :, :3], _per_token(ts, blocks)[:, :12], context)
        parallel = model(x, _per_token(ts, blocks), context)
        incremental, _ = _rollout(model, x, context, ts, blocks)
    torch.testing.assert_close(incremental, parallel, rtol=1e-5, atol=1e-5)


def test_the_flex_backend_gives_the_dense_mask_forward():
    """The model built with attention: flex (eager flex_attention on CPU, forward only; the CUDA
    default in half precision) against the same weights built with sdpa and the dense mask."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    dense = _model(num_frame_per_block=2, local_attn_size=3, sink_size=1, attention="sdpa")
    flex = build_wan(dense.config.replace(attention="flex"))
    flex.load_state_dict(dense.state_dict())
    x, context = _inputs(dense, f=7)
    t = torch.tensor([300.0, 800.0])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
        torch.testing.assert_close(flex(x, t, context), dense(x, t, context), rtol=1e-5, atol=1e-5)
    assert flex.blocks[0].self_attn.core.backend is not dense.blocks[0].self_attn.core.backend


# ------------------------------------------------------------------------------------------- rollout = parallel

@pytest.mark.parametrize("frames,nfpb", [(6, 2), (7, 3), (4, 1)])
def test_kv_cache_rollout_equals_parallel_block_causal_forward(frames, nfpb):
    model = _model(num_frame_per_block=nfpb)
    x, context = _inputs(model, f=frames)
    blocks = _blocks(frames, nfpb)
    ts = _block_timesteps(blocks)
    with torch.no_grad():
        parallel = model(x, _per_token(ts, blocks), context)
        incremental, caches = _rollout(model, x, context, ts, blocks)
        bidirectional = _model(num_frame_per_block=None)(x, _per_token(ts, blocks), context)
    torch.testing.assert_close(incremental, parallel, rtol=1e-5, atol=1e-5)
    assert caches[0].global_end_index == frames * FSL and caches[0].evicted_tokens == 0
    with_grad, _ = _rollout(model, x, context, ts, blocks)  # differentiable path: cat(past, new), then commit
    assert with_grad.requires_grad
    torch.testing.assert_close(with_grad.detach(), incremental, rtol=1e-6, atol=1e-6)
    # the mask matters: the first block differs from what it would be seeing every frame
    assert (parallel[:, :, :nfpb] - bidirectional[:, :, :nfpb]).abs().max() > 1e-3


def test_bf16_rollout_stays_close_to_the_bf16_parallel_forward():
    model = _model(num_frame_per_block=2)
    low = build_wan("tiny-t2v", text_len=16, num_frame_per_block=2, dtype=torch.bfloat16)
    low.load_state_dict(model.state_dict())
    x, context = _inputs(model, f=4)
    blocks = _blocks(4, 2)
    ts = _block_timesteps(blocks)
    caches = new_kv_cache(low, 2, FSL, max_frames=4)
    assert caches[0].k.dtype == torch.bfloat16
    with torch.no_grad():
        reference = model(x, _per_token(ts, blocks), context)
        parallel = low(x, _per_token(ts, blocks), context)
        incremental, _ = _rollout(low, x, context, ts, blocks, caches=caches)
    scale = reference.abs().max()
    assert (incremental - parallel).abs().max() < 1e-3 * scale  # same roundings: keys cast to bf16 either way
    assert (parallel - reference).abs().max() < 0.05 * scale


def test_one_block_covering_all_frames_equals_the_bidirectional_model():
    causal, bidirectional = _model(num_frame_per_block=6), _model(num_frame_per_block=None)
    x, context = _inputs(causal, f=5)
    t = torch.tensor([700.0, 40.0])
    with torch.no_grad():
        reference = bidirectional(x, t, context)
        parallel = causal(x, t, context)
        step, _ = _rollout(causal, x, context, [t], [(0, 5)])
    torch.testing.assert_close(parallel, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step, reference, rtol=1e-5, atol=1e-5)


def test_i2v_rollout_equals_parallel_forward():
    model = _model("tiny-i2v", num_frame_per_block=2)
    x, context = _inputs(model, f=4)
    g = torch.Generator().manual_seed(5)
    y = torch.randn(2, model.config.condition_dim, 4, 4, 4, generator=g)
    clip = torch.randn(2, 257, model.config.image_dim, generator=g)
    blocks = _blocks(4, 2)
    ts = _block_timesteps(blocks)
    with torch.no_grad():
        parallel = model(x, _per_token(ts, blocks), context, clip_fea=clip, y=y)
        incremental, _ = _rollout(model, x, context, ts, blocks, y=y, clip_fea=clip)
    torch.testing.assert_close(incremental, parallel, rtol=1e-5, atol=1e-5)


def test_per_token_and_per_frame_timesteps_in_causal_mode():
    """Wan2.2 TI2V style: the first latent frame is clean (t = 0 on its tokens), other frames vary.
    Per-frame timesteps [B, F] (one modulation row per frame) equal the same values given per token."""
    model = _model("tiny-ti2v", num_frame_per_block=2)
    x, context = _inputs(model, f=6)
    blocks = _blocks(6, 2)
    g = torch.Generator().manual_seed(3)
    per_frame = torch.rand(2, 6, generator=g) * 1000
    per_frame[:, 0] = 0
    per_token = per_frame.repeat_interleave(FSL, dim=1)
    with torch.no_grad():
        parallel = model(x, per_token, context)
        by_frame = model(x, per_frame, context)
        incremental, _ = _rollout(model, x, context, [per_token[:, s * FSL:e * FSL] for s, e in blocks], blocks)
        incremental_by_frame, _ = _rollout(model, x, context, [per_frame[:, s:e] for s, e in blocks], blocks)
        uniform = model(x, _per_token([per_frame[:, s] for s, _ in blocks], blocks), context)
    torch.testing.assert_close(by_frame, parallel, rtol=1e-6, atol=1e-6)
    assert model.time_embed(per_frame, 2, 6 * FSL)[1].shape == (2, 6, 6, model.config.dim)  # rows, not tokens
    torch.testing.assert_close(incremental, parallel, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(incremental_by_frame, parallel, rtol=1e-5, atol=1e-5)
    assert (parallel - uniform).abs().max() > 1e-3  # the per-frame values within a block are used
    with pytest.raises(ValueError, match="timesteps must be"):
        model(x, per_frame[:, :5], context)  # 5 rows do not divide 24 tokens


# ------------------------------------------------------------------------------------------- cache semantics

def test_rerunning_a_block_overwrites_its_slot():
    """Noisy pass then clean pass of each block leaves the cache (and later outputs) equal to clean only."""
    model = _model(num_frame_per_block=2)
    x, context = _inputs(model, f=6)
    noisy = x + torch.randn_like(x)
    blocks = _blocks(6, 2)
    clean_t, noisy_t = torch.zeros(2), torch.full((2,), 800.0)
    with torch.no_grad():
        once, _ = _rollout(model, x, context, [clean_t] * 3, blocks)
        once_caches = new_kv_cache(model, 2, FSL, max_frames=6)
        _rollout(model, x, context, [clean_t] * 3, blocks, caches=once_caches)
        twice_caches, cross, twice = new_kv_cache(model, 2, FSL, max_frames=6), CrossAttnCache(), []
        for s, e in blocks:
            model.forward_causal_step(noisy[:, :, s:e], noisy_t, context, twice_caches, cross, start_frame=s)
            twice.append(model.forward_causal_step(x[:, :, s:e], clean_t, context, twice_caches, cross, start_frame=s))
    for a, b in zip(once_caches, twice_caches):
        assert (a.global_end_index, a.local_end_index) == (b.global_end_index, b.local_end_index)
        assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v)
    torch.testing.assert_close(torch.cat(twice, dim=2), once, rtol=0, atol=0)


def test_rerunning_an_earlier_block_rewinds_the_cache():
    model = _model(num_frame_per_block=2)
    x, context = _inputs(model, f=6)
    blocks = _blocks(6, 2)
    ts = _block_timesteps(blocks)
    with torch.no_grad():
        first, caches = _rollout(model, x, context, ts, blocks)
        cross = CrossAttnCache()
        again = [model.forward_causal_step(x[:, :, s:e], t, context, caches, cross, start_frame=s)
                 for t, (s, e) in zip(ts[1:], blocks[1:])]  # back to block 1, then block 2 again
    assert caches[0].global_end_index == 6 * FSL
    torch.testing.assert_close(torch.cat(again, dim=2), first[:, :, 2:], rtol=0, atol=0)


@pytest.mark.parametrize("frames,nfpb,local,sink", [(7, 2, 3, 1), (8, 2, 3, 0), (9, 3, 4, 2)])
def test_local_window_and_sink_rollout_with_eviction_equals_parallel(frames, nfpb, local, sink):
    model = _model(num_frame_per_block=nfpb, local_attn_size=local, sink_size=sink)
    x, context = _inputs(model, f=frames)
    blocks = _blocks(frames, nfpb)
    ts = _block_timesteps(blocks)
    caches = new_kv_cache(model, 2, FSL)
    assert caches[0].capacity == (local + sink) * FSL
    with torch.no_grad():
        parallel = model(x, _per_token(ts, blocks), context)
        incremental, _ = _rollout(model, x, context, ts, blocks, caches=caches)
        full = _model(num_frame_per_block=nfpb)(x, _per_token(ts, blocks), context)
    assert caches[0].evicted_tokens == (frames - local - sink) * FSL > 0  # eviction really happened
    torch.testing.assert_close(incremental, parallel, rtol=1e-5, atol=1e-5)
    assert (parallel[:, :, -1] - full[:, :, -1]).abs().max() > 1e-3  # the window hides frames


@pytest.mark.parametrize("window", [dict(local_attn_size=3, sink_size=1), {}], ids=["window", "no_window"])
def test_self_forcing_rollout_gradients_survive_checkpointing(window, monkeypatch):
    """Self-Forcing-shaped rollout: each block once with grad (noisy), then refreshed clean under
    no_grad. Outputs equal the no-grad rollout, and activation checkpointing (recomputed after later
    blocks have refreshed, and with a window shifted, the cache) gives the same gradients. The
    recomputations' snapshots of the past are copied only when an eviction overwrites them: never
    without a window (the saved past is a view of the cache, not a copy per layer and block)."""
    from megadistill.models.wan.kv_cache import KVCacheStep

    copies = []
    own_past = KVCacheStep.own_past
    monkeypatch.setattr(KVCacheStep, "own_past", lambda self: (copies.append(self), own_past(self)))
    frames, nfpb = 7, 2
    blocks = _blocks(frames, nfpb)
    results = []
    for ckpt in (False, True):
        model = _model(num_frame_per_block=nfpb, grad_checkpointing=ckpt, **window)
        x, context = _inputs(model, f=frames)
        noisy = x + torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
        caches, cross, outs = new_kv_cache(model, 2, FSL, max_frames=frames), CrossAttnCache(), []
        for s, e in blocks:
            with torch.no_grad():  # an earlier denoising step: fills the context cache without grad
                model.forward_causal_step(noisy[:, :, s:e], torch.full((2,), 900.0), context, caches, cross,
                                          start_frame=s)
            outs.append(model.forward_causal_step(noisy[:, :, s:e], torch.full((2,), 600.0), context, caches, cross,
                                                  start_frame=s))
            with torch.no_grad():
                model.forward_causal_step(x[:, :, s:e], torch.zeros(2), context, caches, cross, start_frame=s)
        out = torch.cat(outs, dim=2)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        assert (caches[0].evicted_tokens > 0) == bool(window)
        assert (len(copies) > 0) == (bool(window) and ckpt)
    (out0, g0), (out1, g1) = results
    assert cross.with_grad  # refilled by the first call that needed gradients
    torch.testing.assert_close(out1, out0, rtol=0, atol=0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-7, msg=name)
    # cross-attention projections get gradients although the context cache was filled under no_grad
    assert g0["blocks.0.cross_attn.k.weight"].abs().sum() > 0 and g0["text_embedding.0.weight"].abs().sum() > 0

    # the grad-mode outputs equal a plain no-grad rollout through the same refreshed caches
    model = _model(num_frame_per_block=nfpb, **window)
    with torch.no_grad():
        caches, cross, ref = new_kv_cache(model, 2, FSL, max_frames=frames), CrossAttnCache(), []
        for s, e in blocks:
            ref.append(model.forward_causal_step(noisy[:, :, s:e], torch.full((2,), 600.0), context, caches, cross,
                                                 start_frame=s))
            model.forward_causal_step(x[:, :, s:e], torch.zeros(2), context, caches, cross, start_frame=s)
    torch.testing.assert_close(torch.cat(ref, dim=2), out0, rtol=1e-6, atol=1e-6)


def test_checkpoint_snapshot_is_copied_only_when_its_rows_are_overwritten():
    """A snapshot views the buffer until a write would change the rows it covers: appending and
    re-running the last block copy nothing; a rewind or an eviction copies first, and the copy holds
    what the call saw."""
    cache = KVCache(torch.zeros(1, 12, 1, 2), torch.zeros(1, 12, 1, 2))

    def write(start, value):  # one no-grad layer call of 2 tokens at `start`
        step = cache.begin(start, 2, snapshot=True)
        step.extend(torch.full((1, 2, 1, 2), float(value)), torch.full((1, 2, 1, 2), float(value)))
        return step

    steps = [write(0, 1), write(2, 2)]
    steps.append(write(2, 3))  # re-run the last block: rows [2, 4) change, nobody's past covers them
    steps.append(write(4, 4))
    views = [s for s in steps[1:] if s.past[0].data_ptr() == cache.k.data_ptr()]  # steps[0]: empty past
    assert len(views) == len(steps) - 1  # nothing copied
    seen = steps[3].past[0].clone()  # block 4's past: rows 0-1 = 1, rows 2-3 = 3
    write(2, 5)  # rewind to block 2: its rows are in block 4's past -> copied before the write
    assert steps[3].past[0].data_ptr() != cache.k.data_ptr()
    assert torch.equal(steps[3].past[0], seen) and cache.k[0, 2, 0, 0] == 5
    assert steps[1].past[0].data_ptr() == cache.k.data_ptr()  # its past (rows 0-1) was not touched

    windowed = KVCache(torch.zeros(1, 6, 1, 2), torch.zeros(1, 6, 1, 2), sink_tokens=2, window_tokens=4)
    cache = windowed
    a, b = write(0, 1), write(2, 2)
    c = write(4, 3)
    before = c.past[0].clone()
    write(6, 4)  # full: evicts by shifting rows >= the sink left, under c's past
    assert c.past[0].data_ptr() != windowed.k.data_ptr() and torch.equal(c.past[0], before)
    assert b.past[0].data_ptr() == windowed.k.data_ptr()  # b's past is the sink: unchanged


def test_gradient_flows_through_the_parallel_forward_and_respects_causality():
    model = _model(num_frame_per_block=2)
    x, context = _inputs(model, f=6)
    x.requires_grad_(True)
    out = model(x, torch.tensor([500.0, 200.0]), context)
    out[:, :, 2:4].square().sum().backward()  # the second block's output
    grad_per_frame = x.grad.abs().sum(dim=(0, 1, 3, 4))
    assert (grad_per_frame[:4] > 0).all()  # its own and the earlier block
    assert torch.equal(grad_per_frame[4:], torch.zeros(2))  # never a later block
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


# ------------------------------------------------------------------------------------------- errors

def test_cache_errors():
    model = _model(num_frame_per_block=2)
    x, context = _inputs(model, f=6)
    t = torch.zeros(2)
    caches = new_kv_cache(model, 2, FSL, max_frames=4)
    with torch.no_grad():
        with pytest.raises(ValueError, match="must append at 0"):
            model.forward_causal_step(x[:, :, 2:4], t, context, caches, start_frame=2)
        for s in (0, 2):
            model.forward_causal_step(x[:, :, s:s + 2], t, context, caches, start_frame=s)
        with pytest.raises(ValueError, match="KVCache full"):
            model.forward_causal_step(x[:, :, 4:6], t, context, caches, start_frame=4)
        with pytest.raises(ValueError, match="layers"):
            model.forward_causal_step(x[:, :, 4:6], t, context, caches[:1], start_frame=4)
    with pytest.raises(ValueError, match="max_frames"):
        new_kv_cache(model, 2, FSL)

    windowed = _model(num_frame_per_block=2, local_attn_size=2, sink_size=1)
    caches = new_kv_cache(windowed, 2, FSL)
    with torch.no_grad():
        for s in (0, 2, 4):
            windowed.forward_causal_step(x[:, :, s:s + 2], t, context, caches, start_frame=s)
        windowed.forward_causal_step(x[:, :, 4:6], t, context, caches, start_frame=4)  # last block: fine
        with pytest.raises(ValueError, match="evicted"):
            windowed.forward_causal_step(x[:, :, 2:4], t, context, caches, start_frame=2)
        with pytest.raises(ValueError, match="does not fit the local window"):
            windowed.forward_causal_step(x[:, :, 0:3], t, context, new_kv_cache(windowed, 2, FSL), start_frame=0)
    with pytest.raises(ValueError, match="exactly sink_tokens"):
        KVCache(torch.zeros(1, 10, 2, 4), torch.zeros(1, 10, 2, 4), sink_tokens=2, window_tokens=4)


@pytest.mark.parametrize("overrides,match", [
    (dict(num_frame_per_block=0), "num_frame_per_block must be a positive int"),
    (dict(local_attn_size=4), "need block-causal mode"),
    (dict(num_frame_per_block=3, local_attn_size=2), r"local_attn_size must be .* >= num_frame_per_block \(3\)"),
    (dict(num_frame_per_block=3, sink_size=1), "sink_size needs local_attn_size"),
    (dict(num_frame_per_block=3, local_attn_size=3, sink_size=-1), "sink_size must be a non-negative int"),
    (dict(num_frame_per_block=1, patch_size=(2, 2, 2)), "temporal patch size of 1"),
])
def test_causal_config_validation(overrides, match):
    with pytest.raises(ValueError, match=match):
        build_wan("tiny-t2v", **overrides)
    assert build_wan("tiny-t2v", num_frame_per_block=3, local_attn_size=5, sink_size=1).config.is_causal
