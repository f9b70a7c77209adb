"""What the trainer pulls micro-batches from, and the state that puts a resumed run at the same place."""
from __future__ import annotations

from typing import Any, Callable, Dict, Protocol

import torch


class DataSource(Protocol):
    """An endless per-rank stream of batches for ``DistillationMethod`` losses."""

    def next_batch(self) -> Any: ...

    def state_dict(self) -> Dict[str, Any]: ...

    def load_state_dict(self, state: Dict[str, Any]) -> None: ...


class SeededBatchSource:
    """Batches drawn by ``make_batch(generator)`` from a private torch.Generator.

    The data position is the generator state plus the number of batches drawn, so a resumed run
    draws exactly the batches the interrupted one would have.
    """

    def __init__(self, make_batch: Callable[[torch.Generator], Any], seed: int):
        self.make_batch = make_batch
        self.generator = torch.Generator().manual_seed(int(seed))
        self.position = 0

    def next_batch(self) -> Any:
        self.position += 1
        return self.make_batch(self.generator)

    def state_dict(self) -> Dict[str, Any]:
        return {"generator": self.generator.get_state(), "position": self.position}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.position = int(state["position"])
