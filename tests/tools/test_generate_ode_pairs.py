"""tools/generate_ode_pairs.py on a tiny Wan teacher checkpoint written by the test.

Checks: the stored steps are the training step list (StepListConfig.timesteps()); the states equal an
independent Euler run with hand-written standard CFG; the shards load into the ODE regression
method; bad inputs are refused before any work.
"""
import json
from pathlib import Path

import pytest
import torch

from megadistill.diffusion.latents import DenseLatents
from megadistill.diffusion.samplers import euler_flow_sample, flow_inference_sigmas
from megadistill.methods.base import DistillBatch
from megadistill.methods.ode_regression import ODERegression, ODERegressionConfig
from megadistill.models.wan import build_wan, save_wan_checkpoint
from megadistill.rollout.steps import StepListConfig
from megadistill.models.wan.denoiser import WanCondition, WanDenoiser
from megadistill.models.wan.run_config import SHIFT
from tests.helpers.scripts import load_module

ROOT = Path(__file__).resolve().parents[2]
cli = load_module("generate_ode_pairs_cli", ROOT / "tools" / "generate_ode_pairs.py")

F, H, W = 2, 4, 4


@pytest.fixture(scope="module")
def teacher_files(tmp_path_factory):
    torch.manual_seed(0)
    net = build_wan("tiny-t2v")
    torch.nn.init.normal_(net.head.head.weight, std=0.1)  # Wan's zero-initialised head would give v = 0
    root = tmp_path_factory.mktemp("teacher")
    save_wan_checkpoint(net, root / "teacher", key_format="diffusers")  # folder + diffusers config.json
    save_wan_checkpoint(net, root / "teacher.safetensors")  # original keys, no config
    g = torch.Generator().manual_seed(1)
    emb = {"context": torch.randn(3, 6, 32, generator=g), "negative": torch.randn(6, 32, generator=g)}
    torch.save(emb, root / "prompts.pt")
    return net.eval(), root, emb


def _run(root, out, *extra):
    return cli.main(["--checkpoint", str(root / "teacher"), "--prompts", str(root / "prompts.pt"),
                     "--latent-shape", str(F), str(H), str(W), "--out", str(out), "--no-progress", *extra])


def test_pairs_match_an_independent_euler_run(teacher_files, tmp_path):
    net, root, emb = teacher_files
    # unwarped [1000, 500] on a 4-step shift-1 grid: sigmas 1, .75, .5, .25, 0 already hold sigma .5
    assert _run(root, tmp_path, "--steps", "1000", "500", "--no-warp", "--ode-steps", "4", "--ode-shift", "1",
                "--cfg-scale", "4.0", "--samples-per-prompt", "2", "--batch-size", "4", "--shard-size", "4") == 0
    shards = sorted(tmp_path.glob("ode_pairs_*.safetensors"))
    assert [p.name for p in shards] == ["ode_pairs_00000.safetensors", "ode_pairs_00001.safetensors"]
    pairs = cli.load_ode_pairs(shards)
    traj, steps, idx = pairs["trajectory"], pairs["steps"], pairs["prompt_index"]
    assert traj.shape == (6, 3, 16, F, H, W) and steps.dtype == torch.float64
    assert steps.tolist() == [1000.0, 500.0] and idx.tolist() == [0, 0, 1, 1, 2, 2]

    noise = traj[:, 0]  # the state at t = 1000 is the initial noise
    g = torch.Generator().manual_seed(0)  # --seed 0, one draw per sample
    torch.testing.assert_close(noise, torch.stack([torch.randn(16, F, H, W, generator=g) for _ in range(6)]))
    ctx, neg = emb["context"][idx], emb["negative"].expand(6, -1, -1)

    def v_fn(x, t):  # standard CFG written out: u + s (c - u)
        with torch.no_grad():
            c, u = net(x, t, ctx), net(x, t, neg)
        return u + 4.0 * (c - u)

    sigmas = flow_inference_sigmas(4, 1.0)
    torch.testing.assert_close(traj[:, -1], euler_flow_sample(v_fn, noise, sigmas), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(traj[:, 1], euler_flow_sample(v_fn, noise, sigmas[:3]), rtol=1e-5, atol=1e-5)
    assert (traj[:, -1] - noise).abs().mean() > 0.1  # the teacher did move the samples


def test_default_steps_are_the_training_list_and_load_into_ode_regression(teacher_files, tmp_path):
    net, root, emb = teacher_files
    assert _run(root, tmp_path, "--ode-steps", "6", "--cfg-scale", "3.0") == 0
    pairs = cli.load_ode_pairs(sorted(tmp_path.glob("ode_pairs_*.safetensors")))
    training = StepListConfig(shift=SHIFT)  # the student's list: warped [1000, 750, 500, 250] at Wan's shift 5
    assert pairs["steps"].tolist() == training.timesteps()
    assert pairs["trajectory"].shape == (3, 5, 16, F, H, W)

    student = WanDenoiser(build_wan("tiny-t2v"))
    method = ODERegression(ODERegressionConfig(step_list=training.timesteps()), generator=student,
                           rng=torch.Generator().manual_seed(0))
    batch = DistillBatch(cond=WanCondition(context=emb["context"][pairs["prompt_index"]]), latents=DenseLatents(3, (16, F, H, W), frame_dim=2), trajectory=pairs["trajectory"],
                         trajectory_steps=pairs["steps"])
    loss, _ = method.generator_loss(batch, 0)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    # pairs for another list are refused by the method
    other = ODERegression(ODERegressionConfig(step_list=StepListConfig(warp=False).timesteps()), generator=student)
    with pytest.raises(ValueError, match="training step list"):
        other.generator_loss(batch, 0)


def test_original_keys_with_a_preset_and_bf16_teacher(teacher_files, tmp_path):
    net, root, _ = teacher_files
    args = ["--checkpoint", str(root / "teacher.safetensors"), "--wan-config", "tiny-t2v", "--prompts",
            str(root / "prompts.pt"), "--latent-shape", str(F), str(H), str(W), "--out", str(tmp_path),
            "--no-progress", "--steps", "1000", "--no-warp", "--ode-steps", "2", "--dtype", "bf16"]
    assert cli.main(args) == 0
    pairs = cli.load_ode_pairs(sorted(tmp_path.glob("ode_pairs_*.safetensors")))
    assert pairs["trajectory"].dtype == torch.float32 and torch.isfinite(pairs["trajectory"]).all()
    assert cli.main(args) == 2  # shards exist: refused without --overwrite
    assert cli.main(args + ["--overwrite"]) == 0


@pytest.mark.parametrize("change, message", [
    (lambda r, a: a.__setitem__(1, str(r / "missing")), "no such file"),
    (lambda r, a: a.__setitem__(3, str(r / "bad_dim.pt")), "text_dim = 32"),
    (lambda r, a: a.__setitem__(3, str(r / "no_negative.pt")), "needs a negative embedding"),
    (lambda r, a: a.__setitem__(6, "3"), "multiples of patch_size"),
    (lambda r, a: a.extend(["--steps", "500", "1000"]), "strictly decreasing"),
    (lambda r, a: a.extend(["--wan-config", "tiny-i2v"]), "only text-to-video"),
    (lambda r, a: a.extend(["--wan-config", "tiny-ti2v"]), "only text-to-video"),
])
def test_bad_requests_fail_before_any_work(teacher_files, tmp_path, capsys, change, message):
    _, root, emb = teacher_files
    torch.save({"context": torch.randn(2, 6, 16)}, root / "bad_dim.pt")
    torch.save({"context": emb["context"]}, root / "no_negative.pt")
    out = tmp_path / "out"
    args = ["--checkpoint", str(root / "teacher"), "--prompts", str(root / "prompts.pt"),
            "--latent-shape", str(F), str(H), str(W), "--out", str(out), "--no-progress"]
    change(root, args)
    assert cli.main(args) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_checkpoint_that_does_not_match_the_config_is_refused(teacher_files, tmp_path, capsys):
    _, root, _ = teacher_files
    args = ["--checkpoint", str(root / "teacher.safetensors"), "--wan-config", str(root / "wrong.json"),
            "--prompts", str(root / "prompts.pt"), "--latent-shape", str(F), str(H), str(W),
            "--out", str(tmp_path / "out"), "--no-progress"]
    (root / "wrong.json").write_text('{"model_type": "t2v", "dim": 64, "ffn_dim": 128, "num_heads": 4, '
                                     '"num_layers": 3, "text_dim": 32, "freq_dim": 32}')
    assert cli.main(args) == 2
    assert "missing" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_demo_teacher_prompts_are_encoded_and_stored(tmp_path, capsys):
    from megadistill.demo.teacher import DemoSettings, demo_teacher_config, save_demo_teacher

    torch.manual_seed(0)
    settings = DemoSettings(model=demo_teacher_config(num_layers=1, dim=32, ffn_dim=64))
    net = build_wan(settings.model)
    torch.nn.init.normal_(net.head.head.weight, std=0.1)
    weights = tmp_path / "demo_teacher.safetensors"
    save_demo_teacher(net, settings, weights)
    prompts = ["a red square moving left", "a blue disc moving up"]
    out = tmp_path / "pairs"
    args = ["--demo", "--checkpoint", str(weights), "--out", str(out), "--no-progress", "--steps", "1000", "500",
            "--no-warp", "--ode-steps", "4", "--ode-shift", "1", "--cfg-scale", "2.0", "--latent-shape", "3", "8", "8"]
    for p in prompts:
        args += ["--prompt", p]
    assert cli.main(args) == 0
    shard = out / "ode_pairs_00000.safetensors"
    pairs = cli.load_ode_pairs([shard])
    assert pairs["trajectory"].shape == (2, 3, 3, 3, 8, 8) and pairs["steps"].tolist() == [1000.0, 500.0]
    from safetensors import safe_open

    with safe_open(str(shard), "pt") as f:
        assert json.loads(f.metadata()["prompts"]) == prompts
    # the states follow the teacher guided by the demo encoder's prompts, "" as the negative
    encoder = settings.encoder()
    ctx, neg = encoder.encode(prompts), encoder.negative(2)

    def v_fn(x, t):
        with torch.no_grad():
            c, u = net(x, t, ctx), net(x, t, neg)
        return u + 2.0 * (c - u)

    noise = pairs["trajectory"][:, 0]
    euler = euler_flow_sample(v_fn, noise, flow_inference_sigmas(4, 1.0))
    torch.testing.assert_close(pairs["trajectory"][:, -1], euler, rtol=1e-5, atol=1e-5)
    assert cli.main(["--demo", "--checkpoint", str(weights), "--out", str(tmp_path / "bad"), "--prompt",
                     "a red triangle moving left"]) == 2
    assert "unknown word(s) ['triangle']" in capsys.readouterr().err
