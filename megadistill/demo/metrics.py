"""Sample metrics of the demo: interpretable per-video features, attribute accuracy, distances.

Features come from a soft foreground mask: a pixel's brightest channel, mapped from [-1, 1] to a
weight in [0, 1] and zeroed below ``FOREGROUND_THRESHOLD`` (every demo colour has a channel at +1,
the background none). Per frame: the foreground centroid and mass; per video: the mass-weighted
mean colour and a shape statistic.

Distances compare two SETS of videos generated for the same prompts, e.g. a student's 4-step
samples against the teacher's 50-step samples. Samples are not paired (different noise, different
samplers), so the distance is distributional: per prompt, the sliced Wasserstein-1
(``toylab.distance``) between the two sets, averaged over prompts. ``feature_distance`` works on
the feature vectors (colour, trajectory, size, shape, softness: what a viewer checks),
``pixel_distance`` on 2 x 2 average-pooled pixels (raw, but dominated by where the shape is: it
barely sees blur, the features' softness does).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from megadistill.toylab.distance import projection_directions, sliced_wasserstein

from .videos import COLOURS, parse_prompt

FOREGROUND_THRESHOLD = 0.25
# Mean foreground mass per frame (pixels) below which a video counts as showing no shape.
MIN_MASS = 3.0
# A shape must move at least this fast (pixels per frame; the set's slowest is 0.6) to have a direction.
MIN_SPEED = 0.2
# E[dx^2 dy^2] / E[r^2]^2 around the centroid: 1/4 for an axis-aligned square, 1/6 for a disc.
SHAPE_SPLIT = (0.25 + 1.0 / 6.0) / 2
NUM_PROJECTIONS = 256


def brightness(videos: torch.Tensor) -> torch.Tensor:
    """[B, 3, F, H, W] in [-1, 1] -> brightest channel mapped to [0, 1]: [B, F, H, W] (float64)."""
    if videos.dim() != 5 or videos.shape[1] != 3:
        raise ValueError(f"videos must be [B, 3, F, H, W], got {list(videos.shape)}")
    return ((videos.double().amax(dim=1) + 1.0) / 2.0).clamp(0.0, 1.0)


def foreground_weights(videos: torch.Tensor) -> torch.Tensor:
    """Soft foreground mask [B, F, H, W] in [0, 1]: brightness with values below the threshold zeroed."""
    w = brightness(videos)
    return torch.where(w >= FOREGROUND_THRESHOLD, w, torch.zeros_like(w))


def video_features(videos: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-video features (float64): colour [B, 3], centroid [B, F, 2] (x, y in pixels), mass [B, F]
    (pixels), shape [B] (E[dx^2 dy^2] / E[r^2]^2, mean over frames), softness [B] (mean of 4 b (1 - b)
    over pixels of the brightness b: 0 for a binary image, larger for blur, haze and noise; the
    set's anti-aliased edges give about 0.05)."""
    soft = brightness(videos)
    softness = (4.0 * soft * (1.0 - soft)).mean(dim=(1, 2, 3))
    w = foreground_weights(videos)
    b, f, h, wid = w.shape
    ys = torch.arange(h, dtype=torch.float64).view(1, 1, h, 1) + 0.5
    xs = torch.arange(wid, dtype=torch.float64).view(1, 1, 1, wid) + 0.5
    mass = w.sum(dim=(2, 3))
    safe = mass.clamp_min(1e-6)
    # An empty frame gets the frame centre: no motion, no information, never a division by zero.
    cx = torch.where(mass > 0, (w * xs).sum(dim=(2, 3)) / safe, torch.full_like(mass, wid / 2))
    cy = torch.where(mass > 0, (w * ys).sum(dim=(2, 3)) / safe, torch.full_like(mass, h / 2))
    dx2 = (xs - cx[..., None, None]) ** 2
    dy2 = (ys - cy[..., None, None]) ** 2
    r2 = (w * (dx2 + dy2)).sum(dim=(2, 3)) / safe
    cross = (w * dx2 * dy2).sum(dim=(2, 3)) / safe
    shape_stat = (cross / r2.clamp_min(1e-6) ** 2).mean(dim=1)
    total = mass.sum(dim=1).clamp_min(1e-6)
    colour = (videos.double() * w[:, None]).sum(dim=(2, 3, 4)) / total[:, None]
    return {"colour": colour, "centroid": torch.stack([cx, cy], dim=-1), "mass": mass, "shape": shape_stat,
            "softness": softness}


def velocity(centroid: torch.Tensor) -> torch.Tensor:
    """Least-squares slope of the centroid over frames: [B, F, 2] -> [B, 2] pixels per frame."""
    f = centroid.shape[1]
    t = torch.arange(f, dtype=torch.float64) - (f - 1) / 2
    return (t.view(1, f, 1) * centroid).sum(dim=1) / (t * t).sum()


def feature_vectors(videos: torch.Tensor) -> torch.Tensor:
    """[B, 12] vectors on comparable scales for the sliced distance.

    Lengths are fractions of the frame times 2 (a full-frame move = 2, like a full swing of a colour
    channel): mean centroid (2), travel = velocity x (F - 1) (2), mean size = sqrt(mass) (1); colour
    in [-1, 1] (3). Defects that real videos never show get weight 4 so that they register:
    wobble (RMS distance of the centroid from its straight-line fit), size change over frames
    (std of sqrt(mass)), the shape statistic (square 1, disc 2/3) and softness. A trajectory is
    summarised by its line rather than listed frame by frame, which keeps the vector short: the
    sliced distance dilutes a difference in one coordinate by about 1 / sqrt(dim).
    """
    feats = video_features(videos)
    _, _, f, h, w = videos.shape
    scale = torch.tensor([2.0 / w, 2.0 / h], dtype=torch.float64)
    centroid = feats["centroid"]  # [B, F, 2]
    vel = velocity(centroid)
    t = torch.arange(f, dtype=torch.float64).view(1, f, 1) - (f - 1) / 2
    fit = centroid.mean(dim=1, keepdim=True) + t * vel[:, None]
    wobble = ((centroid - fit) * scale).pow(2).sum(dim=-1).mean(dim=1).sqrt()
    side = 2.0 * feats["mass"].sqrt() / (h * w) ** 0.5
    return torch.cat([
        feats["colour"], centroid.mean(dim=1) * scale, vel * (f - 1) * scale, side.mean(dim=1, keepdim=True),
        4.0 * wobble[:, None], 4.0 * side.std(dim=1, keepdim=True), 4.0 * feats["shape"][:, None],
        4.0 * feats["softness"][:, None],
    ], dim=1)


def predicted_attributes(videos: torch.Tensor) -> list[Optional[tuple[str, str, str]]]:
    """(colour, shape, direction) read off each video, or None where no shape is visible."""
    feats = video_features(videos)
    palette_names = list(COLOURS)
    palette = torch.tensor([COLOURS[c] for c in palette_names], dtype=torch.float64)
    colour_idx = torch.cdist(feats["colour"], palette).argmin(dim=1)
    vel = velocity(feats["centroid"])
    out = []
    for i in range(videos.shape[0]):
        if float(feats["mass"][i].mean()) < MIN_MASS:
            out.append(None)
            continue
        vx, vy = float(vel[i, 0]), float(vel[i, 1])
        if max(abs(vx), abs(vy)) < MIN_SPEED:
            direction = "still"
        elif abs(vx) >= abs(vy):
            direction = "right" if vx > 0 else "left"
        else:
            direction = "down" if vy > 0 else "up"
        shape = "square" if float(feats["shape"][i]) > SHAPE_SPLIT else "disc"
        out.append((palette_names[int(colour_idx[i])], shape, direction))
    return out


def attribute_accuracy(videos: torch.Tensor, prompts: Sequence[str]) -> dict[str, float]:
    """Fraction of videos whose colour / shape / direction (and all three) match their prompt."""
    if len(prompts) != videos.shape[0]:
        raise ValueError(f"{len(prompts)} prompts for {videos.shape[0]} videos")
    if not prompts:
        raise ValueError("no videos")
    wanted = [parse_prompt(p) for p in prompts]
    got = predicted_attributes(videos)
    hits = {"colour": 0, "shape": 0, "direction": 0, "all": 0}
    for want, have in zip(wanted, got):
        if have is None:
            continue
        ok = [a == b for a, b in zip(want, have)]
        for key, good in zip(("colour", "shape", "direction"), ok):
            hits[key] += good
        hits["all"] += all(ok)
    return {k: v / len(prompts) for k, v in hits.items()}


def _per_prompt_distance(a: torch.Tensor, b: torch.Tensor, prompts_a: Sequence[str],
                         prompts_b: Sequence[str], seed: int) -> float:
    if a.shape[0] != len(prompts_a) or b.shape[0] != len(prompts_b):
        raise ValueError(f"{len(prompts_a)} / {len(prompts_b)} prompts for {a.shape[0]} / {b.shape[0]} samples")
    groups_a, groups_b = {}, {}
    for i, p in enumerate(prompts_a):
        groups_a.setdefault(p, []).append(i)
    for i, p in enumerate(prompts_b):
        groups_b.setdefault(p, []).append(i)
    if set(groups_a) != set(groups_b) or any(len(groups_a[p]) != len(groups_b[p]) for p in groups_a):
        raise ValueError("both sets need the same prompts, each with as many samples in both")
    directions = projection_directions(a.shape[1], NUM_PROJECTIONS, seed)
    dists = [sliced_wasserstein(a[groups_a[p]], b[groups_b[p]], directions) for p in groups_a]
    return sum(dists) / len(dists)


def feature_distance(videos_a: torch.Tensor, videos_b: torch.Tensor, prompts: Sequence[str],
                     prompts_b: Optional[Sequence[str]] = None, seed: int = 0) -> float:
    """Mean over prompts of the sliced W1 between the two sets' feature vectors.

    ``prompts`` label videos_a (and videos_b unless ``prompts_b`` is given); every prompt needs as
    many samples in both sets.
    """
    prompts_b = prompts if prompts_b is None else prompts_b
    return _per_prompt_distance(feature_vectors(videos_a), feature_vectors(videos_b), prompts, prompts_b, seed)


def pixel_distance(videos_a: torch.Tensor, videos_b: torch.Tensor, prompts: Sequence[str],
                   prompts_b: Optional[Sequence[str]] = None, seed: int = 0) -> float:
    """Like ``feature_distance`` on 2 x 2 average-pooled pixels."""
    prompts_b = prompts if prompts_b is None else prompts_b

    def pooled(v: torch.Tensor) -> torch.Tensor:
        return F.avg_pool3d(v.double(), kernel_size=(1, 2, 2)).flatten(1)

    return _per_prompt_distance(pooled(videos_a), pooled(videos_b), prompts, prompts_b, seed)


def video_distance(videos_a: torch.Tensor, videos_b: torch.Tensor, prompts: Sequence[str],
                   prompts_b: Optional[Sequence[str]] = None, seed: int = 0) -> dict[str, float]:
    """{"feature": feature_distance, "pixel": pixel_distance}."""
    return {"feature": feature_distance(videos_a, videos_b, prompts, prompts_b, seed),
            "pixel": pixel_distance(videos_a, videos_b, prompts, prompts_b, seed)}
