"""Sharded EMA: float64 reference update with start step; shards of any world size reassemble into
the single-process EMA; checkpoint state round trip."""
import math

import pytest
import torch
from torch import nn

from megadistill.engine.ema import ShardedEMA, ema_update_, shard_bounds


def _params(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 1))  # 15 + 5 + 5 + 1 elements: odd sizes
    return net, [(n, p) for n, p in net.named_parameters()]


def _perturb(net, step):
    with torch.no_grad():
        for i, p in enumerate(net.parameters()):
            p.add_(torch.sin(torch.arange(p.numel(), dtype=torch.float32) + step + i).reshape(p.shape) * 0.1)


@pytest.mark.parametrize("start_step", [0, 3])
def test_ema_matches_float64_reference(start_step):
    net, named = _params()
    decay = 0.9
    ema = ShardedEMA(named, decay, start_step, rank=0, world_size=1)
    ref = None
    for step in range(8):
        started = ema.maybe_start(step)
        assert started == (step == start_step)
        if step >= start_step and ref is None:
            ref = {n: p.detach().double().clone() for n, p in named}
        _perturb(net, step)  # the optimizer step
        ema.update()
        if ref is not None:
            ref = {n: decay * ref[n] + (1 - decay) * p.detach().double() for n, p in named}
        assert ema.started == (step >= start_step)
    full = ema.gather()
    for n, _ in named:
        torch.testing.assert_close(full[n].double(), ref[n], rtol=0, atol=1e-6)


def test_shards_of_two_and_three_ranks_reassemble_the_single_process_ema():
    nets, emas = {}, {}
    for world in (1, 2, 3):
        for rank in range(world):
            net, named = _params()
            nets[world, rank] = net
            emas[world, rank] = ShardedEMA(named, 0.8, 1, rank=rank, world_size=world)
    for step in range(5):
        for key, net in nets.items():
            emas[key].maybe_start(step)
            _perturb(net, step)
            emas[key].update()
    single = emas[1, 0].gather()
    for world in (2, 3):
        for name, full in single.items():
            shards = [emas[world, r].shards[name] for r in range(world)]
            assert all(s.numel() == math.ceil(full.numel() / world) for s in shards)  # no full copy per rank
            assert torch.equal(torch.cat(shards)[: full.numel()].reshape(full.shape), full)


def test_shard_bounds_follow_zero3_partitioning():
    assert [shard_bounds(10, r, 4) for r in range(4)] == [(0, 3, 3), (3, 6, 3), (6, 9, 3), (9, 10, 3)]
    assert shard_bounds(1, 1, 2) == (1, 1, 1)  # a rank can own only padding


def test_ema_update_formula():
    ema = torch.tensor([1.0, 2.0])
    ema_update_(ema, torch.tensor([3.0, 6.0]), 0.75)
    assert torch.equal(ema, torch.tensor([1.5, 3.0]))


def test_state_dict_round_trip_and_checks():
    net, named = _params()
    ema = ShardedEMA(named, 0.5, 0, rank=1, world_size=2)
    assert ema.state_dict()["shards"] is None
    ema.maybe_start(0)
    _perturb(net, 0)
    ema.update()
    other = ShardedEMA(_params(1)[1], 0.5, 0, rank=1, world_size=2)
    other.load_state_dict(ema.state_dict())
    assert all(torch.equal(other.shards[n], ema.shards[n]) for n in ema.shards)
    with pytest.raises(ValueError, match=r"rank 1 of 2 \(tp rank 0 of 1\), cannot load into rank 0 of 2"):
        ShardedEMA(named, 0.5, 0, rank=0, world_size=2).load_state_dict(ema.state_dict())
    small = [(n, p) for n, p in named][:2]
    with pytest.raises(ValueError, match="names or shapes"):
        ShardedEMA(small, 0.5, 0, rank=1, world_size=2).load_state_dict(ema.state_dict())
    with pytest.raises(ValueError, match="decay"):
        ShardedEMA(named, 1.0, 0, rank=0, world_size=1)


def test_state_dict_records_the_tensor_parallel_coordinate():
    """Without tensor-parallel layers a shard is TP rank 0 of 1; a shard of another TP rank is refused,
    and a state written before TP was recorded (no tp keys) still loads."""
    net, named = _params()
    ema = ShardedEMA(named, 0.5, 0, rank=0, world_size=2, tp_module=net)
    ema.maybe_start(0)
    state = ema.state_dict()
    assert (state["tp_rank"], state["tp_size"]) == (0, 1)
    other = ShardedEMA(named, 0.5, 0, rank=0, world_size=2)
    with pytest.raises(ValueError, match=r"tp rank 1 of 2\), cannot load into rank 0 of 2 \(tp rank 0 of 1\)"):
        other.load_state_dict({**state, "tp_rank": 1, "tp_size": 2})
    old = {k: v for k, v in state.items() if k not in ("tp_rank", "tp_size")}
    other.load_state_dict(old)
    assert all(torch.equal(other.shards[n], ema.shards[n]) for n in ema.shards)
    with pytest.raises(ValueError, match="rank must be in"):
        ShardedEMA(named, 0.5, 0, rank=2, world_size=2)
