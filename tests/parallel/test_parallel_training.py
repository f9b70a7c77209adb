"""The trainer on a parallel mesh reproduces a one-process run, and bad parallel sizes stop the CLI.

Distributed (train_sp_worker.py, gloo on CPU, fp32): tiny Wan DMD (teacher + generator + critic,
bidirectional rollout) through the real Trainer for 3 steps on
- 4 ranks with ZeRO-3 and sp = 2 (dp = 2), then, in the same process group, ZeRO-3 and tp = 2 (dp = 2)
  with checkpoints, the same tp = 2 run resumed from its step-2 checkpoint, ZeRO-2 and sp = 2
  (DeepSpeed weighs the SP ranks differently under stages 0-2), ZeRO-2 and tp = 2, ZeRO-3 and cfg = 2
  (dp = 2: the guided teacher's conditional and unconditional passes on the two ranks of a cfg group,
  through the wan job's ``teacher_denoiser``; ZeRO partitions and averages over dp x cfg), and the GAN
  method (critic = Wan backbone + register heads on blocks 0 and 1) with ZeRO-2 and sp = 2 (dp = 2: the
  heads read the block features gathered over the SP group),
- 1 process accumulating the same 2 samples per update (grad_accum = 2; the samples are defined by
  their global index, see the worker), with no mesh splitting anything: DMD under ZeRO-3
  (checkpointed) and ZeRO-2, GAN under ZeRO-2.
Every logged value of every step (losses, DeepSpeed's gradient norms) and the final, unsharded
generator, critic and EMA must agree (the EMA under tp = 2 is sharded over the sequence_data group per
TP shard). The optimizer is scale-sensitive (AdamW with eps = 1), so a wrong weighting of the SP
ranks' gradients (a factor sp) changes the weights and the later losses. The tp = 2 checkpoint (one
DeepSpeed file set per TP rank, EMA shards per (TP rank, sequence_data rank)) merges offline to exactly
the weights the run gathered, which match the one-process checkpoint's merge; resuming it continues the
run exactly.

CLI: sizes that do not fit the world size or the models' heads, tp > 1 for the toy-lab job, and
cfg = 2 where it cannot pay (a method without guided teacher calls, or a guidance that is the identity)
exit with code 2 before anything is written; cfg = 2 for a guided DMD / SiD teacher and the GAN with
sp > 1 pass the job's checks.
"""
import json
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
from tests.helpers import ranks  # noqa: E402
from tests.helpers.scripts import load_module

pytestmark = pytest.mark.distributed

# ZeRO-3 averages the SP ranks' gradients, stages 0-2 sum them (engines.sequence_parallel_loss_scale): both.
RUNS = {"sp2": {"tp": 1, "sp": 2, "ema": True}, "tp2": {"tp": 2, "sp": 1, "ema": True, "checkpoint": "ckpt_tp2"},
        "tp2_resumed": {"tp": 2, "sp": 1, "ema": True, "resume_from": "ckpt_tp2/step_000000002"},
        "sp2_zero2": {"tp": 1, "sp": 2, "ema": False, "stage": 2},
        "tp2_zero2": {"tp": 2, "sp": 1, "ema": True, "stage": 2, "checkpoint": "ckpt_tp2_zero2"},
        "cfg2": {"cfg": 2, "ema": True, "checkpoint": "ckpt_cfg2"},
        "gan_sp2_zero2": {"method": "gan", "sp": 2, "ema": False, "stage": 2}}
COMPARED = [run for run in RUNS if "resume_from" not in RUNS[run]]  # full 3-step runs
REFERENCE_CHECKPOINT = "ckpt_reference"
# The 1-process runs (grad_accum 2), in launch order, and which one each parallel run is compared with.
REFERENCES = {"reference": {"ema": True, "checkpoint": REFERENCE_CHECKPOINT},
              "reference_zero2": {"ema": True, "stage": 2},
              "reference_gan_zero2": {"method": "gan", "ema": False, "stage": 2}}
# The ZeRO-3 runs' layouts (the ZeRO-2 runs are cheaper: ZeRO-3 gathers every module's parameters).
SIZES = {"sp2": {"tp": 1, "sp": 2, "cfg": 1, "dp": 2}, "tp2": {"tp": 2, "sp": 1, "cfg": 1, "dp": 2},
         "cfg2": {"tp": 1, "sp": 1, "cfg": 2, "dp": 2}}


def _in(tmp: Path, run: dict) -> dict:
    """``run`` with its checkpoint paths under ``tmp``."""
    return {k: str(tmp / v) if k in ("checkpoint", "resume_from") else v for k, v in run.items()}


def _launch(tmp: Path, name: str, world: int, grad_accum: int, runs) -> list:
    spec = {"results": str(tmp / f"{name}.pt"), "grad_accum": grad_accum, "runs": runs}
    (tmp / f"{name}.json").write_text(json.dumps(spec))
    logs = tmp / f"logs_{name}"
    logs.mkdir()
    ranks.launch(HERE / "train_sp_worker.py", [str(tmp / f"{name}.json")], world_size=world, log_dir=logs,
                 timeout_s=240)
    return torch.load(spec["results"], weights_only=False)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parallel_training")
    reference = _launch(tmp, "reference", 1, 2, [_in(tmp, r) for r in REFERENCES.values()])
    parallel = _launch(tmp, "parallel", 4, 1, [_in(tmp, r) for r in RUNS.values()])
    return {**dict(zip(REFERENCES, reference)), **dict(zip(RUNS, parallel)), "tmp": tmp}


def _reference(results, run):
    if RUNS[run].get("method") == "gan":
        return results["reference_gan_zero2"]
    return results["reference_zero2" if RUNS[run].get("stage") == 2 else "reference"]


def _initial_generator():
    sys.path.insert(0, str(HERE))
    try:
        from train_sp_worker import tiny_wan
    finally:
        sys.path.remove(str(HERE))
    return {f"net.{k}": v for k, v in tiny_wan(num_heads=4).state_dict().items()}


@pytest.mark.parametrize("run", list(SIZES))
def test_layout_and_zero3_partitioning(results, run):
    res = results[run]
    expected = SIZES[run]
    assert res["sizes"] == expected
    assert res["zero3"]
    assert res["cfg_parallel_teacher"] == (expected["cfg"] == 2)  # the job's teacher_denoiser split the passes
    full = sum(v.numel() for v in res["generator"].values())
    # The TP shard holds every replicated parameter and 1/tp of the sharded ones; ZeRO-3 splits it over
    # the sequence_data group (dp x sp x cfg = 4 ranks for sp = 2 or cfg = 2, 2 for tp = 2), padding
    # each tensor.
    tp_numel, group = res["tp_numel"], 4 // expected["tp"]
    assert (tp_numel == full) if expected["tp"] == 1 else (0.5 * full < tp_numel < 0.9 * full)
    assert tp_numel <= res["local_numel"] * group < tp_numel + group * res["num_params"]
    ref = results["reference"]
    assert ref["sizes"] == {"tp": 1, "sp": 1, "cfg": 1, "dp": 1} and ref["local_numel"] == full


@pytest.mark.parametrize("run", COMPARED)
def test_per_step_logs_match_one_process(results, run):
    ours, ref = results[run]["history"], _reference(results, run)["history"]
    assert len(ours) == len(ref) == 3
    if RUNS[run].get("method", "dmd") == "dmd":  # DMD logs the rollout's exit step (the GAN the same, unlogged)
        assert [h["generator/exit_index"] for h in ref] == [0.0, 2.0, 1.0]  # every rollout depth is exercised
    for step, (a, b) in enumerate(zip(ours, ref)):
        assert a.keys() == b.keys()
        for key in b:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (step, key, a[key], b[key])


@pytest.mark.parametrize("run", COMPARED)
def test_final_weights_match_one_process(results, run):
    ours, ref = results[run], _reference(results, run)
    initial = _initial_generator()
    moved = max((ref["generator"][k] - initial[k]).abs().max().item() for k in initial)
    assert moved > 5e-3  # 2500 x the tolerance below: the comparison is not between nearly initial weights
    roles = ("generator", "critic", "ema") if ours["ema"] is not None else ("generator", "critic")
    for role in roles:
        assert ours[role].keys() == ref[role].keys(), role
        for name, w in ref[role].items():
            torch.testing.assert_close(ours[role][name], w, rtol=1e-4, atol=2e-6, msg=lambda m: f"{role}.{name}: {m}")


@pytest.mark.parametrize("run", COMPARED)
def test_full_weights_load_into_the_split_model(results, run):
    res = results[run]
    assert res["critic_reloaded"].keys() == res["generator"].keys()
    for name, w in res["generator"].items():
        assert torch.equal(res["critic_reloaded"][name], w), name
    assert any(not torch.equal(res["critic_backbone"][k], w) for k, w in res["generator"].items())  # a real change


def test_trainer_seeds_per_rank_streams_from_the_dp_coordinate(results):
    for run in COMPARED:
        res = results[run]
        seeded, coords = res["seeded"], res["coords"]
        for r in range(4):
            for q in range(4):
                same_dp = coords[r]["dp"] == coords[q]["dp"]
                assert torch.equal(seeded[r], seeded[q]) == same_dp, (run, r, q)


def test_tp2_resume_continues_the_run_exactly(results):
    """The tp = 2 run resumed from its step-2 checkpoint (ZeRO partitions per TP rank, EMA shards per
    (TP rank, sequence_data rank)) trains step 2 exactly as the uninterrupted run did."""
    resumed, full = results["tp2_resumed"], results["tp2"]
    assert resumed["history"] == full["history"][2:]
    for role in ("generator", "critic", "ema"):
        assert resumed[role].keys() == full[role].keys()
        for name, w in full[role].items():
            assert torch.equal(resumed[role][name], w), (role, name)


@pytest.fixture(scope="module")
def merged(results):
    from megadistill.engine import merge

    tmp = results["tmp"]
    out = {}
    for run, root in (("tp2", tmp / RUNS["tp2"]["checkpoint"]), ("tp2_zero2", tmp / RUNS["tp2_zero2"]["checkpoint"]),
                      ("cfg2", tmp / RUNS["cfg2"]["checkpoint"]), ("reference", tmp / REFERENCE_CHECKPOINT)):
        info = merge.read_checkpoint_info(root)
        out[run] = {"info": info, **{m: merge.merged_state_dict(info, m) for m in merge.MODELS}}
    return out


@pytest.mark.parametrize("run", ["tp2", "tp2_zero2"])
def test_tp2_checkpoint_holds_one_file_set_per_tp_rank(merged, run):
    info = merged[run]["info"]
    assert (info.step, info.world_size, info.tp, info.zero_stage) == (3, 4, 2, RUNS[run].get("stage", 3))
    for tag in ("generator", "critic"):
        files = sorted(p.name for p in (Path(info.path) / tag).glob("*_optim_states.pt"))
        assert files == [f"zero_pp_rank_{d}_mp_rank_{t:02d}_optim_states.pt" for d in range(2) for t in range(2)]
        # The recorded layout and the info's shapes are the unsharded ones (the reference's).
        assert info.engines[tag].param_shapes == merged["reference"]["info"].engines[tag].param_shapes
    assert 0 < len(info.engines["generator"].tp_partitions) < len(info.engines["generator"].param_shapes)
    assert info.ema["numel"] == merged["reference"]["info"].ema["numel"]


@pytest.mark.parametrize("run", ["tp2", "tp2_zero2", "cfg2"])
@pytest.mark.parametrize("model", ["generator", "ema", "critic"])
def test_parallel_checkpoint_merges_to_the_unsharded_weights(results, merged, run, model):
    """Exactly the full weights the tp = 2 (or cfg = 2: ZeRO partitions over the cfg pairs too) run
    gathered at its last step (the same fp32 masters and EMA values, put together offline), and, within
    the runs' tolerance, the one-process ZeRO-3 run's merge (ZeRO-2 and ZeRO-3 give the same
    trajectory: the SP-free runs are compared with it)."""
    from megadistill.engine.merge import strip_wrapper

    gathered = strip_wrapper(results[run][model])
    ours, ref = merged[run][model], merged["reference"][model]
    assert ours.keys() == ref.keys() == gathered.keys()
    for name, w in gathered.items():
        assert ours[name].shape == ref[name].shape == w.shape, name
        assert torch.equal(ours[name], w), name
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-4, atol=2e-6, msg=lambda m: f"{name}: {m}")
    for name, w in strip_wrapper(results["reference"][model]).items():  # the one-process merge itself
        assert torch.equal(ref[name], w), name


# ---- bad sizes through launch/train.py -----------------------------------------------------------

def _cli():
    return load_module("train_cli", ROOT / "launch" / "train.py")


@pytest.mark.parametrize("world,overrides,config,expected", [
    (4, ["parallel.sp=8"], "demo_dmd.yaml",
     ["model.teacher (demo) has 4 heads: tp x sp must be one of 1, 2, 4, got tp=1 x sp=8 = 8"]),
    (3, ["parallel.sp=2"], "demo_dmd.yaml", ["does not divide the world size 3"]),
    # cfg = 2 where no guided teacher pass exists to split: the second rank would only repeat the first.
    (2, ["parallel.cfg=2", "method.name=gan"], "demo_dmd.yaml",
     ["parallel.cfg=2 splits the teacher's conditional and unconditional passes",
      "method gan makes no guided teacher call"]),
    (2, ["parallel.cfg=2", "method.dmd.guidance_scale=1.0"], "demo_dmd.yaml",
     ["parallel.cfg=2 with method.dmd.guidance_scale=1.0 (standard form): the guidance is the identity"]),
    (2, ["parallel.cfg=2", "method.name=sid", "method.sid.guidance_scale=0.0"], "demo_dmd.yaml",
     ["method.sid.guidance_scale=0.0 (upstream form): the guidance is the identity"]),
    (3, ["parallel.cfg=2"], "demo_dmd.yaml", ["tp x sp x cfg = 1 x 1 x 2 = 2 does not divide the world size 3"]),
    (2, ["parallel.tp=2"], "toylab_dmd.yaml", ["parallel: model family 'toy' has no attention heads to split"]),
    (2, ["parallel.sp=3"], "demo_dmd.yaml", ["has 4 heads", "tp=1 x sp=3"]),
])
def test_bad_parallel_sizes_exit_2_before_anything_is_written(world, overrides, config, expected, tmp_path,
                                                               monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    out = tmp_path / "never"
    code = _cli().main(["--config", str(ROOT / "configs" / config), "--ds_config", str(ROOT / "configs" / "zero3.json"),
                        f"run.output_dir={out}", *overrides])
    err = capsys.readouterr().err
    assert code == 2, err
    for text in expected:
        assert text in err, err
    assert not out.exists()


@pytest.mark.parametrize("world,overrides,dp", [
    (4, ["parallel.cfg=2"], 2),  # the demo's DMD: standard CFG 3 on its teacher
    (4, ["parallel.cfg=2", "method.name=sid"], 2),  # SiD's default: upstream guidance 3
    (4, ["parallel.cfg=2", "parallel.sp=2", "method.name=sid"], 1),
    (2, ["parallel.sp=2", "method.name=gan"], 1),  # the critic's features are gathered over SP
])
def test_cfg_parallel_and_the_gan_under_sp_pass_the_checks(world, overrides, dp, tmp_path, monkeypatch):
    """What the job accepts, with the DeepSpeed batch the launcher fills in: dp replicas only (a cfg
    group, like a tp x sp group, works on one sample)."""
    monkeypatch.setenv("WORLD_SIZE", str(world))
    cli = _cli()
    cfg = cli.load_config(cli.ExperimentConfig, str(ROOT / "configs" / "demo_dmd.yaml"),
                          [f"run.output_dir={tmp_path / 'run'}", *overrides])
    ds = cli.check_job_inputs(cfg, str(ROOT / "configs" / "zero3.json"))
    assert ds["train_batch_size"] == cfg.train.micro_batch_size * cfg.train.grad_accum * dp
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("saved", [None, {"tp": 1, "sp": 2, "cfg": 1, "dp": 1}])
def test_resume_with_other_parallel_sizes_exits_2(saved, tmp_path, monkeypatch, capsys):
    """A checkpoint written by 2 ranks with sp = 2 (or by an earlier version: no sizes recorded, so data
    parallel) is not resumed with tp = 2 on 2 ranks: the ZeRO partitions would not fit."""
    out = tmp_path / "run"
    step = out / "checkpoints" / "step_000000004"
    step.mkdir(parents=True)
    state = {"step": 4, "world_size": 2, "zero_stage": 3, **({"parallel": saved} if saved else {})}
    (step / "trainer_state.json").write_text(json.dumps(state))
    (step / "COMPLETE").write_text("")
    (out / "checkpoints" / "latest").write_text(step.name)
    before = sorted(p.name for p in out.rglob("*"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    code = _cli().main(["--config", str(ROOT / "configs" / "demo_dmd.yaml"), "--ds_config",
                        str(ROOT / "configs" / "zero3.json"), f"run.output_dir={out}", "parallel.tp=2",
                        "train.ema.decay=0"])
    err = capsys.readouterr().err
    assert code == 2, err
    written = saved or {"tp": 1, "sp": 1, "cfg": 1, "dp": 2}
    assert f"written with parallel sizes {written}, this run has {{'tp': 2, 'sp': 1, 'cfg': 1, 'dp': 1}}" in err, err
    assert sorted(p.name for p in out.rglob("*")) == before
