"""Ulysses sequence parallelism against the single-process Wan model, 4 gloo ranks on CPU.

One launch (sp_worker.py) runs every case under sp = 4 and sp = 2 (two groups of two), fp32, with
L = frames x 9 tokens (never a multiple of 2 or 4; causal steps of 18 and 9 tokens). Each rank
backpropagates sum(weights * output) / sp: its output must equal the single-process output and the
gradients summed over its SP group must equal the single-process gradients, for every parameter.
Cases: bidirectional T2V and I2V ([B] timesteps), TI2V per-token timesteps [B, L], the two-expert
WanMoE with one sample per expert, the block-causal parallel forward with per-frame timesteps [B, F]
(with activation checkpointing) and with a local window + sink, and the KV-cache rollout
(forward_causal_step block after block, each block refreshed clean at the same start frame) with and
without a window (eviction) and checkpointing. The inference rollout (causal_generate) runs unchanged
under sp, and a bf16 model stays within bf16 rounding of the bf16 single-process model. Composed with
tensor parallelism (tp = 2 x sp = 2): each TP shard's gradient summed over its SP group equals that
shard of the single-process gradient.
"""
import json
from pathlib import Path

import pytest
import torch

from megadistill.parallel.sequence_parallel import shard_length, shard_positions
from megadistill.parallel.tensor_parallel import shard
from tests.helpers import ranks
from tests.helpers.scripts import load_module

HERE = Path(__file__).resolve().parent


pytestmark = pytest.mark.distributed
worker = load_module("sp_worker", HERE / "sp_worker.py")

SP_GROUPS = {4: [[0, 1, 2, 3]], 2: [[0, 1], [2, 3]]}
TP_SP_CASES = ["t2v", "ti2v_per_token", "causal_per_frame", "causal_steps"]
REL_TOL = 2e-5


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ulysses")
    spec = tmp / "spec.json"
    spec.write_text(json.dumps({"sp": sorted(SP_GROUPS), "cases": list(worker.CASES), "tp_sp_cases": TP_SP_CASES,
                                "out_dir": str(tmp)}))
    ranks.launch(HERE / "sp_worker.py", [str(spec)], world_size=4, log_dir=tmp, timeout_s=180)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(4)]


@pytest.fixture(scope="module")
def references():
    out = {}
    for name in worker.CASES:
        model, inputs = worker.make_case(name)
        out[name] = worker.run_case(name, model, inputs)
    return out


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str):
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= REL_TOL * scale + 1e-7, f"{what}: max error {err:.3e} vs max |expected| {scale:.3e}"


def test_shard_arithmetic():
    assert [shard_length(n, 4) for n in (1, 4, 27, 28)] == [1, 1, 7, 7]
    assert shard_positions(27, 4, 3).tolist() == [21, 22, 23, 24, 25, 26, 26]  # one padding slot
    assert shard_positions(9, 4, 0).tolist() == [0, 1, 2]
    assert torch.equal(torch.cat([shard_positions(27, 4, r) for r in range(4)])[:27], torch.arange(27))


@pytest.mark.parametrize("name", list(worker.CASES))
@pytest.mark.parametrize("sp", sorted(SP_GROUPS))
def test_outputs_and_gradients_match_single_process(rank_results, references, sp, name):
    ref = references[name]
    assert ref["grads"], "the reference run must produce gradients"
    for group in SP_GROUPS[sp]:
        runs = [rank_results[r][(sp, name)] for r in group]
        for r, run in zip(group, runs):
            # the blocks really ran on shards (a model left whole would pass the sums below too)
            assert run["block_tokens"] == sorted({shard_length(n, sp) for n in ref["block_tokens"]})
            assert len(run["outputs"]) == len(ref["outputs"])
            for i, (out, expected) in enumerate(zip(run["outputs"], ref["outputs"])):
                _assert_close(out, expected, f"sp={sp} rank {r} output {i}")
            if ref["cache_heads"] is not None:  # each rank caches the full sequence for its own heads
                assert run["cache_heads"] == ref["cache_heads"] // sp
        # every parameter that gets a gradient in one process gets one on each rank, and nothing more
        for run in runs:
            assert set(run["grads"]) == set(ref["grads"])
        for pname, expected in ref["grads"].items():
            total = sum(run["grads"][pname] for run in runs)
            _assert_close(total, expected, f"sp={sp} ranks {group} grad of {pname}")


@pytest.mark.parametrize("name", TP_SP_CASES)
def test_composed_with_tensor_parallel(rank_results, references, name):
    """Rank r: tp rank r % 2, sp rank r // 2 (TP innermost)."""
    ref = references[name]
    for tp_rank in (0, 1):
        group = [tp_rank, tp_rank + 2]  # the SP group of this TP shard
        runs = [rank_results[r][("tp2sp2", name)] for r in group]
        for r, run in zip(group, runs):
            assert run["block_tokens"] == sorted({shard_length(n, 2) for n in ref["block_tokens"]})
            for i, (out, expected) in enumerate(zip(run["outputs"], ref["outputs"])):
                _assert_close(out, expected, f"tp2 x sp2 rank {r} output {i}")
            if ref["cache_heads"] is not None:
                assert run["cache_heads"] == ref["cache_heads"] // 4
        partition = runs[0]["partition"]
        assert partition, "tensor parallelism must have sharded some parameters"
        for pname, full in ref["grads"].items():
            expected = full
            if pname in partition:
                dim, chunks = partition[pname]
                expected = shard(full, dim, tp_rank, 2, chunks)
            total = sum(run["grads"][pname] for run in runs)
            _assert_close(total, expected, f"tp2 x sp2 tp rank {tp_rank} grad of {pname}")


@pytest.mark.parametrize("sp", sorted(SP_GROUPS))
def test_streaming_rollout_matches_single_process(rank_results, sp):
    model, _ = worker.make_case("causal_steps")
    expected = worker.generate(model)
    assert expected.abs().max() > 0
    for r in range(4):
        _assert_close(rank_results[r][(sp, "generate")], expected, f"sp={sp} rank {r} causal_generate")


@pytest.mark.parametrize("sp", sorted(SP_GROUPS))
def test_bf16_matches_single_process_bf16(rank_results, sp):
    expected = worker.bf16_forward("causal_per_frame")
    scale = expected.abs().max()
    for r in range(4):
        # same per-token arithmetic; only the attention's reduction order may differ
        assert (rank_results[r][(sp, "bf16")] - expected).abs().max() <= 1e-2 * scale


def test_sp1_is_a_noop(rank_results):
    assert all(rank_results[r]["api"]["sp1_noop"] for r in range(4))


def test_heads_not_divisible_raise_before_any_change(rank_results):
    for r in range(4):
        api = rank_results[r]["api"]
        if r < 3:
            assert api["sp3_error"] is not None and "num_heads = 4" in api["sp3_error"]
            assert api["sp3_untouched"]
        # tensor-parallel local head count (2) of the last block, sp = 4
        assert api["tp_local_error"] is not None and "blocks.1.self_attn" in api["tp_local_error"]
        assert api["tp_local_untouched"]
        assert api["twice_error"] is not None and "already" in api["twice_error"]


def test_deepcopy_of_a_parallel_model(rank_results):
    for r in range(4):
        assert rank_results[r]["api"]["deepcopy_layout"] and rank_results[r]["api"]["deepcopy_equal"]
