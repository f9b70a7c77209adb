"""The procedural video set: determinism, shapes and ranges, and videos that match their prompts."""
import math

import pytest
import torch

from megadistill.demo.metrics import attribute_accuracy
from megadistill.demo.videos import (COLOURS, DIRECTIONS, SHAPES, VideoSetConfig, all_prompts, make_prompt,
                                     parse_prompt, render_videos, sample_videos)


def test_same_generator_state_gives_the_same_videos_and_another_seed_does_not():
    p1, v1 = sample_videos(16, torch.Generator().manual_seed(3))
    p2, v2 = sample_videos(16, torch.Generator().manual_seed(3))
    p3, v3 = sample_videos(16, torch.Generator().manual_seed(4))
    assert p1 == p2 and torch.equal(v1, v2)
    assert p1 != p3 or not torch.equal(v1, v3)


def test_shapes_ranges_and_pure_colours():
    prompts, videos = sample_videos(64, torch.Generator().manual_seed(0))
    assert videos.shape == (64, 3, 9, 16, 16) and videos.dtype == torch.float32
    assert videos.min() >= -1.0 and videos.max() <= 1.0
    for prompt, video in zip(prompts, videos):
        colour, _, _ = parse_prompt(prompt)
        # Fully covered pixels carry exactly the named colour; every frame has some (half-size >= 2).
        full = (video - torch.tensor(COLOURS[colour]).view(3, 1, 1, 1)).abs().amax(dim=0) < 1e-6
        assert full.flatten(1).any(dim=1).all()
        # Anti-aliased edges are blends of the background and that colour, nothing else.
        coverage = (video + 1.0) / (torch.tensor(COLOURS[colour]).view(3, 1, 1, 1) + 1.0 + 1e-12)
        lit = torch.tensor(COLOURS[colour]) > 0
        assert torch.allclose(coverage[lit][0], coverage[lit][-1]) and (video[~lit] == -1.0).all()


def test_every_prompt_is_well_formed_and_parsed_back():
    prompts = all_prompts()
    assert len(prompts) == len(set(prompts)) == len(COLOURS) * len(SHAPES) * len(DIRECTIONS) == 32
    assert parse_prompt(make_prompt("blue", "disc", "up")) == ("blue", "disc", "up")
    for bad in ("a purple square moving left", "a red square moving", "red square moving left", ""):
        with pytest.raises(ValueError, match="not a demo prompt"):
            parse_prompt(bad)


@pytest.mark.parametrize("jitter", [1.5, math.inf])
def test_the_shape_stays_whole_inside_the_frame_with_the_analytic_area(jitter):
    cfg = VideoSetConfig(position_jitter=jitter)
    prompts = [p for p in all_prompts() for _ in range(8)]
    videos = render_videos(prompts, torch.Generator().manual_seed(1), cfg)
    mass = ((videos.amax(dim=1) + 1) / 2).sum(dim=(2, 3))  # [B, F] pixels covered
    # Constant per video (never clipped by the border; 4x supersampling quantises the area by a few
    # percent, losing a half-pixel column would cost > 10%) and within the area range of the set:
    # the square's (2h)^2 and the disc's equal area, h in half_size.
    assert (mass.std(dim=1) / mass.mean(dim=1)).max() < 0.05
    lo, hi = (4 * h * h for h in cfg.half_size)
    assert mass.min() > 0.93 * lo and mass.max() < 1.07 * hi


def test_videos_move_the_named_way_at_the_configured_speed():
    prompts = [p for p in all_prompts() for _ in range(4)]
    videos = render_videos(prompts, torch.Generator().manual_seed(2))
    w = (videos.double().amax(dim=1) + 1) / 2  # coverage, no threshold: the exact centroid
    xs = torch.arange(16, dtype=torch.float64) + 0.5
    cx = (w.sum(dim=2) * xs).sum(dim=-1) / w.sum(dim=(2, 3))
    cy = (w.sum(dim=3) * xs).sum(dim=-1) / w.sum(dim=(2, 3))
    for i, prompt in enumerate(prompts):
        dx, dy = DIRECTIONS[parse_prompt(prompt)[2]]
        step_x, step_y = cx[i, 1:] - cx[i, :-1], cy[i, 1:] - cy[i, :-1]
        along, across = (step_x * dx, step_y) if dx else (step_y * dy, step_x)
        # Every frame moves forward; the mean speed lies in the set's range of px per frame, up to
        # the 1/4-pixel quantisation of 4x supersampling at both ends of the path.
        lo, hi = VideoSetConfig().speed
        assert along.min() > 0.2
        assert lo - 0.07 < float(along.mean()) < hi + 0.07
        assert across.abs().max() < 0.05  # up to the supersampling of the disc's edge
    assert attribute_accuracy(videos, prompts) == {"colour": 1.0, "shape": 1.0, "direction": 1.0, "all": 1.0}


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="does not fit"):
        VideoSetConfig(half_size=(3.0, 5.0))
    with pytest.raises(ValueError, match="num_frames"):
        VideoSetConfig(num_frames=1)
    with pytest.raises(ValueError, match="speed"):
        VideoSetConfig(speed=(1.0, 0.5))
    with pytest.raises(ValueError, match="position_jitter"):
        VideoSetConfig(position_jitter=-1.0)
    assert render_videos([], None).shape == (0, 3, 9, 16, 16)
    assert math.isclose(VideoSetConfig().shape[1], 9)
