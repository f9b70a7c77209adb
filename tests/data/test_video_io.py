"""Video tensors <-> uint8 frames <-> MP4: value mapping, lossy round trips with both codecs, odd
sizes, tiling and nearest upscaling against direct index formulas."""
import numpy as np
import pytest
import torch

pytest.importorskip("av")

from megadistill.data.video_io import (  # noqa: E402
    pad_to_even, read_mp4, tile_frames, tile_videos, to_uint8_frames, upscale_nearest, viewable_factor, write_mp4,
)


def smooth_video(frames=12, height=34, width=46):
    """A moving colour gradient in [-0.9, 0.9], [3, F, H, W] (what codecs are made for)."""
    t = torch.linspace(0, 1, frames)[:, None, None]
    y = torch.linspace(-1, 1, height)[None, :, None]
    x = torch.linspace(-1, 1, width)[None, None, :]
    channels = [torch.sin(3 * x + 2 * t + 0 * y), torch.cos(2 * y - 3 * t + 0 * x), torch.sin(2 * x * y + t)]
    return 0.9 * torch.stack([c.expand(frames, height, width) for c in channels])


def test_to_uint8_frames_maps_the_range_and_layout():
    g = torch.Generator().manual_seed(0)
    v = torch.rand(3, 2, 4, 5, generator=g) * 2.4 - 1.2  # some values outside [-1, 1]
    frames = to_uint8_frames(v)
    assert frames.dtype == np.uint8 and frames.shape == (2, 4, 5, 3)
    ref = np.clip((v.double().numpy() + 1) * 127.5, 0, 255).transpose(1, 2, 3, 0)
    assert np.abs(frames - ref).max() <= 0.5 + 1e-9  # rounding only
    assert to_uint8_frames(torch.tensor([-1.0, 1.0]).reshape(1, 1, 1, 2)).tolist() == [[[[0, 0, 0], [255, 255, 255]]]]
    gray = to_uint8_frames(v[:1])
    assert np.array_equal(gray[..., 0], gray[..., 2]) and np.array_equal(gray[..., 0], frames[..., 0])
    with pytest.raises(ValueError, match="channels"):
        to_uint8_frames(torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match=r"\[C, F, H, W\]"):
        to_uint8_frames(torch.zeros(3, 4, 4))


def _codecs():
    """The writer's fallback (mpeg4) must exist in every build; libx264 is tested where the build has it."""
    import av

    return [c for c in ("libx264", "mpeg4") if c == "mpeg4" or c in av.codecs_available]


@pytest.mark.parametrize("codec", _codecs())
def test_round_trip_of_a_smooth_video(tmp_path, codec):
    import av

    assert codec in av.codecs_available, f"this FFmpeg build has no {codec}: write_mp4 has no codec to fall back to"
    video = smooth_video()
    path = write_mp4(str(tmp_path / "nested" / "dir" / "v.mp4"), video, fps=8, codec=codec)  # parents created
    decoded = read_mp4(path)
    expected = to_uint8_frames(video)
    assert decoded.shape == expected.shape == (12, 34, 46, 3)
    err = np.abs(decoded.astype(float) - expected).mean()
    assert err < 8  # lossy (yuv420p halves the chroma resolution); measured 3.9 (x264) / 3.9 (mpeg4)
    with av.open(path) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name in ({"libx264": "h264"}.get(codec, codec), codec)
        assert stream.average_rate == 8


def test_odd_sizes_are_padded_not_fatal(tmp_path):
    video = smooth_video(frames=5, height=33, width=47)
    decoded = read_mp4(write_mp4(str(tmp_path / "odd.mp4"), video))
    assert decoded.shape == (5, 34, 48, 3)
    expected = pad_to_even(to_uint8_frames(video))
    assert np.abs(decoded.astype(float) - expected).mean() < 8  # measured 4.2
    frames = to_uint8_frames(video)
    padded = pad_to_even(frames)  # the last row / column repeated, the rest untouched
    assert np.array_equal(padded[:, :33, :47], frames)
    assert np.array_equal(padded[:, 33, :47], frames[:, 32]) and np.array_equal(padded[:, :33, 47], frames[:, :, 46])
    assert np.array_equal(pad_to_even(padded), padded)  # even sizes pass through


def test_write_accepts_uint8_frames(tmp_path):
    video = smooth_video(frames=3, height=16, width=16)
    from_frames = read_mp4(write_mp4(str(tmp_path / "u8.mp4"), to_uint8_frames(video)))
    assert np.array_equal(from_frames, read_mp4(write_mp4(str(tmp_path / "float.mp4"), video)))


def test_read_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        read_mp4(str(tmp_path / "nope.mp4"))


def test_tile_videos_side_by_side():
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.rand(3, 4, 6, w, generator=g) * 2 - 1 for w in (5, 7, 3))
    tiled = tile_videos([a, b, c], pad=2, pad_value=1.0)
    assert tiled.shape == (3, 4, 6, 5 + 2 + 7 + 2 + 3)
    assert torch.equal(tiled[..., 0:5], a) and torch.equal(tiled[..., 7:14], b) and torch.equal(tiled[..., 16:19], c)
    assert (tiled[..., 5:7] == 1).all() and (tiled[..., 14:16] == 1).all()
    assert torch.equal(tile_videos([a], pad=2), a)
    assert tile_videos([a, a], pad=0).shape == (3, 4, 6, 10)
    with pytest.raises(ValueError, match="same"):
        tile_videos([a, torch.zeros(3, 5, 6, 5)])


def test_upscale_nearest_repeats_pixels():
    g = torch.Generator().manual_seed(0)
    v = torch.rand(3, 2, 4, 5, generator=g)
    k = 3
    up = upscale_nearest(v, k)
    rows, cols = torch.arange(4 * k) // k, torch.arange(5 * k) // k
    assert torch.equal(up, v[..., rows[:, None], cols[None, :]])
    assert torch.equal(upscale_nearest(v, 1), v)
    with pytest.raises(ValueError, match="factor"):
        upscale_nearest(v, 0)
    assert viewable_factor(16, 32) == 8 and viewable_factor(20, 20) == 7 and viewable_factor(480, 832) == 1


def test_tile_frames_grid():
    frames = np.arange(5, dtype=np.uint8)[:, None, None, None] * np.ones((5, 2, 3, 3), np.uint8)
    still = tile_frames(frames, pad=1)  # 3 columns (ceil sqrt 5), 2 rows
    assert still.shape == (2 * 2 + 1, 3 * 3 + 2, 3)
    assert (still[0:2, 0:3] == 0).all() and (still[0:2, 4:7] == 1).all() and (still[3:5, 4:7] == 4).all()
    assert (still[2] == 255).all() and (still[3:5, 8:11] == 255).all()  # separator and the empty cell
