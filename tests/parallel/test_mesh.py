"""ParallelConfig validation, the rank layout, and ParallelMesh on 4 CPU ranks (gloo) with DeepSpeed.

The expected groups come from an independent enumeration: the world as an array of shape
[dp, cfg, sp, tp] (TP innermost), a group being one slice of it. The distributed part (mesh_worker.py)
records the members each group really has (an all_gather of global ranks inside it), the mpu
answers, a random draw seeded per rank, and what DeepSpeed ZeRO-3 does with the mesh as mpu.
"""
from pathlib import Path

import numpy as np
import pytest
import torch

from megadistill.parallel.mesh import ParallelConfig, coordinates, global_rank, rank_groups

HERE = Path(__file__).resolve().parent
from tests.helpers import ranks  # noqa: E402

pytestmark = pytest.mark.distributed

WORLD = 4
LAYOUTS = [(2, 1, 1), (1, 2, 1), (2, 2, 1), (1, 4, 1), (4, 1, 1), (1, 1, 2), (2, 1, 2), (1, 2, 2)]


def expected_groups(world: int, tp: int, sp: int, cfg: int) -> dict[int, dict[str, list[int]]]:
    """rank -> group name -> sorted members, by slicing arange(world).reshape(dp, cfg, sp, tp)."""
    grid = np.arange(world).reshape(world // (tp * sp * cfg), cfg, sp, tp)
    out = {}
    for r in range(world):
        d, c, s, t = (int(i) for i in np.argwhere(grid == r)[0])
        out[r] = {"tp": grid[d, c, s, :], "sp": grid[d, c, :, t], "cfg": grid[d, :, s, t], "dp": grid[:, c, s, t],
                  "sequence_data": grid[:, :, :, t], "pipe": np.array([r]),
                  "coords": np.array([t, s, c, d])}
        out[r] = {k: sorted(int(x) for x in v.flatten()) if k != "coords" else [int(x) for x in v]
                  for k, v in out[r].items()}
    return out


# ---- pure: validation and layout -------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    (dict(tp=0), "parallel.tp must be a positive int, got 0"),
    (dict(sp=-2), "parallel.sp must be a positive int, got -2"),
    (dict(tp=True), "parallel.tp must be a positive int, got True"),
    (dict(sp=2.0), "parallel.sp must be a positive int, got 2.0"),
    (dict(cfg=3), "parallel.cfg must be 1 or 2"),
])
def test_config_rejects_bad_degrees(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ParallelConfig(**kwargs)


def test_check_heads_and_world():
    with pytest.raises(ValueError) as e:
        ParallelConfig(tp=8).check(8, num_heads=12, model="Wan 1.3B")
    assert str(e.value) == "Wan 1.3B has 12 heads: tp x sp must be one of 1, 2, 3, 4, 6, 12, got tp=8 x sp=1 = 8"
    with pytest.raises(ValueError, match=r"has 40 heads: tp x sp must be one of 1, 2, 4, 5, 8, 10, 20, 40, "
                                         r"got tp=2 x sp=3 = 6"):
        ParallelConfig(tp=2, sp=3).check(48, num_heads=40)
    with pytest.raises(ValueError) as e:
        ParallelConfig(tp=2, sp=2, cfg=2).check(12, num_heads=12)
    assert str(e.value) == ("tp x sp x cfg = 2 x 2 x 2 = 8 does not divide the world size 12 "
                            "(must be one of 1, 2, 3, 4, 6, 12)")
    with pytest.raises(ValueError, match="world_size must be a positive int"):
        ParallelConfig().check(0)
    # Valid: dp is what is left; heads are optional (checked once the model is known).
    assert ParallelConfig(tp=2, sp=3).check(48, num_heads=12) == 8
    assert ParallelConfig(tp=4, sp=2, cfg=2).check(64) == 4
    assert ParallelConfig().check(1, num_heads=12) == 1


@pytest.mark.parametrize("world,tp,sp,cfg", [(16, 2, 2, 2), (24, 2, 3, 1), (8, 1, 1, 2), (12, 4, 1, 1), (4, 1, 4, 1)])
def test_layout_matches_independent_enumeration(world, tp, sp, cfg):
    sizes = dict(tp=tp, sp=sp, cfg=cfg, dp=ParallelConfig(tp=tp, sp=sp, cfg=cfg).check(world))
    expected = expected_groups(world, tp, sp, cfg)
    for r in range(world):
        c = coordinates(r, sizes)
        assert [c["tp"], c["sp"], c["cfg"], c["dp"]] == expected[r]["coords"]
        assert global_rank(c, sizes) == r
        assert r == c["tp"] + tp * (c["sp"] + sp * (c["cfg"] + cfg * c["dp"]))
    for name, dims in (("tp", ("tp",)), ("sp", ("sp",)), ("cfg", ("cfg",)), ("dp", ("dp",)),
                       ("sequence_data", ("sp", "cfg", "dp")), ("pipe", ())):
        groups = rank_groups(sizes, dims)
        assert sorted(r for g in groups for r in g) == list(range(world))  # a partition of the world
        assert sorted(map(tuple, groups)) == sorted({tuple(expected[r][name]) for r in range(world)})


# ---- distributed: 4 gloo ranks ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("mesh")
    ranks.launch(HERE / "mesh_worker.py", [str(out)], world_size=WORLD, log_dir=out, timeout_s=150)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _get(results, rank, key):
    res = results[rank][key]
    assert "error" not in res, f"rank {rank} {key}:\n{res['error']}"
    return res


@pytest.mark.parametrize("layout", LAYOUTS)
def test_groups_and_mpu(results, layout):
    expected = expected_groups(WORLD, *layout)
    for r in range(WORLD):
        res, exp = _get(results, r, layout), expected[r]
        assert [res["coords"][d] for d in ("tp", "sp", "cfg", "dp")] == exp["coords"]
        for name, g in res["groups"].items():
            assert g["comm"] == g["mesh"] == exp[name], (r, name)  # real members, in group-rank order
            assert g["rank"] == g["dist_rank"] == exp[name].index(r) and g["size"] == len(exp[name])
        mpu_expected = {"model": "tp", "tensor_model": "tp", "data": "dp", "sequence": "sp",
                        "sequence_data": "sequence_data", "pipe": "pipe"}
        for prefix, name in mpu_expected.items():
            m = res["mpu"][prefix]
            assert m["group"] == exp[name], (r, prefix)
            assert m["rank"] == exp[name].index(r) and m["world_size"] == len(exp[name]), (r, prefix)
        assert res["data_parallel_group_ranks"] == exp["dp"]
        assert res["tp_src"] == exp["tp"][0]


def test_mesh_refuses_bad_sizes_before_creating_groups(results):
    for r in range(WORLD):
        assert results[r]["bad_heads"] == ("the model has 6 heads: tp x sp must be one of 1, 2, 3, 6, "
                                           "got tp=4 x sp=1 = 4")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_seed_rule(results, layout):
    """Identical within tp, sp and cfg groups (one sample), different across dp ranks."""
    expected = expected_groups(WORLD, *layout)
    draws = _get(results, 0, layout)["draws"]
    for r in range(WORLD):
        res = _get(results, r, layout)
        assert torch.equal(res["draws"], draws)  # the gathered world is the same on every rank
        assert res["seed_rank"] == res["coords"]["dp"]
        for name in ("tp", "sp", "cfg"):
            for q in expected[r][name]:
                assert torch.equal(draws[q], draws[r]), (name, r, q)
                assert _get(results, q, layout)["seed_offsets"] == res["seed_offsets"]
        for q in expected[r]["dp"]:
            if q != r:
                assert not torch.allclose(draws[q], draws[r]), (r, q)
                assert _get(results, q, layout)["seed_offsets"][""] != res["seed_offsets"][""]
        assert len(set(res["seed_offsets"].values())) == 3  # named streams differ


@pytest.mark.parametrize("layout", [(1, 2, 1), (2, 1, 1), (1, 1, 2)])
def test_deepspeed_zero3_shards_and_reduces_over_sequence_data(results, layout):
    tp, sp, cfg = layout
    dp = WORLD // (tp * sp * cfg)
    expected = expected_groups(WORLD, *layout)
    for r in range(WORLD):
        res = _get(results, r, ("deepspeed",) + layout)
        group = expected[r]["sequence_data"]
        assert res["seq_data_group"] == res["optimizer_group"] == res["param_group"] == group
        assert res["local_numel"] * len(group) == res["full_numel"]  # partitioned over sequence_data
        assert res["train_batch_size"] == dp and res["dp_world_size"] == dp  # batch counts samples: dp only
        assert res["mp_world_size"] == tp and res["sequence_parallel_size"] == sp
        # SGD(lr=1) update = the group's gradients combined over SP and the data (x cfg) replicas, clipped
        # to norm 1 (DeepSpeed's default gradient_clipping). The clipped step does not see a uniform
        # scale of the gradient, so it checks the groups, not how SP ranks are weighed (sum or mean:
        # that is measured in test_parallel_training.py). The norm is reduced over the
        # model-parallel (TP) group counting parameters without ``tensor_model_parallel`` on TP rank 0
        # only: it is the norm of TP rank 0's replica (TP keeps replicated gradients identical).
        grads = _averaged_grads(res["before"], group, sp)
        norm_grads = _averaged_grads(res["before"], expected[expected[r]["tp"][0]]["sequence_data"], sp)
        norm = torch.sqrt(sum(g.pow(2).sum() for g in norm_grads))
        assert norm > 1.5  # the clipping is active, so a wrong norm would show
        for g, update in zip(grads, res["update"]):
            torch.testing.assert_close(update, g / (norm + 1e-6), rtol=1e-5, atol=1e-7)


def _averaged_grads(weights, group, sp):
    """Single-process gradients of mesh_worker's toy model: summed over ``group``'s ranks' inputs, divided
    by the number of data replicas len(group) / sp."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    with torch.no_grad():
        for p, w in zip(model.parameters(), weights):
            p.copy_(w)
    for q in group:
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(100 + q))
        model(x).pow(2).sum().backward()
    return [p.grad / (len(group) / sp) for p in model.parameters()]


def test_zero3_with_tensor_parallel_wan_matches_single_process_step(results):
    """tp = 2 x dp = 2 under ZeRO-3: one SGD(lr=1) step equals the single-process step on the two samples
    (gradients averaged over the data replicas, clipped by the FULL model's gradient norm)."""
    from megadistill.models.wan import build_wan

    recs = [_get(results, r, "deepspeed_wan_tp") for r in range(WORLD)]
    assert [r["dp_rank"] for r in recs] == [0, 0, 1, 1]
    assert recs[0]["loss"] == recs[1]["loss"] != recs[2]["loss"] == recs[3]["loss"]  # one sample per TP pair
    assert all(r["local_numel"] * 2 == r["tp_numel"] for r in recs)  # each TP shard split over its 2 replicas
    before = recs[0]["before"]
    model = build_wan("tiny-t2v", text_len=16)
    model.load_state_dict(before)
    for rec in (recs[0], recs[2]):
        (model(**rec["kwargs"]) * rec["weight"]).sum().backward()
    grads = {n: p.grad / 2 for n, p in model.named_parameters()}
    norm = torch.sqrt(sum(g.pow(2).sum() for g in grads.values()))
    assert norm > 1.5  # clipping active
    for rec in recs:
        assert rec["before"].keys() == rec["after"].keys() == grads.keys()
        for name, g in grads.items():
            update = rec["before"][name] - rec["after"][name]
            # The update is read back as a difference of fp32 weights: allow their rounding.
            atol = 4 * torch.finfo(torch.float32).eps * rec["before"][name].abs().max().item()
            torch.testing.assert_close(update, g / (norm + 1e-6), rtol=1e-5, atol=atol,
                                       msg=lambda m, name=name: f"{name}: {m}")
