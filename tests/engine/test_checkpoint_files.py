"""Checkpoint directory protocol: only complete checkpoints are resumed from, whatever ``latest`` says;
keep-last-K pruning; the atomic save sequence (with stand-in engines that write like DeepSpeed's)."""
import json
import os

import pytest
import torch

from megadistill.engine import checkpoint as ckpt


def _complete(root, step, world_size=1):
    path = root / ckpt.step_dir_name(step)
    path.mkdir()
    (path / ckpt.TRAINER_STATE).write_text(json.dumps({"step": step, "world_size": world_size}))
    (path / ckpt.COMPLETE).write_text(json.dumps({"step": step}))
    return str(path)


def test_partial_checkpoint_is_never_latest(tmp_path):
    _complete(tmp_path, 10)
    partial = tmp_path / ckpt.step_dir_name(20)  # killed before its COMPLETE marker
    partial.mkdir()
    (partial / "rank_00000.pt").write_bytes(b"half")
    (tmp_path / ".tmp-step_000000030").mkdir()  # killed before the rename
    (tmp_path / ckpt.LATEST).write_text(ckpt.step_dir_name(20))  # even if the pointer says so
    assert ckpt.find_latest(str(tmp_path)) == str(tmp_path / ckpt.step_dir_name(10))
    assert [s for s, _ in ckpt.complete_checkpoints(str(tmp_path))] == [10]


def test_latest_pointer_wins_over_newer_complete(tmp_path):
    _complete(tmp_path, 10)
    _complete(tmp_path, 20)
    assert ckpt.find_latest(str(tmp_path)).endswith("step_000000020")  # no pointer: newest complete
    (tmp_path / ckpt.LATEST).write_text(ckpt.step_dir_name(10))  # e.g. a run resumed from an older one
    assert ckpt.find_latest(str(tmp_path)).endswith("step_000000010")
    (tmp_path / ckpt.LATEST).write_text("../elsewhere")
    assert ckpt.find_latest(str(tmp_path)).endswith("step_000000020")


def test_nothing_to_resume(tmp_path):
    assert ckpt.find_latest(str(tmp_path / "missing")) is None
    assert ckpt.find_latest(str(tmp_path)) is None
    with pytest.raises(FileNotFoundError, match="COMPLETE"):
        ckpt.read_trainer_state(str(tmp_path))


def test_prune_keeps_last_k_complete_and_drops_temp_dirs(tmp_path):
    for step in (5, 10, 15, 20):
        _complete(tmp_path, step)
    (tmp_path / ".tmp-step_000000025").mkdir()
    ckpt.prune(str(tmp_path), keep_last=2)
    assert sorted(os.listdir(tmp_path)) == ["step_000000015", "step_000000020"]
    ckpt.prune(str(tmp_path), keep_last=0)  # 0 keeps everything
    assert len(os.listdir(tmp_path)) == 2


def test_prune_never_deletes_or_counts_kept_checkpoints(tmp_path):
    for step in (5, 10, 15, 20):
        _complete(tmp_path, step)
    (tmp_path / ckpt.step_dir_name(5) / ckpt.KEEP).write_text("")  # e.g. a progressive stage's end
    (tmp_path / ckpt.step_dir_name(15) / ckpt.KEEP).write_text("")
    ckpt.prune(str(tmp_path), keep_last=1)
    assert sorted(os.listdir(tmp_path)) == ["step_000000005", "step_000000015", "step_000000020"]


class _FakeEngine:
    """Writes and reads a tag directory the way DeepSpeed's save/load_checkpoint does."""

    def __init__(self, value):
        self.value = value

    def save_checkpoint(self, save_dir, tag, save_latest):
        assert not save_latest  # our pointer is the only one
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        torch.save({"value": self.value}, os.path.join(save_dir, tag, "state.pt"))

    def load_checkpoint(self, load_dir, tag, load_optimizer_states, load_lr_scheduler_states):
        path = os.path.join(load_dir, tag, "state.pt")
        self.value = torch.load(path)["value"]
        return path, {}


def test_save_then_load_round_trip_single_rank(tmp_path):
    root = str(tmp_path / "ckpts")
    engines = {"generator": _FakeEngine(1.0), "critic": _FakeEngine(2.0)}
    state = {"world_size": 1, "step": 3, "engines": sorted(engines)}
    for step in (3, 6, 9):
        engines["generator"].value = float(step)
        path = ckpt.save_checkpoint(root, step, engines, {"data": step}, dict(state, step=step), keep_last=2, rank=0)
    assert path.endswith("step_000000009") and ckpt.find_latest(root) == path
    assert sorted(os.listdir(root)) == ["latest", "step_000000006", "step_000000009"]
    # saving the same step again (resumed, then stopped before any step) keeps the existing checkpoint
    ckpt.save_checkpoint(root, 9, engines, {"data": -1}, dict(state, step=9), keep_last=2, rank=0)
    fresh = {"generator": _FakeEngine(0.0), "critic": _FakeEngine(0.0)}
    rank_state, trainer_state = ckpt.load_checkpoint(path, fresh, rank=0, world_size=1)
    assert rank_state == {"data": 9} and trainer_state["step"] == 9
    assert fresh["generator"].value == 9.0 and fresh["critic"].value == 2.0
    with pytest.raises(ValueError, match="written by 1 ranks, this run has 2"):
        ckpt.load_checkpoint(path, fresh, rank=0, world_size=2)
    with pytest.raises(ValueError, match=r"no state for \['discriminator'\]"):
        ckpt.load_checkpoint(path, {"discriminator": _FakeEngine(0.0)}, rank=0, world_size=1)
