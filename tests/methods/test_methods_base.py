"""The method interface: Denoiser conversions and CFG forms, the few-step rollout protocol, registry."""
import pytest
import torch

from megadistill.diffusion.latents import DenseLatents
from megadistill.diffusion.flow_match import FlowMatchSchedule, warp_step_list
from megadistill.methods import METHODS, get_method
from megadistill.methods.base import Denoiser, DistillBatch, FewStepRollout, nominal_timestep
from megadistill.models.toy.mlp import ToyFlowMLP


class LinearFlow(torch.nn.Module):
    """v = a * x + b * cond + t/1000, recording whether grad was enabled at each call."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.5, dtype=torch.float64))
        self.calls = []

    def forward(self, x, t, cond):
        self.calls.append((float(t.reshape(-1)[0]), torch.is_grad_enabled()))
        cond = torch.as_tensor(cond, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        return self.a * x + cond + (t.to(x.dtype) / 1000).reshape(-1, *([1] * (x.dim() - 1)))


def test_x0_is_flow_conversion_in_float64():
    torch.manual_seed(0)
    d = Denoiser(LinearFlow())
    x = torch.randn(3, 2, dtype=torch.float64)
    t = torch.tensor([1000.0, 500.0, 20.0], dtype=torch.float64)
    cond = torch.tensor([0.0, 1.0, 2.0])
    v = d.flow(x, t, cond)
    torch.testing.assert_close(d.x0(x, t, cond), x - (t / 1000)[:, None] * v)


def test_guidance_forms_agree():
    torch.manual_seed(0)
    d = Denoiser(LinearFlow())
    x = torch.randn(4, 2, dtype=torch.float64)
    t = torch.full((4,), 700.0, dtype=torch.float64)
    c, u = torch.ones(4), torch.zeros(4)
    x0c, x0u = d.x0(x, t, c), d.x0(x, t, u)
    standard = d.x0_guided(x, t, c, u, 4.0, "standard")
    torch.testing.assert_close(standard, x0u + 4.0 * (x0c - x0u))
    # Upstream g = 3 (Self-Forcing guidance_scale 3.0) is standard CFG 4.
    torch.testing.assert_close(d.x0_guided(x, t, c, u, 3.0, "upstream"), standard)
    # Flow-space CFG gives the same x0 (the conversion is affine in v).
    torch.testing.assert_close(d.flow_to_x0(d.flow_guided(x, t, c, u, 4.0), x, t), standard)
    with pytest.raises(ValueError, match="form"):
        d.x0_guided(x, t, c, u, 2.0, "cfg++")


def test_rollout_grad_only_at_exit_step_and_renoises():
    net = LinearFlow()
    g = torch.Generator().manual_seed(0)
    rollout = FewStepRollout([1000.0, 750.0, 500.0, 250.0], last_step_only=True, generator=g)
    batch = DistillBatch(cond=torch.zeros(5), latents=DenseLatents(5, (3,)), dtype=torch.float64)
    out = rollout(Denoiser(net), batch, grad=True)
    assert out.exit_index == 3
    assert [c[0] for c in net.calls] == [1000.0, 750.0, 500.0, 250.0]
    assert [c[1] for c in net.calls] == [False, False, False, True]
    assert out.samples.requires_grad
    assert out.denoised_timestep_from == 250.0 and out.denoised_timestep_to == 0.0
    net.calls.clear()
    out = rollout(Denoiser(net), batch, grad=False)
    assert not out.samples.requires_grad and not any(c[1] for c in net.calls)


def test_rollout_random_exit_covers_all_steps():
    g = torch.Generator().manual_seed(0)
    rollout = FewStepRollout([1000.0, 500.0], generator=g)
    batch = DistillBatch(cond=torch.zeros(2), latents=DenseLatents(2, (2,)), dtype=torch.float64)
    exits = {rollout(Denoiser(LinearFlow()), batch, grad=False).exit_index for _ in range(40)}
    assert exits == {0, 1}


def test_nominal_timesteps_of_warped_list_match_upstream():
    # Warped [1000, 750, 500, 250] (shift 5) maps back to the nominal list via the shifted grid.
    schedule = FlowMatchSchedule(shift=5.0)
    warped = warp_step_list([1000, 750, 500, 250], 5.0).tolist()
    assert [nominal_timestep(t, schedule) for t in warped] == [1000.0, 750.0, 500.0, 250.0]
    rollout = FewStepRollout(warped, schedule=schedule)
    rollout.last_step_only = False
    torch.manual_seed(0)
    seen = set()
    for _ in range(30):
        out = rollout(Denoiser(LinearFlow()), DistillBatch(cond=torch.zeros(1), latents=DenseLatents(1, (2,)),
                                                           dtype=torch.float64), grad=False)
        seen.add((out.exit_index, out.denoised_timestep_from, out.denoised_timestep_to))
    expected = {(0, 1000.0, 750.0), (1, 750.0, 500.0), (2, 500.0, 250.0), (3, 250.0, 0.0)}
    assert seen <= expected and len(seen) >= 3


def test_distill_batch_validates_batch():
    with pytest.raises(ValueError, match="real"):
        DistillBatch(cond=None, latents=DenseLatents(2, (2,)), real=torch.zeros(3, 2))


def test_registry_names_and_errors():
    assert {"dmd", "sid", "ode_regression", "progressive"} <= set(METHODS)
    with pytest.raises(ValueError, match="known"):
        get_method("nope")


def test_toy_mlp_features_and_conditioning():
    torch.manual_seed(0)
    net = ToyFlowMLP(dim=2, num_classes=3, hidden=16, depth=4)
    x = torch.randn(5, 2)
    t = torch.rand(5, dtype=torch.float64) * 1000
    cond = torch.tensor([0, 1, 2, 3, 3])
    assert net.null_class == 3
    v, feats = net(x, t, cond, return_features=[3, 1])
    assert v.shape == (5, 2) and [f.shape for f in feats] == [(5, 1, 16), (5, 1, 16)]
    torch.testing.assert_close(v, net(x, t.half().float(), cond), rtol=1e-2, atol=1e-2)
    # Features come back in the order asked for (block 3 last in the network, first in the list).
    _, f3 = net(x, t, cond, return_features=[3])
    torch.testing.assert_close(feats[0], f3[0])
    with pytest.raises(ValueError, match="return_features"):
        net(x, t, cond, return_features=[4])


def test_every_method_declares_what_it_needs():
    """The declarations the jobs and the planner read instead of lists of method names."""
    from megadistill.methods import METHODS, method_needs
    from megadistill.methods.apt import APTConfig
    from megadistill.methods.consistency import ConsistencyConfig

    got = {name: method_needs(name, config_cls()) for name, (_, config_cls) in METHODS.items()}
    table = {name: (n.teacher, n.guided_teacher, n.critic, n.real, n.trajectory, n.generator_forward)
             for name, n in got.items()}
    assert table == {
        "dmd": (True, True, True, False, False, "rollout"),
        "sid": (True, True, True, False, False, "rollout"),
        "gan": (False, False, True, True, False, "rollout"),
        "ode_regression": (False, False, False, False, True, "parallel"),
        "causal_diffusion": (False, False, False, True, False, "parallel"),
        "progressive": (True, True, False, True, False, "parallel"),
        "apt": (True, True, True, False, False, "parallel"),
        "consistency": (True, True, False, True, False, "parallel"),
    }
    for name, (cls, _) in METHODS.items():
        assert got[name].critic == cls.has_critic, name
    assert not method_needs("apt", APTConfig(target="real")).teacher and method_needs("apt", APTConfig(target="real")).real
    assert not method_needs("consistency", ConsistencyConfig(mode="data")).teacher
