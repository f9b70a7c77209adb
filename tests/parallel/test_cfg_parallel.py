"""CFG parallelism against the single-process guided teacher, on 2 and 4 gloo ranks (cfg_worker.py).

Teacher: a tiny Wan model (randomised head) in a WanDenoiser; cases T2V with per-sample [B] and per-frame
[B, F] timesteps and TI2V first-frame conditioning (WanDenoiser's overrides); both guidance forms, x0 and
flow. The 2-rank launch uses a plain ``dist.new_group([0, 1])``, the 4-rank launch the mesh's cfg groups
{0, 1}, {2, 3} (cfg = 2, dp = 2: each group on its own sample). Checked, fp32:

- every rank's guided output equals the single-process ``x0_guided`` / ``flow_guided``;
- each rank backpropagates its own weighted sum of the output: the x_t gradients of a group add up to
  the single-process gradient of the SUM of the group's losses (the exchange's backward sums the
  gradient over the group); when both ranks backpropagate the same loss, the group's mean x_t gradient
  is the single-process gradient (what ZeRO's average over cfg ranks gives the generator);
- each guided call runs exactly one network forward and one exchange per rank; an unguided scale
  (standard 1, upstream 0) runs the conditional pass on both ranks, no exchange, and equals ``x0`` /
  ``flow`` of the condition;
- the wrapper keeps the wrapped denoiser's interface (net, flow, x0, flow_to_x0 with [B, F] timesteps,
  sigma, network_inputs, parameters); a group of size 1 (or None) returns the denoiser itself; groups of
  3 or 4 ranks raise ValueError; the exchange alone returns every rank's tensor in group order and the
  gradient of the sum of the ranks' losses.
"""
import json
from pathlib import Path

import pytest
import torch

from tests.helpers import ranks
from tests.helpers.scripts import load_module

HERE = Path(__file__).resolve().parent
REL_TOL = 1e-5


pytestmark = pytest.mark.distributed
worker = load_module("cfg_worker", HERE / "cfg_worker.py")

WORLDS = (2, 4)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = {}
    for world in WORLDS:
        tmp = tmp_path_factory.mktemp(f"cfg{world}")
        spec = tmp / "spec.json"
        spec.write_text(json.dumps({"out_dir": str(tmp)}))
        ranks.launch(HERE / "cfg_worker.py", [str(spec)], world_size=world, log_dir=tmp, timeout_s=120)
        out[world] = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]
    return out


@pytest.fixture(scope="module")
def references():
    """Single-process guided outputs and x_t gradients for every (case, sample, form, fn) the ranks ran."""
    torch.manual_seed(0)
    out = {}
    for name, (preset, _, _) in worker.CASES.items():
        den = worker.make_denoiser(preset)
        for sample in (0, 1):
            s = worker.make_sample(name, sample, den.net)
            for form, scale in worker.GUIDANCE:
                for fn in worker.FNS:
                    x = s["x"].clone().requires_grad_(True)
                    y = getattr(den, fn)(x, s["t"], s["cond"], s["uncond"], scale, form)
                    out[(name, sample, form, fn)] = dict(y=y.detach(), x=x, out=y)
            with torch.no_grad():
                out[(name, sample, "x0")] = den.x0(s["x"], s["t"], s["cond"])
                out[(name, sample, "flow")] = den.flow(s["x"], s["t"], s["cond"])
    return out


def _reference_grad(ref: dict, weights: torch.Tensor) -> torch.Tensor:
    (grad,) = torch.autograd.grad((weights * ref["out"]).sum(), ref["x"], retain_graph=True)
    return grad


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str):
    assert actual.shape == expected.shape, f"{what}: shape {list(actual.shape)} vs {list(expected.shape)}"
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert scale > 0, f"{what}: the reference is all zeros"
    assert err <= REL_TOL * scale + 1e-7, f"{what}: max error {err:.3e} vs max |expected| {scale:.3e}"


def _groups(rank_results):
    """{tuple of global ranks: sample} of the cfg groups of one launch."""
    groups = {}
    for r in rank_results:
        groups.setdefault(tuple(r["group_ranks"]), set()).add(r["sample"])
    assert all(len(s) == 1 for s in groups.values()), "the ranks of a cfg group must hold the same sample"
    return {g: s.pop() for g, s in groups.items()}


def test_groups_follow_the_mesh(results):
    assert _groups(results[2]) == {(0, 1): 0}
    assert _groups(results[4]) == {(0, 1): 0, (2, 3): 1}  # cfg innermost after tp, sp; sample = dp coordinate
    for r in results[4]:
        assert r["mesh_cfg_rank"] == r["group_rank"] == r["group_ranks"].index(r["rank"])


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("fn", worker.FNS)
@pytest.mark.parametrize("form", [f for f, _ in worker.GUIDANCE])
@pytest.mark.parametrize("name", list(worker.CASES))
def test_guided_output_and_gradient_match_single_process(results, references, world, name, form, fn):
    key = f"{name}/{form}/{fn}"
    for group, sample in _groups(results[world]).items():
        ref = references[(name, sample, form, fn)]
        cond_only = references[(name, sample, "x0" if fn == "x0_guided" else "flow")]
        assert (ref["y"] - cond_only).abs().max() > 1e-2 * ref["y"].abs().max(), "guidance must matter here"
        summed_weights = 0
        for r in group:
            got = results[world][r]["cases"][f"{key}/distinct"]
            _assert_close(got["y"], ref["y"], f"{key} output, rank {r}/{world}")
            assert got["forwards"] == 1 and got["exchanges"] == 1, (r, got["forwards"], got["exchanges"])
            summed_weights = summed_weights + worker.loss_weights(key, r, ref["y"].shape)
        grads = sum(results[world][r]["cases"][f"{key}/distinct"]["grad"] for r in group)
        _assert_close(grads, _reference_grad(ref, summed_weights), f"{key} summed x_t gradient, group {group}")
        # one rank's gradient alone is NOT the gradient of its own loss (the exchange moved part of it)
        alone = results[world][group[0]]["cases"][f"{key}/distinct"]["grad"]
        own = _reference_grad(ref, worker.loss_weights(key, group[0], ref["y"].shape))
        assert (alone - own).abs().max() > 1e-3 * own.abs().max()


@pytest.mark.parametrize("world", WORLDS)
def test_same_loss_on_both_ranks_averages_to_single_process_gradient(results, references, world):
    name, form, fn = worker.SAME_LOSS_CASE
    key = f"{name}/{form}/{fn}"
    for group, sample in _groups(results[world]).items():
        ref = references[(name, sample, form, fn)]
        expected = _reference_grad(ref, worker.loss_weights(key, -1, ref["y"].shape))
        runs = [results[world][r]["cases"][f"{key}/same"] for r in group]
        for r, got in zip(group, runs):
            _assert_close(got["y"], ref["y"], f"{key} output, rank {r}")
        _assert_close(sum(g["grad"] for g in runs) / len(runs), expected, f"{key} mean x_t gradient, group {group}")


@pytest.mark.parametrize("world", WORLDS)
def test_unguided_scale_runs_the_conditional_pass_only(results, references, world):
    for group, sample in _groups(results[world]).items():
        for r in group:
            for name in worker.CASES:
                for form, _ in worker.UNGUIDED:
                    for fn in worker.FNS:
                        got = results[world][r]["unguided"][f"{name}/{form}/{fn}"]
                        assert got["forwards"] == 1 and got["exchanges"] == 0, (r, name, form, fn, got)
                        expected = references[(name, sample, "x0" if fn == "x0_guided" else "flow")]
                        _assert_close(got["y"], expected, f"unguided {name}/{form}/{fn}, rank {r}")


@pytest.mark.parametrize("world", WORLDS)
def test_wrapper_keeps_the_denoiser_interface(results, world):
    for r in results[world]:
        api = r["api"]
        assert api["type"] == "CFGParallelDenoiser"
        assert api["net_is_same"] and api["same_params"] and api["num_train_timesteps"] == 1000
        assert api["param_names"] and all(n.startswith("denoiser.net.") for n in api["param_names"])
        for check in ("flow_equal", "x0_equal", "flow_to_x0_equal", "sigma_equal", "network_inputs_equal"):
            assert api[check], check
        assert api["size1_unchanged"] and api["none_unchanged"]
        assert "form must be one of" in api["bad_form_error"], api["bad_form_error"]


def test_wrong_group_size_raises(results):
    for r in results[4]:
        api = r["api"]
        for label in ("fn", "cls"):
            assert "got 4" in api[f"error_world_{label}"], api[f"error_world_{label}"]
            if r["rank"] < 3:  # members of the 3-rank group
                assert "got 3" in api[f"error_three_{label}"], api[f"error_three_{label}"]


@pytest.mark.parametrize("world", WORLDS)
def test_exchange_gathers_in_group_order_with_summed_gradient(results, world):
    for group, _ in _groups(results[world]).items():
        inputs = [worker.gather_input(r) for r in group]
        for i, r in enumerate(group):
            api = results[world][r]["api"]
            assert torch.equal(api["gather_value"], torch.stack(inputs))
            # d/dx_i of sum_j sum_k c_j[k] . x_k = sum_j c_j[i]
            expected = sum(worker.gather_weights(q, len(group))[i] for q in group)
            assert torch.allclose(api["gather_grad"], expected, atol=1e-6), (r, api["gather_grad"], expected)
