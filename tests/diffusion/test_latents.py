"""Latents layouts: dense and packed reductions against per-sample loops, and score methods on packed
variable-length batches against the same methods on the dense tensor / one sample at a time."""
import pytest
import torch
from torch import nn

from megadistill.diffusion.flow_match import _expand_like
from megadistill.diffusion.latents import DenseLatents, PackedLatents, frame_mean, per_frame, require_dense
from megadistill.methods.base import Denoiser, DistillBatch, FewStepRollout
from megadistill.methods.dmd import DMD, DMDConfig, dmd_gradient
from megadistill.methods.sid import SiD, SiDConfig, sid_loss


def test_dense_reductions_and_frames():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, 2, 6, generator=g, dtype=torch.float64)  # [B, C, F, H, W]
    lat = DenseLatents(3, (4, 5, 2, 6), frame_dim=2)
    torch.testing.assert_close(lat.per_sample_mean(x), x.reshape(3, -1).mean(1))
    assert lat.per_sample_mean_abs(x).shape == (3, 1, 1, 1, 1)
    torch.testing.assert_close(lat.frame_mean(x), x.permute(0, 2, 1, 3, 4).reshape(3, 5, -1).mean(-1))
    # the same video with frames first ([B, F, C, H, W]) gives the same per-frame means
    torch.testing.assert_close(frame_mean(x.transpose(1, 2), 1), lat.frame_mean(x))
    v = torch.arange(15.0).reshape(3, 5)
    assert per_frame(v, 5, 2).shape == (3, 1, 5, 1, 1)
    assert torch.equal(lat.per_row(v[:, 0]), v[:, 0])
    with pytest.raises(ValueError, match="no frame axis"):
        DenseLatents(3, (8,)).frame_mean(torch.zeros(3, 8))
    with pytest.raises(ValueError, match="frame_dim"):
        DenseLatents(3, (8,), frame_dim=2)
    with pytest.raises(ValueError, match="shape"):
        lat.check(torch.zeros(3, 4, 5, 2, 5))


def test_packed_reductions_match_per_sample_loops():
    g = torch.Generator().manual_seed(1)
    lat = PackedLatents((3, 7, 1), channels=4)
    assert lat.shape == (11, 4) and lat.batch_size == 3
    assert lat.cu_seqlens().tolist() == [0, 3, 10, 11] and lat.cu_seqlens().dtype == torch.int32
    x = torch.randn(11, 4, generator=g, dtype=torch.float64) * torch.tensor([1.0] * 3 + [10.0] * 7 + [0.1])[:, None]
    parts = lat.split(x)
    torch.testing.assert_close(lat.per_sample_mean(x), torch.stack([p.mean() for p in parts]))
    expected = torch.cat([p.abs().mean().expand(len(p), 1) for p in parts])
    torch.testing.assert_close(lat.per_sample_mean_abs(x), expected)
    t = torch.tensor([10.0, 500.0, 990.0])
    assert lat.per_row(t).tolist() == [10.0] * 3 + [500.0] * 7 + [990.0]
    with pytest.raises(ValueError, match="frame axis"):
        lat.frame_mean(x)
    with pytest.raises(ValueError, match="leading dim 3"):
        lat.per_row(torch.zeros(2))
    with pytest.raises(ValueError, match="lengths"):
        PackedLatents((3, 0), channels=4)
    with pytest.raises(ValueError, match="dense latents"):
        require_dense(lat, "the Self-Forcing rollout")
    with pytest.raises(ValueError, match="real has shape"):
        DistillBatch(cond=None, latents=lat, real=torch.zeros(10, 4))


class TokenFlow(nn.Module):
    """A per-token flow net: the same function of each row whatever the layout (t and the condition,
    a scalar, broadcast against x like every per-sample value)."""

    def __init__(self, channels: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(channels, channels, generator=g, dtype=torch.float64) * 0.3)
        self.b = nn.Parameter(torch.randn(channels, generator=g, dtype=torch.float64) * 0.1)

    def forward(self, x, t, cond):
        s = _expand_like(torch.as_tensor(t, dtype=x.dtype) / 1000.0, x)
        return torch.tanh(x @ self.w) * (1.0 + s) + self.b * (s + float(cond))


def _dmd(rollout_seed: int, method_cls, cfg):
    gen, teacher, critic = (Denoiser(TokenFlow(4, s)) for s in (1, 2, 3))
    rollout = FewStepRollout([1000.0, 750.0, 500.0], generator=torch.Generator().manual_seed(rollout_seed))
    return method_cls(cfg, generator=gen, teacher=teacher, critic=critic, rollout=rollout,
                      rng=torch.Generator().manual_seed(11))


@pytest.mark.parametrize("method_cls,cfg", [(DMD, DMDConfig(snap_noise_to_grid=True, timestep_shift=5.0)),
                                            (SiD, SiDConfig(alpha=1.2))])
def test_score_methods_on_packed_equal_lengths_equal_dense(method_cls, cfg):
    """B samples of L tokens packed as [B*L, C] give the dense [B, L, C] loss and gradients exactly."""
    B, L, C = 3, 5, 4
    dense = DistillBatch(cond=torch.tensor(0.0), uncond=torch.tensor(1.0), latents=DenseLatents(B, (L, C)),
                         dtype=torch.float64)
    packed = DistillBatch(cond=torch.tensor(0.0), uncond=torch.tensor(1.0),
                          latents=PackedLatents((L,) * B, channels=C), dtype=torch.float64)
    results = []
    for batch in (dense, packed):
        method = _dmd(5, method_cls, cfg)
        loss, logs = method.generator_loss(batch, 0)
        loss.backward()
        critic_loss, _ = method.critic_loss(batch, 0)
        results.append((loss, critic_loss, [p.grad for p in method.generator.parameters()]))
    (l_d, c_d, g_d), (l_p, c_p, g_p) = results
    torch.testing.assert_close(l_p, l_d)
    torch.testing.assert_close(c_p, c_d)
    for a, b in zip(g_p, g_d):
        torch.testing.assert_close(a, b)


def test_packed_normalisers_are_per_sample_whatever_the_packing():
    """Unequal lengths: each packed sample's DMD direction and SiD terms equal that sample alone."""
    g = torch.Generator().manual_seed(3)
    lat = PackedLatents((2, 9, 4), channels=3)
    scale = torch.tensor([0.1] * 2 + [5.0] * 9 + [1.0] * 4, dtype=torch.float64)[:, None]
    x, fake, real = (torch.randn(15, 3, generator=g, dtype=torch.float64) * scale for _ in range(3))
    grad = dmd_gradient(x, fake, real, lat)
    for xs, fs, rs, gs in zip(lat.split(x), lat.split(fake), lat.split(real), lat.split(grad)):
        torch.testing.assert_close(gs, dmd_gradient(xs[None], fs[None], rs[None])[0])
    # SiD: the token-weighted mean of per-sample-normalised terms
    terms = [sid_loss(xs[None], rs[None], fs[None], 1.0) * xs.numel()
             for xs, fs, rs in zip(lat.split(x), lat.split(fake), lat.split(real))]
    torch.testing.assert_close(sid_loss(x, real, fake, 1.0, latents=lat), sum(terms) / x.numel())
    # a single normaliser over the whole pack (what a dense reduction would do) is not the same
    assert not torch.allclose(dmd_gradient(x, fake, real, lat), dmd_gradient(x[None], fake[None], real[None])[0])
