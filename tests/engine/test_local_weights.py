"""engine/local_weights.py: a frozen copy updated from a trained module part by part, plain and under
ZeRO-3 over two ranks (gloo), against the same update made on the full weights in float64."""
from pathlib import Path

import pytest
import torch

from megadistill.engine.local_weights import copy_weights_, lerp_weights_, load_local_state, local_state
from megadistill.models.toy.mlp import ToyFlowMLP

HERE = Path(__file__).resolve().parent
from tests.helpers import ranks  # noqa: E402

pytestmark = pytest.mark.distributed


def _net(seed):
    torch.manual_seed(seed)
    return ToyFlowMLP(2, 3, hidden=16, depth=2, time_dim=8)


def test_plain_lerp_copy_and_local_state_round_trip():
    a, b = _net(0), _net(1)
    a0 = {k: v.clone().double() for k, v in a.state_dict().items()}
    lerp_weights_(a, b, 0.25)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v.double(), a0[k] + 0.25 * (b.state_dict()[k].double() - a0[k]), rtol=0, atol=1e-6)
    saved = local_state(a)
    copy_weights_(a, b)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    load_local_state(a, saved)
    assert all(torch.equal(v, saved[k]) for k, v in a.state_dict().items())


def test_mismatched_modules_are_refused():
    with pytest.raises(ValueError, match="modules differ"):
        lerp_weights_(_net(0), ToyFlowMLP(2, 3, hidden=16, depth=3, time_dim=8), 0.5)
    with pytest.raises(ValueError, match="holds"):
        copy_weights_(_net(0), ToyFlowMLP(2, 3, hidden=8, depth=2, time_dim=8))
    with pytest.raises(KeyError, match="do not match"):
        load_local_state(_net(0), {"nope": torch.zeros(1)})


@pytest.fixture(scope="module")
def zero3(tmp_path_factory):
    pytest.importorskip("deepspeed")
    tmp = tmp_path_factory.mktemp("local_weights")
    ranks.launch(HERE / "local_weights_worker.py", [str(tmp / "out.pt")], world_size=2, log_dir=tmp, timeout_s=150)
    return torch.load(tmp / "out.pt", weights_only=False)


def _plain_forward(state):
    import sys

    sys.path.insert(0, str(HERE))
    from local_weights_worker import forward, make

    net = make(0)
    net.load_state_dict(state)
    return forward(net)


def test_zero3_partitions_update_like_the_full_weights(zero3):
    # The source holds both kinds of ZeRO-3 parameter: partitioned ones and small ones kept gathered.
    assert zero3["gathered"] and zero3["partitioned"]
    gen, before = zero3["gen"], zero3["target_before"]
    for name, value in zero3["target_lerp"].items():
        expected = before[name].double() + 0.3 * (gen[name].double() - before[name].double())
        torch.testing.assert_close(value.double(), expected, rtol=0, atol=1e-6)
    assert all(torch.equal(zero3["target_copy"][k], gen[k]) for k in gen)
    # What the target computes is what its updated weights compute (its gathered copies are current).
    torch.testing.assert_close(zero3["out_lerp"], _plain_forward(zero3["target_lerp"]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(zero3["out_copy"], _plain_forward(gen), rtol=1e-5, atol=1e-6)


def test_zero3_local_state_reloads_into_a_fresh_partitioned_module(zero3):
    assert all(torch.equal(zero3["reloaded"][k], v) for k, v in zero3["target_lerp"].items())
    torch.testing.assert_close(zero3["out_reloaded"], zero3["out_lerp"], rtol=0, atol=0)
