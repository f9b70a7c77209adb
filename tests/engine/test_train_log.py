"""Training reports: TensorBoard scalars read back from the event files, resume purging, samples as
MP4 / PNG, the console line, the tqdm bar, rank-0-only output, and a real (plain ``python``) Trainer
run with a log dir and a sample_fn."""
import io
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from megadistill.data.video_io import read_mp4, tile_frames, tile_videos, to_uint8_frames, upscale_nearest
from megadistill.engine.train_log import TrainLogger, format_duration, format_log_line

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tests.helpers import ranks

pytestmark = pytest.mark.distributed

HERE = Path(__file__).resolve().parent
GLOBAL_BATCH = 12  # e.g. micro 2 x grad_accum 3 x 2 ranks


def events(log_dir):
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def series(acc, tag):
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def vm_rss_kib():
    with open("/proc/self/status") as f:
        (line,) = [line for line in f if line.startswith("VmRSS:")]
    return int(line.split()[1])


def step_logs(step, loss, step_time=0.25):
    """What Trainer.train_step returns for a step of a method with a critic (values exact in fp32)."""
    return {"generator/loss": loss, "generator/grad_norm": 2.5, "generator/dmdtrain_gradient_norm": 0.125,
            "generator/lr": 2**-10, "critic/loss": loss / 2, "critic/grad_norm": 0.75, "critic/lr": 2**-12,
            "step": float(step), "step_time_s": step_time}


def quiet_logger(log_dir, **kw):
    return TrainLogger(max_steps=kw.pop("max_steps", 10), global_batch=GLOBAL_BATCH, log_dir=str(log_dir),
                       bar_file=io.StringIO(), **kw)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="compares with Linux /proc")
def test_scalars_read_back_exactly(tmp_path):
    with quiet_logger(tmp_path) as log:
        for step in range(3):
            log.log_step(step_logs(step, loss=1.0 + step, step_time=0.25 * (step + 1)))
    vm_rss_gib = vm_rss_kib() / 2**20  # the kernel's own figure, read right after
    acc = events(tmp_path)
    expected_tags = {"generator/loss", "generator/grad_norm", "generator/dmdtrain_gradient_norm", "generator/lr",
                     "critic/loss", "critic/grad_norm", "critic/lr", "step_time_s", "samples_per_s", "memory/rss_gib"}
    assert set(acc.Tags()["scalars"]) == expected_tags  # no "step" tag: it is the x axis
    assert series(acc, "generator/loss") == [(0, 1.0), (1, 2.0), (2, 3.0)]
    assert series(acc, "critic/loss") == [(0, 0.5), (1, 1.0), (2, 1.5)]
    assert series(acc, "generator/lr") == [(s, 2**-10) for s in range(3)]
    assert series(acc, "generator/dmdtrain_gradient_norm") == [(s, 0.125) for s in range(3)]
    assert series(acc, "step_time_s") == [(0, 0.25), (1, 0.5), (2, 0.75)]
    # global samples of the step / step time
    assert series(acc, "samples_per_s") == [(0, 48.0), (1, 24.0), (2, 16.0)]
    # resident memory: what /proc/self/status reports (the process barely changed in between)
    for _, rss in series(acc, "memory/rss_gib"):
        assert rss == pytest.approx(vm_rss_gib, rel=0.05)


def test_resume_purges_the_interrupted_runs_later_steps(tmp_path):
    with quiet_logger(tmp_path) as log:  # interrupted run: logged steps 0..5, last checkpoint at 3
        for step in range(6):
            log.log_step(step_logs(step, loss=float(step)))
    with quiet_logger(tmp_path, initial_step=3) as log:  # resumed run
        for step in range(3, 8):
            log.log_step(step_logs(step, loss=100.0 + step))
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 2
    assert series(events(tmp_path), "generator/loss") == [
        (0, 0.0), (1, 1.0), (2, 2.0), (3, 103.0), (4, 104.0), (5, 105.0), (6, 106.0), (7, 107.0)]


def test_video_and_image_samples(tmp_path):
    g = torch.Generator().manual_seed(0)
    videos = torch.rand(3, 3, 4, 6, 5, generator=g) * 2 - 1  # N, C, F, H, W: tiny, odd width
    image = torch.rand(1, 8, 8, generator=g) * 2 - 1
    with quiet_logger(tmp_path) as log:
        mp4 = log.log_video(40, "samples/video", videos)
        png = log.log_image(40, "samples/toy", image)
    assert mp4 == str(tmp_path / "samples" / "samples_video_000040.mp4")
    assert png == str(tmp_path / "samples" / "samples_toy_000040.png")
    # the N videos side by side, upscaled nearest so the short side is >= 128 px (6 px -> x22)
    expected = to_uint8_frames(upscale_nearest(tile_videos(list(videos)), 22))
    assert expected.shape == (4, 132, 22 * (3 * 5 + 2 * 2), 3)
    decoded = read_mp4(mp4)
    assert decoded.shape == expected.shape  # even sizes: no padding needed
    assert np.abs(decoded.astype(float) - expected).mean() < 8  # lossy codec, random pixels (measured 2.5)
    # PNG is lossless: exactly the upscaled image, gray to RGB
    assert np.array_equal(np.asarray(Image.open(png)), to_uint8_frames(upscale_nearest(image, 16)[:, None])[0])
    acc = events(tmp_path)
    assert set(acc.Tags()["images"]) == {"samples/video", "samples/toy"}
    (still,) = acc.Images("samples/video")
    assert still.step == 40 and (still.height, still.width) == tile_frames(expected).shape[:2]
    (toy,) = acc.Images("samples/toy")
    assert toy.step == 40 and (toy.height, toy.width) == (128, 128)


def test_samples_dispatch_by_shape(tmp_path):
    with quiet_logger(tmp_path) as log:
        log.log_samples(7, {"img": torch.zeros(3, 4, 4), "vid": torch.zeros(3, 2, 4, 4),
                            "vids": torch.zeros(2, 1, 2, 4, 4)})
        with pytest.raises(ValueError, match="sample 'flat'"):
            log.log_samples(7, {"flat": torch.zeros(4, 4)})
    assert sorted(os.listdir(tmp_path / "samples")) == ["img_000007.png", "vid_000007.mp4", "vids_000007.mp4"]
    assert read_mp4(str(tmp_path / "samples" / "vids_000007.mp4")).shape[0] == 2


def test_other_ranks_write_nothing(tmp_path, caplog):
    log_dir = tmp_path / "logs"
    bar = io.StringIO()
    with caplog.at_level(logging.INFO), TrainLogger(10, GLOBAL_BATCH, rank=1, log_dir=str(log_dir), log_every=1,
                                                     bar_file=bar) as log:
        assert log.writer is None and log.bar is None
        log.log_step(step_logs(0, 1.0))
        assert log.log_video(0, "v", torch.zeros(3, 2, 4, 4)) is None
        assert log.log_image(0, "i", torch.zeros(3, 4, 4)) is None
    assert not log_dir.exists()
    assert bar.getvalue() == "" and caplog.records == []


def test_console_line_format():
    line = format_log_line(step_logs(41, 1.5, step_time=0.5), max_steps=1000, samples_per_s=24.0, eta_s=3723.4)
    assert line == ("step 42/1000 | generator/loss 1.5 | critic/loss 0.75 | generator/grad_norm 2.5 | "
                    "critic/grad_norm 0.75 | generator/lr 0.0009766 | "
                    "critic/lr 0.0002441 | 0.50 s/step | 24 samples/s | ETA 1:02:03")
    critic_only = {"critic/loss": 0.25, "critic/lr": 1e-3, "step": 3.0, "step_time_s": 2.0}
    assert format_log_line(critic_only, 10) == "step 4/10 | critic/loss 0.25 | critic/lr 0.001 | 2.00 s/step"
    assert format_duration(59.6) == "0:01:00" and format_duration(90061) == "25:01:01"
    assert format_duration(float("nan")) == "?"


def test_console_lines_every_log_every_and_last_step(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="megadistill.engine.train_log"), \
            quiet_logger(tmp_path, max_steps=7, log_every=3, tensorboard=False) as log:
        for step in range(7):
            log.log_step(step_logs(step, 1.0))
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(" | ")[0] for line in lines] == ["step 1/7", "step 4/7", "step 7/7"]
    assert all("samples/s" in line and " | ETA " in line for line in lines)
    assert lines[-1].endswith("ETA 0:00:00")  # nothing left after the last step
    assert not list(tmp_path.glob("events.*"))  # tensorboard=False


def test_progress_bar_total_initial_and_postfix(tmp_path):
    bar = io.StringIO()
    log = TrainLogger(max_steps=10, global_batch=GLOBAL_BATCH, log_dir=None, initial_step=3, bar_file=bar)
    assert (log.bar.total, log.bar.n) == (10, 3)
    log.log_step(step_logs(3, 1.5))
    log.log_step(step_logs(4, 0.5))
    assert log.bar.n == 5 and log.bar.postfix == "g_loss=0.5, c_loss=0.25"
    log.log_step({"critic/loss": 2.0, "step": 5.0, "step_time_s": 0.1})  # critic-only step: last g_loss stays
    assert log.bar.n == 6 and log.bar.postfix == "g_loss=0.5, c_loss=2"
    log.close()
    assert "6/10" in bar.getvalue() and "g_loss=0.5, c_loss=2" in bar.getvalue()
    assert TrainLogger(10, GLOBAL_BATCH, progress_bar=False).bar is None


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory):
    pytest.importorskip("deepspeed")
    out = tmp_path_factory.mktemp("train_log")
    ranks.launch(HERE / "train_log_worker.py", [str(out)], world_size=1, log_dir=out, timeout_s=120, plain=True)
    return out, json.loads((out / "result.json").read_text()), (out / "rank0.log").read_text()


def test_trainer_logs_every_step_and_samples(trainer_run):
    out, result, console = trainer_run
    steps, every = result["steps"], result["sample_every"]
    acc = events(out / "logs")
    logged = series(acc, "generator/loss")
    assert [s for s, _ in logged] == list(range(steps))
    np.testing.assert_allclose([v for _, v in logged], result["logged"]["loss"], rtol=1e-6)
    assert {"generator/grad_norm", "generator/lr", "step_time_s", "samples_per_s"} <= set(acc.Tags()["scalars"])
    # sample_fn before every `every`-th step and after the last, named by the completed step count
    sample_steps = list(range(0, steps, every)) + [steps]
    assert result["sample_steps"] == sample_steps
    frame_count = result["video_shape"][2]
    for step in sample_steps:
        frames = read_mp4(str(out / "logs" / "samples" / f"video_{step:06d}.mp4"))
        assert frames.shape[0] == frame_count
        assert (out / "logs" / "samples" / f"scatter_{step:06d}.png").is_file()
    assert [e.step for e in acc.Images("video")] == sample_steps
    # console: every log_every-th step and the last one
    for k in (1, 3, 5, 6):
        assert f"step {k}/{steps} | generator/loss" in console
    assert "step 2/6 |" not in console


def test_sampling_leaves_the_training_trajectory_alone(trainer_run):
    _, result, _ = trainer_run
    # sample_fn drew from the global RNG; the trainer restored it, so a callback drawing after every
    # step sees the same numbers as in the run without sampling, and the losses match
    assert result["logged"]["noise"] == result["plain"]["noise"]
    assert result["logged"]["loss"] == result["plain"]["loss"]


def test_cuda_memory_is_reported_when_cuda_is_in_use(monkeypatch):
    from megadistill.engine import train_log

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: 3 * 2**30 + 2**29)
    assert train_log.memory_metrics() == {"memory/cuda_max_allocated_gib": 3.5}


def test_train_config_reporting_fields():
    from megadistill.engine.config import TrainConfig

    cfg = TrainConfig()
    assert (cfg.tensorboard, cfg.progress_bar, cfg.sample_every) == (True, True, 0)
    with pytest.raises(ValueError, match="sample_every must be >= 0"):
        TrainConfig(sample_every=-1)
