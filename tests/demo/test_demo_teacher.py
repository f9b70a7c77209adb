"""The shipped demo teacher: its files, its config (= the causal student's weights layout), its
sampler against a hand-written Euler loop, and measured sample quality at 50 vs 4 steps.

Known limit of the shipped teacher: it renders the right colour nearly always but the right
direction only about half the time, and its 4-step samples are not yet farther from its 50-step
samples, in feature distance, than a second 50-step draw is; so no test here claims that.
"""
import json
import os

import pytest
import torch

from megadistill.demo.evaluation import EVAL_PROMPTS
from megadistill.demo.metrics import attribute_accuracy, video_features
from megadistill.demo.teacher import (DEFAULT_WEIGHTS, DemoSettings, demo_noise, demo_student_config,
                                      demo_teacher_config, guided_flow, load_demo_teacher, settings_path,
                                      teacher_sample)
from megadistill.diffusion.flow_match import shift_sigma
from megadistill.models.wan import build_wan, load_wan_checkpoint

# 8 prompts covering every colour, shape and direction; one sample each per set (keeps this file fast).
PROMPTS = list(EVAL_PROMPTS)
# Thresholds with margin below what this file's fixed-seed samples measured on the shipped teacher:
# colour 1.0, all three attributes 8/16 = 0.5 (shape 0.94, direction 0.56), softness of the 4-step
# samples 1.42 x the 50-step samples'.
MIN_COLOUR_50 = 0.9
MIN_ACCURACY_50 = 0.3
MIN_SOFTNESS_RATIO = 1.2


@pytest.fixture(scope="module")
def teacher():
    return load_demo_teacher()


@pytest.fixture(scope="module")
def samples(teacher):
    """Two 50-step sets (one batched call) and a 4-step set on the second set's noise."""
    model, settings = teacher
    noise = demo_noise(2 * len(PROMPTS), settings, torch.Generator().manual_seed(1234))
    both = teacher_sample(model, PROMPTS * 2, noise, settings.num_steps, settings)
    few = teacher_sample(model, PROMPTS, noise[len(PROMPTS):], 4, settings)
    return both, few


def test_shipped_files_and_config(teacher):
    model, settings = teacher
    assert settings.model == demo_teacher_config() == model.config
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert DEFAULT_WEIGHTS.stat().st_size < 5e6
    stored = json.loads(settings_path(DEFAULT_WEIGHTS).read_text())
    assert stored["num_steps"] == 50 and stored["cfg_scale"] == settings.cfg_scale and stored["shift"] == settings.shift
    assert DemoSettings.from_dict(stored) == settings


def test_teacher_weights_load_into_the_causal_student():
    student_cfg = demo_student_config()
    assert student_cfg.num_frame_per_block == 3 and student_cfg.replace(num_frame_per_block=None) == demo_teacher_config()
    student = build_wan(student_cfg)
    result = load_wan_checkpoint(student, DEFAULT_WEIGHTS)  # strict: every key, every shape
    assert result.missing == [] and result.unexpected == []


def test_missing_asset_names_the_training_tool(tmp_path):
    with pytest.raises(FileNotFoundError, match="tools/train_demo_teacher.py"):
        load_demo_teacher(tmp_path / "demo_teacher.safetensors")


def test_guided_flow_is_standard_cfg_of_separate_calls(teacher):
    model, settings = teacher
    enc = settings.encoder()
    g = torch.Generator().manual_seed(0)
    x, t = demo_noise(2, settings, g), torch.tensor([700.0, 250.0], dtype=torch.float64)
    ctx, neg = enc.encode(PROMPTS[:2]), enc.negative(2)
    with torch.no_grad():
        got = guided_flow(model, ctx, neg, 3.0)(x, t)
        c, u = model(x, t, ctx), model(x, t, neg)
    torch.testing.assert_close(got, u + 3.0 * (c - u), atol=1e-5, rtol=1e-5)


def test_teacher_sample_is_the_shifted_euler_loop(teacher):
    model, settings = teacher
    enc = settings.encoder()
    noise = demo_noise(2, settings, torch.Generator().manual_seed(1))
    got = teacher_sample(model, PROMPTS[:2], noise, 3, settings)
    ctx, neg = enc.encode(PROMPTS[:2]), enc.negative(2)
    sig = [shift_sigma(1 - i / 3, settings.shift) for i in range(3)] + [0.0]
    x = noise
    with torch.no_grad():
        for s, s_next in zip(sig, sig[1:]):
            t = torch.full((2,), 1000.0 * s, dtype=torch.float64)
            c, u = model(x, t, ctx), model(x, t, neg)
            x = x + (u + settings.cfg_scale * (c - u)) * (s_next - s)
    torch.testing.assert_close(got, x, atol=1e-4, rtol=1e-4)


def test_fifty_step_samples_show_the_prompted_attributes(samples):
    both, _ = samples
    acc = attribute_accuracy(both, PROMPTS * 2)
    assert acc["colour"] >= MIN_COLOUR_50 and acc["all"] >= MIN_ACCURACY_50, acc


def test_four_step_samples_are_softer_than_fifty_step_ones(samples):
    # Few-step Euler averages over what is still undecided: blurrier shapes. (The feature distance to
    # the 50-step set does not yet separate 4 from 50 steps for this teacher; see the module notes.)
    both, few = samples
    soft_50 = video_features(both)["softness"].mean()
    soft_4 = video_features(few)["softness"].mean()
    assert soft_4 > MIN_SOFTNESS_RATIO * soft_50, (float(soft_4), float(soft_50))


def test_demo_asset_references_resolve_to_shipped_files(tmp_path):
    from megadistill.demo.teacher import ASSET_DIR, resolve_checkpoint

    assert resolve_checkpoint("demo:teacher") == str(ASSET_DIR / "demo_teacher.safetensors")
    assert os.path.isfile(resolve_checkpoint("demo:teacher"))
    plain = str(tmp_path / "weights.safetensors")
    assert resolve_checkpoint(plain) == plain  # other paths pass through untouched
    with pytest.raises(ValueError, match="no shipped demo asset 'nope'.*'teacher'"):
        resolve_checkpoint("demo:nope")
