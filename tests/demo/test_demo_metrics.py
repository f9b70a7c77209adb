"""Demo metrics on real procedural data: exact features, attribute accuracy, and distances that rank
a floor (two draws of the set) below wrong-prompt and corrupted sets."""
import random

import pytest
import torch

from megadistill.demo.metrics import (SHAPE_SPLIT, attribute_accuracy, feature_distance, pixel_distance,
                                      predicted_attributes, video_distance, video_features)
from megadistill.demo.videos import COLOURS, all_prompts, render_videos

PER_PROMPT = 8


def _block_video(colour, size=4, start=(2, 5), step=(1, 0), frames=9):
    """A size x size pixel block moving ``step`` pixels per frame: exact centroid, speed, shape."""
    v = torch.full((1, 3, frames, 16, 16), -1.0)
    for f in range(frames):
        x, y = start[0] + step[0] * f, start[1] + step[1] * f
        v[0, :, f, y:y + size, x:x + size] = torch.tensor(colour).view(3, 1, 1)
    return v


def test_features_of_a_moving_pixel_block_are_exact():
    v = _block_video(COLOURS["green"], size=4, start=(2, 5), step=(1, 0))
    feats = video_features(v)
    assert torch.allclose(feats["colour"][0], torch.tensor(COLOURS["green"], dtype=torch.float64))
    expected_x = torch.arange(9, dtype=torch.float64) + 2 + 2.0  # left edge + half the block
    assert torch.allclose(feats["centroid"][0, :, 0], expected_x)
    assert torch.allclose(feats["centroid"][0, :, 1], torch.full((9,), 7.0, dtype=torch.float64))
    assert torch.allclose(feats["mass"][0], torch.full((9,), 16.0, dtype=torch.float64))
    # Pixel offsets +-0.5, +-1.5: E[dx^2 dy^2] = 1.25^2, E[r^2] = 2.5 -> exactly 1/4 like the square.
    assert feats["shape"][0].item() == pytest.approx(0.25)
    assert predicted_attributes(v) == [("green", "square", "right")]
    up = _block_video(COLOURS["yellow"], start=(6, 11), step=(0, -1))
    assert predicted_attributes(up) == [("yellow", "square", "up")]


def test_a_pixel_disc_reads_as_a_disc():
    ys, xs = torch.meshgrid(torch.arange(16) + 0.5, torch.arange(16) + 0.5, indexing="ij")
    disc = ((xs - 8.0) ** 2 + (ys - 8.0) ** 2 <= 3.2 ** 2).float()
    v = (-1 + 2 * disc).expand(1, 3, 9, 16, 16).clone()
    v[:, 1:] = -1.0  # red
    assert video_features(v)["shape"][0] < SHAPE_SPLIT
    assert predicted_attributes(v) == [("red", "disc", "still")]


def _real(seed, prompts):
    return render_videos(prompts, torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def data():
    prompts = [p for p in all_prompts() for _ in range(PER_PROMPT)]
    return prompts, _real(0, prompts), _real(1, prompts)


def test_floor_is_low_and_wrong_prompts_are_far(data):
    prompts, a, b = data
    shuffled = prompts[:]
    random.Random(0).shuffle(shuffled)
    floor = video_distance(a, b, prompts)
    wrong = video_distance(a, b, prompts, shuffled)
    assert video_distance(a, a, prompts) == {"feature": 0.0, "pixel": 0.0}
    # Measured: floor 0.024 / 0.063, shuffled 0.55 / 0.25 (feature / pixel).
    assert wrong["feature"] > 4 * floor["feature"]
    assert wrong["pixel"] > 1.3 * floor["pixel"]
    assert feature_distance(b, a, prompts) == pytest.approx(floor["feature"], rel=1e-12)  # symmetric


def test_corrupted_sets_lose_accuracy_and_move_away(data):
    prompts, a, b = data
    floor = feature_distance(a, b, prompts)
    # Wrong colour: rotate the RGB channels (red -> green -> blue -> red; yellow -> cyan, nearest
    # palette colours green or blue: wrong as well).
    recoloured = a.roll(1, dims=1)
    acc = attribute_accuracy(recoloured, prompts)
    assert acc["colour"] == 0.0 and acc["all"] == 0.0 and acc["direction"] == 1.0 and acc["shape"] == 1.0
    assert feature_distance(recoloured, b, prompts) > 3 * floor
    # Played backwards: every direction wrong, colour and shape untouched.
    backwards = a.flip(2)
    acc = attribute_accuracy(backwards, prompts)
    assert acc["direction"] == 0.0 and acc["colour"] == 1.0 and acc["shape"] == 1.0
    assert feature_distance(backwards, b, prompts) > 3 * floor
    # Frozen on the first frame: no motion, no direction.
    frozen = a[:, :, :1].expand_as(a)
    assert attribute_accuracy(frozen, prompts)["direction"] == 0.0
    # A blank video shows nothing: wrong on every attribute.
    blank = torch.full_like(a[:4], -1.0)
    assert attribute_accuracy(blank, prompts[:4]) == {"colour": 0.0, "shape": 0.0, "direction": 0.0, "all": 0.0}


def test_noise_and_blur_raise_the_distances(data):
    prompts, a, b = data
    g = torch.Generator().manual_seed(5)
    noisy = (a + 0.5 * torch.randn(a.shape, generator=g)).clamp(-1, 1)
    blurred = torch.nn.functional.avg_pool3d(a, (1, 3, 3), stride=1, padding=(0, 1, 1), count_include_pad=False)
    assert pixel_distance(noisy, b, prompts) > 1.3 * pixel_distance(a, b, prompts)
    # Measured: floor 0.024, blurred 0.135 (softness 0.05 -> 0.13), noisy higher still.
    floor = feature_distance(a, b, prompts)
    assert feature_distance(blurred, b, prompts) > 3 * floor
    assert feature_distance(noisy, b, prompts) > 3 * floor
    acc = attribute_accuracy(blurred, prompts)
    assert acc["colour"] == acc["direction"] == 1.0  # blur keeps colour and motion (rounds corners: shape)


def test_distance_needs_matching_prompt_groups(data):
    prompts, a, b = data
    with pytest.raises(ValueError, match="same prompts"):
        feature_distance(a[:-1], b[:-1], prompts[:-1], prompts[1:])
    with pytest.raises(ValueError, match="prompts for"):
        attribute_accuracy(a[:3], prompts[:2])
