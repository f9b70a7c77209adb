"""What the trainer reports: TensorBoard scalars and samples, a tqdm bar, a one-line console log.

Only rank 0 reports; on every other rank a ``TrainLogger`` creates no file and no bar (the logs it
is handed are already averaged over ranks by the trainer).

TensorBoard (``<log_dir>/events.out.tfevents.*``), x axis = the number of optimizer steps the weights
had when the value was measured (a step's losses are logged at its 0-based index, a sample made after
N completed steps at N):
    every float of the step's logs (``generator/loss``, ``generator/grad_norm``, ``generator/lr``,
    the method's own keys such as ``generator/dmdtrain_gradient_norm``, ``critic/...``, ``step_time_s``),
    ``samples_per_s`` (one update's global batch / step time), and ``memory/cuda_max_allocated_gib``
    (when CUDA is in use) or ``memory/rss_gib`` (the process's resident memory).
A resumed run opens its event file with ``purge_step`` = the resumed step, so TensorBoard drops what
the interrupted run logged after its last checkpoint instead of showing those steps twice.

Samples: ``log_video`` writes ``<log_dir>/samples/<tag>_<step:06d>.mp4`` (upscaled so tiny videos stay
visible) and a TensorBoard image of the frames tiled row by row; ``log_image`` a TensorBoard image and
``<log_dir>/samples/<tag>_<step:06d>.png`` ("/" in a tag becomes "_" in the file name).

Console (through ``logging``, so it lands wherever the launcher sends INFO; while the bar is shown the
console handlers go through ``tqdm.write`` so lines do not tear the bar), every ``log_every`` steps and
at the last step, e.g.:
    step 11/1000 | generator/loss 0.1234 | critic/loss 0.5678 | generator/grad_norm 1.23 |
    critic/grad_norm 0.456 | generator/lr 2e-06 | critic/lr 4e-07 | 0.53 s/step | 60.4 samples/s | ETA 0:08:43
(one line; keys absent from the step, e.g. the generator's on critic-only steps, are left out; ETA =
remaining steps x wall time per step so far in this run, checkpoint saves and sampling included).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import resource
import sys
import time
from typing import Any, Dict, Mapping, Optional

import torch

logger = logging.getLogger(__name__)

GIB = 2.0**30
SAMPLES_DIR = "samples"
VIDEO_FPS = 16
MIN_SAMPLE_SIDE = 128  # samples smaller than this are upscaled (nearest) for viewing
# Keys of the console line, in order (those present in the step's logs).
CONSOLE_KEYS = ("generator/loss", "critic/loss", "generator/grad_norm", "critic/grad_norm", "generator/lr", "critic/lr")
BAR_KEYS = {"generator/loss": "g_loss", "critic/loss": "c_loss"}


def memory_metrics() -> Dict[str, float]:
    """Peak CUDA memory of this process when it uses CUDA, else its resident set size, in GiB."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return {"memory/cuda_max_allocated_gib": torch.cuda.max_memory_allocated() / GIB}
    return {"memory/rss_gib": rss_bytes() / GIB}


def rss_bytes() -> int:
    """Current resident memory (Linux /proc), or the peak from getrusage where /proc is missing."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def throughput(logs: Mapping[str, float], global_batch: int) -> Dict[str, float]:
    """``samples_per_s``: samples of one update over all ranks and micro-batches / the step's time."""
    step_time = logs.get("step_time_s", 0.0)
    return {"samples_per_s": global_batch / step_time} if step_time > 0 else {}


def scalars(logs: Mapping[str, float], global_batch: int) -> Dict[str, float]:
    """Everything TensorBoard gets for one step (not the step index itself, which is the x axis)."""
    out = {k: float(v) for k, v in logs.items() if k != "step" and isinstance(v, (int, float))}
    out.update(throughput(logs, global_batch))
    out.update(memory_metrics())
    return out


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` (hours unbounded), or ``?`` when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def format_log_line(logs: Mapping[str, float], max_steps: int, samples_per_s: Optional[float] = None,
                    eta_s: Optional[float] = None) -> str:
    """The console line of one step (``logs["step"]`` is its 0-based index; shown 1-based)."""
    parts = [f"step {int(logs['step']) + 1}/{max_steps}"]
    parts += [f"{key} {logs[key]:.4g}" for key in CONSOLE_KEYS if key in logs]
    parts.append(f"{logs['step_time_s']:.2f} s/step")
    if samples_per_s is not None:
        parts.append(f"{samples_per_s:.4g} samples/s")
    if eta_s is not None:
        parts.append(f"ETA {format_duration(eta_s)}")
    return " | ".join(parts)


def _file_tag(tag: str) -> str:
    return tag.replace("/", "_").replace(os.sep, "_")


class TrainLogger:
    """Reports the steps of one ``Trainer.train`` call; see the module docstring.

    ``log_dir`` None: no TensorBoard and no sample files (console and bar only). ``initial_step``:
    the step the run starts (resumes) at. ``global_batch``: micro batch x grad_accum x world size.
    """

    def __init__(self, max_steps: int, global_batch: int, rank: int = 0, log_dir: Optional[str] = None,
                 initial_step: int = 0, log_every: int = 10, tensorboard: bool = True,
                 progress_bar: bool = True, bar_file: Any = None):
        self.max_steps, self.global_batch, self.rank = max_steps, global_batch, rank
        self.log_dir, self.log_every, self.initial_step = log_dir, log_every, initial_step
        self.active = rank == 0
        self.writer = None
        self.bar = None
        self._stack = contextlib.ExitStack()
        self._clock: Optional[float] = None  # start of the first step reported here
        self._steps_seen = 0
        self._postfix: Dict[str, str] = {}  # last value of each bar key (the generator skips steps)
        if not self.active:
            return
        if log_dir is not None and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides events at steps >= it that an interrupted run left behind.
            self.writer = SummaryWriter(log_dir, purge_step=initial_step if initial_step > 0 else None)
        if progress_bar:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            stream = bar_file if bar_file is not None else sys.stderr
            tty = hasattr(stream, "isatty") and stream.isatty()
            # in a log file (SLURM) every refresh is a new line: refresh rarely there
            self.bar = tqdm(total=max_steps, initial=initial_step, file=stream, dynamic_ncols=tty,
                            mininterval=0.1 if tty else 30.0, unit="step", desc="train")
            self._stack.enter_context(logging_redirect_tqdm())

    # ------------------------------------------------------------------ steps
    def should_print(self, step_index: int) -> bool:
        return bool(self.log_every) and (step_index % self.log_every == 0 or step_index + 1 == self.max_steps)

    def eta_seconds(self, step_index: int) -> float:
        """Remaining steps x the wall time per step so far in this run (checkpoints and samples in)."""
        if self._clock is None or self._steps_seen == 0:
            return float("nan")
        per_step = (time.perf_counter() - self._clock) / self._steps_seen
        return per_step * (self.max_steps - step_index - 1)

    def log_step(self, logs: Mapping[str, float]) -> None:
        """Report one finished step (``logs`` as ``Trainer.train_step`` returns them)."""
        if not self.active:
            return
        if self._clock is None:
            self._clock = time.perf_counter() - logs.get("step_time_s", 0.0)
        self._steps_seen += 1
        step = int(logs["step"])
        values = scalars(logs, self.global_batch)
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)
        if self.bar is not None:
            self._postfix.update({short: f"{logs[k]:.4g}" for k, short in BAR_KEYS.items() if k in logs})
            self.bar.set_postfix(self._postfix, refresh=False)
            self.bar.update(1)
        if self.should_print(step):
            logger.info(format_log_line(logs, self.max_steps, values.get("samples_per_s"), self.eta_seconds(step)))

    # ------------------------------------------------------------------ samples
    def _sample_path(self, tag: str, step: int, ext: str) -> str:
        return os.path.join(self.log_dir, SAMPLES_DIR, f"{_file_tag(tag)}_{step:06d}.{ext}")

    def log_video(self, step: int, tag: str, video: torch.Tensor, fps: int = VIDEO_FPS) -> Optional[str]:
        """``video`` in [-1, 1], ``[C, F, H, W]`` or ``[N, C, F, H, W]`` (N shown side by side).
        Returns the MP4's path (None where nothing is written)."""
        from megadistill.data.video_io import tile_frames, tile_videos, to_uint8_frames, upscale_nearest
        from megadistill.data.video_io import viewable_factor, write_mp4

        if not self.active or self.log_dir is None:
            return None
        video = torch.as_tensor(video).detach().float().cpu()
        if video.ndim == 5:
            video = tile_videos(list(video))
        if video.ndim != 4:
            raise ValueError(f"log_video({tag!r}): video must be [C, F, H, W] or [N, C, F, H, W], "
                             f"got {tuple(video.shape)}")
        video = upscale_nearest(video, viewable_factor(video.shape[-2], video.shape[-1], MIN_SAMPLE_SIDE))
        frames = to_uint8_frames(video)
        path = write_mp4(self._sample_path(tag, step, "mp4"), frames, fps=fps)
        if self.writer is not None:
            self.writer.add_image(tag, tile_frames(frames), step, dataformats="HWC")
        return path

    def log_image(self, step: int, tag: str, image: torch.Tensor) -> Optional[str]:
        """``image`` ``[C, H, W]`` in [-1, 1] (C = 1 or 3). Returns the PNG's path (None if none)."""
        from PIL import Image

        from megadistill.data.video_io import to_uint8_frames, upscale_nearest, viewable_factor

        if not self.active or self.log_dir is None:
            return None
        image = torch.as_tensor(image).detach().float().cpu()
        if image.ndim != 3:
            raise ValueError(f"log_image({tag!r}): image must be [C, H, W], got {tuple(image.shape)}")
        image = upscale_nearest(image, viewable_factor(image.shape[-2], image.shape[-1], MIN_SAMPLE_SIDE))
        pixels = to_uint8_frames(image[:, None])[0]
        path = self._sample_path(tag, step, "png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(pixels).save(path)
        if self.writer is not None:
            self.writer.add_image(tag, pixels, step, dataformats="HWC")
        return path

    def log_samples(self, step: int, samples: Mapping[str, torch.Tensor]) -> None:
        """A ``sample_fn``'s output: 3-D tensors are images, 4-D / 5-D videos."""
        for tag, value in samples.items():
            ndim = torch.as_tensor(value).ndim
            if ndim == 3:
                self.log_image(step, tag, value)
            elif ndim in (4, 5):
                self.log_video(step, tag, value)
            else:
                raise ValueError(f"sample {tag!r}: expected an image [C, H, W] or a video [(N,) C, F, H, W], "
                                 f"got shape {tuple(torch.as_tensor(value).shape)}")

    # ------------------------------------------------------------------ lifetime
    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        self._stack.close()
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __enter__(self) -> "TrainLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
