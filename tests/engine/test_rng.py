"""Seeds and RNG state: per-rank / shared streams, and a captured state replays every generator."""
import random

import numpy as np
import pytest
import torch

from megadistill.engine.data_source import SeededBatchSource
from megadistill.engine.rng import capture_rng_state, derive_seed, restore_rng_state, seed_everything


def _draw(gens):
    return (random.random(), float(np.random.rand()), float(torch.rand(())),
            *(float(torch.rand((), generator=g)) for g in gens.values()))


def test_seeds_differ_per_rank_and_name_but_shared_streams_agree():
    assert derive_seed(7, 0) != derive_seed(7, 1) and derive_seed(7, 0, "a") != derive_seed(7, 0, "b")
    draws = []
    for rank in (0, 1):
        per_rank, shared = {"method": torch.Generator()}, {"rollout": torch.Generator()}
        seed_everything(7, rank, per_rank, shared)
        draws.append((_draw(per_rank), float(torch.rand((), generator=shared["rollout"]))))
    assert draws[0][0] != draws[1][0]  # data-dependent randomness differs between ranks
    assert draws[0][1] == draws[1][1]  # structural choices (rollout exit step) agree


def test_capture_restore_replays_everything():
    gens = {"a": torch.Generator().manual_seed(1), "b": torch.Generator().manual_seed(2)}
    seed_everything(3, 0)
    _draw(gens)
    state = capture_rng_state(gens)
    first = _draw(gens)
    _draw(gens)
    restore_rng_state(state, gens)
    assert _draw(gens) == first
    with pytest.raises(ValueError, match=r"no RNG state for generators \['c'\]"):
        restore_rng_state(state, {"c": torch.Generator()})


def test_seeded_batch_source_resumes_at_its_position():
    source = SeededBatchSource(lambda g: torch.randn(3, generator=g), seed=5)
    source.next_batch()
    state = source.state_dict()
    expected = [source.next_batch() for _ in range(2)]
    fresh = SeededBatchSource(lambda g: torch.randn(3, generator=g), seed=99)
    fresh.load_state_dict(state)
    assert fresh.position == 1
    assert all(torch.equal(a, b) for a, b in zip([fresh.next_batch() for _ in range(2)], expected))
