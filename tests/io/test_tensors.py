"""megadistill/io/tensors.py: what save_tensors writes reads back through open_checkpoint, bit for bit,
in every layout (one file, a directory, numbered shards with an index, a torch file)."""
import json

import pytest
import torch

from megadistill.io.tensors import open_checkpoint, parse_size, save_tensors, split_into_shards


def _tensors():
    g = torch.Generator().manual_seed(0)
    fused = torch.randn(6, 4, generator=g)
    return {"a.weight": torch.randn(3, 5, generator=g), "b.bias": torch.arange(7, dtype=torch.int64),
            "c.half": torch.randn(2, 2, generator=g).half(),
            # rows of one storage, as a split fused qkv hands them out
            "q.weight": fused[:2], "k.weight": fused[2:4], "v.weight": fused[4:]}


def _read_all(path):
    source = open_checkpoint(path)
    return {name: source.get(name) for name in source.shapes}


@pytest.mark.parametrize("layout", ["file", "pth", "directory", "shards"])
def test_round_trip(tmp_path, layout):
    tensors = _tensors()
    target = {"file": tmp_path / "w.safetensors", "pth": tmp_path / "w.pth"}.get(layout, tmp_path / "out")
    written = save_tensors(tensors, target, "diffusion_pytorch_model",
                           max_shard_size=100 if layout == "shards" else None)
    if layout == "directory":
        assert [p.name for p in written] == ["diffusion_pytorch_model.safetensors"]
    if layout == "shards":
        names = [p.name for p in written]
        assert names[-1] == "diffusion_pytorch_model.safetensors.index.json"
        assert len(names) > 2 and names[0] == f"diffusion_pytorch_model-00001-of-{len(names) - 1:05d}.safetensors"
        index = json.loads(written[-1].read_text())
        assert set(index["weight_map"]) == set(tensors)
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    back = _read_all(target)
    assert back.keys() == tensors.keys()
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    assert not list(tmp_path.rglob("*.tmp"))  # every file went through its temporary and was renamed


def test_shard_split_and_sizes():
    tensors = {f"t{i}": torch.zeros(10) for i in range(5)}  # 40 bytes each
    assert [list(s) for s in split_into_shards(tensors, 80)] == [["t0", "t1"], ["t2", "t3"], ["t4"]]
    assert [list(s) for s in split_into_shards(tensors, 10)] == [[f"t{i}"] for i in range(5)]  # one too big alone
    assert parse_size("5GB") == 5 * 10**9 and parse_size("1.5 MiB") == int(1.5 * 2**20) and parse_size(7) == 7
    with pytest.raises(ValueError, match="like '5GB'"):
        parse_size("five")


def test_refusals(tmp_path):
    with pytest.raises(ValueError, match="needs a directory"):
        save_tensors(_tensors(), tmp_path / "w.safetensors", max_shard_size="1KB")
    with pytest.raises(ValueError, match="unknown checkpoint file type"):
        open_checkpoint(_touch(tmp_path / "w.txt"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_checkpoint(tmp_path / "absent.safetensors")


def _touch(path):
    path.write_text("")
    return path


def test_a_view_is_written_without_the_rest_of_its_storage(tmp_path):
    fused = torch.randn(300, 100)
    save_tensors({"q.weight": fused[:100]}, tmp_path / "q.pth")
    assert (tmp_path / "q.pth").stat().st_size < 1.1 * 100 * 100 * 4  # not 3x: k and v left out
