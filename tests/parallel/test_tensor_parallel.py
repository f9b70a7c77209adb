"""Megatron tensor parallelism for Wan against the single-process model, on 4 CPU ranks (gloo).

One launch of tp_worker.py runs tp = 2 on two subgroups ({0, 1}, {2, 3}), tp = 4 on all ranks, and
tp = 2 x sp = 2 from a ParallelMesh (TP, then Ulysses SP), with 27 tokens (not divisible by sp).
Per case every rank compares with its own single-process copy of the same model and inputs: the
output, and EVERY parameter gradient (a sharded one against the matching slice of the single-process
gradient; replicated ones in full and identical across the TP ranks, with no extra all-reduce).
Tolerances: the fp32 noise floor of these tiny models against float64 is ~3e-6 (gradients).
"""
from pathlib import Path

import pytest
import torch

from megadistill.models.wan import build_wan
from megadistill.models.wan.norms import WanRMSNorm
from megadistill.models.wan.parallelize import apply_tensor_parallel
from megadistill.ops.rms_norm import rms_normalize
from megadistill.parallel.tensor_parallel import TPRMSNorm, shard, tp_rms_normalize, unshard

HERE = Path(__file__).resolve().parent
from tests.helpers import ranks  # noqa: E402

pytestmark = pytest.mark.distributed

OUT_TOL, GRAD_TOL = 1e-5, 2e-5
WORLD = 4
HEADS, DIM, FFN = 4, 64, 128  # the tiny presets
FORWARD_CASES = [(2, "t2v"), (2, "ti2v_per_token"), (2, "causal_per_frame"), (2, "fused_qkv"), (2, "i2v"),
                 (2, "moe"), (4, "t2v"), (4, "ti2v_per_token"), (4, "causal_per_frame"), (4, "fused_qkv"),
                 ("tp2_sp2", "t2v"), ("tp2_sp2", "ti2v_per_token"), ("tp2_sp2", "causal_per_frame")]
TP_SIZE = {2: 2, 4: 4, "tp2_sp2": 2}  # "tp2_sp2": the mesh's tp = 2 x sp = 2, TP then Ulysses SP


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp")
    ranks.launch(HERE / "tp_worker.py", [str(out)], world_size=WORLD, log_dir=out, timeout_s=150)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _case(results, rank, key):
    res = results[rank][key]
    assert "error" not in res, f"rank {rank} case {key}:\n{res['error']}"
    return res


def _check_grads(res, key, rank):
    assert sorted(res["grad_errs"]) == res["ref_names"], "every parameter must be compared"
    bad = {n: e for n, e in res["grad_errs"].items() if not e <= GRAD_TOL}
    assert not bad, f"rank {rank} {key}: gradients off: {bad}"
    assert res["num_sharded"] > 0
    # Replicated parameters: the same full gradient on every TP rank, without an extra all-reduce.
    assert res["replicated_across_ranks"] <= 1e-6


@pytest.mark.parametrize("layout,name", FORWARD_CASES)
def test_forward_and_every_gradient_match_single_process(results, layout, name):
    tp = TP_SIZE[layout]
    for rank in range(WORLD):
        res = _case(results, rank, (layout, name))
        assert res["out_err"] <= OUT_TOL, (rank, res["out_err"])
        assert res["out_scale"] > 0.1  # a non-trivial output (the head is not left at its zero init)
        _check_grads(res, (layout, name), rank)
        # TP really applied: local heads and shards, in every block (both experts for the MoE).
        assert res["self_heads"] == res["cross_heads"] == HEADS // tp
        assert res["qkv_weight"] == ((3 if name == "fused_qkv" else 1) * DIM // tp, DIM)
        assert res["o_weight"] == (DIM, DIM // tp)
        assert res["ffn0_weight"] == (FFN // tp, DIM) and res["ffn2_weight"] == (DIM, FFN // tp)
        assert res["norm_q"] == (DIM // tp,)
        assert res["types"] == ["ColumnParallelLinear", "RowParallelLinear", "TPRMSNorm"]
        assert res["blocks_parallel"] == res["blocks"] == (4 if name == "moe" else 2)


@pytest.mark.parametrize("layout,cache_heads", [(2, 2), (4, 1), ("tp2_sp2", 1)])
def test_causal_steps_with_kv_cache_and_refresh(results, layout, cache_heads):
    for rank in range(WORLD):
        res = _case(results, rank, (layout, "kv_cache"))
        assert len(res["step_errs"]) == 4 and max(res["step_errs"]) <= OUT_TOL, res["step_errs"]
        assert res["cache_heads"] == [cache_heads] * 2  # new_kv_cache allocates the local heads (/ tp / sp)
        _check_grads(res, (layout, "kv_cache"), rank)


@pytest.mark.parametrize("tp", [2, 4])
def test_bad_tp_raises_before_modifying(results, tp):
    for rank in range(WORLD):
        res = _case(results, rank, (tp, "bad_sizes"))
        assert res["heads"]["message"] == (f"tensor parallel size {tp} does not divide the model's 3 heads "
                                           "(tp must be one of 1, 3)")
        assert res["ffn"]["message"] == f"tensor parallel size {tp} does not divide the 129 output features of blocks.0.ffn.0"
        assert res["heads"]["unchanged"] and res["ffn"]["unchanged"]


def test_unsharded_checkpoint_round_trip(results):
    for rank in range(WORLD):
        res = dict(_case(results, rank, (2, "state_dict")))
        assert res.pop("deepcopy_err") == 0.0
        assert sorted(res) == ["fused", "i2v", "moe", "t2v"]
        for label, r in res.items():
            assert r["same"], (rank, label)  # gathered == the unsharded weights, same keys and shapes
            assert r["local_rows"] * 2 == r["full_rows"], (rank, label)
            assert r["reload_same"] and r["meta_same"], (rank, label)  # both load paths give this rank's shards
            # Megatron attributes restored after to_empty (DeepSpeed's gradient norm reads them).
            assert r["meta_marked"] and r["num_sharded"] > 0, (rank, label)


def test_group_of_size_one_is_a_no_op(results):
    for rank in range(WORLD):
        res = _case(results, rank, (2, "size_one_group"))
        assert res == {"equal": True, "same_object": True, "no_tp_layers": True}


# Pure pieces (no process group).

def test_shard_of_fused_qkv_keeps_the_thirds():
    q, k, v = (torch.randn(8, 5) + i for i in range(3))
    fused = torch.cat([q, k, v])
    shards = [shard(fused, 0, r, 4, chunks=3) for r in range(4)]
    for r, s in enumerate(shards):
        lq, lk, lv = s.chunk(3, 0)
        assert torch.equal(lq, q[2 * r:2 * r + 2]) and torch.equal(lk, k[2 * r:2 * r + 2])
        assert torch.equal(lv, v[2 * r:2 * r + 2])
    assert torch.equal(unshard(shards, 0, chunks=3), fused)
    cols = [shard(fused, 1, r, 5) for r in range(5)]
    assert torch.equal(unshard(cols, 1), fused)
    with pytest.raises(ValueError, match="does not split into 3 shards"):
        shard(fused, 0, 0, 3, chunks=3)


def test_rms_statistic_without_group_is_wan_rmsnorm():
    x = torch.randn(2, 7, 64)
    assert torch.allclose(tp_rms_normalize(x, 64, 1e-6, None), rms_normalize(x, 1e-6), rtol=1e-6, atol=1e-7)


def test_tp_rmsnorm_keeps_wan_dtype_order():
    """bf16 input, fp32 weight: normalise in fp32, cast back to bf16, then scale (-> fp32), as WanRMSNorm."""
    ref = WanRMSNorm(64)
    with torch.no_grad():
        ref.weight.copy_(1 + 0.1 * torch.randn(64))
    norm = TPRMSNorm(torch.nn.Parameter(ref.weight.detach().clone()), 64, ref.eps, None)
    x = torch.randn(2, 7, 64).to(torch.bfloat16)
    out, expected = norm(x), ref(x)
    assert out.dtype == expected.dtype == torch.float32
    # sum / D vs mean may round differently before the bf16 cast: at most one bf16 ulp apart.
    torch.testing.assert_close(out, expected, rtol=2 ** -7, atol=0)


def test_no_group_leaves_model_untouched():
    model = build_wan("tiny-t2v")
    modules = list(model.modules())
    assert apply_tensor_parallel(model, None) is model
    assert list(model.modules()) == modules
    assert isinstance(model.blocks[0].self_attn.norm_q, WanRMSNorm)
