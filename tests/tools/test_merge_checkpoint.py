"""tools/merge_checkpoint.py and tools/inspect_checkpoint.py on checkpoints written by the real trainer.

A tiny Wan DiT generator and a tiny Wan critic (build_wan("tiny-t2v"), flow-fit on random latents,
wan_worker.py) are trained for 3 steps under 2-process DeepSpeed ZeRO-3 (gloo) and saved; one
single-process launch does the same under ZeRO-0 and ZeRO-1 (fp32) and ZeRO-3 (bf16). References come from the training
processes themselves: the weights and EMA gathered by the trainer's collectives, and the outputs of
the trained generator on a fixed input. Merged files must reproduce them in our key format (our
WanModel), the original Wan format (load_wan_checkpoint) and diffusers format
(WanTransformer3DModel.from_pretrained, an independent implementation).
"""
import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


from tests.helpers import ranks  # noqa: E402
from tests.helpers.scripts import load_module  # noqa: E402

worker = load_module("merge_test_wan_worker", HERE / "wan_worker.py")
merge_cli = load_module("merge_checkpoint_cli", ROOT / "tools" / "merge_checkpoint.py")
inspect_cli = load_module("inspect_checkpoint_cli", ROOT / "tools" / "inspect_checkpoint.py")

from megadistill.engine import merge  # noqa: E402
from megadistill.models.wan import build_wan, load_wan_checkpoint  # noqa: E402

pytestmark = pytest.mark.distributed


def _launch(tmp: Path, name: str, runs, world_size: int):
    spec = {"results": str(tmp / f"{name}.pt"), "runs": runs}
    (tmp / f"{name}.json").write_text(json.dumps(spec))
    logs = tmp / f"logs_{name}"
    logs.mkdir()
    ranks.launch(HERE / "wan_worker.py", [str(tmp / f"{name}.json")], world_size=world_size, log_dir=logs,
                 timeout_s=150, plain=world_size == 1)
    return torch.load(spec["results"], weights_only=False)


@pytest.fixture(scope="module")
def zero3(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zero3")
    (result,) = _launch(tmp, "z3", [{"stage": 3, "checkpoint_dir": str(tmp / "ckpt")}], world_size=2)
    return {"root": tmp / "ckpt", **result}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    runs = [{"stage": s, "checkpoint_dir": str(tmp / f"ckpt{s}")} for s in (0, 1)]
    runs.append({"stage": 3, "checkpoint_dir": str(tmp / "ckpt3_bf16"), "precision": "bf16"})
    results = _launch(tmp, "single", runs, world_size=1)
    return {key: {"root": Path(run["checkpoint_dir"]), **r} for key, run, r in zip((0, 1, "3_bf16"), runs, results)}


def _unwrapped(sd):
    return {k[len("net."):]: v for k, v in sd.items()}


def _assert_equal(merged, reference):
    assert merged.keys() == reference.keys()
    for name, value in reference.items():
        assert merged[name].dtype == torch.float32, name
        assert torch.equal(merged[name], value), name


# ----------------------------------------------------------------------------------- merged state dicts

@pytest.mark.parametrize("model", ["generator", "critic", "ema"])
def test_zero3_two_rank_merge_equals_gathered(zero3, model):
    """ZeRO-3 partitions of 2 ranks (and the 2 EMA shards) merged in one process, no process group."""
    merged = merge.merged_state_dict(zero3["root"], model)
    _assert_equal(merged, _unwrapped(zero3[model]))
    if model == "ema":  # the EMA really differs from the weights it follows (decay 0.5, 2 updates)
        assert not torch.equal(merged["blocks.0.ffn.0.weight"], _unwrapped(zero3["generator"])["blocks.0.ffn.0.weight"])


@pytest.mark.parametrize("stage", [0, 1])
@pytest.mark.parametrize("model", ["generator", "critic", "ema"])
def test_single_process_zero0_zero1_merge(single, stage, model):
    run = single[stage]
    info = merge.read_checkpoint_info(run["root"])
    assert (info.zero_stage, info.world_size, info.step) == (stage, 1, 3)
    _assert_equal(merge.merged_state_dict(run["root"], model), _unwrapped(run[model]))


def test_bf16_zero3_merges_fp32_masters_that_round_to_the_bf16_weights(single):
    run = single["3_bf16"]
    info = merge.read_checkpoint_info(run["root"])
    assert info.engines["generator"].weight_dtype == "bf16" and info.engines["generator"].master_dtype == "fp32"
    merged, weights = merge.merged_state_dict(run["root"]), _unwrapped(run["generator"])
    assert merged.keys() == weights.keys()
    for name, w in weights.items():
        assert w.dtype == torch.bfloat16 and merged[name].dtype == torch.float32
        assert torch.equal(merged[name].to(torch.bfloat16), w), name
    _assert_equal(merge.merged_state_dict(run["root"], "ema"), _unwrapped(run["ema"]))


def test_reassemble_shards_cuts_padding():
    full = torch.arange(10.0).reshape(2, 5)
    shards = [torch.tensor([0.0, 1, 2, 3]), torch.tensor([4.0, 5, 6, 7]), torch.tensor([8.0, 9, 0, 0])]
    assert torch.equal(merge.reassemble_shards(shards, (2, 5)), full)


# ----------------------------------------------------------------------------------- files and models

def _reference_inputs():
    return worker.probe_input()


def _our_model_from(files, fmt):
    model = build_wan("tiny-t2v").eval()
    if fmt == "ours":
        from safetensors.torch import load_file

        (file,) = [f for f in files if f.suffix == ".safetensors"]
        model.load_state_dict(load_file(str(file)), strict=True)
    else:
        result = load_wan_checkpoint(model, files[0].parent)
        assert result.key_format == "original" and not result.missing and not result.unexpected
    return model


@pytest.mark.parametrize("fmt", ["ours", "original"])
def test_merged_file_reproduces_trained_output_in_our_model(zero3, tmp_path, fmt):
    out = tmp_path / ("gen.safetensors" if fmt == "ours" else "gen")
    # No --wan-config: the trainer recorded the generator's WanConfig in the checkpoint.
    result = merge.merge_checkpoint(zero3["root"], out, "generator", fmt, verify=True, progress=False)
    assert result.report.ok and result.report.tensors == 69
    if fmt == "original":
        assert json.loads((out / "config.json").read_text())["_class_name"] == "WanModel"
    x, t, context = _reference_inputs()
    with torch.no_grad():
        got = _our_model_from(result.written, fmt)(x, t, context)
    reference = zero3["outputs"]["generator"]
    assert reference.abs().max() > 1e-2  # trained away from the zero-initialised head's zero output
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-6)


def test_diffusers_folder_loads_in_diffusers_and_reproduces_output(zero3, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    out = tmp_path / "critic_diffusers"
    with pytest.raises(merge.MergeError, match="does not record the critic"):
        merge.merge_checkpoint(zero3["root"], out, "critic", "diffusers", progress=False)
    merge.merge_checkpoint(zero3["root"], out, "critic", "diffusers", wan_config="tiny-t2v", progress=False)
    model = diffusers.WanTransformer3DModel.from_pretrained(str(out)).eval()
    x, t, context = _reference_inputs()
    # Wan (and our model) zero-pad the text embeddings to text_len; diffusers' pipeline pads them too.
    padded = torch.nn.functional.pad(context, (0, 0, 0, 512 - context.shape[1]))
    with torch.no_grad():
        got = model(hidden_states=x, timestep=t, encoder_hidden_states=padded, return_dict=False)[0]
    reference = zero3["outputs"]["critic"]
    assert reference.abs().max() > 1e-2  # trained away from the zero-initialised head's zero output
    torch.testing.assert_close(got.float(), reference, rtol=1e-5, atol=1e-6)


def test_sharded_bf16_cli_with_verify(zero3, tmp_path, capsys):
    out = tmp_path / "ema_bf16"
    code = merge_cli.main([str(zero3["root"]), str(out), "--model", "ema", "--dtype", "bf16",
                           "--max-shard-size", "100KB", "--verify", "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0 and "verify OK: 69 tensors, 147,200 elements" in printed
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1
    for f in files:
        assert (out / f).stat().st_size <= 100_000 + 64 * 1024  # one tensor may overflow a shard; none is large
    from safetensors.torch import load_file

    stored = {k: v for f in files for k, v in load_file(str(out / f)).items()}
    expected = _unwrapped(zero3["ema"])
    assert stored.keys() == expected.keys()
    for name, value in expected.items():
        assert stored[name].dtype == torch.bfloat16 and torch.equal(stored[name], value.to(torch.bfloat16)), name


def test_verify_detects_a_corrupted_file(zero3, tmp_path):
    out = tmp_path / "gen.safetensors"
    merge.merge_checkpoint(zero3["root"], out, progress=False)
    expected = merge.merged_state_dict(zero3["root"], "generator")
    expected["blocks.1.ffn.2.bias"] = expected["blocks.1.ffn.2.bias"] + 1e-3
    report = merge.verify_files([out], expected)
    assert not report.ok and report.mismatched == ["blocks.1.ffn.2.bias"]
    assert report.max_abs_diff == pytest.approx(1e-3, rel=1e-3)


# ----------------------------------------------------------------------------------- inspect

def test_inspect_reports_contents(zero3, capsys):
    assert inspect_cli.main([str(zero3["root"])]) == 0
    text = capsys.readouterr().out
    numel = sum(v.numel() for v in zero3["generator"].values())
    assert numel == 147_200
    for line in ("step         3", "world size   2", "ZeRO stage   3", "models       critic, generator",
                 f"generator  {numel:,} parameters in 69 tensors", "EMA          present: 147,200 elements",
                 "RNG state    present (2 rank file(s))", "data state   present", "config       no snapshot saved"):
        assert line in text, line


# ----------------------------------------------------------------------------------- errors

def test_missing_directory(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="not found"):
        merge.merged_state_dict(tmp_path / "nowhere")
    assert merge_cli.main([str(tmp_path / "nowhere"), str(tmp_path / "o.safetensors")]) == 2
    assert "checkpoint directory not found" in capsys.readouterr().err


def test_incomplete_checkpoint_is_refused(single, tmp_path):
    source = merge.resolve_checkpoint(single[0]["root"])
    broken = tmp_path / "step_000000003"
    shutil.copytree(source, broken)
    (broken / "COMPLETE").unlink()
    with pytest.raises(merge.MergeError, match="incomplete checkpoint"):
        merge.merge_checkpoint(broken, tmp_path / "o.safetensors", progress=False)
    with pytest.raises(merge.MergeError, match="no complete checkpoint"):
        merge.read_checkpoint_info(tmp_path)  # a root whose only checkpoint is incomplete
    assert not (tmp_path / "o.safetensors").exists()


def test_bad_requests_fail_before_work(single, tmp_path):
    root = single[0]["root"]
    with pytest.raises(merge.MergeError, match="unknown model 'teacher'"):
        merge.merge_checkpoint(root, tmp_path / "o.safetensors", model="teacher", progress=False)
    with pytest.raises(SystemExit):  # argparse refuses it too
        merge_cli.parse_args([str(root), "o", "--model", "teacher"])
    with pytest.raises(merge.MergeError, match="needs --wan-config"):  # only the generator's config is recorded
        merge.merge_checkpoint(root, tmp_path / "d", model="critic", fmt="diffusers", progress=False)
    with pytest.raises(merge.MergeError, match="unknown dtype"):
        merge.merge_checkpoint(root, tmp_path / "o.safetensors", dtype="int3", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_wan_format_for_a_non_wan_model_is_refused(single):
    info = merge.read_checkpoint_info(single[0]["root"])
    toy = {"net.body.0.weight": (4, 4), "net.body.0.bias": (4,)}  # a ToyFlowMLP-like generator
    info.engines["generator"].param_shapes = toy
    for fmt in ("original", "diffusers"):
        with pytest.raises(merge.MergeError, match="not a Wan DiT"):
            merge.check_request(info, "generator", fmt)
    assert merge.check_request(info, "generator", "ours") == "generator"
