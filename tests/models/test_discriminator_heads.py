"""Register-token discriminator heads: shapes, attention math, gradients, the backbone wrapper."""
import pytest
import torch

from megadistill.models.discriminators.discriminator import Discriminator
from megadistill.models.discriminators.register_heads import (
    RegisterCrossAttention,
    RegisterHeads,
    RegisterHeadsConfig,
)
from megadistill.models.toy.mlp import ToyFlowMLP


@pytest.mark.parametrize("style", ["self_forcing", "apt"])
@pytest.mark.parametrize("tokens", [1, 7])
@pytest.mark.parametrize("num_classes", [1, 3])
def test_heads_shapes_on_token_and_single_vector_features(style, tokens, num_classes):
    torch.manual_seed(0)
    cfg = RegisterHeadsConfig(
        dim=16, num_layers=3, num_heads=4, num_classes=num_classes, style=style, time_embedding=True
    )
    heads = RegisterHeads(cfg)
    feats = [torch.randn(5, tokens, 16) for _ in range(3)]
    out = heads(feats, torch.rand(5) * 1000)
    assert out.shape == (5, num_classes)
    assert torch.isfinite(out).all()


def test_styles_differ_as_documented():
    sf = RegisterHeads(RegisterHeadsConfig(dim=8, num_layers=2, num_heads=2, style="self_forcing"))
    apt = RegisterHeads(RegisterHeadsConfig(dim=8, num_layers=2, num_heads=2, style="apt"))
    assert all(b.ffn is not None for b in sf.blocks) and all(b.ffn is None for b in apt.blocks)
    # self_forcing: LN -> Linear -> SiLU -> Linear; apt: LN -> Linear to the logit
    assert [type(m).__name__ for m in sf.classifier] == ["LayerNorm", "Linear", "SiLU", "Linear"]
    assert [type(m).__name__ for m in apt.classifier] == ["LayerNorm", "Linear"]


def test_cross_attention_matches_hand_written_softmax_attention():
    torch.manual_seed(1)
    ca = RegisterCrossAttention(dim=8, num_heads=2).double()
    q_in, ctx = torch.randn(3, 1, 8, dtype=torch.float64), torch.randn(3, 5, 8, dtype=torch.float64)
    q = ca.norm_q(ca.q(q_in)).view(3, 1, 2, 4)
    k = ca.norm_k(ca.k(ctx)).view(3, 5, 2, 4)
    v = ca.v(ctx).view(3, 5, 2, 4)
    att = torch.einsum("bqhd,bkhd->bhqk", q, k) / 2.0  # sqrt(head_dim = 4)
    out = torch.einsum("bhqk,bkhd->bqhd", att.softmax(-1), v).reshape(3, 1, 8)
    torch.testing.assert_close(ca(q_in, ctx), ca.o(out), rtol=1e-12, atol=1e-12)


def test_heads_are_invariant_to_token_order():
    # attention pooling has no positions: the logit is a set function of each layer's tokens
    torch.manual_seed(2)
    heads = RegisterHeads(RegisterHeadsConfig(dim=8, num_layers=2, num_heads=2)).double()
    feats = [torch.randn(2, 6, 8, dtype=torch.float64) for _ in range(2)]
    perm = torch.randperm(6)
    torch.testing.assert_close(heads(feats), heads([f[:, perm] for f in feats]), rtol=1e-10, atol=1e-12)


def test_gradients_reach_register_tokens_and_features():
    torch.manual_seed(3)
    heads = RegisterHeads(RegisterHeadsConfig(dim=8, num_layers=2, num_heads=2, style="apt"))
    feats = [torch.randn(4, 3, 8, requires_grad=True) for _ in range(2)]
    heads(feats).sum().backward()
    assert heads.registers.grad is not None
    assert (heads.registers.grad.abs().sum(dim=1) > 0).all()  # every layer's token gets gradient
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats)


def test_heads_config_validation():
    with pytest.raises(ValueError, match="style"):
        RegisterHeadsConfig(dim=8, style="conv")
    with pytest.raises(ValueError, match="num_heads"):
        RegisterHeadsConfig(dim=8, num_heads=3)
    heads = RegisterHeads(RegisterHeadsConfig(dim=8, num_layers=2, num_heads=2, time_embedding=True))
    with pytest.raises(ValueError, match="feature maps"):
        heads([torch.randn(2, 1, 8)])
    with pytest.raises(ValueError, match="timesteps"):
        heads([torch.randn(2, 1, 8)] * 2)


def test_discriminator_wraps_toy_backbone():
    torch.manual_seed(4)
    backbone = ToyFlowMLP(dim=2, num_classes=3, hidden=32, depth=4)
    heads = RegisterHeads(RegisterHeadsConfig(dim=32, num_layers=2, num_heads=4, time_embedding=True))
    disc = Discriminator(backbone, heads, layers=[1, 3])
    x, t, c = torch.randn(6, 2), torch.rand(6) * 1000, torch.randint(0, 3, (6,))
    out = disc(x, t, c)
    assert out.logits.shape == (6, 1)
    assert [tuple(f.shape) for f in out.features] == [(6, 1, 32), (6, 1, 32)]
    torch.testing.assert_close(out.flow, backbone(x, t, c))
    out.logits.sum().backward()
    assert backbone.blocks[0].mlp[0].weight.grad is not None  # the whole critic trains, not just the heads
    assert backbone.blocks[3].mlp[0].weight.grad is not None
    with pytest.raises(ValueError, match="one entry per head"):
        Discriminator(backbone, heads, layers=[1])
