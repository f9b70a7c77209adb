"""WanDenoiser: TI2V first-frame conditioning, I2V pass-through, per-frame timesteps, input checks.

References are manual calls of the same WanModel with inputs built by hand, and float64 formulas.
"""
import pytest
import torch

from megadistill.models.wan import build_wan
from megadistill.models.wan.denoiser import WanCondition, WanDenoiser, as_wan_condition

B, F, H, W = 2, 3, 4, 4
TOKENS_PER_FRAME = (H // 2) * (W // 2)


def _wan(preset, **overrides):
    """A tiny Wan whose output head is not zero (Wan initialises it to zero: every flow would be 0)."""
    net = build_wan(preset, **overrides)
    torch.nn.init.normal_(net.head.head.weight, std=0.1)
    return net


def _ti2v():
    torch.manual_seed(0)
    net = _wan("tiny-ti2v").eval()
    cond = WanCondition(context=torch.randn(B, 5, 32), first_frame=torch.randn(B, 48, 1, H, W))
    return WanDenoiser(net), cond, torch.randn(B, 48, F, H, W), torch.tensor([700.0, 250.0], dtype=torch.float64)


def test_ti2v_x0_frame0_is_exactly_the_image_latent():
    den, cond, x_t, t = _ti2v()
    x0 = den.x0(x_t, t, cond)
    assert torch.equal(x0[:, :, :1], cond.first_frame)
    # the other frames are the flow conversion of the network output: x0 = x_t - sigma v (float64)
    v = den.flow(x_t, t, cond)
    assert v.abs().mean() > 0.01
    ref = x_t.double() - (t / 1000)[:, None, None, None, None] * v.double()
    torch.testing.assert_close(x0[:, :, 1:], ref[:, :, 1:].float(), rtol=0, atol=1e-6)


def test_ti2v_network_sees_frame0_replaced_and_zero_timestep_tokens():
    den, cond, x_t, t = _ti2v()
    seen = {}
    handle = den.net.register_forward_pre_hook(lambda m, args: seen.update(x=args[0], t=args[1]))
    try:
        v = den.flow(x_t, t, cond)
    finally:
        handle.remove()
    assert torch.equal(seen["x"][:, :, :1], cond.first_frame) and torch.equal(seen["x"][:, :, 1:], x_t[:, :, 1:])
    t_tok = seen["t"]
    assert t_tok.shape == (B, F * TOKENS_PER_FRAME)
    assert (t_tok[:, :TOKENS_PER_FRAME] == 0).all()
    assert torch.equal(t_tok[:, TOKENS_PER_FRAME:], t[:, None].expand(B, (F - 1) * TOKENS_PER_FRAME).to(t_tok.dtype))
    # a manual network call with hand-built inputs gives the same flow
    x_manual = torch.cat([cond.first_frame, x_t[:, :, 1:]], dim=2)
    t_manual = torch.cat([torch.zeros(B, TOKENS_PER_FRAME, dtype=torch.float64),
                          t[:, None].repeat(1, (F - 1) * TOKENS_PER_FRAME)], dim=1)
    with torch.no_grad():
        ref = den.net(x_manual, t_manual, cond.context)
    torch.testing.assert_close(v.detach(), ref, rtol=0, atol=1e-6)
    # what the caller puts in frame 0 of x_t is ignored
    x_other = x_t.clone()
    x_other[:, :, 0] += 5.0
    torch.testing.assert_close(den.flow(x_other, t, cond), v, rtol=0, atol=0)


def test_without_first_frame_the_network_sees_the_inputs_unchanged():
    torch.manual_seed(1)
    den = WanDenoiser(_wan("tiny-t2v").eval())
    x_t, t, ctx = torch.randn(B, 16, F, H, W), torch.tensor([900.0, 30.0]), torch.randn(B, 6, 32)
    with torch.no_grad():
        torch.testing.assert_close(den.flow(x_t, t, WanCondition(context=ctx)), den.net(x_t, t, ctx), rtol=0, atol=0)


def test_i2v_condition_passes_y_and_clip_features():
    torch.manual_seed(2)
    net = _wan("tiny-i2v").eval()
    den = WanDenoiser(net)
    cond = WanCondition(context=torch.randn(B, 5, 32), clip_fea=torch.randn(B, 257, 48),
                        y=torch.randn(B, 20, F, H, W))
    x_t, t = torch.randn(B, 16, F, H, W), torch.tensor([500.0, 100.0])
    with torch.no_grad():
        ref = net(x_t, t, cond.context, cond.clip_fea, cond.y)
        torch.testing.assert_close(den.flow(x_t, t, cond), ref, rtol=0, atol=0)
        # a dict of the fields is the same condition (what cat_batch and collation produce)
        as_dict = dict(context=cond.context, clip_fea=cond.clip_fea, y=cond.y)
        torch.testing.assert_close(den.x0(x_t, t, as_dict), den.x0(x_t, t, cond), rtol=0, atol=0)


def test_per_frame_timesteps_conversion_matches_float64_formula():
    torch.manual_seed(3)
    den = WanDenoiser(_wan("tiny-t2v"))
    v, x_t = torch.randn(B, 16, F, H, W), torch.randn(B, 16, F, H, W)
    t = torch.tensor([[1000.0, 625.0, 0.0], [937.5, 833.3333, 12.5]], dtype=torch.float64)
    got = den.flow_to_x0(v, x_t, t)
    ref = torch.empty(B, 16, F, H, W, dtype=torch.float64)
    for b in range(B):
        for f in range(F):
            ref[b, :, f] = x_t[b, :, f].double() - (float(t[b, f]) / 1000.0) * v[b, :, f].double()
    torch.testing.assert_close(got, ref.float(), rtol=0, atol=0)
    # equal per-frame timesteps reduce to the per-sample path
    t_same = torch.tensor([400.0, 80.0], dtype=torch.float64)
    torch.testing.assert_close(den.flow_to_x0(v, x_t, t_same[:, None].expand(B, F)), den.flow_to_x0(v, x_t, t_same))


def test_per_frame_timesteps_reach_the_block_causal_network():
    torch.manual_seed(4)
    net = _wan("tiny-t2v", num_frame_per_block=1).eval()
    den = WanDenoiser(net)
    x_t, ctx = torch.randn(B, 16, F, H, W), torch.randn(B, 5, 32)
    t = torch.tensor([[1000.0, 500.0, 250.0], [750.0, 750.0, 10.0]], dtype=torch.float64)
    with torch.no_grad():
        x0 = den.x0(x_t, t, WanCondition(context=ctx))
        v = net(x_t, t, ctx)
    ref = x_t.double() - (t / 1000)[:, None, :, None, None] * v.double()
    torch.testing.assert_close(x0, ref.float(), rtol=0, atol=1e-6)


def test_mismatched_batches_and_shapes_are_refused():
    den, cond, x_t, t = _ti2v()
    with pytest.raises(ValueError, match="first_frame has batch 3"):
        WanCondition(context=torch.randn(2, 5, 32), first_frame=torch.randn(3, 48, 1, H, W))
    with pytest.raises(ValueError, match="y has batch 1"):
        WanCondition(context=torch.randn(2, 5, 32), y=torch.randn(1, 20, F, H, W))
    with pytest.raises(ValueError, match="one latent frame"):
        WanCondition(context=torch.randn(2, 5, 32), first_frame=torch.randn(2, 48, 2, H, W))
    with pytest.raises(ValueError, match="condition has batch 2, latents have 3"):
        den.flow(torch.randn(3, 48, F, H, W), torch.full((3,), 500.0), cond)
    with pytest.raises(ValueError, match=r"per-frame timesteps must be \[B, F\]"):
        den.flow_to_x0(x_t, x_t, torch.zeros(B, F + 1))
    with pytest.raises(ValueError, match="per-token timesteps itself"):
        den.flow(x_t, torch.zeros(B, F), cond)
    with pytest.raises(ValueError, match="unknown WanCondition field"):
        as_wan_condition(dict(context=cond.context, image=cond.first_frame))
    with pytest.raises(TypeError, match="WanCondition or a dict"):
        as_wan_condition(cond.context)
