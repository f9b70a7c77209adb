"""ODE regression pairs on disk: safetensors shards written by tools/generate_ode_pairs.py.

Each shard holds ``trajectory`` [n, K + 1, C, F, H, W] (the teacher ODE's states at the K training
steps, then the clean end), ``steps`` [K] (the timesteps they were stored at, float64) and
``prompt_index`` [n] (the row of the prompt list the pairs were generated from).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Sequence, Union

import torch

SHARD_PATTERN = "ode_pairs_{:05d}.safetensors"


def shard_paths(path: Union[str, os.PathLike]) -> List[Path]:
    """The shards of a pairs directory (or one shard file), sorted; FileNotFoundError when none."""
    path = Path(path)
    paths = sorted(path.glob("ode_pairs_*.safetensors")) if path.is_dir() else [path]
    if not paths or not all(p.is_file() for p in paths):
        raise FileNotFoundError(f"no ODE pair shards (ode_pairs_*.safetensors) at {path}")
    return paths


def load_ode_pairs(paths: Sequence[os.PathLike]) -> Dict[str, torch.Tensor]:
    """Concatenate shards: {trajectory [N, K + 1, ...], steps [K], prompt_index [N]}; steps must agree."""
    from safetensors.torch import load_file

    if not paths:
        raise ValueError("no ODE pair shards given")
    parts = [load_file(str(p)) for p in sorted(paths)]
    steps = parts[0]["steps"]
    for p, part in zip(sorted(paths), parts):
        if not torch.equal(part["steps"], steps):
            raise ValueError(f"{p} was stored at steps {part['steps'].tolist()}, not {steps.tolist()}")
    return {"trajectory": torch.cat([p["trajectory"] for p in parts]), "steps": steps,
            "prompt_index": torch.cat([p["prompt_index"] for p in parts])}
