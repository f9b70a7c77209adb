"""Training checkpoint -> one full state dict of the generator, its EMA or the critic, and out to disk.

A checkpoint written by ``engine/checkpoint.py`` holds, per trained model, DeepSpeed's
``engine.save_checkpoint`` output (ZeRO partitions of every rank) and, per rank, our EMA shard. Merging
needs neither the original world size nor GPUs: ZeRO stages 1-3 are reassembled from the fp32 master
partitions with DeepSpeed's ``zero_to_fp32`` utilities, stage 0 (no partitions) is read from the model
states file, and the EMA shards are concatenated in rank order and cut back to each tensor's shape
(ema.py's layout). The EMA covers the trainable generator parameters; the generator's other tensors
(frozen parameters, buffers) fill the rest of an EMA state dict.

Tensor parallelism (``parallel.tp`` > 1 in trainer_state.json): DeepSpeed writes one file set per TP
rank (``*mp_rank_XX_*``), each the ZeRO partitions of that rank's TP shard over the sequence_data group.
Each TP rank's shard is reconstructed on its own (zero_to_fp32 on that rank's files only), then the
shards are joined with the partition layout the trainer records (``tensor_parallel``: name -> [dim,
chunks], parallel/tensor_parallel.py's ``unshard``); parameters outside it are replicated and taken
from TP rank 0. The EMA likewise: every rank file records its TP rank and its place in the
sequence_data group; the shards of one TP rank reassemble its TP shard, which is then unsharded. The
result is the unsharded state dict, the same a tp = 1 run of the same weights gives.

Output formats:
    ours       the network's own state dict (a Denoiser's ``net.`` prefix removed): loads with
               ``model.load_state_dict``; any model, not only Wan.
    original   original Wan names (``save_wan_checkpoint``); optional config.json in a directory.
    diffusers  diffusers names plus config.json (``WanTransformer3DModel.from_pretrained`` loads it).
The Wan formats need the network's WanConfig (a preset name or a config.json): the checkpoint holds
weights only.

Every check that can fail (missing or incomplete checkpoint, unknown model, model absent, EMA not
started, Wan format for a non-Wan model) runs before any tensor is merged.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from . import checkpoint as ckpt

MODELS = ("generator", "ema", "critic")
FORMATS = ("ours", "original", "diffusers")
WAN_FORMATS = ("original", "diffusers")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
WRAPPER_PREFIX = "net."  # methods.base.Denoiser holds the network as ``net``
CONFIG_SNAPSHOTS = ("config.yaml", "config.yml", "config.json")
_QKV = re.compile(r"(^|\.)self_attn\.qkv\.(weight|bias)$")


class MergeError(ValueError):
    """A checkpoint or request that cannot be merged (raised before any tensor is read)."""


# ---------------------------------------------------------------------------------------------- reading


@dataclass
class EngineInfo:
    """What one DeepSpeed engine directory holds, read from its (rank 0) model states file."""

    tag: str
    zero_stage: int
    param_shapes: Dict[str, Tuple[int, ...]]  # trainable then frozen, in module order
    trainable: int  # elements of trainable parameters
    frozen: int
    weight_dtype: str  # dtype of the module weights (bf16 when bf16 is enabled)
    master_dtype: Optional[str]  # fp32 masters in the optimizer partitions (ZeRO 1-3), None at stage 0
    tp: int = 1  # tensor-parallel degree: one DeepSpeed file set per TP rank
    tp_partitions: Dict[str, List[int]] = field(default_factory=dict)  # TP-sharded name -> [dim, chunks]


@dataclass
class CheckpointInfo:
    path: str
    step: int
    world_size: int
    zero_stage: int
    tp: int
    engines: Dict[str, EngineInfo]
    ema_started: bool
    rank_files: List[str]
    trainer_state: Dict[str, Any]
    config_snapshot: Optional[str] = None  # a saved run config (file path), if any
    ema: Optional[Dict[str, Any]] = None  # decay, start_step, numel (from rank 0's file)
    rank_state_keys: List[str] = field(default_factory=list)


def resolve_checkpoint(path: Union[str, os.PathLike]) -> str:
    """A complete checkpoint directory: ``path`` itself (a step_* dir) or, for a checkpoint root, the
    one ``latest`` names (or the newest complete one)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    if not os.path.isdir(path):
        raise MergeError(f"{path} is not a directory (pass a step_* checkpoint directory or its root)")
    if ckpt.is_complete(path):
        return path
    if os.path.isfile(os.path.join(path, ckpt.TRAINER_STATE)) or glob.glob(os.path.join(path, "rank_*.pt")):
        raise MergeError(f"{path} is an incomplete checkpoint (no {ckpt.COMPLETE} marker: the save was "
                         "interrupted); merge an earlier complete one")
    latest = ckpt.find_latest(path)
    if latest is None:
        raise MergeError(f"{path} holds no complete checkpoint (no step_* directory with a {ckpt.COMPLETE} marker)")
    return latest


def _model_states_file(engine_dir: str) -> str:
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if os.path.isfile(os.path.join(engine_dir, name)):
            return os.path.join(engine_dir, name)
    raise MergeError(f"{engine_dir}: no DeepSpeed model states file (mp_rank_00_model_states.pt)")


def _load_states(path: str) -> Dict[str, Any]:
    # DeepSpeed's own file (config, optimizer metadata): not weights-only; mmap keeps stage-0 weights on disk.
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def full_shape(shape: Tuple[int, ...], partition: Optional[List[int]], tp: int) -> Tuple[int, ...]:
    """The unsharded shape of a TP rank's ``shape`` (``partition``: [dim, chunks], None if replicated)."""
    if partition is None or tp == 1:
        return tuple(shape)
    out = list(shape)
    out[partition[0]] *= tp
    return tuple(out)


def read_engine_info(path: str, tag: str, tp: int = 1, partitions: Optional[Dict[str, List[int]]] = None) -> EngineInfo:
    """What the engine ``tag`` holds; under tensor parallelism (``tp``, ``partitions``: the trainer's
    recorded layout) the shapes are the unsharded ones."""
    partitions = dict(partitions or {})
    states = _load_states(_model_states_file(os.path.join(path, tag)))
    stage = int(states.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0))
    module = states["module"]
    shapes: Dict[str, Tuple[int, ...]] = {}
    trainable = frozen = 0
    if stage == 0 or states.get("param_shapes") is None:
        for name, t in module.items():
            shapes[name] = full_shape(tuple(t.shape), partitions.get(name), tp)
            trainable += math.prod(shapes[name])
    else:
        for group in states["param_shapes"]:
            for name, shape in group.items():
                shapes[name] = full_shape(tuple(shape), partitions.get(name), tp)
                trainable += math.prod(shapes[name])
        for name, shape in (states.get("frozen_param_shapes") or {}).items():
            shapes[name] = full_shape(tuple(shape), partitions.get(name), tp)
            frozen += math.prod(shapes[name])
    unknown = sorted(set(partitions) - set(shapes))
    if unknown:
        raise MergeError(f"{path}/{tag}: the recorded tensor-parallel layout names tensors the engine does not "
                         f"hold: {unknown[:5]}")
    ds = states.get("ds_config", {})
    if ds.get("bf16", {}).get("enabled"):
        weight_dtype = "bf16"
    elif ds.get("fp16", {}).get("enabled"):
        weight_dtype = "fp16"
    else:
        floats = [t.dtype for t in module.values() if t.is_floating_point()]
        weight_dtype = _dtype_name(floats[0]) if floats else "fp32"
    return EngineInfo(tag, stage, shapes, trainable, frozen, weight_dtype, None if stage == 0 else "fp32", tp,
                      partitions)


def _config_snapshot(path: str, state: Dict[str, Any]) -> Optional[str]:
    for where in (path, os.path.dirname(os.path.abspath(path))):
        for name in CONFIG_SNAPSHOTS:
            if os.path.isfile(os.path.join(where, name)):
                return os.path.join(where, name)
    return "trainer_state.json:config" if "config" in state else None


def read_checkpoint_info(path: Union[str, os.PathLike]) -> CheckpointInfo:
    """Everything a checkpoint holds except the tensors themselves (cheap: metadata files only)."""
    path = resolve_checkpoint(path)
    state = ckpt.read_trainer_state(path)
    world = int(state["world_size"])
    rank_files = [os.path.join(path, ckpt.rank_file(r)) for r in range(world)]
    absent = [f for f in rank_files if not os.path.isfile(f)]
    if absent:
        raise MergeError(f"{path}: written by {world} ranks but rank files are missing: "
                         f"{[os.path.basename(f) for f in absent]}")
    tp = int(state.get("parallel", {}).get("tp", 1))
    layouts = state.get("tensor_parallel", {})
    if tp > 1:
        unrecorded = sorted(set(state["engines"]) - set(layouts))
        if unrecorded:
            raise MergeError(f"{path}: written with tensor parallelism (tp={tp}) but trainer_state.json records no "
                             f"tensor_parallel layout for {unrecorded}: the TP shards cannot be joined")
        for tag in state["engines"]:
            for i in range(tp):
                tp_files = _tp_rank_files(os.path.join(path, tag), i)
                if not tp_files:
                    raise MergeError(f"{path}/{tag}: written with tp={tp} but holds no files of TP rank {i} "
                                     f"(*mp_rank_{i:02d}_*)")
    engines = {tag: read_engine_info(path, tag, tp, layouts.get(tag) if tp > 1 else None) for tag in state["engines"]}
    rank0 = torch.load(rank_files[0], map_location="cpu", weights_only=False, mmap=True)
    ema = None
    if rank0.get("ema") is not None and rank0["ema"].get("shards") is not None:
        layout = rank0["ema"]["layout"]
        partitions = engines["generator"].tp_partitions if "generator" in engines else {}
        ema = {"decay": rank0["ema"]["decay"], "start_step": rank0["ema"]["start_step"],
               "numel": sum(math.prod(full_shape(s, partitions.get(n), tp)) for n, s in layout.items()),
               "tensors": len(layout)}
    return CheckpointInfo(
        path=path, step=int(state["step"]), world_size=world, zero_stage=int(state["zero_stage"]), tp=tp,
        engines=engines,
        ema_started=bool(state.get("ema_started", ema is not None)), rank_files=rank_files, trainer_state=state,
        config_snapshot=_config_snapshot(path, state), ema=ema, rank_state_keys=sorted(rank0),
    )


# ---------------------------------------------------------------------------------------------- merging


def _tp_rank_files(engine_dir: str, tp_rank: int) -> List[str]:
    """DeepSpeed's files of one TP rank (``mp_rank_XX`` in their names), sorted."""
    pattern = re.compile(rf"(^|_)mp_rank_{tp_rank:02d}_")
    return sorted(os.path.join(engine_dir, f) for f in os.listdir(engine_dir) if pattern.search(f))


def merge_engine_tp_rank(path: str, info: EngineInfo, tp_rank: int) -> Dict[str, torch.Tensor]:
    """Full fp32 state dict of TP rank ``tp_rank``'s shard of one engine (its own file set only)."""
    engine_dir = os.path.join(path, info.tag)
    if info.zero_stage == 0:
        states = torch.load(os.path.join(engine_dir, f"mp_rank_{tp_rank:02d}_model_states.pt"), map_location="cpu",
                            weights_only=False)
        return {k: v.detach().clone() for k, v in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if info.tp == 1:
        return {k: v.detach() for k, v in get_fp32_state_dict_from_zero_checkpoint(path, tag=info.tag).items()}
    # zero_to_fp32 reads every *_optim_states.pt of a directory as one dp world: show it one TP rank's.
    with tempfile.TemporaryDirectory(prefix="merge-tp-") as view:
        os.mkdir(os.path.join(view, info.tag))
        for f in _tp_rank_files(engine_dir, tp_rank):
            os.symlink(os.path.abspath(f), os.path.join(view, info.tag, os.path.basename(f)))
        sd = get_fp32_state_dict_from_zero_checkpoint(view, tag=info.tag)
        return {k: v.detach().clone() for k, v in sd.items()}


def unshard_tensor_parallel(per_rank: List[Dict[str, torch.Tensor]],
                            partitions: Dict[str, List[int]]) -> Dict[str, torch.Tensor]:
    """One state dict from the TP ranks' (in TP rank order): sharded tensors joined along their
    recorded dim (per chunk of fused tensors), replicated ones taken from TP rank 0."""
    from megadistill.parallel.tensor_parallel import unshard

    names = list(per_rank[0])
    for rank, sd in enumerate(per_rank[1:], start=1):
        if set(sd) != set(names):
            raise MergeError(f"TP rank {rank} holds other tensors than TP rank 0: "
                             f"{sorted(set(sd) ^ set(names))[:5]}")
    out = {}
    for name in names:
        if name in partitions:
            dim, chunks = partitions[name]
            out[name] = unshard([sd[name] for sd in per_rank], dim, chunks)
        else:
            out[name] = per_rank[0][name]
    return out


def merge_engine(path: str, info: EngineInfo) -> Dict[str, torch.Tensor]:
    """Full fp32 (ZeRO 1-3: the optimizer's masters) state dict of one engine, TP shards joined."""
    if info.tp == 1:
        return merge_engine_tp_rank(path, info, 0)
    return unshard_tensor_parallel([merge_engine_tp_rank(path, info, t) for t in range(info.tp)], info.tp_partitions)


def reassemble_shards(shards: List[torch.Tensor], shape: Tuple[int, ...]) -> torch.Tensor:
    """One tensor from its per-rank padded flat slices (ema.shard_bounds layout), rank order."""
    numel = math.prod(shape)
    flat = torch.cat([s.reshape(-1) for s in shards])
    if flat.numel() < numel:
        raise MergeError(f"EMA shards hold {flat.numel()} elements, the tensor needs {numel}")
    return flat[:numel].reshape(shape).clone()


def merge_ema(info: CheckpointInfo, generator: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The EMA generator: reassembled EMA tensors over the generator's merged state dict."""
    states = [torch.load(f, map_location="cpu", weights_only=False)["ema"] for f in info.rank_files]
    # Each rank file holds the shard of (TP rank, rank in the sequence_data group); without TP that
    # group is the world and the file's rank is the global rank.
    group = info.world_size // info.tp
    by_coord: Dict[Tuple[int, int], Dict[str, Any]] = {}
    for rank, s in enumerate(states):
        if s is None or s["shards"] is None:
            raise MergeError(f"{info.path}: rank {rank} holds no EMA shard")
        coord = (s.get("tp_rank", 0), s["rank"])
        expected = (s.get("tp_size", 1), s["world_size"]) == (info.tp, group)
        if not expected or coord in by_coord or not (0 <= coord[0] < info.tp and 0 <= coord[1] < group):
            raise MergeError(f"{info.rank_files[rank]} holds the EMA shard of rank {s['rank']} of "
                             f"{s['world_size']} (tp rank {coord[0]} of {s.get('tp_size', 1)}), expected one of "
                             f"{group} shards per TP rank with tp={info.tp} ({info.world_size} ranks)")
        by_coord[coord] = s
    partitions = info.engines["generator"].tp_partitions
    per_tp = []
    for t in range(info.tp):
        shards = [by_coord[t, r] for r in range(group)]
        per_tp.append({name: reassemble_shards([s["shards"][name] for s in shards], tuple(shape))
                       for name, shape in shards[0]["layout"].items()})
    ema = unshard_tensor_parallel(per_tp, partitions) if info.tp > 1 else per_tp[0]
    out = dict(generator)
    for name, tensor in ema.items():
        if name not in generator:
            raise MergeError(f"EMA tensor {name!r} is not a generator parameter")
        if tuple(generator[name].shape) != tuple(tensor.shape):
            raise MergeError(f"EMA tensor {name!r} has shape {list(tensor.shape)}, "
                             f"the generator {list(generator[name].shape)}")
        out[name] = tensor
    return out


def strip_wrapper(sd: Dict[str, Any]) -> Dict[str, Any]:
    """The network's own names: a Denoiser's ``net.`` prefix removed when every key has it."""
    if sd and all(k.startswith(WRAPPER_PREFIX) for k in sd):
        return {k[len(WRAPPER_PREFIX):]: v for k, v in sd.items()}
    return dict(sd)


def is_wan(keys) -> bool:
    from megadistill.models.wan.checkpoint import detect_key_format

    try:
        return detect_key_format(list(keys)) == "original"
    except ValueError:
        return False


def check_request(info: CheckpointInfo, model: str, fmt: str) -> str:
    """Validate model / format against the checkpoint; returns the engine tag the model comes from."""
    if model not in MODELS:
        raise MergeError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
    if fmt not in FORMATS:
        raise MergeError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    tag = "generator" if model == "ema" else model
    if tag not in info.engines:
        raise MergeError(f"{info.path} holds no {tag} (it has {sorted(info.engines)})")
    if model == "ema" and info.ema is None:
        raise MergeError(f"{info.path} holds no EMA (disabled, or step {info.step} < its start step)")
    if fmt in WAN_FORMATS and not is_wan(strip_wrapper(info.engines[tag].param_shapes)):
        raise MergeError(f"--format {fmt} is for Wan models, but the {tag} in {info.path} is not a Wan DiT "
                         "(its keys have no Wan names); use --format ours")
    return tag


def merged_state_dict(checkpoint: Union[str, os.PathLike, CheckpointInfo],
                      model: str = "generator") -> Dict[str, torch.Tensor]:
    """The full state dict of ``model`` in our key names (the network's own, no Denoiser prefix)."""
    info = checkpoint if isinstance(checkpoint, CheckpointInfo) else read_checkpoint_info(checkpoint)
    tag = check_request(info, model, "ours")
    sd = merge_engine(info.path, info.engines[tag])
    if model == "ema":
        sd = merge_ema(info, sd)
    return strip_wrapper(sd)


# ---------------------------------------------------------------------------------------------- writing


def load_wan_config(spec: str):
    """A WanConfig from a preset name, our original-format config.json or a diffusers config.json."""
    from megadistill.models.wan.config import PRESETS, WanConfig, from_diffusers_config, wan_config

    if spec in PRESETS:
        return wan_config(spec)
    if not os.path.isfile(spec):
        raise MergeError(f"--wan-config {spec!r} is neither a Wan preset ({', '.join(PRESETS)}) nor a file")
    with open(spec) as f:
        data = json.load(f)
    if data.get("_class_name") == "WanTransformer3DModel" or "num_attention_heads" in data:
        return from_diffusers_config(data)
    fields = {f.name for f in dataclasses.fields(WanConfig)}
    return WanConfig(**{k: v for k, v in data.items() if k in fields})


MODEL_CONFIG_KEY = "model_configs"  # trainer_state.json: {"generator": WanConfig fields, "critic": ...}


def wan_config_from_checkpoint(info: "CheckpointInfo", model: str):
    """The WanConfig the training job saved for ``model`` (the EMA is the generator's), or None."""
    from megadistill.models.wan.config import WanConfig

    role = "generator" if model == "ema" else model
    saved = info.trainer_state.get(MODEL_CONFIG_KEY, {}).get(role)
    if saved is None:
        return None
    fields = {f.name for f in dataclasses.fields(WanConfig)}
    return WanConfig(**{k: v for k, v in saved.items() if k in fields})


def build_wan_from_state_dict(sd: Dict[str, torch.Tensor], config):
    """A WanModel (or WanMoE) of ``config`` whose tensors are ``sd`` (built on meta, then assigned:
    no second copy of the weights). A config that does not fit the weights fails here, naming keys."""
    from megadistill.models.wan.model import build_wan

    if any(_QKV.search(k) for k in sd) and not config.fused_qkv:
        config = config.replace(fused_qkv=True)
    model = build_wan(config, device="meta")
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    wrong = [f"{k} {list(sd[k].shape)} vs {list(expected[k].shape)}" for k in expected
             if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        raise MergeError(f"the weights do not fit the Wan config: missing {missing[:5]}, unexpected {unexpected[:5]}, "
                         f"shape mismatch {wrong[:5]}")
    model.load_state_dict(sd, assign=True)
    return model


def write_safetensors(tensors: Dict[str, torch.Tensor], out: Union[str, os.PathLike],
                      max_shard_size: Optional[Union[int, str]] = None, progress: bool = True) -> List[Path]:
    """Our format: ``out.safetensors`` (one file) or a directory with ``model.safetensors`` or numbered
    shards plus ``model.safetensors.index.json`` (the Hugging Face layout)."""
    from megadistill.io.tensors import save_tensors

    if max_shard_size is not None and Path(out).suffix:
        raise MergeError("--max-shard-size needs a directory output, not a .safetensors file")
    return save_tensors(tensors, out, "model", max_shard_size, progress)


def cast(sd: Dict[str, torch.Tensor], dtype: Optional[torch.dtype], progress: bool = True) -> Dict[str, torch.Tensor]:
    from tqdm.auto import tqdm

    out = {}
    for name, t in tqdm(sd.items(), total=len(sd), desc="preparing tensors", unit="tensor", disable=not progress):
        out[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return out


def expected_tensors(sd: Dict[str, torch.Tensor], fmt: str, dtype: Optional[torch.dtype],
                     config=None) -> Dict[str, torch.Tensor]:
    """What the files of ``fmt`` must hold: the merged tensors renamed (Wan formats: q/k/v split)
    and cast, computed independently of the writer so --verify checks the written bytes."""
    if fmt == "ours":
        return cast(sd, dtype, progress=False)
    from megadistill.models.wan.checkpoint import wan_state_dict

    return cast(wan_state_dict(build_wan_from_state_dict(sd, config), fmt), dtype, progress=False)


@dataclass
class VerifyReport:
    tensors: int
    elements: int
    mismatched: List[str]
    missing: List[str]
    unexpected: List[str]
    max_abs_diff: float

    @property
    def ok(self) -> bool:
        return not (self.mismatched or self.missing or self.unexpected)

    def summary(self) -> str:
        head = "verify OK" if self.ok else "verify FAILED"
        text = (f"{head}: {self.tensors} tensors, {self.elements:,} elements compared; "
                f"max |difference| {self.max_abs_diff:.3g}")
        for label, keys in (("mismatched", self.mismatched), ("missing", self.missing),
                            ("unexpected", self.unexpected)):
            if keys:
                text += f"\n  {label} ({len(keys)}): {', '.join(keys[:10])}"
        return text


def verify_files(written: List[Path], expected: Dict[str, torch.Tensor]) -> VerifyReport:
    """Reload the written file(s) and compare every tensor (dtype, shape, values) with ``expected``."""
    from megadistill.io.tensors import open_checkpoint

    index = [p for p in written if p.name.endswith(".index.json")]
    weights = [p for p in written if p.suffix == ".safetensors"]
    source = open_checkpoint(index[0] if index else weights[0])
    stored = set(source.shapes)
    mismatched, max_diff, elements = [], 0.0, 0
    for name in sorted(stored & set(expected)):
        got, want = source.get(name), expected[name]
        elements += want.numel()
        if got.dtype != want.dtype or got.shape != want.shape:
            mismatched.append(f"{name} ({got.dtype} {list(got.shape)} vs {want.dtype} {list(want.shape)})")
            continue
        if want.numel():
            max_diff = max(max_diff, float((got.double() - want.double()).abs().max()))
        if not torch.equal(got, want):
            mismatched.append(name)
    return VerifyReport(len(stored & set(expected)), elements, mismatched, sorted(set(expected) - stored),
                        sorted(stored - set(expected)), max_diff)


@dataclass
class MergeResult:
    written: List[Path]
    info: CheckpointInfo
    tensors: int
    report: Optional[VerifyReport] = None


def merge_checkpoint(path: Union[str, os.PathLike], out: Union[str, os.PathLike], model: str = "generator",
                     fmt: str = "ours", wan_config: Optional[str] = None,
                     max_shard_size: Optional[Union[int, str]] = None, dtype: Optional[str] = None,
                     verify: bool = False, progress: bool = True) -> MergeResult:
    """Merge ``model`` of the checkpoint at ``path`` and write it to ``out`` in ``fmt``."""
    torch_dtype = None
    if dtype is not None:
        if dtype not in DTYPES:
            raise MergeError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        torch_dtype = DTYPES[dtype]
    if max_shard_size is not None:
        from megadistill.io.tensors import parse_size

        parse_size(max_shard_size)  # a bad size fails now, not after the merge
    config = None
    if fmt in WAN_FORMATS:
        if wan_config is not None:
            config = load_wan_config(wan_config)
        if fmt == "diffusers" and Path(out).suffix:
            raise MergeError("--format diffusers writes a directory (weights + config.json); pass a directory")
    info = read_checkpoint_info(path)
    check_request(info, model, fmt)
    if fmt in WAN_FORMATS and config is None:
        config = wan_config_from_checkpoint(info, model)
        if config is None:
            raise MergeError(f"--format {fmt} needs --wan-config (a Wan preset name or a config.json): this "
                             f"checkpoint does not record the {model} model's config")
    sd = merged_state_dict(info, model)

    if fmt == "ours":
        written = write_safetensors(cast(sd, torch_dtype, progress), out, max_shard_size, progress)
    else:
        from megadistill.models.wan.checkpoint import save_wan_checkpoint

        wan = build_wan_from_state_dict(cast(sd, None, progress), config)
        written = save_wan_checkpoint(wan, out, key_format=fmt, max_shard_size=max_shard_size, dtype=torch_dtype)
    result = MergeResult([Path(p) for p in written], info, len(sd))
    if verify:
        result.report = verify_files(result.written, expected_tensors(sd, fmt, torch_dtype, config))
    return result


# ---------------------------------------------------------------------------------------------- inspecting


def format_info(info: CheckpointInfo) -> str:
    """A readable summary of a checkpoint (inspect_checkpoint.py prints it)."""
    lines = [
        f"checkpoint   {info.path}",
        f"step         {info.step}",
        f"world size   {info.world_size}" + (f" (tensor parallel: {info.tp} shards)" if info.tp > 1 else ""),
        f"ZeRO stage   {info.zero_stage}",
        f"models       {', '.join(sorted(info.engines))}",
    ]
    for tag, e in sorted(info.engines.items()):
        total = e.trainable + e.frozen
        master = ", fp32 master partitions" if e.master_dtype else ""
        lines.append(f"  {tag:<10} {total:,} parameters in {len(e.param_shapes)} tensors "
                     f"({e.trainable:,} trainable, {e.frozen:,} frozen); weights {e.weight_dtype}{master}")
    if info.ema is None:
        lines.append("EMA          absent" + (" (not started yet)" if not info.ema_started else ""))
    else:
        lines.append(f"EMA          present: {info.ema['numel']:,} elements in {info.ema['tensors']} tensors, "
                     f"decay {info.ema['decay']}, start step {info.ema['start_step']}, "
                     f"sharded over {info.world_size} rank(s)")
    lines.append(f"RNG state    {'present' if 'rng' in info.rank_state_keys else 'absent'} "
                 f"({info.world_size} rank file(s))")
    lines.append(f"data state   {'present' if 'data' in info.rank_state_keys else 'absent'}")
    lines.append(f"config       {info.config_snapshot or 'no snapshot saved'}")
    extra = {k: v for k, v in info.trainer_state.items()
             if k not in ("step", "world_size", "zero_stage", "engines", "ema_started", "config", "tensor_parallel")}
    if extra:
        lines.append("trainer      " + ", ".join(f"{k}={v}" for k, v in sorted(extra.items())))
    return "\n".join(lines)
