"""One rank of the ZeRO-3 check of engine/local_weights.py (launched by test_local_weights.py).

    python tests/engine/local_weights_worker.py OUT.pt

A generator (trained two steps, so DeepSpeed has traced it and keeps its small parameters gathered
while the others are partitioned) and a frozen target built alike, both ZeRO-3 partitioned over the ranks. Rank 0 writes the full
weights before and after ``lerp_weights_`` / ``copy_weights_``, the target's output after the update
and after a save / perturb / load round trip of ``local_state``.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megadistill.engine.config import OptimConfig  # noqa: E402
from megadistill.engine.engines import (  # noqa: E402
    build_frozen, build_train_engine, full_state_dict, init_distributed,
)
from megadistill.engine.local_weights import (  # noqa: E402
    copy_weights_, lerp_weights_, load_local_state, local_state,
)
from megadistill.methods.base import Denoiser  # noqa: E402
from megadistill.models.toy.mlp import ToyFlowMLP  # noqa: E402

# Small parameters (biases, < 40 elements) stay gathered once traced; the weights are partitioned.
DS = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 1,
      "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 40}}


def make(seed: int) -> Denoiser:
    torch.manual_seed(seed)
    return Denoiser(ToyFlowMLP(2, 3, hidden=16, depth=2, time_dim=8))


def forward(net: Denoiser) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(4, 2, generator=g), torch.tensor([900.0, 500.0, 100.0, 10.0])
    with torch.no_grad():
        return net.flow(x, t, torch.tensor([0, 1, 2, 3])).clone()


def main(out: str) -> None:
    info = init_distributed()
    gen, target = make(0), make(1)
    engine = build_train_engine(gen, list(gen.parameters()), OptimConfig(lr=1e-2, weight_decay=0.0), DS, "generator")
    build_frozen(target, DS, torch.device("cpu"))
    for _ in range(2):  # trace a step of each, so the small parameters are kept gathered
        loss = gen.flow(torch.randn(2, 2), torch.tensor([500.0, 20.0]), torch.tensor([0, 1])).square().mean()
        engine.backward(loss)
        engine.step()
        forward(target)
    rec = {"gathered": sorted(n for n, p in gen.named_parameters() if p.data.numel() > 0),
           "partitioned": sorted(n for n, p in gen.named_parameters() if p.data.numel() == 0)}
    rec["gen"], rec["target_before"] = full_state_dict(gen), full_state_dict(target)
    lerp_weights_(target, gen, 0.3)
    rec["target_lerp"], rec["out_lerp"] = full_state_dict(target), forward(target)
    saved = local_state(target)
    copy_weights_(target, gen)
    rec["target_copy"], rec["out_copy"] = full_state_dict(target), forward(target)
    fresh = make(2)  # a resumed run: built and partitioned again, loaded before its first forward
    build_frozen(fresh, DS, torch.device("cpu"))
    load_local_state(fresh, saved)
    rec["reloaded"], rec["out_reloaded"] = full_state_dict(fresh), forward(fresh)
    if info.rank == 0:
        torch.save(rec, out)


if __name__ == "__main__":
    main(sys.argv[1])
