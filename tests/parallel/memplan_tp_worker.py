"""Per-rank parameter sizes of Wan presets after the REAL tensor-parallel split (tensor_parallel.py).

    python tests/parallel/memplan_tp_worker.py OUT.json PRESET:TP [PRESET:TP ...]

Builds each preset on the meta device and applies ``apply_tensor_parallel`` with torch's fake process
group (rank 1 of tp: no communication happens while splitting), then writes {"PRESET:TP": {name:
local numel}}. A separate process, because a default process group is global state.
"""
from __future__ import annotations

import json
import os
import sys

import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megadistill.models.wan.model import build_wan  # noqa: E402
from megadistill.models.wan.parallelize import apply_tensor_parallel  # noqa: E402


def main(out_path: str, cases: list[str]) -> None:
    result = {}
    for case in cases:
        preset, tp = case.rsplit(":", 1)
        if dist.is_initialized():
            dist.destroy_process_group()
        dist.init_process_group("fake", store=FakeStore(), rank=1, world_size=int(tp))
        model = apply_tensor_parallel(build_wan(preset, device="meta"), dist.group.WORLD)
        result[case] = {name: p.numel() for name, p in model.named_parameters()}
    dist.destroy_process_group()
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
