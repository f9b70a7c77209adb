"""The per-GPU memory plan (megadistill/parallel/memory_plan.py, models/wan/memory.py, tools/plan_memory.py).

Exact part, against independent implementations:
- ZeRO partitions: a 2-rank DeepSpeed run (CPU, gloo; memplan_zero_worker.py) of a tiny Wan with odd
  sizes (padding) and AdamW, ZeRO-3 bf16 / fp32, ZeRO-2 bf16, ZeRO-1 fp32: every rank's parameter,
  gradient, fp32 master, exp_avg / exp_avg_sq, reduce-bucket and persistent-parameter sizes equal the
  plan's bytes exactly; the frozen ZeRO-3 teacher's partition too.
- Parameter counts: the plan's totals equal diffusers' WanTransformer3DModel (built on meta); the
  per-TP-rank sizes equal those of the real tensor_parallel.apply_tensor_parallel, parameter by
  parameter (memplan_tp_worker.py, fake process group).
- KV cache: equals the bytes new_kv_cache allocates.
Estimates, against measurements on CPU (tiny Wan, 4 layers, 384 tokens):
- activations without checkpointing: the bytes autograd saves (saved_tensors_hooks, parameters
  excluded) within 10%, bidirectional and block-causal, fp32 and bf16;
- with and without checkpointing: the profiler's memory at the end of the forward (saved set) within
  25% and the forward + backward peak within a factor 1.35 (the plan adds full gradients; it does not
  model backward temporaries).
CLI: real presets in < 5 s of CPU, exit 0; bad inputs exit 2 with the reason.
"""
import dataclasses
import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from megadistill.models.wan.config import to_diffusers_config, wan_config
from megadistill.models.wan.kv_cache import CrossAttnCache, new_kv_cache
from megadistill.models.wan.model import build_wan
from megadistill.models.wan.memory import (
    PlanConfig, bidirectional_activations, causal_activations, kv_cache_bytes, latent_grid, model_parameters,
    plan_memory, token_grid, vae_stride,
)
from megadistill.parallel.memory_plan import (
    GIB, ZeroSettings, count_parameters, format_plan, frozen_state_bytes, suggestions, trained_state_bytes,
    zero12_partition_numel, zero3_partition_numel,
)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
from tests.helpers import ranks  # noqa: E402
from tests.helpers.scripts import load_module

pytestmark = pytest.mark.distributed

# Odd sizes so that DeepSpeed pads: ffn 37 (odd bias), dim 36 (3 heads of 12).
TINY = {"dim": 36, "num_heads": 3, "ffn_dim": 37, "text_dim": 7, "freq_dim": 16, "text_len": 8}
WORLD = 2
RUNS = [
    {"stage": 3, "precision": "bf16", "ds": {"stage3_param_persistence_threshold": 40, "reduce_bucket_size": 1000}},
    {"stage": 3, "precision": "fp32", "ds": {"stage3_param_persistence_threshold": 0, "reduce_bucket_size": 1002}},
    {"stage": 2, "precision": "bf16", "ds": {}},
    {"stage": 1, "precision": "fp32", "ds": {}},
]


def _zero(run) -> ZeroSettings:
    return ZeroSettings.from_ds_config({"zero_optimization": {"stage": run["stage"], **run["ds"]}})


@pytest.fixture(scope="module")
def deepspeed_sizes(tmp_path_factory):
    out = tmp_path_factory.mktemp("memplan_zero")
    spec = {"model": TINY, "results": str(out / "rank{rank}.json"), "runs": RUNS}
    (out / "spec.json").write_text(json.dumps(spec))
    ranks.launch(HERE / "memplan_zero_worker.py", [str(out / "spec.json")], world_size=WORLD, log_dir=out,
                 timeout_s=150)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.fixture(scope="module")
def tiny_params():
    return count_parameters(build_wan("tiny-t2v", device="meta", **TINY), tp=1)


# ------------------------------------------------------------------------------ exact: DeepSpeed ZeRO

def test_partition_formulas_pad_like_deepspeed():
    assert [zero3_partition_numel(n, 4) for n in (1, 4, 5, 37)] == [1, 1, 2, 10]
    assert zero12_partition_numel(43986, 2) == 21994 and zero12_partition_numel(43987, 2) == 21994
    assert zero12_partition_numel(10, 4) == 4  # padded to 16 (2 x world), 16 / 4


@pytest.mark.parametrize("index", range(len(RUNS)))
def test_zero_state_bytes_equal_deepspeed_partitions(deepspeed_sizes, tiny_params, index):
    run = RUNS[index]
    for rank_result in deepspeed_sizes:
        got = rank_result["runs"][index]
        assert got["numels"] == list(tiny_params.local)  # the plan counts the module DeepSpeed wraps
        plan = trained_state_bytes(tiny_params, run["precision"], _zero(run), WORLD)
        pb = got["param_element_size"]
        assert pb == (2 if run["precision"] == "bf16" else 4)
        optimizer = (got["fp32_partition_numel"] * got["fp32_element_size"]
                     + (got["exp_avg_numel"] + got["exp_avg_sq_numel"]) * got["state_element_size"])
        assert plan.optimizer == optimizer, (run, rank_result["rank"])
        assert plan.partition_numel == got["fp32_partition_numel"]
        if run["stage"] == 3:
            assert plan.params == got["param_partition_numel"] * pb
            assert plan.grads == got["grad_partition_numel"] * got["grad_element_size"]
            persistent_extra = got["persistent_gathered_numel"] - got["persistent_partition_numel"]
            assert plan.zero_buffers == (persistent_extra + got["reduce_bucket_numel"]) * pb
            assert not got["fp32_aliases_params"]  # fp32 too: DeepSpeed clones the master partition
            teacher = frozen_state_bytes(tiny_params, run["precision"], _zero(run), WORLD)
            assert teacher.params == got["teacher_partition_numel"] * pb
            assert got["teacher_persistent_gathered_numel"] == 0  # released after each frozen forward
        else:
            assert plan.params == got["param_full_numel"] * pb
            assert got["flat_padded_numel"] == WORLD * plan.partition_numel


def test_the_runs_exercise_padding_and_persistence(deepspeed_sizes, tiny_params):
    bf16_stage3 = deepspeed_sizes[0]["runs"][0]
    assert bf16_stage3["param_partition_numel"] * WORLD > tiny_params.total  # some parameters padded
    assert bf16_stage3["persistent_count"] > 0
    assert deepspeed_sizes[0]["runs"][2]["flat_padded_numel"] > tiny_params.total


# ------------------------------------------------------------------------------ exact: parameter counts

# One real preset per family keeps the file fast (diffusers' import dominates); the 14B presets share
# the code path (checked by hand: wan2.1-t2v-14b and wan2.1-i2v-14b equal diffusers too).
@pytest.mark.parametrize("preset", ["wan2.1-t2v-1.3b", "wan2.2-ti2v-5b"])
def test_parameter_totals_equal_diffusers(preset):
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        reference = WanTransformer3DModel(**to_diffusers_config(wan_config(preset)))
    mp = model_parameters(preset, 1)
    assert mp.total == mp.local_total == sum(p.numel() for p in reference.parameters())


def test_known_sizes():
    assert round(model_parameters("wan2.1-t2v-1.3b").total / 1e9, 2) == 1.42
    assert round(model_parameters("wan2.1-t2v-14b").total / 1e9, 2) == 14.29
    assert model_parameters("wan2.2-a14b").total == 2 * model_parameters("wan2.1-t2v-14b").total


def test_tensor_parallel_split_equals_apply_tensor_parallel(tmp_path):
    cases = ["wan2.1-t2v-1.3b:2", "wan2.1-i2v-14b:4", "tiny-a14b:2", "wan2.2-ti2v-5b:8"]
    out = tmp_path / "tp.json"
    subprocess.run([sys.executable, str(HERE / "memplan_tp_worker.py"), str(out), *cases], check=True, cwd=ROOT,
                   env={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=120)
    real = json.loads(out.read_text())
    for case in cases:
        preset, tp = case.rsplit(":", 1)
        mp = model_parameters(preset, int(tp))
        assert dict(zip(mp.names, mp.local)) == real[case], case
        assert mp.local_total == mp.sharded // int(tp) + mp.replicated


# ----------------------------------------------------------------------------------------- geometry

def test_latent_and_token_grids():
    assert latent_grid(81, 480, 832, vae_stride(wan_config("wan2.1-t2v-1.3b"))) == (21, 60, 104)
    assert latent_grid(121, 704, 1280, vae_stride(wan_config("wan2.2-ti2v-5b"))) == (31, 44, 80)
    assert token_grid((21, 60, 104), (1, 2, 2)) == (21, 30, 52)  # 32760 tokens
    with pytest.raises(ValueError, match="1 \\+ 4 k"):
        latent_grid(80, 480, 832, (4, 8, 8))
    with pytest.raises(ValueError, match="multiples of 8"):
        latent_grid(81, 484, 832, (4, 8, 8))


def test_bad_parallel_sizes_are_refused_before_counting():
    with pytest.raises(ValueError, match="12 heads"):
        PlanConfig(tp=8, world_size=8)  # 1.3B has 12 heads
    with pytest.raises(ValueError, match="divide the world size"):
        PlanConfig(tp=2, sp=2, world_size=6, teacher=None)
    with pytest.raises(ValueError, match="unknown Wan preset"):
        PlanConfig(critic="wan9-huge")


# ------------------------------------------------------------------------------------ estimates

def _tiny_model(dtype, checkpointing=False, causal=False):
    torch.manual_seed(0)
    extra = {"num_frame_per_block": 2} if causal else {}
    model = build_wan("tiny-t2v", dim=128, ffn_dim=256, num_heads=4, num_layers=4, text_len=16,
                      grad_checkpointing=checkpointing, **extra)
    for p in model.parameters():  # all parameters in the compute dtype, as DeepSpeed bf16 casts them
        p.data = p.data.to(dtype)
    return model


F_LAT, H_LAT, W_LAT, NFPB = 6, 16, 16, 2
FRAME_TOKENS = (H_LAT // 2) * (W_LAT // 2)


def _forward(model, dtype, causal):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, F_LAT, H_LAT, W_LAT, generator=g).to(dtype)
    ctx = torch.randn(1, 16, model.config.text_dim, generator=g).to(dtype)
    t = torch.tensor([500.0])
    if not causal:
        return lambda: model(x, t, ctx)

    def rollout():  # every block's exit step with gradient, as Self-Forcing's gradient window
        cache, cross = new_kv_cache(model, 1, FRAME_TOKENS, F_LAT, dtype=dtype), CrossAttnCache()
        return torch.cat([model.forward_causal_step(x[:, :, s:s + NFPB], t, ctx, cache, cross, start_frame=s)
                          for s in range(0, F_LAT, NFPB)], dim=2)
    return rollout


def _estimate(model, dtype, causal, checkpointing):
    cb = 2 if dtype == torch.bfloat16 else 4
    if causal:
        return causal_activations(model.config, FRAME_TOKENS, F_LAT, NFPB, 1, 1, 1, cb, checkpointing)
    return bidirectional_activations(model.config, F_LAT * FRAME_TOKENS, 1, 1, 1, cb, checkpointing)


CASES = [(dtype, causal) for dtype in (torch.float32, torch.bfloat16) for causal in (False, True)]


@pytest.mark.parametrize("dtype,causal", CASES)
def test_saved_activations_match_autograd_saved_tensors(dtype, causal):
    model = _tiny_model(dtype, causal=causal)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = max(storages.get(s.data_ptr(), 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _forward(model, dtype, causal)()
    measured = sum(storages.values())
    estimate = _estimate(model, dtype, causal, False).saved
    assert 0.9 < estimate / measured < 1.1, (estimate, measured)


def _memory_timeline(fn):
    """(bytes allocated at the end of the forward, peak over forward + backward), from the profiler."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        with torch.profiler.record_function("memplan_backward_starts"):
            pass
        out.float().pow(2).mean().backward()
    events = prof.profiler.kineto_results.events()
    mark = next(e.start_ns() for e in events if e.name() == "memplan_backward_starts")
    current = peak = 0
    end_of_forward = None
    for ts, nbytes in sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"):
        if ts > mark and end_of_forward is None:
            end_of_forward = current
        current += nbytes
        peak = max(peak, current)
    return end_of_forward, peak


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("dtype,causal", CASES)
def test_activation_estimate_against_measured_cpu_memory(dtype, causal, checkpointing):
    torch.set_num_threads(1)
    model = _tiny_model(dtype, checkpointing, causal)
    end_of_forward, peak = _memory_timeline(_forward(model, dtype, causal))
    est = _estimate(model, dtype, causal, checkpointing)
    cb = 2 if dtype == torch.bfloat16 else 4
    # A checkpointed block keeps its KVCacheStep (for the recompute), so the cache outlives the forward.
    cache = kv_cache_bytes(model.config, FRAME_TOKENS, F_LAT, 1, 1, 1, cb) if causal else 0
    held_cache = cache if checkpointing else 0
    grads = sum(p.numel() * p.element_size() for p in model.parameters())
    assert 0.8 < (est.saved + held_cache) / end_of_forward < 1.25, (est, end_of_forward)
    assert 0.9 < (est.peak + cache + grads) / peak < 1.35, (est, peak)
    if checkpointing:  # and checkpointing must be a real saving in the plan as in the measurement
        assert est.saved < 0.3 * _estimate(model, dtype, causal, False).saved


def test_kv_cache_bytes_equal_allocated_caches():
    model = _tiny_model(torch.bfloat16, causal=True)
    caches = new_kv_cache(model, 2, FRAME_TOKENS, F_LAT, dtype=torch.bfloat16)
    cross = model.project_context(torch.randn(2, 16, model.config.text_dim).to(torch.bfloat16))
    allocated = sum(c.k.nbytes + c.v.nbytes for c in caches) + sum(t.nbytes for kv in cross for t in kv)
    assert kv_cache_bytes(model.config, FRAME_TOKENS, F_LAT, 2, 1, 1, 2) == allocated


# ------------------------------------------------------------------------------------------ plan, CLI

def test_plan_scales_with_parallelism():
    base = plan_memory(PlanConfig(world_size=64))
    sp = plan_memory(PlanConfig(world_size=64, sp=4))
    tp = plan_memory(PlanConfig(world_size=64, tp=2))
    assert sp.roles[0].kv_cache < 0.3 * base.roles[0].kv_cache
    assert sp.roles[0].activations.peak < 0.3 * base.roles[0].activations.peak
    assert tp.roles[0].params.local_total < 0.55 * base.roles[0].params.local_total + 0.1e9
    assert tp.config.zero_world == 32  # each TP shard is partitioned over the other 32 ranks
    no_ckpt = plan_memory(PlanConfig(world_size=64, grad_checkpointing=False))
    assert no_ckpt.peak_bytes > 2 * base.peak_bytes


def test_advice_fixes_a_plan_that_does_not_fit():
    cfg = PlanConfig(generator="wan2.1-t2v-14b", critic="wan2.1-t2v-14b", teacher="wan2.1-t2v-14b",
                     frames=81, height=720, width=1280, world_size=64, grad_checkpointing=False)
    plan = plan_memory(cfg)
    assert not plan.fits
    advice = suggestions(cfg)
    assert advice and all(p.fits for _, p in advice)
    text = format_plan(plan, advice)
    assert "does not fit in 80 GiB" in text and "try:" in text
    assert f"{plan.peak_bytes / GIB:.1f}" in text


def _cli(*args):
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "plan_memory.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, env={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
                                                    "PATH": "/usr/bin:/bin"}, timeout=120)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return proc, cpu


def test_cli_real_presets_on_meta():
    proc, _ = _cli("--generator", "wan2.1-t2v-1.3b", "--critic", "wan2.1-t2v-1.3b", "--teacher", "wan2.1-t2v-14b",
                     "--frames", "81", "--height", "480", "--width", "832", "--gpus", "64")
    assert proc.returncode == 0, proc.stderr
    assert "latent 21x60x104" in proc.stdout and "32760 tokens" in proc.stdout
    assert "fits in 80 GiB" in proc.stdout or "does not fit" in proc.stdout


def _cli_main():
    return load_module("plan_memory_cli", ROOT / "tools" / "plan_memory.py").main


def test_cli_reads_experiment_and_ds_config(capsys):
    code = _cli_main()(["--config", str(ROOT / "configs/wan2.1_t2v_1.3b_self_forcing_dmd.yaml"),
                        "--ds-config", str(ROOT / "configs/zero3.json"), "--gpus", "8"])
    out = capsys.readouterr().out
    assert code == 0
    assert "latent 21x60x104" in out and "ZeRO-3 over 8 ranks" in out and "generator: causal" in out
    assert "wan2.1-t2v-14b" in out and "checkpointing on" in out


def test_cli_ode_regression_has_no_rollout_and_no_critic(capsys):
    assert _cli_main()(["--config", str(ROOT / "configs/wan2.1_t2v_1.3b_ode_init.yaml"), "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "generator: parallel" in out and "+ critic update" not in out
    assert "\ncritic " not in out and "\nteacher " not in out


@pytest.mark.parametrize("args,message", [
    (["--generator", "wan9-huge"], "unknown Wan preset 'wan9-huge'"),
    (["--tp", "8", "--gpus", "8"], "tp x sp must be one of 1, 2, 3, 4, 6, 12"),
    (["--frames", "80"], "frames must be 1 + 4 k"),
    (["--ds-config", "no/such/file.json"], "No such file"),
])
def test_cli_bad_inputs_exit_2(capsys, args, message):
    assert _cli_main()(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_gan_plans_no_resident_teacher(capsys):
    """The GAN's critic is the teacher's copy; the job frees the teacher, so the plan holds none."""
    assert _cli_main()(["--config", str(ROOT / "configs/wan2.1_t2v_1.3b_self_forcing_gan.yaml"), "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "\ncritic " in out and "\nteacher " not in out and "generator: causal" in out


def test_plan_follows_what_the_method_class_declares(tmp_path):
    """Causal diffusion trains on real latents with one parallel forward, no teacher or critic; DMD
    keeps its teacher and critic; SiD likewise (plan_from_experiment asks the method classes)."""
    from megadistill.models.wan.memory import plan_from_experiment

    base = (ROOT / "configs/wan2.1_t2v_1.3b_self_forcing_dmd.yaml").read_text()
    for name, teacher, critic, rollout in (("causal_diffusion", False, False, "parallel"),
                                           ("dmd", True, True, "causal"), ("sid", True, True, "causal")):
        path = tmp_path / f"{name}.yaml"
        path.write_text(base.replace("  name: dmd\n", f"  name: {name}\n"))
        plan = plan_from_experiment(str(path))
        assert (plan.teacher is not None, plan.critic is not None, plan.rollout) == (teacher, critic, rollout), name
        assert plan.target is None, name


def test_plan_counts_the_target_a_method_declares(tmp_path):
    """Consistency declares needs_target (a frozen EMA copy of the generator): the plan holds it as a
    frozen role of the generator's preset (parameters only, same as a frozen copy), and its forward
    is in the generator update; DMD holds none."""
    from megadistill.models.wan.memory import plan_from_experiment

    base = (ROOT / "configs/wan2.1_t2v_1.3b_self_forcing_dmd.yaml").read_text()
    path = tmp_path / "consistency.yaml"
    path.write_text(base.replace("  name: dmd\n", "  name: consistency\n"))
    cfg = plan_from_experiment(str(path), world_size=8)
    assert cfg.target == cfg.generator and cfg.critic is None
    plan = plan_memory(cfg)
    by = {r.role: r for r in plan.roles}
    target, gen = by["target"], by["generator"]
    assert not target.trained and target.state.grads == 0 and target.state.optimizer == 0
    assert target.params.local == gen.params.local
    assert target.state.params == frozen_state_bytes(gen.params, cfg.precision, cfg.zero, cfg.zero_world).params > 0
    without = plan_memory(dataclasses.replace(cfg, target=None))
    assert plan.static_bytes - without.static_bytes == target.state.total
    assert "\ntarget " in format_plan(plan)
