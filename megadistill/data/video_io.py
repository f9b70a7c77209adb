"""Videos as tensors and as MP4 files: [-1, 1] float tensors <-> uint8 RGB frames <-> H.264 files.

Tensors follow the models' layout, ``[C, F, H, W]`` (channels, frames, height, width) with values in
[-1, 1]; frames on disk and in numpy are ``uint8 [F, H, W, 3]`` RGB. Encoding goes through PyAV
(FFmpeg): libx264 when the FFmpeg build has it, else MPEG-4 part 2, both in yuv420p, the pixel
format every player reads. yuv420p subsamples chroma 2x2, so odd heights / widths are padded by
repeating the last row / column (``read_mp4`` returns the padded size).
"""
from __future__ import annotations

import math
import os
from typing import Sequence, Union

import numpy as np
import torch

Array = Union[torch.Tensor, np.ndarray]

# libx264 constant-quality setting: 18 is "visually lossless" for natural video; samples are small
# (tens of kB), so quality wins over size.
X264_CRF = "18"
MPEG4_BIT_RATE = 8_000_000  # fallback codec has no constant-quality mode here; a rate far above need


def _as_video(video: Array) -> torch.Tensor:
    v = torch.as_tensor(video).detach().cpu()
    if v.ndim != 4:
        raise ValueError(f"video must be [C, F, H, W], got shape {tuple(v.shape)}")
    if v.shape[0] not in (1, 3):
        raise ValueError(f"video must have 1 (gray) or 3 (RGB) channels, got {v.shape[0]} (shape {tuple(v.shape)})")
    return v


def to_uint8_frames(video: Array) -> np.ndarray:
    """``[C, F, H, W]`` in [-1, 1] (C = 1 gray or 3 RGB) -> ``uint8 [F, H, W, 3]``; values outside
    [-1, 1] are clipped."""
    v = _as_video(video).float()
    frames = ((v.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    frames = frames.permute(1, 2, 3, 0)  # F, H, W, C
    if frames.shape[-1] == 1:
        frames = frames.expand(*frames.shape[:-1], 3)
    return np.ascontiguousarray(frames.numpy())


def pad_to_even(frames: np.ndarray) -> np.ndarray:
    """``[F, H, W, 3]`` with the last row / column repeated where H / W is odd (yuv420p needs even)."""
    _, h, w, _ = frames.shape
    return np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def video_codec() -> str:
    import av

    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def write_mp4(path: str, video: Array, fps: int = 16, codec: str = "") -> str:
    """Encode ``video`` to an MP4 at ``path`` (parent directories are created); returns ``path``.

    ``video`` is ``[C, F, H, W]`` float in [-1, 1], or frames already converted, ``uint8 [F, H, W, 3]``.
    ``codec``: "libx264", "mpeg4", or "" for the best one available.
    """
    import av

    if fps < 1:
        raise ValueError(f"fps must be >= 1, got {fps}")
    if isinstance(video, np.ndarray) and video.dtype == np.uint8:
        frames = video
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"uint8 frames must be [F, H, W, 3], got shape {frames.shape}")
    else:
        frames = to_uint8_frames(video)
    if frames.shape[0] < 1:
        raise ValueError("video has no frames")
    frames = pad_to_even(frames)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    codec = codec or video_codec()
    if codec not in ("libx264", "mpeg4"):
        raise ValueError(f"codec must be 'libx264' or 'mpeg4', got {codec!r}")
    with av.open(path, mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": X264_CRF}
        else:
            stream.bit_rate = MPEG4_BIT_RATE
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder's delayed frames
            container.mux(packet)
    return path


def read_mp4(path: str) -> np.ndarray:
    """Decode every frame of the first video stream of ``path`` -> ``uint8 [F, H, W, 3]`` RGB."""
    import av

    if not os.path.isfile(path):
        raise FileNotFoundError(f"video file not found: {path}")
    with av.open(path) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    if not frames:
        raise ValueError(f"{path} holds no video frames")
    return np.stack(frames)


def tile_videos(videos: Sequence[Array], pad: int = 2, pad_value: float = 1.0) -> torch.Tensor:
    """Place ``[C, F, H, W]`` videos side by side (along W) with ``pad`` columns of ``pad_value``
    (default white) between them -> ``[C, F, H, N W + (N - 1) pad]``. All need the same C, F, H."""
    if not videos:
        raise ValueError("tile_videos needs at least one video")
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    vs = [_as_video(v).float() for v in videos]
    c, f, h, _ = vs[0].shape
    for i, v in enumerate(vs):
        if v.shape[:3] != (c, f, h):
            raise ValueError(f"video {i} has shape {tuple(v.shape)}; tiling needs the same [C, F, H] as video 0 "
                             f"{(c, f, h)}")
    gap = torch.full((c, f, h, pad), float(pad_value))
    parts = []
    for i, v in enumerate(vs):
        if i and pad:
            parts.append(gap)
        parts.append(v)
    return torch.cat(parts, dim=3)


def upscale_nearest(video: Array, factor: int) -> torch.Tensor:
    """Repeat every pixel ``factor`` x ``factor`` times (the last two dims are H, W): tiny samples
    stay sharp instead of being blurred by a player's scaler or destroyed by chroma subsampling."""
    if int(factor) != factor or factor < 1:
        raise ValueError(f"factor must be an integer >= 1, got {factor}")
    v = torch.as_tensor(video)
    if v.ndim < 2:
        raise ValueError(f"need at least [H, W], got shape {tuple(v.shape)}")
    factor = int(factor)
    return v.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


def viewable_factor(height: int, width: int, min_side: int = 128) -> int:
    """The smallest integer upscale that makes the shorter side at least ``min_side`` pixels."""
    return max(1, math.ceil(min_side / max(1, min(height, width))))


def tile_frames(frames: np.ndarray, columns: int = 0, pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """``uint8 [F, H, W, 3]`` frames laid out row by row in one image (``columns`` 0 = ceil(sqrt(F)))
    with ``pad`` pixels of ``pad_value`` between them -> ``uint8 [H', W', 3]``: a video as a still."""
    if frames.ndim != 4:
        raise ValueError(f"frames must be [F, H, W, C], got shape {frames.shape}")
    n, h, w, c = frames.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    out = np.full((rows * h + (rows - 1) * pad, columns * w + (columns - 1) * pad, c), pad_value, dtype=frames.dtype)
    for i, frame in enumerate(frames):
        r, col = divmod(i, columns)
        out[r * (h + pad): r * (h + pad) + h, col * (w + pad): col * (w + pad) + w] = frame
    return out
