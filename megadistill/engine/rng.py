"""Seeds and random-number-generator state: one seed agreed on by all ranks, offset per rank, and
the full RNG state of a rank (python, numpy, torch CPU, accelerator, named generators) for resume."""
from __future__ import annotations

import random
import zlib
from typing import Any, Dict, Mapping, Optional

import numpy as np
import torch
import torch.distributed as dist


def broadcast_seed(seed: int) -> int:
    """Rank 0's seed on every rank (a launcher may hand ranks different configs or clocks)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return int(seed)
    t = torch.tensor([int(seed)], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.broadcast(t, src=0)
    return int(t.item())


def derive_seed(seed: int, rank: int, name: str = "") -> int:
    """Per-rank (and per named stream) seed: seed + rank, decorrelated streams for different names."""
    offset = zlib.crc32(name.encode()) if name else 0
    return (int(seed) + int(rank) + 1_000_003 * offset) % (2**63)


def seed_everything(
    seed: int,
    rank: int,
    generators: Optional[Mapping[str, torch.Generator]] = None,
    shared_generators: Optional[Mapping[str, torch.Generator]] = None,
) -> int:
    """Seed python, numpy, torch (and the accelerator) with seed + rank and each named generator with
    its own per-rank stream; ``shared_generators`` get the same stream on every rank."""
    rank_seed = derive_seed(seed, rank)
    random.seed(rank_seed)
    np.random.seed(rank_seed % 2**32)
    torch.manual_seed(rank_seed)  # also seeds every CUDA device
    for name, gen in (generators or {}).items():
        gen.manual_seed(derive_seed(seed, rank, name))
    for name, gen in (shared_generators or {}).items():
        gen.manual_seed(derive_seed(seed, 0, "shared/" + name))
    return rank_seed


def _accelerator_rng_state() -> Optional[torch.Tensor]:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.get_rng_state()
    return None


def capture_rng_state(generators: Optional[Mapping[str, torch.Generator]] = None) -> Dict[str, Any]:
    """Everything random on this rank, as plain Python / tensors (torch.save-able)."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "accelerator": _accelerator_rng_state(),
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }


def restore_rng_state(state: Dict[str, Any], generators: Optional[Mapping[str, torch.Generator]] = None) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if state.get("accelerator") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["accelerator"])
    saved = state.get("generators", {})
    missing = sorted(set(generators or {}) - set(saved))
    if missing:
        raise ValueError(f"checkpoint has no RNG state for generators {missing} (saved: {sorted(saved)})")
    for name, g in (generators or {}).items():
        g.set_state(saved[name])
