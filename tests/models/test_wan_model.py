"""WanModel pieces against closed forms, gradient checkpointing, precision modes, MoE routing, input checks."""
import math

import pytest
import torch

from megadistill.models.wan import build_wan
from megadistill.models.wan.embeddings import sinusoidal_embedding
from megadistill.models.wan.rope import rope_axis_dims, rope_grid
from megadistill.ops.rope import apply_rope


def _inputs(config, b=2, f=2, h=4, w=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, config.out_dim, f, h, w, generator=g)
    context = torch.randn(b, config.text_len, config.text_dim, generator=g)
    extra = {}
    if config.model_type == "i2v":
        extra["y"] = torch.randn(b, config.in_dim - config.out_dim, f, h, w, generator=g)
        extra["clip_fea"] = torch.randn(b, 257, config.image_dim, generator=g)
    return x, context, extra


def _perturbed(preset, seed=0, **overrides):
    torch.manual_seed(seed)
    model = build_wan(preset, **overrides)
    with torch.no_grad():  # the upstream init zeroes the head, which would make every output zero
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


# ------------------------------------------------------------------------------------------- closed forms

def test_rope_split_and_rotation_match_closed_form():
    assert rope_axis_dims(128) == (44, 42, 42)
    head_dim, grid, theta = 16, (3, 2, 4), 10000.0
    dt, dh, dw = rope_axis_dims(head_dim)
    x = torch.randn(1, math.prod(grid), 2, head_dim, dtype=torch.float64)
    out = apply_rope(x, rope_grid(grid, head_dim, theta, frame_offset=5))
    expected = torch.empty_like(x)
    token = 0
    for f in range(grid[0]):
        for h in range(grid[1]):
            for w in range(grid[2]):
                for j in range(head_dim // 2):  # pair j rotates channels (2j, 2j+1)
                    if j < dt // 2:
                        angle = (f + 5) * theta ** (-2 * j / dt)
                    elif j < (dt + dh) // 2:
                        angle = h * theta ** (-2 * (j - dt // 2) / dh)
                    else:
                        angle = w * theta ** (-2 * (j - (dt + dh) // 2) / dw)
                    c, s = math.cos(angle), math.sin(angle)
                    a, b = x[0, token, :, 2 * j], x[0, token, :, 2 * j + 1]
                    expected[0, token, :, 2 * j] = a * c - b * s
                    expected[0, token, :, 2 * j + 1] = a * s + b * c
                token += 1
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-6)


def test_sinusoidal_embedding_closed_form():
    t = torch.tensor([0.0, 1.0, 937.5])
    emb = sinusoidal_embedding(8, t)
    for i, ti in enumerate(t.tolist()):
        freqs = [10000 ** (-k / 4) for k in range(4)]
        expected = [math.cos(ti * f) for f in freqs] + [math.sin(ti * f) for f in freqs]
        torch.testing.assert_close(emb[i], torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------- forward modes

def test_gradient_checkpointing_gives_identical_outputs_and_gradients():
    model = _perturbed("tiny-i2v")
    x, context, extra = _inputs(model.config)
    t = torch.tensor([999.0, 10.0])
    results = []
    for flag in (False, True):
        model.grad_checkpointing = flag
        model.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        out = model(xi, t, context, **extra)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results.append((out.detach(), xi.grad.clone(), grads))
    (o0, gx0, g0), (o1, gx1, g1) = results
    assert torch.equal(o0, o1) and torch.equal(gx0, gx1)
    assert g0.keys() == g1.keys() and all(torch.equal(g0[n], g1[n]) for n in g0)
    assert all(g0[n].abs().sum() > 0 for n in g0)  # every parameter takes part
    assert build_wan("tiny-t2v", grad_checkpointing=True).grad_checkpointing


def test_uniform_per_token_timesteps_equal_batch_timesteps():
    model = _perturbed("tiny-ti2v")
    x, context, _ = _inputs(model.config)
    tokens = 2 * 2 * 2
    t = torch.tensor([700.0, 30.0])
    with torch.no_grad():
        a = model(x, t, context)
        b = model(x, t[:, None].expand(2, tokens), context)
        # a clean first frame (t = 0 on its tokens, Wan2.2 TI2V) changes the result
        tt = t[:, None].expand(2, tokens).clone()
        tt[:, :4] = 0
        c = model(x, tt, context)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert (a - c).abs().max() > 1e-3


def test_short_context_is_zero_padded_as_upstream():
    model = _perturbed("tiny-t2v")
    x, context, _ = _inputs(model.config)
    short = context[:, :7]
    padded = torch.cat([short, torch.zeros(2, model.config.text_len - 7, model.config.text_dim)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model(x, torch.tensor([500.0, 1.0]), short),
                                   model(x, torch.tensor([500.0, 1.0]), padded), rtol=0, atol=0)


def test_batch_elements_are_independent():
    model = _perturbed("tiny-t2v")
    x, context, _ = _inputs(model.config)
    t = torch.tensor([800.0, 100.0])
    with torch.no_grad():
        both = model(x, t, context)
        one = model(x[1:], t[1:], context[1:])
    torch.testing.assert_close(both[1:], one, rtol=1e-5, atol=1e-6)


def test_bf16_storage_and_autocast_stay_close_to_fp32():
    model = _perturbed("tiny-t2v")
    x, context, _ = _inputs(model.config)
    t = torch.tensor([900.0, 50.0])
    with torch.no_grad():
        ref = model(x, t, context)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = model(x, t, context)
        bf16 = build_wan("tiny-t2v", dtype=torch.bfloat16)
        bf16.load_state_dict(model.state_dict())
        low = bf16(x, t, context)
    assert bf16.blocks[0].modulation.dtype == torch.float32 and bf16.time_embedding[0].weight.dtype == torch.float32
    assert bf16.blocks[0].self_attn.q.weight.dtype == torch.bfloat16
    scale = ref.abs().max()
    for out in (auto, low):
        assert out.dtype == torch.float32
        assert (out - ref).abs().max() < 0.05 * scale


def test_moe_routes_by_boundary():
    moe = build_wan("tiny-a14b")
    with torch.no_grad():
        for p in moe.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, context, _ = _inputs(moe.config)
    assert moe.boundary_timestep == 875.0
    t = torch.tensor([875.0, 874.0])
    with torch.no_grad():
        out = moe(x, t, context)
        high = moe.high_noise_model(x[:1], t[:1], context[:1])
        low = moe.low_noise_model(x[1:], t[1:], context[1:])
    torch.testing.assert_close(out[:1], high, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[1:], low, rtol=1e-5, atol=1e-6)
    assert moe.is_high_noise(torch.tensor([[0.0, 900.0], [0.0, 100.0]])).tolist() == [True, False]


# ------------------------------------------------------------------------------------------- input checks

@pytest.mark.parametrize("case,match", [
    ("channels", "in_dim"),
    ("odd_size", "multiple of patch_size"),
    ("t_shape", "timesteps must be"),
    ("context_dim", "context must be"),
    ("y_on_t2v", "takes no condition y"),
])
def test_t2v_input_errors(case, match):
    model = build_wan("tiny-t2v")
    x, context, _ = _inputs(model.config)
    t = torch.tensor([1.0, 2.0])
    kwargs = {}
    if case == "channels":
        x = x[:, :3]
    elif case == "odd_size":
        x = x[..., :3]
    elif case == "t_shape":
        t = torch.ones(2, 5)
    elif case == "context_dim":
        context = context[..., :5]
    elif case == "y_on_t2v":
        kwargs["y"] = x
    with pytest.raises(ValueError, match=match):
        model(x, t, context, **kwargs)


def test_i2v_input_errors():
    model = build_wan("tiny-i2v")
    x, context, extra = _inputs(model.config)
    t = torch.tensor([1.0, 2.0])
    with pytest.raises(ValueError, match="needs the condition y"):
        model(x, t, context, clip_fea=extra["clip_fea"])
    with pytest.raises(ValueError, match="needs clip_fea"):
        model(x, t, context, y=extra["y"])
    with pytest.raises(ValueError, match="no CLIP image branch"):
        build_wan("tiny-t2v")(x, t, context, clip_fea=extra["clip_fea"])
