"""Meta-device loading (models/wan/loading.py) against today's path, build_wan + load_wan_checkpoint
(+ apply_tensor_parallel): every parameter and buffer identical (values, dtypes, requires_grad, TP
attributes) for original / diffusers names, single / sharded / .pth files, separate and stored fused
qkv, the A14B experts, bf16; every TP shard read from the file equal to ``shard`` of the full tensor;
mismatches raised before a single tensor is read; tp = 2 and ZeRO-3 partitioning while loading on two
gloo ranks."""
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megadistill.models.wan import CheckpointMismatchError, build_wan
from megadistill.models.wan.checkpoint import plan_wan_checkpoint, read_planned_tensor
from megadistill.models.wan import loading
from megadistill.models.wan.loading import load_wan, load_wan_checkpoint_into_meta
from megadistill.parallel.tensor_parallel import shard
from tests.helpers.scripts import load_module
from tests.helpers import ranks

pytestmark = pytest.mark.distributed

HERE = Path(__file__).resolve().parent


worker = load_module("wan_loading_worker", HERE / "wan_loading_worker.py")
TEXT_LEN = worker.TEXT_LEN


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan_ckpts")
    worker.write_checkpoints(root)
    return root


@pytest.mark.parametrize("case", list(worker.CASES))
def test_equals_current_path(ckpts, case):
    preset, overrides, rel = worker.CASES[case]
    ref = worker.current_path(preset, overrides, ckpts / rel)
    new = load_wan(preset, ckpts / rel, text_len=TEXT_LEN, **overrides)
    assert worker.differences(new, ref) == []
    assert type(new) is type(ref) and sum(p.numel() for p in new.parameters()) > 0


def test_bf16_option_equals_cast_build(ckpts):
    """A frozen bf16 teacher: same tensors as build_wan(dtype=bf16) + load (norms, modulation, time MLPs,
    head in float32)."""
    ref = worker.current_path("tiny-t2v", {}, ckpts / "t2v.safetensors", dtype=torch.bfloat16)
    new = load_wan("tiny-t2v", ckpts / "t2v.safetensors", dtype=torch.bfloat16, text_len=TEXT_LEN)
    assert worker.differences(new, ref) == []
    dtypes = {n: p.dtype for n, p in new.named_parameters()}
    assert dtypes["blocks.0.self_attn.q.weight"] == torch.bfloat16 and dtypes["blocks.0.modulation"] == torch.float32


@pytest.mark.parametrize("rel", ["t2v.safetensors", "t2v.pth", "stored_qkv.safetensors"])
def test_every_shard_read_from_file_equals_shard_of_full_tensor(ckpts, rel):
    """read_planned_tensor(dim, rank, size, chunks) == tensor_parallel.shard(full, ...) for every tensor,
    dim, tp in {2, 4} and chunks in {1, 3} (a fused qkv: built from separate q/k/v, or cut from a
    stored to_qkv), on the full model of a fused-qkv config."""
    model = build_wan("tiny-t2v", text_len=TEXT_LEN, fused_qkv=True, device="meta")
    plan = plan_wan_checkpoint({n: tuple(p.shape) for n, p in model.named_parameters()}, ckpts / rel)
    checked = 0
    for name in plan.tensors:
        full = read_planned_tensor(plan, name)
        for dim in range(full.dim()):
            for size in (2, 4):
                for chunks in (1, 3):
                    if full.shape[dim] % (size * chunks):
                        continue
                    for rank in range(size):
                        got = read_planned_tensor(plan, name, dim, rank, size, chunks)
                        assert torch.equal(got, shard(full, dim, rank, size, chunks)), (name, dim, size, chunks, rank)
                        checked += 1
    assert checked > 500


def _broken(src: Path, dst: Path, edit) -> Path:
    tensors = load_file(str(src))
    edit(tensors)
    save_file(tensors, str(dst))
    return dst


@pytest.fixture
def no_reads(monkeypatch):
    """Fail the test if the loader reads (materialises) any tensor."""
    def refuse(*args, **kwargs):
        raise AssertionError("a tensor was read before the checkpoint was checked")
    monkeypatch.setattr(loading, "read_planned_tensor", refuse)


@pytest.mark.parametrize("edit,match", [
    (lambda sd: sd.pop("blocks.1.cross_attn.norm_k.weight"), r"missing \(1\): blocks\.1\.cross_attn\.norm_k\.weight"),
    (lambda sd: sd.update({"blocks.0.lora_A.weight": torch.zeros(2)}), r"unexpected \(1\): blocks\.0\.lora_A\.weight"),
    (lambda sd: sd.update({"blocks.0.ffn.0.weight": torch.zeros(256, 64)}),
     r"shape mismatch \(1\): blocks\.0\.ffn\.0\.weight .*\[256, 64\].*\[128, 64\]"),
])
def test_mismatch_raises_before_anything_is_read(ckpts, tmp_path, no_reads, edit, match):
    path = _broken(ckpts / "t2v.safetensors", tmp_path / "broken.safetensors", edit)
    with pytest.raises(CheckpointMismatchError, match=match):
        load_wan("tiny-t2v", path, text_len=TEXT_LEN)


def test_moe_checks_both_experts_before_reading_either(ckpts, tmp_path, no_reads):
    folder = tmp_path / "a14b"
    shutil.copytree(ckpts / "a14b", folder)
    low = folder / "low_noise_model" / "diffusion_pytorch_model.safetensors"
    _broken(low, low, lambda sd: sd.update({"head.head.weight": torch.zeros(3, 64)}))
    with pytest.raises(CheckpointMismatchError, match=r"shape mismatch \(1\): head\.head\.weight"):
        load_wan("tiny-a14b", folder, text_len=TEXT_LEN)


def test_not_strict_tolerates_unexpected_never_missing(ckpts, tmp_path):
    extra = _broken(ckpts / "t2v.safetensors", tmp_path / "extra.safetensors",
                    lambda sd: sd.update({"blocks.0.lora_A.weight": torch.zeros(2)}))
    model = build_wan("tiny-t2v", text_len=TEXT_LEN, device="meta")
    result = load_wan_checkpoint_into_meta(model, extra, strict=False)
    assert result.unexpected == ["blocks.0.lora_A.weight"] and result.missing == []
    ref = worker.current_path("tiny-t2v", {}, ckpts / "t2v.safetensors")
    assert worker.differences(model, ref) == []
    lacking = _broken(ckpts / "t2v.safetensors", tmp_path / "lacking.safetensors",
                      lambda sd: sd.pop("head.head.bias"))
    with pytest.raises(CheckpointMismatchError, match=r"lacks 1 tensors .*head\.head\.bias.*no initial value"):
        load_wan("tiny-t2v", lacking, text_len=TEXT_LEN, strict=False)


def test_buffer_without_a_checkpoint_entry_is_refused(ckpts, no_reads):
    """A non-persistent buffer has no source: refused up front, never left uninitialised."""
    model = build_wan("tiny-t2v", text_len=TEXT_LEN, device="meta")
    model.blocks[0].register_buffer("table", torch.empty(4, device="meta"), persistent=False)
    with pytest.raises(ValueError, match=r"non-persistent buffers \['blocks\.0\.table'\]"):
        load_wan_checkpoint_into_meta(model, ckpts / "t2v.safetensors")


@pytest.fixture(scope="module")
def rank_results(ckpts, tmp_path_factory):
    """One launch of wan_loading_worker.py on 2 gloo ranks (both tests below read it)."""
    out = tmp_path_factory.mktemp("wan_loading_ranks")
    ranks.launch(HERE / "wan_loading_worker.py", [str(ckpts), str(out)], world_size=2, log_dir=out, timeout_s=150)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_tensor_parallel_ranks_equal_current_path(ckpts, rank_results):
    """tp = 2 on two gloo ranks: each rank's model (local shards, replicated tensors, TP attributes,
    bf16 option) equals apply_tensor_parallel of the fully loaded model; a wrong shape is named with
    the FULL shapes."""
    results = rank_results
    full = {name: sum(p.numel() for p in worker.current_path(preset, overrides, ckpts / rel).state_dict().values())
            for name, (preset, overrides, rel) in worker.CASES.items()}
    for rank, res in enumerate(results):
        for name in [*worker.CASES, "t2v_bf16"]:
            r = res[name]
            assert "error" not in r, f"rank {rank} {name}:\n{r.get('error')}"
            assert r["diffs"] == [], (rank, name, r["diffs"])
            assert r["sharded"] > 0
            if name in full:
                assert r["local_numel"] < 0.75 * full[name], (name, r["local_numel"], full[name])
        assert res["t2v_bf16"]["dtypes"] == ["torch.bfloat16", "torch.float32"]
        msg = res["mismatch"]["message"]
        assert msg is not None and "blocks.0.ffn.0.weight" in msg and "model: [256, 64]" in msg
        assert res["mismatch"]["full_ffn"] == (256, 64)


def test_zero3_partitions_each_block_as_it_loads(rank_results):
    """``partition`` = deepspeed.zero.Init(module=...) on 2 ranks: every parameter ends partitioned
    (empty local data), the gathered weights equal the current path's, build_frozen's engine computes
    the same output, and no call ever saw more than one block plus embeddings and head in full."""
    for rank in range(2):
        z = rank_results[rank]["zero3"]
        assert "error" not in z, z.get("error")
        assert z["partitioned"] and z["same"] and z["forward_err"] <= 1e-6, z
        assert len(z["alive"]) == 3  # blocks 0 and 1, then the whole model
        assert z["alive"][:2] == [z["block"], z["block"]]  # block 0 alone, then block 1 alone
        assert z["alive"][2] == z["rest"] < z["total"] / 2


def test_benchmark_checkpoint_writer_covers_the_model(tmp_path):
    """tools/bench_model_loading.py's random checkpoint (written shard by shard from the meta model)
    holds exactly the preset's tensors: load_wan takes it, and each weight is the stored one."""
    bench = load_module("bench_model_loading", HERE.parents[1] / "tools" / "bench_model_loading.py")
    index = bench.write_random_checkpoint("tiny-t2v", tmp_path, shard_bytes=50_000)
    stored = {}
    for path in sorted(tmp_path.glob("*.safetensors")):
        stored.update(load_file(str(path)))
    assert len(list(tmp_path.glob("*.safetensors"))) >= 3
    model = load_wan("tiny-t2v", index)
    assert set(stored) == set(model.state_dict())
    assert all(torch.equal(t, stored[k]) for k, t in model.state_dict().items())
