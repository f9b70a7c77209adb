"""The layout of a batch of latents: dense ``[B, *sample_shape]`` or packed variable-size sequences.

Methods and rollouts never reduce over hard-coded dims: they ask the batch's ``Latents`` for noise,
for per-sample values laid out against x (a timestep, a noise level), for per-sample means and for
per-frame means. Two layouts:

``DenseLatents``
    Every sample has the same shape: x is ``[B, *sample_shape]`` (the toy lab's ``[B, 2]``, a video
    family's ``[B, C, F, H, W]`` with ``frame_dim = 2``). Per-sample values stay ``[B]`` (broadcast over the
    trailing dims), so a dense batch behaves exactly as plain tensors did.
``PackedLatents``
    Samples of different sizes concatenated along one token axis, as variable-length attention
    consumes them: x is ``[sum(lengths), channels]`` and ``cu_seqlens`` marks where each sample
    starts. Per-sample values are repeated per token (``[N]``), means are taken per segment, so a
    sample's share of a loss does not depend on what it was packed with.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Optional, Tuple

import torch


class Latents(abc.ABC):
    """Shape and reductions of one batch of latents (see the module docstring)."""

    batch_size: int

    @property
    @abc.abstractmethod
    def shape(self) -> Tuple[int, ...]:
        """The shape of the whole batch's tensor."""

    def noise(self, generator: Optional[torch.Generator] = None, device: torch.device = torch.device("cpu"),
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(self.shape, generator=generator, device=device, dtype=dtype)

    def check(self, x: torch.Tensor, name: str = "x") -> None:
        """Raise ValueError unless x has this layout's shape."""
        if tuple(x.shape) != self.shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {self.shape} ({self!r})")

    @abc.abstractmethod
    def per_row(self, values: torch.Tensor) -> torch.Tensor:
        """Per-sample ``values`` ``[B]`` laid out along x's leading dim, so they broadcast against x
        after right-padding with singleton dims (what timesteps and noise levels go through)."""

    @abc.abstractmethod
    def per_sample_mean(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of each sample's elements: ``[B]``."""

    def per_sample_mean_abs(self, x: torch.Tensor) -> torch.Tensor:
        """mean |x| of each sample, laid out to broadcast against x (DMD / SiD normalisers)."""
        means = self.per_row(self.per_sample_mean(x.abs()))
        return means.reshape(means.shape + (1,) * (x.dim() - means.dim()))

    def frame_mean(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of each frame of each sample: ``[B, F]`` (per-frame losses of causal training)."""
        raise _no_frame_axis(self)


def _no_frame_axis(latents: Latents) -> ValueError:
    return ValueError(f"{type(latents).__name__} has no frame axis: per-frame losses need dense video latents "
                      "with frame_dim set")


@dataclass(frozen=True)
class DenseLatents(Latents):
    """``[batch_size, *sample_shape]``; ``frame_dim`` is the frame axis of the full tensor (video: 2)."""

    batch_size: int
    sample_shape: Tuple[int, ...]
    frame_dim: Optional[int] = None

    def __post_init__(self):
        object.__setattr__(self, "sample_shape", tuple(int(s) for s in self.sample_shape))
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.sample_shape or any(s < 1 for s in self.sample_shape):
            raise ValueError(f"sample_shape must be non-empty with sizes >= 1, got {self.sample_shape}")
        if self.frame_dim is not None and not 1 <= self.frame_dim <= len(self.sample_shape):
            raise ValueError(f"frame_dim must index a sample dim (1..{len(self.sample_shape)}), got {self.frame_dim}")

    @property
    def shape(self) -> Tuple[int, ...]:
        return (self.batch_size, *self.sample_shape)

    def per_row(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def per_sample_mean(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=tuple(range(1, x.dim())))

    def frame_mean(self, x: torch.Tensor) -> torch.Tensor:
        return frame_mean(x, self.video_frame_dim())

    def video_frame_dim(self) -> int:
        """``frame_dim``, or a ValueError when these latents have no frame axis."""
        if self.frame_dim is None:
            raise _no_frame_axis(self)
        return self.frame_dim


def frame_mean(x: torch.Tensor, frame_dim: int) -> torch.Tensor:
    """Mean over every dim but the batch (0) and ``frame_dim``: ``[B, F]``."""
    dims = tuple(d for d in range(1, x.dim()) if d != frame_dim)
    return x.mean(dim=dims) if dims else x


def per_frame(values: torch.Tensor, ndim: int, frame_dim: int) -> torch.Tensor:
    """Per-frame ``values`` ``[B, F]`` shaped to broadcast against an ``ndim``-dim tensor whose frames
    lie along ``frame_dim``."""
    shape = [1] * ndim
    shape[0], shape[frame_dim] = values.shape
    return values.reshape(shape)


@dataclass(frozen=True)
class PackedLatents(Latents):
    """``[sum(lengths), channels]``: sample i holds ``lengths[i]`` tokens (rows)."""

    lengths: Tuple[int, ...]
    channels: int

    def __post_init__(self):
        object.__setattr__(self, "lengths", tuple(int(n) for n in self.lengths))
        if not self.lengths or any(n < 1 for n in self.lengths):
            raise ValueError(f"lengths must be non-empty with every sample >= 1 token, got {self.lengths}")
        if self.channels < 1:
            raise ValueError(f"channels must be >= 1, got {self.channels}")

    @property
    def batch_size(self) -> int:  # type: ignore[override]
        return len(self.lengths)

    @property
    def shape(self) -> Tuple[int, ...]:
        return (sum(self.lengths), self.channels)

    def cu_seqlens(self, device: torch.device = torch.device("cpu")) -> torch.Tensor:
        """int32 ``[B + 1]`` offsets of each sample's first token (flash-attention varlen layout)."""
        lengths = torch.tensor((0, *self.lengths), dtype=torch.int64, device=device)
        return lengths.cumsum(0).to(torch.int32)

    def sample_index(self, device: torch.device = torch.device("cpu")) -> torch.Tensor:
        """int64 ``[N]``: the sample each token belongs to."""
        counts = torch.tensor(self.lengths, device=device)
        return torch.repeat_interleave(torch.arange(self.batch_size, device=device), counts)

    def per_row(self, values: torch.Tensor) -> torch.Tensor:
        if values.shape[:1] != (self.batch_size,):
            raise ValueError(f"per-sample values must have leading dim {self.batch_size}, got {tuple(values.shape)}")
        return values[self.sample_index(values.device)]

    def per_sample_mean(self, x: torch.Tensor) -> torch.Tensor:
        self.check(x)
        sums = torch.zeros(self.batch_size, dtype=x.dtype, device=x.device)
        sums = sums.index_add(0, self.sample_index(x.device), x.sum(dim=1))
        counts = torch.tensor(self.lengths, dtype=x.dtype, device=x.device) * self.channels
        return sums / counts

    def split(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """Each sample's ``[lengths[i], channels]`` rows."""
        self.check(x)
        return tuple(torch.split(x, list(self.lengths), dim=0))


def require_dense(latents: Latents, what: str) -> DenseLatents:
    """``latents`` if dense, else a ValueError naming ``what`` needs dense latents."""
    if not isinstance(latents, DenseLatents):
        raise ValueError(f"{what} needs dense latents [B, *sample_shape], got {latents!r}")
    return latents


__all__ = ["Latents", "DenseLatents", "PackedLatents", "require_dense", "frame_mean", "per_frame"]
