"""``model.kernels``: which back-end computes each op, by name, for every network of a run.

Validated when the config loads (an unknown name is an error naming the key and the known ones);
a family resolves the names when it builds its networks (``ops.attention.resolve_backend``: a
back-end that cannot run in this process is refused then) and hands the result to its blocks, so a
built network never changes back-end. RMSNorm, RoPE and the adaLN ops have one back-end today (their
torch references); their fields come with their kernels.
"""
from __future__ import annotations

from dataclasses import dataclass

from .attention import BACKENDS


@dataclass
class KernelsConfig:
    """``attention``: a name of ``ops.attention.BACKENDS`` (auto, sdpa, flex, or a registered kernel)."""

    attention: str = "auto"

    def __post_init__(self):
        if self.attention not in BACKENDS:
            raise ValueError(f"attention: unknown back-end {self.attention!r}; known: {sorted(BACKENDS)}")
