"""One rank of the tensor-parallel tests (launched by test_tensor_parallel.py through tests/helpers/ranks.py).

Every rank builds the single-process reference model itself (same seed, same inputs), runs it, then
splits a copy across its TP group (and, for tp x sp, its SP group) and runs the same inputs. It
records, per case, the largest relative error of the output and of EVERY parameter gradient (sharded
ones against the matching slice of the reference gradient), plus facts showing TP really happened.
Results go to ``<out>/rank<r>.pt``; test_tensor_parallel.py asserts on them.
"""
from __future__ import annotations

import copy
import os
import sys
import time
import traceback

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megadistill.models.wan import build_wan
from megadistill.models.wan.kv_cache import new_kv_cache
from megadistill.parallel.mesh import ParallelConfig, ParallelMesh
from megadistill.models.wan.parallelize import apply_sequence_parallel, apply_tensor_parallel
from megadistill.parallel.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, TPRMSNorm,
                                                  gather_tensor_parallel_state_dict, load_unsharded_state_dict, shard,
                                                  sharded_parameters)

B, F, H, W = 2, 3, 6, 6  # latent grid: 3 x 3 x 3 = 27 tokens with patch (1, 2, 2): not divisible by sp
TEXT_LEN = 16


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Upstream init zeroes the head and biases and sets norm weights to 1: every path would then be
    trivial (zero output, untested bias and norm-weight sharding). Draw everything instead."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(1 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.05 * noise)
            elif name.endswith("head.weight"):
                p.copy_(0.05 * noise)
            elif p.dim() == 2:
                p.copy_(noise / p.shape[1] ** 0.5)


def make_model(preset: str, **overrides):
    torch.manual_seed(0)  # the parameters randomize() leaves (patch and time embeddings, modulation)
    model = build_wan(preset, text_len=TEXT_LEN, **overrides)
    randomize(model, seed=1)
    return model


def make_inputs(model, t_kind: str = "batch"):
    c = model.config
    g = torch.Generator().manual_seed(2)
    x = torch.randn(B, c.out_dim, F, H, W, generator=g)
    tokens = F * (H // 2) * (W // 2)
    if t_kind == "batch":
        t = torch.tensor([900.0, 250.0])
    elif t_kind == "token":
        t = torch.rand(B, tokens, generator=g) * 1000
    else:  # per frame
        t = torch.rand(B, F, generator=g) * 1000
    kwargs = dict(x=x, t=t, context=torch.randn(B, TEXT_LEN - 5, c.text_dim, generator=g))
    if c.model_type == "i2v":
        kwargs["y"] = torch.randn(B, c.condition_dim, F, H, W, generator=g)
        if c.image_dim is not None:
            kwargs["clip_fea"] = torch.randn(B, 257, c.image_dim, generator=g)
    weight = torch.randn(B, c.out_dim, F, H, W, generator=g)
    return kwargs, weight


def forward_backward(model, kwargs, weight):
    model.zero_grad(set_to_none=True)
    out = model(**kwargs)
    (out * weight).sum().backward()
    return out.detach()


@dataclass
class Layout:
    """TP group, and optionally an SP group (TP applied first, then Ulysses SP from P2's module)."""

    tp_group: Any
    sp_group: Any = None

    def parallelize(self, model):
        model = apply_tensor_parallel(model, self.tp_group)
        return model if self.sp_group is None else apply_sequence_parallel(model, self.sp_group)

    def gradient(self, p: torch.Tensor) -> torch.Tensor:
        """The gradient to compare with single process: under SP every rank backpropagates the same full
        loss and the SP group's gradients sum to sp x the single-process one (sequence_parallel.py)."""
        if self.sp_group is None:
            return p.grad
        g = p.grad.clone()
        dist.all_reduce(g, group=self.sp_group)
        return g / dist.get_world_size(self.sp_group)


def compare_grads(tp_model, ref_model, layout: Layout) -> dict:
    group = layout.tp_group
    rank, tp = dist.get_rank(group), dist.get_world_size(group)
    ref = dict(ref_model.named_parameters())
    errs, sharded, replicated_local = {}, 0, {}
    for name, p in tp_model.named_parameters():
        r = ref[name].grad
        if getattr(p, "tensor_model_parallel", False):
            sharded += 1
            r = shard(r, p.partition_dim, rank, tp, p.partition_chunks)
        else:
            replicated_local[name] = p.grad.detach().clone()
        if p.grad is None or p.grad.shape != r.shape:
            errs[name] = float("inf")
        else:
            errs[name] = rel_err(layout.gradient(p), r)
    # Replicated gradients must also agree ACROSS the TP ranks (no extra all-reduce is applied).
    flat = torch.cat([g.flatten() for g in replicated_local.values()])
    gathered = [torch.empty_like(flat) for _ in range(tp)]
    dist.all_gather(gathered, flat, group=group)
    across = max(rel_err(gathered[i], gathered[0]) for i in range(tp))
    return dict(grad_errs=errs, ref_names=sorted(ref), num_sharded=sharded, replicated_across_ranks=across)


def layer_facts(model) -> dict:
    block = next(m for m in model.modules() if type(m).__name__ == "WanBlock")
    sa = block.self_attn
    return dict(
        self_heads=sa.num_heads, cross_heads=block.cross_attn.num_heads,
        o_weight=tuple(sa.o.weight.shape), ffn0_weight=tuple(block.ffn[0].weight.shape),
        ffn2_weight=tuple(block.ffn[2].weight.shape),
        qkv_weight=tuple((sa.qkv if sa.fused_qkv else sa.q).weight.shape),
        norm_q=tuple(sa.norm_q.weight.shape),
        types=sorted({type(m).__name__ for m in model.modules()
                      if isinstance(m, (ColumnParallelLinear, RowParallelLinear, TPRMSNorm))}),
        blocks_parallel=sum(isinstance(m.ffn[0], ColumnParallelLinear) for m in model.modules()
                            if type(m).__name__ == "WanBlock"),
        blocks=sum(type(m).__name__ == "WanBlock" for m in model.modules()),
    )


def case_forward_backward(layout: Layout, preset, t_kind, **overrides) -> dict:
    ref = make_model(preset, **overrides)
    kwargs, weight = make_inputs(ref, t_kind)
    ref_out = forward_backward(ref, kwargs, weight)
    model = layout.parallelize(copy.deepcopy(ref))
    out = forward_backward(model, kwargs, weight)
    return dict(out_err=rel_err(out, ref_out), out_scale=ref_out.abs().max().item(),
                **compare_grads(model, ref, layout), **layer_facts(model))


def case_kv_cache(layout: Layout) -> dict:
    """forward_causal_step block after block against KV caches, with a clean-context refresh of block 1,
    vs single process: outputs of every call, and the parameter gradients of the last call (which
    attends to the cached past with its own keys differentiable)."""
    ref = make_model("tiny-t2v", num_frame_per_block=1)
    kwargs, _ = make_inputs(ref, "frame")
    model = layout.parallelize(copy.deepcopy(ref))
    frame_seq_len = (H // 2) * (W // 2)
    models = {"ref": ref, "tp": model}
    caches = {name: new_kv_cache(m, B, frame_seq_len, max_frames=F) for name, m in models.items()}
    g = torch.Generator().manual_seed(5)
    errs = []
    # Blocks 0, 1, then block 1 again at t = 0 (the clean-context refresh overwrites its slot), then 2.
    for start, t, grad in ((0, 500.0, False), (1, 500.0, False), (1, 0.0, False), (2, 500.0, True)):
        x = torch.randn(B, ref.config.out_dim, 1, H, W, generator=g)
        weight = torch.randn(B, ref.config.out_dim, 1, H, W, generator=g)
        t = torch.full((B,), t)
        outs = {}
        for name, m in models.items():
            m.zero_grad(set_to_none=True)
            with torch.set_grad_enabled(grad):
                outs[name] = m.forward_causal_step(x, t, kwargs["context"], caches[name], start_frame=start)
            if grad:
                (outs[name] * weight).sum().backward()
        errs.append(rel_err(outs["tp"].detach(), outs["ref"].detach()))
    return dict(step_errs=errs, cache_heads=[c.k.shape[2] for c in caches["tp"]], **compare_grads(model, ref, layout))


def case_bad_sizes(layout: Layout) -> dict:
    """tp not dividing heads or ffn_dim: ValueError and the model untouched."""
    results = {}
    for label, overrides in (("heads", dict(dim=48, num_heads=3)), ("ffn", dict(ffn_dim=129))):
        model = make_model("tiny-t2v", **overrides)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        types_before = [type(m) for m in model.modules()]
        try:
            apply_tensor_parallel(model, layout.tp_group)
            message = None
        except ValueError as e:
            message = str(e)
        after = model.state_dict()
        unchanged = (types_before == [type(m) for m in model.modules()] and before.keys() == after.keys()
                     and all(torch.equal(before[k], after[k]) for k in before))
        results[label] = dict(message=message, unchanged=unchanged)
    return results


def case_state_dict(layout: Layout) -> dict:
    """Unsharded checkpoint -> TP -> gather gives the same tensors; loading = build, load, apply (or meta
    build, apply, materialise, load the shards) gives the same local shards; a deep copy still runs."""
    group, out = layout.tp_group, {}
    for label, preset, overrides in (("t2v", "tiny-t2v", {}), ("fused", "tiny-t2v", dict(fused_qkv=True)),
                                     ("i2v", "tiny-i2v", {}), ("moe", "tiny-a14b", {})):
        full = make_model(preset, **overrides)
        full_sd = {k: v.clone() for k, v in full.state_dict().items()}
        model = apply_tensor_parallel(full, group)
        local = model.state_dict()
        gathered = gather_tensor_parallel_state_dict(model, group)
        same = gathered.keys() == full_sd.keys() and all(
            gathered[k].shape == full_sd[k].shape and torch.equal(gathered[k], full_sd[k]) for k in full_sd)
        # Reload: a fresh, differently initialised model, load the gathered dict, apply TP.
        fresh = build_wan(preset, text_len=TEXT_LEN, **overrides)
        fresh.load_state_dict(gathered)
        fresh = apply_tensor_parallel(fresh, group)
        # Or without ever holding the full weights: meta model, TP, materialise, load this rank's shards.
        meta = apply_tensor_parallel(build_wan(preset, text_len=TEXT_LEN, device="meta", **overrides), group)
        meta.to_empty(device="cpu")
        load_unsharded_state_dict(meta, gathered, group)
        meta_marked = all(getattr(p, "tensor_model_parallel", False) for p, _, _ in sharded_parameters(meta).values())
        ffn_key = next(k for k in full_sd if k.endswith("blocks.0.ffn.0.weight"))
        out[label] = dict(same=same, reload_same=_equal_states(fresh.state_dict(), local),
                          meta_same=_equal_states(meta.state_dict(), local), meta_marked=meta_marked,
                          num_sharded=len(sharded_parameters(meta)),
                          local_rows=local[ffn_key].shape[0], full_rows=full_sd[ffn_key].shape[0])
    kwargs, _ = make_inputs(model)
    with torch.no_grad():  # a deep copy (EMA, teacher copies) shares the process group and computes the same
        out["deepcopy_err"] = rel_err(copy.deepcopy(model)(**kwargs), model(**kwargs))
    return out


def _equal_states(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


def case_size_one_group(layout: Layout) -> dict:
    """A group of size 1 (and None) leaves the model exactly as it was (same modules, same output)."""
    singles = [dist.new_group([r]) for r in range(dist.get_world_size())]
    model = make_model("tiny-t2v")
    kwargs, _ = make_inputs(model)
    with torch.no_grad():
        before = model(**kwargs)
        same_object = apply_tensor_parallel(model, singles[dist.get_rank()]) is model
        same_object &= apply_tensor_parallel(model, None) is model
        after = model(**kwargs)
    no_tp_layers = not any(isinstance(m, (ColumnParallelLinear, RowParallelLinear, TPRMSNorm)) for m in model.modules())
    return dict(equal=torch.equal(before, after), same_object=same_object, no_tp_layers=no_tp_layers)


CASES = {
    "t2v": lambda g: case_forward_backward(g, "tiny-t2v", "batch"),
    "ti2v_per_token": lambda g: case_forward_backward(g, "tiny-ti2v", "token"),
    "causal_per_frame": lambda g: case_forward_backward(g, "tiny-t2v", "frame", num_frame_per_block=1),
    "fused_qkv": lambda g: case_forward_backward(g, "tiny-t2v", "batch", fused_qkv=True),
    "i2v": lambda g: case_forward_backward(g, "tiny-i2v", "batch"),
    "moe": lambda g: case_forward_backward(g, "tiny-a14b", "batch"),
    "kv_cache": case_kv_cache,
    "bad_sizes": case_bad_sizes,
    "state_dict": case_state_dict,
    "size_one_group": case_size_one_group,
}
# tp = 2 on two subgroups of the 4 ranks ({0, 1} and {2, 3}, never WORLD), then tp = 4 on all of them,
# then tp = 2 x sp = 2 from the mesh (TP composed with Ulysses SP).
PLAN = {2: list(CASES), 4: ["t2v", "ti2v_per_token", "causal_per_frame", "fused_qkv", "kv_cache", "bad_sizes"],
        "tp2_sp2": ["t2v", "ti2v_per_token", "causal_per_frame", "kv_cache"]}


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    start = time.perf_counter()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    pairs = [dist.new_group([r, r + 1]) for r in range(0, world, 2)]
    mesh = ParallelMesh(ParallelConfig(tp=2, sp=2), num_heads=4)
    layouts = {2: Layout(pairs[rank // 2]), 4: Layout(dist.group.WORLD),
               "tp2_sp2": Layout(mesh.tp_group, mesh.sp_group)}
    results = {"seconds": {"init": time.perf_counter() - start}}
    for key, names in PLAN.items():
        for name in names:
            start = time.perf_counter()
            try:
                results[(key, name)] = CASES[name](layouts[key])
            except Exception:  # recorded, so the test names the failing case
                results[(key, name)] = {"error": traceback.format_exc()}
            results["seconds"][(key, name)] = time.perf_counter() - start
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
