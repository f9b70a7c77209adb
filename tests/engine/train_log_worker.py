"""A short plain-``python`` Trainer run with reporting on (launched by test_train_log.py).

    python tests/engine/train_log_worker.py OUT_DIR

Run "logged": flow-matching fit of a tiny MLP (single_process_worker's FlowFit / Chunks), ZeRO stage
2, with a log dir, a progress bar, the console line every 2 steps and a ``sample_fn`` every 3 steps
that returns a batch of videos and an image computed from the generator, drawing from the global
torch RNG (which the trainer must restore). Run "plain": the same without any reporting. Writes
OUT_DIR/result.json with both loss trajectories and the sample steps seen.
"""
from __future__ import annotations

import json
import logging
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from megadistill.engine.config import EMAConfig, TrainConfig  # noqa: E402
from megadistill.engine.trainer import Trainer  # noqa: E402

from tests.helpers.scripts import load_module  # noqa: E402

spw = load_module("single_process_worker", os.path.join(ROOT, "tests", "engine", "single_process_worker.py"))

MICRO, STEPS, SAMPLE_EVERY, LOG_EVERY = 8, 6, 3, 2
VIDEO_SHAPE = (2, 3, 5, 9, 7)  # N, C, F, H, W (odd H / W on purpose)


def sample_fn(trainer):
    """Videos / an image from the generator's flow on fixed inputs, plus a global-RNG draw."""
    net = trainer.method.generator
    n, c, f, h, w = VIDEO_SHAPE
    count = n * c * f * h * w // 2
    g = torch.Generator().manual_seed(5)
    x = torch.randn(count, 2, generator=g)
    t = torch.full((count,), 500.0)
    cond = torch.zeros(count, dtype=torch.long)
    video = torch.tanh(net.flow(x, t, cond)).reshape(VIDEO_SHAPE)
    torch.randn(1000)  # consumes the global stream: the trainer must give it back untouched
    sample_steps.append(trainer.step)
    return {"video": video, "scatter": video[0, :, 0]}  # [C, H, W] image


sample_steps = []


def run(log_dir):
    train = TrainConfig(max_steps=STEPS, micro_batch_size=MICRO, precision="fp32", log_every=LOG_EVERY,
                        save_every=0, sample_every=SAMPLE_EVERY if log_dir else 0, progress_bar=log_dir is not None,
                        generator_optim=spw.OPTIM, ema=EMAConfig(decay=0.0))

    def draw_noise(trainer, logs):  # a callback that uses the global RNG: a changed stream shows in `noise`
        noise.append(float(torch.rand(())))

    noise = []
    trainer = Trainer(spw.FlowFit(spw.model()), spw.Chunks(MICRO), train, {"zero_optimization": {"stage": 2}},
                      log_dir=log_dir, sample_fn=sample_fn if log_dir else None, callbacks=[draw_noise])
    torch.manual_seed(0)
    history = trainer.train()
    return {"loss": [h["generator/loss"] for h in history], "noise": noise}


def main():
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
    out_dir = sys.argv[1]
    logged = run(os.path.join(out_dir, "logs"))
    plain = run(None)
    with open(os.path.join(out_dir, "result.json"), "w") as f:
        json.dump({"logged": logged, "plain": plain, "sample_steps": sample_steps, "steps": STEPS,
                   "sample_every": SAMPLE_EVERY, "video_shape": VIDEO_SHAPE}, f)


if __name__ == "__main__":
    main()
