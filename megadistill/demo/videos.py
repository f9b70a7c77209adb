"""Procedural text-to-video set: one coloured shape moving in a named direction over a dark background.

A sample is (prompt, video) with video [C=3, F, H, W] in [-1, 1], e.g. "a red square moving left".
The demo has no VAE: its "latent" space IS this pixel space (identity VAE), so the Wan teacher is
built with in_dim = out_dim = 3 and denoises pixels directly; MP4 writers upscale.

Each sample draws a size, a speed and a position (the path centred in the frame, then shifted by
up to ``position_jitter`` pixels along each axis, always inside the frame), so every prompt is a
continuous distribution of videos, not one clip: a few-step sampler that collapses or blurs it is
visible to a distributional metric. Shapes are rendered with anti-aliased (supersampled) coverage,
so sub-pixel positions and speeds stay continuous.

Coordinates: x to the right, y downwards, in pixels, pixel i covers [i, i + 1); "up" is -y.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

# RGB in [-1, 1]. Every colour has one channel at +1, so the brightest channel separates shape from
# background for every colour (the feature extractor relies on it).
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, -1.0, -1.0),
    "green": (-1.0, 1.0, -1.0),
    "blue": (-1.0, -1.0, 1.0),
    "yellow": (1.0, 1.0, -1.0),
}
SHAPES: tuple[str, ...] = ("square", "disc")
# Unit motion (dx, dy) in image coordinates (y down).
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
BACKGROUND = -1.0


@dataclass(frozen=True)
class VideoSetConfig:
    """Geometry of the set. Defaults: 9 frames (3 causal blocks of 3) of 16 x 16 pixels.

    ``half_size``: range of the shape's half-extent in pixels (square half-side; the disc radius is
    ``DISC_RADIUS_SCALE`` times it, for equal area); ``speed``: range of pixels per frame;
    ``position_jitter``: the path is centred in the frame and then shifted by up to this many pixels
    along each axis (clamped so the path stays inside; ``math.inf``: anywhere it fits).
    """

    num_frames: int = 9
    height: int = 16
    width: int = 16
    half_size: tuple[float, float] = (2.0, 2.5)
    speed: tuple[float, float] = (0.9, 1.2)
    position_jitter: float = 1.0
    supersample: int = 4

    def __post_init__(self):
        for name in ("num_frames", "height", "width", "supersample"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not self.position_jitter >= 0:
            raise ValueError(f"position_jitter must be >= 0, got {self.position_jitter}")
        if self.num_frames < 2:
            raise ValueError(f"num_frames must be >= 2 for a motion to exist, got {self.num_frames}")
        for name in ("half_size", "speed"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"{name} must be a range 0 < lo <= hi, got {getattr(self, name)}")
        h_max, travel = self.half_size[1], self.speed[1] * (self.num_frames - 1)
        if 2 * h_max + travel > min(self.height, self.width):
            raise ValueError(
                f"a shape of half_size {h_max} moving {travel:.2f} px (speed {self.speed[1]} x "
                f"{self.num_frames - 1} frames) does not fit in {self.height} x {self.width}")

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """Video shape [C, F, H, W]."""
        return (3, self.num_frames, self.height, self.width)


# sqrt(4 / pi): a disc of this radius has the area of a square of the same half-size.
DISC_RADIUS_SCALE = (4.0 / torch.pi) ** 0.5


def make_prompt(colour: str, shape: str, direction: str) -> str:
    return f"a {colour} {shape} moving {direction}"


def all_prompts() -> list[str]:
    """Every prompt of the set (colour-major order), 4 x 2 x 4 = 32."""
    return [make_prompt(c, s, d) for c in COLOURS for s in SHAPES for d in DIRECTIONS]


def parse_prompt(prompt: str) -> tuple[str, str, str]:
    """"a red square moving left" -> ("red", "square", "left"); ValueError for anything else."""
    words = prompt.split()
    if (len(words) != 5 or words[0] != "a" or words[3] != "moving" or words[1] not in COLOURS
            or words[2] not in SHAPES or words[4] not in DIRECTIONS):
        raise ValueError(f"not a demo prompt: {prompt!r}; prompts look like 'a <colour> <shape> moving <direction>' "
                         f"with colour in {list(COLOURS)}, shape in {list(SHAPES)}, direction in {list(DIRECTIONS)}")
    return words[1], words[2], words[4]


def random_prompts(num: int, generator: Optional[torch.Generator] = None) -> list[str]:
    """``num`` prompts drawn uniformly from ``all_prompts()``."""
    prompts = all_prompts()
    idx = torch.randint(0, len(prompts), (num,), generator=generator)
    return [prompts[i] for i in idx.tolist()]


def render_videos(prompts: Sequence[str], generator: Optional[torch.Generator] = None,
                  config: VideoSetConfig = VideoSetConfig()) -> torch.Tensor:
    """One video per prompt, float32 [B, 3, F, H, W] in [-1, 1], with random size, speed and start.

    Deterministic given the generator's state: the per-sample draws are made in a fixed order
    (half-size, speed, position along the motion, perpendicular position), one tensor each.
    """
    parsed = [parse_prompt(p) for p in prompts]
    b, f, hgt, wid = len(parsed), config.num_frames, config.height, config.width
    if b == 0:
        return torch.zeros((0,) + config.shape)
    u = torch.rand(4, b, generator=generator, dtype=torch.float64)
    jitter = min(config.position_jitter, float(max(config.height, config.width)))
    half = config.half_size[0] + (config.half_size[1] - config.half_size[0]) * u[0]
    speed = config.speed[0] + (config.speed[1] - config.speed[0]) * u[1]
    travel = speed * (f - 1)
    dirs = torch.tensor([DIRECTIONS[d] for _, _, d in parsed], dtype=torch.float64)  # [B, 2] (dx, dy)
    horizontal = dirs[:, 0] != 0
    extent = torch.where(horizontal, torch.full_like(half, wid), torch.full_like(half, hgt))
    cross_extent = torch.where(horizontal, torch.full_like(half, hgt), torch.full_like(half, wid))
    # Along the motion the centre goes from a to a + sign * travel; both ends keep the shape inside.
    sign = dirs.sum(dim=1)
    lo = half + torch.where(sign < 0, travel, torch.zeros_like(travel))
    hi = extent - half - torch.where(sign > 0, travel, torch.zeros_like(travel))
    # Centre of the valid range, shifted by up to +-jitter, clamped to the range.
    along = torch.minimum(torch.maximum((lo + hi) / 2 + jitter * (2 * u[2] - 1), lo), hi)
    across = torch.clamp(cross_extent / 2 + jitter * (2 * u[3] - 1), min=half, max=cross_extent - half)
    x0 = torch.where(horizontal, along, across)
    y0 = torch.where(horizontal, across, along)
    steps = torch.arange(f, dtype=torch.float64)
    cx = x0[:, None] + dirs[:, 0, None] * speed[:, None] * steps  # [B, F]
    cy = y0[:, None] + dirs[:, 1, None] * speed[:, None] * steps

    s = config.supersample
    xs = (torch.arange(wid * s, dtype=torch.float64) + 0.5) / s
    ys = (torch.arange(hgt * s, dtype=torch.float64) + 0.5) / s
    dx = xs.view(1, 1, 1, -1) - cx[:, :, None, None]  # [B, F, 1, W*s]
    dy = ys.view(1, 1, -1, 1) - cy[:, :, None, None]  # [B, F, H*s, 1]
    hb = half.view(b, 1, 1, 1)
    square = (dx.abs() <= hb) & (dy.abs() <= hb)
    disc = dx * dx + dy * dy <= (DISC_RADIUS_SCALE * hb) ** 2
    is_disc = torch.tensor([shape == "disc" for _, shape, _ in parsed]).view(b, 1, 1, 1)
    inside = torch.where(is_disc, disc, square).to(torch.float64)
    coverage = inside.view(b, f, hgt, s, wid, s).mean(dim=(3, 5))  # [B, F, H, W]

    colour = torch.tensor([COLOURS[c] for c, _, _ in parsed], dtype=torch.float64).view(b, 3, 1, 1, 1)
    video = BACKGROUND + coverage[:, None] * (colour - BACKGROUND)
    return video.float()


def sample_videos(num: int, generator: Optional[torch.Generator] = None,
                  config: VideoSetConfig = VideoSetConfig()) -> tuple[list[str], torch.Tensor]:
    """``num`` random (prompt, video) pairs: prompts list and videos [num, 3, F, H, W]."""
    prompts = random_prompts(num, generator)
    return prompts, render_videos(prompts, generator, config)
