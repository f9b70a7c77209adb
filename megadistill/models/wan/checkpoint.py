"""Wan checkpoints: original <-> diffusers key names, the checked load plan (fused qkv), saving.

Reading never touches the model until the whole plan is checked: every model tensor must have a
source with the right shape, and (strict) every checkpoint tensor must be used; otherwise one error
lists the missing keys, the unexpected keys and the shape mismatches. Tensors are then read one at a
time (safetensors ``safe_open``, ``torch.load(mmap=True)``), so peak memory stays near the model size.
The check alone is ``plan_wan_checkpoint`` (against full shapes given by name), and
``read_planned_tensor`` reads one planned tensor, or one rank's tensor-parallel shard of it from only
that shard's bytes: models/wan/loading.py builds on them to load straight into a meta-device model.

Accepted inputs: ``*.safetensors``, ``*.pth`` / ``*.pt`` / ``*.bin`` / ``*.ckpt``, a sharded
``*.index.json`` (``weight_map``), or a directory holding one of those (diffusers and original Wan
releases both use ``diffusion_pytorch_model*.safetensors``). The key format (original / diffusers) is
detected; wrapper prefixes (``module.``, ``model.``, ``diffusion_model.``) and wrapper components
(``_fsdp_wrapped_module``, ``_checkpoint_wrapped_module``, ``_orig_mod``) are stripped; a fused
``self_attn.qkv`` is built from q/k/v (and split back) as the model needs. The file formats are
megadistill/io/tensors.py's.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from megadistill.io.tensors import (TORCH_SUFFIXES, Index, TensorSource, atomic_write, open_checkpoint, owned_copy,
                                    save_tensors, strip_wrappers)
from megadistill.models.wan.config import to_diffusers_config

KeyFormat = Literal["original", "diffusers"]

# (original, diffusers) name prefixes; "{n}" is a block index. Each key is rewritten by at most one
# rule, matched at a dot boundary, so the norm2 <-> norm3 swap (diffusers' norm2 is the original
# cross-attention norm3) needs no ordering tricks and round-trips exactly.
KEY_RULES: tuple[tuple[str, str], ...] = (
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("head.modulation", "scale_shift_table"),
    ("head.head", "proj_out"),
    ("img_emb.proj.0", "condition_embedder.image_embedder.norm1"),
    ("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj"),
    ("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2"),
    ("img_emb.proj.4", "condition_embedder.image_embedder.norm2"),
    ("img_emb.emb_pos", "condition_embedder.image_embedder.pos_embed"),
    ("blocks.{n}.modulation", "blocks.{n}.scale_shift_table"),
    ("blocks.{n}.ffn.0", "blocks.{n}.ffn.net.0.proj"),
    ("blocks.{n}.ffn.2", "blocks.{n}.ffn.net.2"),
    ("blocks.{n}.norm3", "blocks.{n}.norm2"),
    ("blocks.{n}.norm2", "blocks.{n}.norm3"),
    ("blocks.{n}.self_attn.q", "blocks.{n}.attn1.to_q"),
    ("blocks.{n}.self_attn.k", "blocks.{n}.attn1.to_k"),
    ("blocks.{n}.self_attn.v", "blocks.{n}.attn1.to_v"),
    ("blocks.{n}.self_attn.o", "blocks.{n}.attn1.to_out.0"),
    ("blocks.{n}.self_attn.qkv", "blocks.{n}.attn1.to_qkv"),
    ("blocks.{n}.self_attn.norm_q", "blocks.{n}.attn1.norm_q"),
    ("blocks.{n}.self_attn.norm_k", "blocks.{n}.attn1.norm_k"),
    ("blocks.{n}.cross_attn.q", "blocks.{n}.attn2.to_q"),
    ("blocks.{n}.cross_attn.k", "blocks.{n}.attn2.to_k"),
    ("blocks.{n}.cross_attn.v", "blocks.{n}.attn2.to_v"),
    ("blocks.{n}.cross_attn.o", "blocks.{n}.attn2.to_out.0"),
    ("blocks.{n}.cross_attn.norm_q", "blocks.{n}.attn2.norm_q"),
    ("blocks.{n}.cross_attn.norm_k", "blocks.{n}.attn2.norm_k"),
    ("blocks.{n}.cross_attn.k_img", "blocks.{n}.attn2.add_k_proj"),
    ("blocks.{n}.cross_attn.v_img", "blocks.{n}.attn2.add_v_proj"),
    ("blocks.{n}.cross_attn.norm_k_img", "blocks.{n}.attn2.norm_added_k"),
)

# diffusers drops these on load (``_keys_to_ignore_on_load_unexpected``); so do we.
DIFFUSERS_IGNORED = re.compile(r"(^|\.)norm_added_q(\.|$)")

WRAPPER_CLASSES = ("DataParallel", "DistributedDataParallel", "DeepSpeedEngine")

FUSED_QKV = re.compile(r"^(blocks\.\d+\.self_attn\.)qkv\.(weight|bias)$")


class CheckpointMismatchError(ValueError):
    """A checkpoint whose keys or shapes do not match the model (raised before anything is loaded)."""


def _compile(template: str) -> re.Pattern:
    parts = [re.escape(p) for p in template.split("{n}")]
    return re.compile("^" + r"(\d+)".join(parts) + r"(?=\.|$)")


_RULES = {
    ("original", "diffusers"): [(_compile(o), d) for o, d in KEY_RULES],
    ("diffusers", "original"): [(_compile(d), o) for o, d in KEY_RULES],
}


def convert_key(key: str, src: KeyFormat, dst: KeyFormat) -> str:
    """One key from ``src`` to ``dst`` naming; keys without a rule (patch_embedding.*) are unchanged."""
    if src == dst:
        return key
    for pattern, target in _RULES[(src, dst)]:
        m = pattern.match(key)
        if m:
            return (target.replace("{n}", m.group(1)) if m.groups() else target) + key[m.end():]
    return key


def convert_state_dict(sd: dict, src: KeyFormat, dst: KeyFormat) -> dict:
    """A state dict renamed from ``src`` to ``dst`` key format (tensors shared, not copied)."""
    out = {}
    for key, value in sd.items():
        if src == "diffusers" and DIFFUSERS_IGNORED.search(key):
            continue
        new = convert_key(key, src, dst)
        if new in out:
            raise ValueError(f"key collision converting {src} -> {dst}: two keys map to {new!r}")
        out[new] = value
    return out


def detect_key_format(keys: Iterable[str]) -> KeyFormat:
    """'original' (time_embedding, self_attn, ...) or 'diffusers' (condition_embedder, attn1, ...)."""
    keys = list(keys)
    original = any(k.startswith(("time_embedding.", "text_embedding.", "time_projection.", "head."))
                   or ".self_attn." in k or ".cross_attn." in k for k in keys)
    diffusers = any(k.startswith(("condition_embedder.", "proj_out.", "scale_shift_table"))
                    or ".attn1." in k or ".attn2." in k for k in keys)
    if original == diffusers:
        what = "both" if original else "neither"
        raise ValueError(f"cannot tell the key format: keys look like {what} original Wan and diffusers names "
                         f"(first keys: {keys[:5]})")
    return "original" if original else "diffusers"


# ---------------------------------------------------------------------------------------------- loading


@dataclass
class LoadResult:
    key_format: KeyFormat
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


@dataclass
class _Entry:
    """One original-named tensor: a stored tensor, or one third of a stored fused qkv."""
    stored: str
    shape: tuple[int, ...]
    chunk: Optional[int] = None


def _checkpoint_entries(source: TensorSource) -> tuple[dict[str, _Entry], list[str], KeyFormat]:
    """Original-named, unfused entries of a checkpoint, the stored keys that were dropped, and the format."""
    clean_to_stored = strip_wrappers(source.shapes)
    key_format = detect_key_format(clean_to_stored)
    entries, dropped = {}, []
    for clean, stored in clean_to_stored.items():
        if key_format == "diffusers" and DIFFUSERS_IGNORED.search(clean):
            dropped.append(stored)
            continue
        name = convert_key(clean, key_format, "original")
        shape = source.shapes[stored]
        m = FUSED_QKV.match(name)
        if m and shape[0] % 3 == 0:
            for i, part in enumerate("qkv"):
                entries[f"{m.group(1)}{part}.{m.group(2)}"] = _Entry(stored, (shape[0] // 3,) + shape[1:], i)
        else:
            entries[name] = _Entry(stored, shape)
    return entries, dropped, key_format


def _sources_for(target: str) -> list[str]:
    """Original unfused names that make up one model tensor (three for a fused qkv)."""
    m = FUSED_QKV.match(target)
    if m:
        return [f"{m.group(1)}{p}.{m.group(2)}" for p in "qkv"]
    return [target]


def _fmt(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The WanModel inside torch.compile / DataParallel / DDP / DeepSpeed-engine wrappers."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif type(model).__name__ in WRAPPER_CLASSES and isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            return model


def _model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    tensors = dict(model.named_parameters())
    persistent = set(model.state_dict(keep_vars=True))
    tensors.update({k: v for k, v in model.named_buffers() if k in persistent})
    return tensors


def _assign(model: nn.Module, name: str, value: torch.Tensor):
    """Write a tensor into the model: in place, or by replacement for meta-device parameters."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    current = getattr(module, leaf)
    with torch.no_grad():
        if current.is_meta:
            value = value.to(current.dtype).clone()
            if isinstance(current, nn.Parameter):
                module._parameters[leaf] = nn.Parameter(value, requires_grad=current.requires_grad)
            else:
                module._buffers[leaf] = value
        else:
            current.copy_(value)


@dataclass
class LoadPlan:
    """Where each model tensor comes from, checked against the model's shapes before anything is read.

    ``tensors`` maps a model tensor name to the original unfused names that make it up (three for a
    fused qkv, concatenated on dim 0); ``entries`` says where each of those is stored.
    """
    source: TensorSource
    key_format: KeyFormat
    entries: dict[str, _Entry]
    tensors: dict[str, list[str]]
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def shape(self, name: str) -> tuple[int, ...]:
        """The full shape of model tensor ``name`` as the checkpoint holds it."""
        return _joined_shape([self.entries[p].shape for p in self.tensors[name]])


def _joined_shape(shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    """Shape of the dim-0 concatenation of tensors of these shapes (one: its own, also 0-d)."""
    return shapes[0] if len(shapes) == 1 else (sum(s[0] for s in shapes),) + shapes[0][1:]


def plan_wan_checkpoint(shapes: Mapping[str, Sequence[int]], path: Union[str, os.PathLike, TensorSource],
                        strict: bool = True, model_name: str = "WanModel") -> LoadPlan:
    """Match a checkpoint against model tensors given by name -> FULL (unsharded) shape.

    Raises ``CheckpointMismatchError`` naming every missing / unexpected key and shape mismatch;
    ``strict=False`` tolerates missing and unexpected keys (listed in the plan), never wrong shapes.
    Reads headers only.
    """
    source = path if isinstance(path, TensorSource) else open_checkpoint(path)
    entries, dropped, key_format = _checkpoint_entries(source)

    plan, missing, mismatched, used = {}, [], [], set()
    for name, shape in shapes.items():
        shape = tuple(int(s) for s in shape)
        parts = _sources_for(name)
        if not all(p in entries for p in parts):
            missing.append(name)
            continue
        used.update(parts)
        got = _joined_shape([entries[p].shape for p in parts])
        if any(entries[p].shape[1:] != entries[parts[0]].shape[1:] for p in parts) or got != shape:
            stored = " + ".join(entries[p].stored for p in parts)
            mismatched.append(f"{name} (checkpoint {stored}: {list(got)}, model: {list(shape)})")
            continue
        plan[name] = parts
    unexpected = sorted({entries[k].stored for k in set(entries) - used})

    if mismatched or (strict and (missing or unexpected)):
        lines = [f"checkpoint {source.description} ({key_format} keys) does not match {model_name}:"]
        if missing:
            lines.append(f"  missing ({len(missing)}): {_fmt(missing)}")
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): {_fmt(unexpected)}")
        if mismatched:
            lines.append(f"  shape mismatch ({len(mismatched)}): {_fmt(mismatched)}")
        raise CheckpointMismatchError("\n".join(lines))
    return LoadPlan(source, key_format, entries, plan, missing, unexpected)


def _read_rows(plan: LoadPlan, parts: list[str], start: int, stop: int, rest: Index,
               dtype: Optional[torch.dtype]) -> torch.Tensor:
    """Rows [start, stop) of the dim-0 concatenation of ``parts``, later dims indexed by ``rest``."""
    pieces, offset = [], 0
    for part in parts:
        entry = plan.entries[part]
        rows = entry.shape[0]
        lo, hi = max(start, offset), min(stop, offset + rows)
        if lo < hi:
            base = -offset if entry.chunk is None else entry.chunk * rows - offset  # a third of a stored qkv
            pieces.append(plan.source.read(entry.stored, (slice(base + lo, base + hi),) + rest, dtype))
        offset += rows
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def read_planned_tensor(plan: LoadPlan, name: str, dim: Optional[int] = None, rank: int = 0, size: int = 1,
                        chunks: int = 1, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Model tensor ``name`` as planned (a new tensor, cast to ``dtype`` while it is copied out of the
    file), or (``dim`` given) only rank ``rank``'s shard of ``size`` along ``dim``, the layout of
    ``parallel.tensor_parallel.shard`` (``chunks`` equal parts, each split): only the bytes of that
    shard are read from the file."""
    full = plan.shape(name)
    parts = plan.tensors[name]
    if not full:
        return owned_copy(plan.source.get(plan.entries[parts[0]].stored), dtype)
    if dim is None:
        return _read_rows(plan, parts, 0, full[0], (), dtype)
    if full[dim] % (chunks * size):
        raise ValueError(f"{name}: dim {dim} of size {full[dim]} ({chunks} part(s)) does not split into {size} shards")
    piece = full[dim] // chunks
    local = piece // size
    ranges = [(c * piece + rank * local, c * piece + (rank + 1) * local) for c in range(chunks)]
    if dim == 0:
        shards = [_read_rows(plan, parts, lo, hi, (), dtype) for lo, hi in ranges]
    else:
        rest = [(slice(None),) * (dim - 1) + (slice(lo, hi),) for lo, hi in ranges]
        shards = [_read_rows(plan, parts, 0, full[0], r, dtype) for r in rest]
    return shards[0] if len(shards) == 1 else torch.cat(shards, dim)


def load_wan_checkpoint(model: nn.Module, path: Union[str, os.PathLike], strict: bool = True) -> LoadResult:
    """Load original- or diffusers-named weights into a WanModel (or a WanMoE from its expert folders).

    Raises ``CheckpointMismatchError`` naming every missing / unexpected key and shape mismatch before
    any weight is written; ``strict=False`` tolerates missing and unexpected keys (returned), never
    wrong shapes. Values are cast to the model's parameter dtypes.
    """
    from megadistill.models.wan.model import WanMoE  # model imports nothing from here; keep it that way

    model = unwrap_model(model)
    if isinstance(model, WanMoE):
        results = [load_wan_checkpoint(expert, Path(path) / sub, strict)
                   for sub, expert in (("high_noise_model", model.high_noise_model),
                                       ("low_noise_model", model.low_noise_model))]
        return LoadResult(results[0].key_format,
                          [f"high_noise_model.{k}" for k in results[0].missing]
                          + [f"low_noise_model.{k}" for k in results[1].missing],
                          [f"high_noise_model.{k}" for k in results[0].unexpected]
                          + [f"low_noise_model.{k}" for k in results[1].unexpected])

    shapes = {name: tuple(t.shape) for name, t in _model_tensors(model).items()}
    planned = plan_wan_checkpoint(shapes, path, strict, type(model).__name__)
    source, entries = planned.source, planned.entries

    stored_cache: dict[str, torch.Tensor] = {}
    for name, parts in planned.tensors.items():
        pieces = []
        for p in parts:
            entry = entries[p]
            if entry.chunk is None:
                pieces.append(source.get(entry.stored))
            else:
                # a fused qkv is read once and shared by its three consumers
                full = stored_cache.get(entry.stored)
                if full is None:
                    full = stored_cache[entry.stored] = source.get(entry.stored)
                pieces.append(full.chunk(3, dim=0)[entry.chunk])
        _assign(model, name, pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0))
        if len(stored_cache) > 3:
            stored_cache.clear()
    return LoadResult(planned.key_format, planned.missing, planned.unexpected)


# ---------------------------------------------------------------------------------------------- saving


def wan_state_dict(model: nn.Module, key_format: KeyFormat = "original") -> dict[str, torch.Tensor]:
    """The model's tensors under original (or diffusers) names with any fused qkv split into q, k, v."""
    out = {}
    for name, tensor in unwrap_model(model).state_dict().items():
        m = FUSED_QKV.match(name)
        if m:
            for part, piece in zip("qkv", tensor.chunk(3, dim=0)):
                out[f"{m.group(1)}{part}.{m.group(2)}"] = piece
        else:
            out[name] = tensor
    return convert_state_dict(out, "original", key_format)


def _config_json(model: nn.Module, key_format: KeyFormat) -> Optional[dict]:
    config = getattr(model, "config", None)
    if config is None:
        return None
    if key_format == "diffusers":
        return {"_class_name": "WanTransformer3DModel", **to_diffusers_config(config)}
    return {"_class_name": "WanModel", "model_type": config.model_type, "patch_size": list(config.patch_size),
            "text_len": config.text_len, "in_dim": config.in_dim, "dim": config.dim, "ffn_dim": config.ffn_dim,
            "freq_dim": config.freq_dim, "text_dim": config.text_dim, "out_dim": config.out_dim,
            "num_heads": config.num_heads, "num_layers": config.num_layers, "qk_norm": config.qk_norm,
            "cross_attn_norm": config.cross_attn_norm, "eps": config.eps}


def save_wan_checkpoint(model: nn.Module, path: Union[str, os.PathLike], key_format: KeyFormat = "original",
                        max_shard_size: Optional[Union[int, str]] = None,
                        dtype: Optional[torch.dtype] = None) -> list[Path]:
    """Save a WanModel's weights under original or diffusers names; returns the files written.

    ``path`` ending in .safetensors / .pth / .pt / .bin: one file. Otherwise ``path`` is a directory
    that receives ``diffusion_pytorch_model.safetensors`` (or, with ``max_shard_size``, numbered shards
    plus ``diffusion_pytorch_model.safetensors.index.json``) and a ``config.json`` (diffusers' config for
    diffusers keys, the layout ``WanTransformer3DModel.from_pretrained`` reads; the original Wan config
    otherwise). A WanMoE goes to
    ``path/high_noise_model`` and ``path/low_noise_model`` as in the Wan2.2 release.
    """
    from megadistill.models.wan.model import WanMoE

    path, model = Path(path), unwrap_model(model)
    if isinstance(model, WanMoE):
        return [f for sub, expert in (("high_noise_model", model.high_noise_model),
                                      ("low_noise_model", model.low_noise_model))
                for f in save_wan_checkpoint(expert, path / sub, key_format, max_shard_size, dtype)]

    tensors = {}
    for name, t in wan_state_dict(model, key_format).items():
        tensors[name] = t.detach().to("cpu", dtype) if dtype is not None and t.is_floating_point() else t.detach().cpu()
    written = save_tensors(tensors, path, "diffusion_pytorch_model", max_shard_size)
    if path.suffix in (".safetensors", *TORCH_SUFFIXES):
        return written
    config = _config_json(model, key_format)
    if config is not None:
        cfg_path = path / "config.json"
        atomic_write(cfg_path, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))
        written.append(cfg_path)
    return written
