"""Weight files: lazy reading of safetensors / torch files and sharded indexes, atomic sharded writing.

Reading: ``open_checkpoint(path)`` gives a ``TensorSource`` (names, shapes, one tensor or one slice
of it at a time) for a ``*.safetensors`` file, a ``*.pth`` / ``*.pt`` / ``*.bin`` / ``*.ckpt`` state
dict (also inside one ``state_dict`` / ``module`` / ``model`` container), a sharded ``*.index.json``
(``weight_map``) or a directory holding one of them; ``strip_wrappers`` maps keys saved through FSDP,
activation-checkpoint or compile wrappers (and a shared ``module.`` / ``model.`` /
``diffusion_model.`` prefix) to clean names. Writing: ``save_tensors`` writes one file or, with a
shard size, numbered shards plus the Hugging Face ``<stem>.safetensors.index.json``; each file goes
through a temporary file and a rename, so a crash never leaves half a file. Model families build their
key rules and loaders on this (models/wan/checkpoint.py); engine/merge.py writes with it.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch

WRAPPER_COMPONENTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")
LEADING_PREFIXES = ("module.", "model.", "diffusion_model.")
CONTAINER_KEYS = ("state_dict", "module", "model")
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def strip_wrappers(keys: Iterable[str]) -> Dict[str, str]:
    """{clean key: stored key}: drops FSDP / activation-checkpoint / compile wrapper components anywhere
    and leading ``module.`` / ``model.`` / ``diffusion_model.`` prefixes shared by all keys."""
    cleaned = {}
    for key in keys:
        cleaned[".".join(p for p in key.split(".") if p not in WRAPPER_COMPONENTS)] = key
    if len(cleaned) != len(set(cleaned.values())):
        raise ValueError("stripping wrapper components makes two checkpoint keys collide")
    changed = True
    while changed and cleaned:
        changed = False
        for prefix in LEADING_PREFIXES:
            if all(k.startswith(prefix) for k in cleaned):
                cleaned = {k[len(prefix):]: v for k, v in cleaned.items()}
                changed = True
    return cleaned


# ---------------------------------------------------------------------------------------------- reading


Index = Tuple[slice, ...]


class TensorSource:
    """Names, shapes and lazy tensor access of one checkpoint (single file or sharded)."""

    def __init__(self, description: str):
        self.description = description
        self.shapes: Dict[str, Tuple[int, ...]] = {}
        self._getters: Dict[str, Callable[[], torch.Tensor]] = {}
        self._slicers: Dict[str, Callable[[Index, Optional[torch.dtype]], torch.Tensor]] = {}

    def add(self, name: str, shape, getter: Callable[[], torch.Tensor],
            slicer: Optional[Callable[[Index, Optional[torch.dtype]], torch.Tensor]] = None):
        """``slicer(index, dtype)`` reads part of the tensor without reading the rest (default: read it
        all, then index)."""
        if name in self.shapes:
            raise ValueError(f"{self.description}: tensor {name!r} appears twice")
        self.shapes[name] = tuple(int(s) for s in shape)
        self._getters[name] = getter
        if slicer is not None:
            self._slicers[name] = slicer

    def get(self, name: str) -> torch.Tensor:
        return self._getters[name]()

    def read(self, name: str, index: Index, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """``tensor[index]`` (basic slices, one per leading dim) as a new tensor owning its memory, cast
        to ``dtype`` in the same copy."""
        slicer = self._slicers.get(name)
        return slicer(index, dtype) if slicer is not None else owned_copy(self.get(name)[index], dtype)


def owned_copy(t: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """A copy of ``t`` (cast to ``dtype``): one new tensor, whatever the cast."""
    return t.clone() if dtype is None or dtype == t.dtype else t.to(dtype)


def _read_safetensors(path: Path, name: str, index: Optional[Index] = None,
                      dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """One tensor (or ``tensor[index]``) of a safetensors file, copied out of the file.

    safetensors maps the file and hands out views of that mapping: copy, so the result owns its memory
    (a model must not depend on the file staying as it is), through a short-lived handle, so the
    mapping goes away at once: its touched pages count in the resident set for as long as it lives
    (a handle kept for a whole load doubles the peak)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as handle:
        return owned_copy(handle.get_tensor(name) if index is None else handle.get_slice(name)[index], dtype)


def _add_safetensors(source: TensorSource, path: Path, names: Optional[set] = None):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as handle:
        shapes = {name: handle.get_slice(name).get_shape() for name in handle.keys()}
    for name, shape in shapes.items():
        if names is None or name in names:
            source.add(name, shape, lambda n=name: _read_safetensors(path, n),
                       lambda index, dtype, n=name: _read_safetensors(path, n, index, dtype))


def _load_torch_dict(path: Path) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # files written with the legacy (non-zip) serialisation cannot be mmapped
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(obj).__name__}")
    while not all(isinstance(v, torch.Tensor) for v in obj.values()):
        containers = [k for k in CONTAINER_KEYS if isinstance(obj.get(k), dict)]
        if len(containers) != 1:
            raise ValueError(f"{path}: not a flat state dict and no single container key among "
                             f"{CONTAINER_KEYS} (top-level keys: {list(obj)[:10]})")
        obj = obj[containers[0]]
    return obj


def _add_torch(source: TensorSource, path: Path, names: Optional[set] = None):
    for name, tensor in _load_torch_dict(path).items():
        if names is None or name in names:
            source.add(name, tensor.shape, lambda t=tensor: t, lambda index, dtype, t=tensor: owned_copy(t[index], dtype))


def _add_file(source: TensorSource, path: Path, names: Optional[set] = None):
    if path.suffix == ".safetensors":
        _add_safetensors(source, path, names)
    elif path.suffix in TORCH_SUFFIXES:
        _add_torch(source, path, names)
    else:
        raise ValueError(f"{path}: unknown checkpoint file type (want .safetensors, {', '.join(TORCH_SUFFIXES)})")


def _find_in_directory(path: Path) -> Path:
    for pattern in ("*.safetensors.index.json", "*.index.json", "*.safetensors", *("*" + s for s in TORCH_SUFFIXES)):
        found = sorted(path.glob(pattern))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            names = [p.name for p in found]
            preferred = [p for p in found if p.name.startswith("diffusion_pytorch_model")]
            if len(preferred) == 1:
                return preferred[0]
            raise ValueError(f"{path}: several checkpoint candidates {names}; pass the file or index to load")
    raise FileNotFoundError(f"{path}: no checkpoint (*.safetensors, *.index.json, *.pth, *.bin) in this directory")


def open_checkpoint(path: Union[str, os.PathLike]) -> TensorSource:
    """A lazy view of a checkpoint file, sharded index json, or a directory holding one of them."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        path = _find_in_directory(path)
    source = TensorSource(str(path))
    if path.name.endswith(".json"):
        weight_map = json.loads(path.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{path}: an index json needs a 'weight_map' of tensor name -> file")
        by_file: Dict[str, set] = {}
        for name, file in weight_map.items():
            by_file.setdefault(file, set()).add(name)
        for file, names in by_file.items():
            shard = path.parent / file
            if not shard.exists():
                raise FileNotFoundError(f"{path}: shard {file} is listed in the index but missing")
            _add_file(source, shard, names)
        absent = set(weight_map) - set(source.shapes)
        if absent:
            raise ValueError(f"{path}: {len(absent)} tensors in the index are absent from their shards, "
                             f"e.g. {sorted(absent)[:5]}")
    else:
        _add_file(source, path)
    return source


# ---------------------------------------------------------------------------------------------- writing


def split_into_shards(tensors: Dict[str, torch.Tensor], limit: int) -> List[Dict[str, torch.Tensor]]:
    """Greedy split in key order; a shard exceeds ``limit`` only when one tensor alone does."""
    shards, current, current_size = [], {}, 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        if current and current_size + size > limit:
            shards.append(current)
            current, current_size = {}, 0
        current[name] = t
        current_size += size
    shards.append(current)
    return shards


def parse_size(size: Union[int, str]) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(size), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size must be bytes or like '5GB', got {size!r}")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * scale)


def atomic_write(path: Path, write: Callable[[str], None]):
    """Write via a temporary file in the same directory, then rename: a crash never leaves half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_tensor_file(path: Path, tensors: Dict[str, torch.Tensor]):
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    elif path.suffix in TORCH_SUFFIXES:
        atomic_write(path, lambda tmp: torch.save(tensors, tmp))
    else:
        raise ValueError(f"{path}: save to .safetensors or one of {TORCH_SUFFIXES}, or to a directory")


def _standalone(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous and owning its whole storage, so a file never holds more than the tensor (a torch
    file stores a view's whole storage: the q rows of a fused qkv would carry k and v)."""
    t = t.detach().contiguous()
    return t.clone() if t.untyped_storage().nbytes() != t.numel() * t.element_size() else t


def save_tensors(tensors: Dict[str, torch.Tensor], path: Union[str, os.PathLike], stem: str = "model",
                 max_shard_size: Optional[Union[int, str]] = None, progress: bool = False) -> List[Path]:
    """Write ``tensors``; returns the files written. ``path`` ending in .safetensors / .pth / .pt / .bin /
    .ckpt: that one file. Otherwise a directory receiving ``<stem>.safetensors``, or with
    ``max_shard_size`` numbered ``<stem>-0000i-of-0000n.safetensors`` shards plus
    ``<stem>.safetensors.index.json`` (the Hugging Face layout)."""
    from tqdm.auto import tqdm

    path = Path(path)
    limit = None if max_shard_size is None else parse_size(max_shard_size)
    tensors = {name: _standalone(t) for name, t in tensors.items()}
    if path.suffix in (".safetensors", *TORCH_SUFFIXES):
        if limit is not None:
            raise ValueError("max_shard_size needs a directory path, not a single file")
        path.parent.mkdir(parents=True, exist_ok=True)
        write_tensor_file(path, tensors)
        return [path]
    path.mkdir(parents=True, exist_ok=True)
    shards = [tensors] if limit is None else split_into_shards(tensors, limit)
    files = ([path / f"{stem}.safetensors"] if limit is None else
             [path / f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    bar = tqdm(total=len(tensors), desc="writing tensors", unit="tensor", disable=not progress)
    for file, shard in zip(files, shards):
        write_tensor_file(file, shard)
        bar.update(len(shard))
    bar.close()
    written = list(files)
    if limit is not None:
        weight_map = {name: file.name for file, shard in zip(files, shards) for name in shard}
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = path / f"{stem}.safetensors.index.json"
        text = json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        atomic_write(index, lambda tmp: Path(tmp).write_text(text))
        written.append(index)
    return written
