"""launch/train.py's distill job on the Wan family with ``method.name=causal_diffusion`` (the ODE-init stage on real latents):
the demo config runs end to end and writes a causal generator checkpoint; the batches carry the right
clean latents (demo videos, or the clean ends of ODE pairs); bad inputs exit 2 before anything is written.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ROOT / "launch" / "train.py"
ZERO3 = ROOT / "configs" / "zero3.json"
DEMO = ROOT / "configs" / "demo_dmd.yaml"
# The demo teacher's own shift (16x16-pixel videos need none); no evaluation or sample videos.
CAUSAL_DIFFUSION = ["method.name=causal_diffusion", "method.causal_diffusion.shift=1.0", "eval.enabled=false",
                    "train.sample_every=0"]
QUICK = ["train.max_steps=3", "train.log_every=1", "train.save_every=0", "train.micro_batch_size=2",
         "train.progress_bar=false"]

sys.path.insert(0, str(ROOT / "launch"))
import train as train_cli  # noqa: E402

pytestmark = pytest.mark.slow


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return env


def _config(*overrides):
    from megadistill.config import load_config
    from megadistill.experiment import ExperimentConfig

    return load_config(ExperimentConfig, str(DEMO), [*CAUSAL_DIFFUSION, *overrides])


def test_demo_causal_diffusion_end_to_end(tmp_path):
    from megadistill.demo.teacher import load_demo_teacher
    from megadistill.engine import merge
    from megadistill.models.wan import build_wan, load_wan_checkpoint

    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(TRAIN), "--ds_config", str(ZERO3), "--config", str(DEMO),
                           f"run.output_dir={out}", *CAUSAL_DIFFUSION, *QUICK,
                           "method.causal_diffusion.context=teacher_forcing"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "final:" not in proc.stdout  # evaluation off

    ckpt = out / "checkpoints"
    state = json.loads(next(ckpt.glob("step_*/trainer_state.json")).read_text())
    assert state["step"] == 3 and sorted(state["engines"]) == ["generator"]  # generator-only: no critic
    assert state["config"]["method"]["name"] == "causal_diffusion"
    assert state["config"]["method"]["causal_diffusion"]["context"] == "teacher_forcing"
    assert state["model_configs"]["generator"]["num_frame_per_block"] == 3

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "logs"))
    acc.Reload()
    logs = {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    assert len(logs["generator/diffusion_loss"]) == 3
    assert all(v > 0 for v in logs["generator/diffusion_loss"]) and all(v > 0 for v in logs["generator/grad_norm"])

    # The checkpoint holds a block-causal generator that training moved away from the teacher's weights.
    merged = merge.merge_checkpoint(ckpt, tmp_path / "student", "generator", "original", progress=False)
    student = build_wan(merge.wan_config_from_checkpoint(merge.read_checkpoint_info(ckpt), "generator"))
    load_wan_checkpoint(student, merged.written[0].parent)
    teacher, _ = load_demo_teacher()
    assert student.config.num_frame_per_block == 3
    moved = [not torch.equal(p, teacher.state_dict()[k]) for k, p in student.state_dict().items()]
    assert any(moved)


def test_batches_carry_demo_videos_or_ode_pair_clean_ends(tmp_path):
    """Demo: the procedural videos of the drawn prompts; with data.ode_pairs: their clean ends."""
    from safetensors.torch import save_file

    from megadistill.demo.videos import render_videos
    from megadistill.jobs.distill import needs
    from megadistill.models.wan.batches import make_batches
    from megadistill.models.wan.prompts import encode_prompts

    cfg = _config()
    prompts = encode_prompts(cfg.data)
    batch = make_batches(cfg, needs(cfg), prompts)(torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, len(prompts.prompts), (batch.batch_size,), generator=g)
    torch.testing.assert_close(batch.real, render_videos([prompts.prompts[i] for i in idx.tolist()], g))
    torch.testing.assert_close(batch.cond.context, prompts.context[idx])

    n = 5
    clean = torch.randn(n, 3, 9, 16, 16, generator=torch.Generator().manual_seed(0))
    trajectory = torch.stack([torch.randn_like(clean), clean], dim=1)  # one stored state, then the clean end
    prompt_index = torch.tensor([4, 0, 2, 7, 1])
    save_file({"trajectory": trajectory, "steps": torch.tensor([1000.0], dtype=torch.float64),
               "prompt_index": prompt_index}, str(tmp_path / "ode_pairs_00000.safetensors"))
    cfg = _config(f"data.ode_pairs={tmp_path}")
    batch = make_batches(cfg, needs(cfg), prompts)(torch.Generator().manual_seed(3))
    rows = torch.randint(0, n, (batch.batch_size,), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(batch.real, clean[rows])
    torch.testing.assert_close(batch.cond.context, prompts.context[prompt_index[rows]])
    assert batch.trajectory is None


@pytest.mark.parametrize("case", ["bidirectional_generator", "real_encoder_without_data", "demo_videos_wrong_shape"])
def test_bad_causal_diffusion_inputs_exit_2_before_anything_is_written(case, tmp_path, capsys):
    (tmp_path / "umt5").mkdir()
    (tmp_path / "teacher.safetensors").write_bytes(b"")  # only its existence is checked before the run
    extra, expected = {
        "bidirectional_generator": (["rollout.kind=bidirectional"],
                                    ["causal_diffusion trains a block-causal generator", "rollout.kind=causal"]),
        "real_encoder_without_data": ([f"data.text_encoder={tmp_path / 'umt5'}",
                                       f"data.prompts={DEMO}"],  # any existing file: only checked to exist
                                      ["causal_diffusion needs real clean latents", "data.ode_pairs"]),
        "demo_videos_wrong_shape": (["model.teacher.preset=tiny-t2v", f"model.teacher.checkpoint={tmp_path / 'teacher.safetensors'}",
                                     "data.latent_shape=[16, 3, 4, 4]"],
                                    ["demo's videos", "data.latent_shape"]),
    }[case]
    out = tmp_path / "never"
    code = train_cli.main(["--ds_config", str(ZERO3), "--config", str(DEMO), f"run.output_dir={out}",
                           *CAUSAL_DIFFUSION, *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    for text in expected:
        assert text in err, err
    assert not out.exists()
