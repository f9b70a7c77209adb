"""Atomic, complete, resumable training checkpoints.

Layout of ``<root>`` (a directory every rank can see)::

    step_000000100/
        generator/ critic/       DeepSpeed engine.save_checkpoint: ZeRO partitions of weights,
                                 optimizer and LR scheduler of every rank
        rank_00000.pt ...        per rank: EMA shard, RNG states, data position
        trainer_state.json       step counters, world size, ZeRO stage
        KEEP                     optional: never pruned (e.g. the end of a progressive stage)
        COMPLETE                 written last, before the rename
    latest                       name of the newest complete checkpoint, replaced atomically
    .tmp-step_000000200/         a save in progress (or killed): never read

A save writes into ``.tmp-<name>``, waits for every rank, then rank 0 writes COMPLETE, renames the
directory into place (atomic on POSIX) and only then replaces ``latest``. A checkpoint without
COMPLETE is never resumed from, whatever ``latest`` says. Old complete checkpoints beyond
``keep_last`` and stale temporary directories are deleted after the new one is in place.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.distributed as dist

COMPLETE = "COMPLETE"
KEEP = "KEEP"
LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
TMP_PREFIX = ".tmp-"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step_{step:09d}"


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETE))


def complete_checkpoints(root: str) -> List[Tuple[int, str]]:
    """(step, path) of every complete checkpoint under root, oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        path = os.path.join(root, name)
        if m and os.path.isdir(path) and is_complete(path):
            found.append((int(m.group(1)), path))
    return sorted(found)


def find_latest(root: str) -> Optional[str]:
    """The checkpoint to resume from: what ``latest`` names if complete, else the newest complete."""
    pointer = os.path.join(root, LATEST)
    if os.path.isfile(pointer):
        with open(pointer) as f:
            name = f.read().strip()
        path = os.path.join(root, name)
        if _STEP_DIR.match(name) and os.path.isdir(path) and is_complete(path):
            return path
    done = complete_checkpoints(root)
    return done[-1][1] if done else None


def _fsync_write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def prune(root: str, keep_last: int) -> List[str]:
    """Delete complete checkpoints beyond the newest ``keep_last`` (0 keeps all; those marked KEEP
    are neither deleted nor counted) and stale temp dirs."""
    removed = []
    done = [(step, path) for step, path in complete_checkpoints(root) if not os.path.isfile(os.path.join(path, KEEP))]
    if keep_last > 0:
        for _, path in done[:-keep_last]:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    for name in os.listdir(root):
        if name.startswith(TMP_PREFIX):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            removed.append(os.path.join(root, name))
    return removed


def save_checkpoint(
    root: str,
    step: int,
    engines: Mapping[str, Any],
    rank_state: Dict[str, Any],
    trainer_state: Dict[str, Any],
    keep_last: int,
    rank: int,
    keep: bool = False,
) -> str:
    """Collective: every rank calls it. Returns the final checkpoint path; ``keep`` marks it KEEP
    (never pruned)."""
    name = step_dir_name(step)
    final = os.path.join(root, name)
    tmp = os.path.join(root, TMP_PREFIX + name)
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a save that was killed
        os.makedirs(tmp)
    _barrier()
    already = is_complete(final)  # resumed and stopped again before any step: same state
    if not already:
        for tag, engine in engines.items():
            engine.save_checkpoint(tmp, tag=tag, save_latest=False)
        torch.save(rank_state, os.path.join(tmp, rank_file(rank)))
    _barrier()
    if rank == 0:
        if not already:
            _fsync_write(os.path.join(tmp, TRAINER_STATE), json.dumps(trainer_state, indent=2, sort_keys=True))
            if keep:
                _fsync_write(os.path.join(tmp, KEEP), "kept whatever train.keep_last says\n")
            _fsync_write(os.path.join(tmp, COMPLETE), json.dumps({"step": step}))
            os.rename(tmp, final)
            _fsync_dir(root)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        pointer_tmp = os.path.join(root, TMP_PREFIX + LATEST)
        _fsync_write(pointer_tmp, name)
        os.replace(pointer_tmp, os.path.join(root, LATEST))
        _fsync_dir(root)
        prune(root, keep_last)
    _barrier()
    return final


def read_trainer_state(path: str) -> Dict[str, Any]:
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE} marker)")
    with open(os.path.join(path, TRAINER_STATE)) as f:
        return json.load(f)


def load_checkpoint(path: str, engines: Mapping[str, Any], rank: int, world_size: int) -> Tuple[Dict, Dict]:
    """Load engines (weights, optimizer, LR scheduler) in place; return (rank_state, trainer_state)."""
    state = read_trainer_state(path)
    if state["world_size"] != world_size:
        raise ValueError(
            f"checkpoint {path} was written by {state['world_size']} ranks, this run has {world_size}; "
            "resume with the same world size"
        )
    missing = sorted(set(engines) - set(state["engines"]))
    if missing:
        raise ValueError(f"checkpoint {path} holds no state for {missing} (it has {state['engines']})")
    for tag, engine in engines.items():
        loaded, _ = engine.load_checkpoint(path, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
        if loaded is None:
            raise FileNotFoundError(f"DeepSpeed could not load '{tag}' from {path}")
    # Our own per-rank file (RNG tuples, EMA shards): not loadable with weights_only.
    rank_state = torch.load(os.path.join(path, rank_file(rank)), map_location="cpu", weights_only=False)
    return rank_state, state
