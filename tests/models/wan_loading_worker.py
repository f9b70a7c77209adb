"""Checkpoints for the meta-device loading tests, and one rank of their tensor-parallel check.

``write_checkpoints(dir)`` writes one small checkpoint per case of ``CASES`` (original and diffusers
names, single file, sharded index, .pth, a stored fused qkv, the A14B expert folders). Launched as
a script (2 gloo ranks, through tests/helpers/ranks.py), each rank loads every case both ways, the
current path (build_wan, load_wan_checkpoint, apply_tensor_parallel) and ``load_wan`` (meta, TP,
this rank's slices), and records whether the two are identical; test_wan_loading.py asserts on
``<out>/rank<r>.pt``.
"""
from __future__ import annotations

import sys
import traceback
from pathlib import Path

import torch
from safetensors.torch import save_file

from megadistill.models.wan import build_wan, convert_state_dict, load_wan_checkpoint, save_wan_checkpoint, wan_state_dict

TEXT_LEN = 16
# name -> (preset, WanConfig overrides, checkpoint path relative to the checkpoint dir)
CASES = {
    "t2v_original": ("tiny-t2v", {}, "t2v.safetensors"),
    "t2v_pth": ("tiny-t2v", {}, "t2v.pth"),
    "ti2v_diffusers_sharded": ("tiny-ti2v", {}, "ti2v"),
    "i2v_diffusers": ("tiny-i2v", {}, "i2v.safetensors"),
    "fused_from_separate_qkv": ("tiny-t2v", dict(fused_qkv=True), "t2v.safetensors"),
    "separate_from_stored_qkv": ("tiny-t2v", {}, "stored_qkv.safetensors"),
    "fused_from_stored_qkv": ("tiny-t2v", dict(fused_qkv=True), "stored_qkv.safetensors"),
    "moe": ("tiny-a14b", {}, "a14b"),
}


def random_model(preset: str, seed: int, **overrides) -> torch.nn.Module:
    """Every tensor drawn away from the init (upstream zeroes the head and biases)."""
    torch.manual_seed(seed)
    model = build_wan(preset, text_len=TEXT_LEN, **overrides)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def write_checkpoints(root: Path) -> None:
    t2v = random_model("tiny-t2v", 0)
    save_wan_checkpoint(t2v, root / "t2v.safetensors")
    save_wan_checkpoint(t2v, root / "t2v.pth")
    save_wan_checkpoint(random_model("tiny-ti2v", 1), root / "ti2v", key_format="diffusers", max_shard_size="60KB")
    save_wan_checkpoint(random_model("tiny-i2v", 2), root / "i2v.safetensors", key_format="diffusers")
    save_wan_checkpoint(random_model("tiny-a14b", 3), root / "a14b")
    sd = wan_state_dict(t2v)  # diffusers' fuse_projections layout: one stored to_qkv per block
    for i in range(t2v.config.num_layers):
        for p in ("weight", "bias"):
            sd[f"blocks.{i}.self_attn.qkv.{p}"] = torch.cat([sd.pop(f"blocks.{i}.self_attn.{n}.{p}") for n in "qkv"])
    save_file({k: v.contiguous() for k, v in convert_state_dict(sd, "original", "diffusers").items()},
              str(root / "stored_qkv.safetensors"))


def current_path(preset: str, overrides: dict, path: Path, tp_group=None, dtype=None) -> torch.nn.Module:
    """Today's loading: full random-initialised model, full weights copied in, then the TP split."""
    from megadistill.models.wan.parallelize import apply_tensor_parallel

    model = build_wan(preset, text_len=TEXT_LEN, dtype=dtype, **overrides)
    load_wan_checkpoint(model, path)
    return apply_tensor_parallel(model, tp_group)


def differences(new: torch.nn.Module, ref: torch.nn.Module) -> list[str]:
    """Every way ``new`` differs from ``ref``: tensor names, module types, and per parameter and buffer
    the dtype, shape, exact values, requires_grad and the Megatron TP attributes."""
    out = []
    if [type(m).__name__ for m in new.modules()] != [type(m).__name__ for m in ref.modules()]:
        out.append("module types differ")
    for kind in ("named_parameters", "named_buffers"):
        a, b = dict(getattr(new, kind)()), dict(getattr(ref, kind)())
        if list(a) != list(b):
            out.append(f"{kind}: names differ: {sorted(set(a) ^ set(b))[:5]}")
            continue
        for name, t in a.items():
            r = b[name]
            if t.is_meta or t.dtype != r.dtype or t.shape != r.shape or not torch.equal(t, r):
                out.append(f"{name}: value/dtype/shape differ")
            elif t.requires_grad != r.requires_grad:
                out.append(f"{name}: requires_grad differs")
            elif any(getattr(t, k, None) != getattr(r, k, None)
                     for k in ("tensor_model_parallel", "partition_dim", "partition_chunks")):
                out.append(f"{name}: TP attributes differ")
    return out


def zero3_partitioned_while_loading(root: Path) -> dict:
    """ZeRO-3 over both ranks (tp = 1): ``partition`` = ``deepspeed.zero.Init(module=...)`` per block.
    Records the full-size tensors alive at each call (at most one block plus embeddings and head), the
    gathered weights against the current path, and a forward through build_frozen's engine."""
    import deepspeed

    from megadistill.engine.engines import build_frozen
    from megadistill.models.wan.loading import load_wan_checkpoint_into_meta

    ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    model = build_wan("tiny-t2v", text_len=TEXT_LEN, device="meta")
    alive = []

    def partition(module):
        alive.append(sum(p.numel() for p in model.parameters() if not p.is_meta and not hasattr(p, "ds_id")))
        deepspeed.zero.Init(module=module, config_dict_or_path=ds)

    load_wan_checkpoint_into_meta(model, root / "t2v.safetensors", partition=partition)
    partitioned = all(hasattr(p, "ds_id") and p.numel() == 0 for p in model.parameters())
    ref = current_path("tiny-t2v", {}, root / "t2v.safetensors")
    same = True
    for (name, p), r in zip(model.named_parameters(), ref.parameters()):
        with deepspeed.zero.GatheredParameters([p]):
            same &= p.shape == r.shape and torch.equal(p.detach(), r.detach())
    block = sum(p.numel() for p in ref.blocks[0].parameters())
    rest = sum(p.numel() for n, p in ref.named_parameters() if not n.startswith("blocks."))
    engine = build_frozen(model, ds, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    x, t, c = torch.randn(1, 16, 2, 4, 4, generator=g), torch.tensor([700.0]), torch.randn(1, 8, 32, generator=g)
    with torch.no_grad():
        err = (engine(x, t, c) - ref(x, t, c)).abs().max().item()
    return dict(partitioned=partitioned, same=same, alive=alive, block=block, rest=rest,
                total=sum(p.numel() for p in ref.parameters()), forward_err=err)


def main(ckpt_dir: str, out_dir: str) -> None:
    import torch.distributed as dist

    from megadistill.engine.engines import init_distributed
    from megadistill.models.wan.checkpoint import CheckpointMismatchError
    from megadistill.models.wan.loading import load_wan
    from megadistill.parallel.tensor_parallel import sharded_parameters

    torch.set_num_threads(1)
    rank = init_distributed().rank
    group = dist.new_group([0, 1])  # an explicit group, never WORLD implicitly
    root, results = Path(ckpt_dir), {}
    runs = [(name, *case, None) for name, case in CASES.items()] + [("t2v_bf16", "tiny-t2v", {}, "t2v.safetensors",
                                                                       torch.bfloat16)]
    for name, preset, overrides, rel, dtype in runs:
        try:
            ref = current_path(preset, overrides, root / rel, group, dtype)
            new = load_wan(preset, root / rel, tp_group=group, dtype=dtype, text_len=TEXT_LEN, **overrides)
            local = sum(t.numel() for t in new.state_dict().values())
            results[name] = dict(diffs=differences(new, ref), sharded=len(sharded_parameters(new)),
                                 local_numel=local, dtypes=sorted({str(p.dtype) for p in new.parameters()}))
        except Exception:
            results[name] = dict(error=traceback.format_exc())
    try:  # a wrong shape under TP is named against the FULL shapes, before anything is read
        bad = build_wan("tiny-t2v", text_len=TEXT_LEN, ffn_dim=256)
        load_wan("tiny-t2v", root / "t2v.safetensors", tp_group=group, text_len=TEXT_LEN, ffn_dim=256)
        results["mismatch"] = dict(message=None)
    except CheckpointMismatchError as e:
        results["mismatch"] = dict(message=str(e), full_ffn=tuple(bad.blocks[0].ffn[0].weight.shape))
    try:
        results["zero3"] = zero3_partitioned_while_loading(root)
    except Exception:
        results["zero3"] = dict(error=traceback.format_exc())
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
