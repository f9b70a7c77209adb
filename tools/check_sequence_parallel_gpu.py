"""Ulysses sequence parallelism on the GPU backends: flex_attention's BlockMask and the KV-cache steps.

    python tools/check_sequence_parallel_gpu.py             # 2 ranks on cuda:0 (one GPU is enough)
    python tools/check_sequence_parallel_gpu.py --device cpu --frames 4 --latent-hw 6 8 --layers 1   # smoke

The CPU tests (tests/parallel/) prove the sequence-parallel model equals one process with the dense
mask in float32. On a GPU the block-causal forward takes another path: a compiled flex_attention
BlockMask in bf16, which the parallel core receives through ``UlyssesMask`` and applies to the full
sequence with H / sp heads. This runs that path with real Wan 1.3B widths (12 heads of 128, fewer
layers) and a token count that does not divide by sp, and prints for each case the relative error of
the outputs and of the worst block-0 gradient of
  - the single-process bf16 model (the precision's own error) and
  - the sp ranks (gradients summed over ranks, each backpropagating loss / sp)
against the single-process float32 model with SDPA and the dense mask. Sequence parallelism is right
when its error is that of bf16, not larger.

Collectives: the ranks share one GPU, which NCCL refuses, so they use gloo with each collective
staged through host memory (the same functions as NCCL would run, slower). On several GPUs set
``--backend nccl``.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megadistill.models.wan import CrossAttnCache, build_wan, new_kv_cache  # noqa: E402
from megadistill.models.wan.parallelize import apply_sequence_parallel  # noqa: E402
from megadistill.parallel import comm as sp_module  # noqa: E402


def staged(collective):
    """``collective(out, inp, group=...)`` on host copies of CUDA tensors (gloo), result copied back."""
    def run(out, inp, *args, **kwargs):
        if not out.is_cuda:
            return collective(out, inp, *args, **kwargs)
        host = out.cpu()
        result = collective(host, inp.cpu(), *args, **kwargs)
        out.copy_(host)
        return result
    return run


def make_model(args, dtype, device, attention="auto"):
    torch.manual_seed(0)
    model = build_wan("wan2.1-t2v-1.3b", num_layers=args.layers, text_len=64, num_frame_per_block=args.nfpb,
                      attention=attention)
    with torch.no_grad():  # the upstream init zeroes the head: give every output and gradient a value
        model.head.head.weight.normal_(0, 0.02)
    return model.to(device=device, dtype=dtype)


def make_inputs(args, model, device):
    c = model.config
    g = torch.Generator().manual_seed(1)
    h, w = args.latent_hw
    x = torch.randn(1, c.out_dim, args.frames, h, w, generator=g)
    x0 = torch.randn(1, c.out_dim, args.frames, h, w, generator=g)
    context = torch.randn(1, 64, c.text_dim, generator=g)
    t = torch.rand(1, args.frames, generator=g) * 1000  # per frame, as the causal generator trains
    weights = torch.randn(x.shape, generator=g)
    return {k: v.to(device) for k, v in dict(x=x, x0=x0, context=context, t=t, weights=weights).items()}


def run(model, inputs, case, loss_scale=1.0):
    """(outputs, block-0 gradients) of loss_scale * sum(weights * outputs)."""
    dtype = model.blocks[0].self_attn.o.weight.dtype
    x, context = inputs["x"].to(dtype), inputs["context"].to(dtype)
    model.zero_grad(set_to_none=True)
    if case == "forward":  # parallel block-causal forward: flex BlockMask on CUDA in bf16
        out = model(x, inputs["t"], context)
        outputs, loss = [out], (out * inputs["weights"]).sum()
    else:  # KV-cache steps with the clean refresh (the Self-Forcing rollout's calls)
        h, w = x.shape[-2:]
        frames, nfpb = x.shape[2], model.config.num_frame_per_block
        caches, cross = new_kv_cache(model, 1, (h // 2) * (w // 2), max_frames=frames, dtype=dtype), CrossAttnCache()
        outputs, loss = [], 0.0
        for s in range(0, frames, nfpb):
            e = min(s + nfpb, frames)
            out = model.forward_causal_step(x[:, :, s:e], inputs["t"][:, s:e], context, caches, cross, start_frame=s)
            loss = loss + (out * inputs["weights"][:, :, s:e]).sum()
            with torch.no_grad():
                model.forward_causal_step(inputs["x0"][:, :, s:e].to(dtype), torch.zeros(1, device=x.device),
                                          context, caches, cross, start_frame=s)
            outputs.append(out)
    (loss * loss_scale).backward()
    grads = {n: p.grad.detach().float() for n, p in model.named_parameters() if n.startswith("blocks.0.")}
    return torch.cat([o.detach().float().flatten() for o in outputs]), grads


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def errors(got, ref):
    out, grads = got
    ref_out, ref_grads = ref
    # A key bias shifts every score of a query equally: softmax cancels it, its true gradient is 0.
    names = [n for n in ref_grads if not n.endswith("k.bias")]
    worst = max(names, key=lambda n: rel(grads[n], ref_grads[n]))
    return rel(out, ref_out), rel(grads[worst], ref_grads[worst]), worst


def worker(rank, args, port, queue):
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(args.backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.sp)
    if args.backend == "gloo" and device.type == "cuda":
        dist.all_to_all_single = staged(dist.all_to_all_single)
        sp_module._all_gather_single = staged(sp_module._all_gather_single)
        sp_module._reduce_scatter_single = staged(sp_module._reduce_scatter_single)
        all_reduce = dist.all_reduce
        dist.all_reduce = lambda t, *a, **k: t.copy_(all_reduce(h := t.cpu(), *a, **k) or h)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    group = dist.new_group(list(range(args.sp)))
    rows = []
    for case in ("forward", "steps"):
        reference_model = make_model(args, torch.float32, device, attention="sdpa")
        inputs = make_inputs(args, reference_model, device)
        reference = run(reference_model, inputs, case)
        single = run(make_model(args, dtype, device), inputs, case)
        model = apply_sequence_parallel(make_model(args, dtype, device), group)
        out, grads = run(model, inputs, case, loss_scale=1.0 / args.sp)
        for g in grads.values():
            dist.all_reduce(g, group=group)  # each rank's share of the single-process gradient
        rows.append((case, errors(single, reference), errors((out, grads), reference)))
    if rank == 0:
        queue.put(rows)
    dist.destroy_process_group()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--sp", type=int, default=2)
    p.add_argument("--frames", type=int, default=9, help="latent frames (blocks of --nfpb)")
    p.add_argument("--nfpb", type=int, default=3)
    p.add_argument("--latent-hw", type=int, nargs=2, default=(30, 50), metavar=("H", "W"))
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default="gloo", choices=("gloo", "nccl"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    h, w = args.latent_hw
    tokens = args.frames * (h // 2) * (w // 2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, args, port, queue)) for r in range(args.sp)]
    for proc in procs:
        proc.start()
    rows = queue.get(timeout=1800)
    for proc in procs:
        proc.join()
    if any(proc.exitcode for proc in procs):
        print(f"a rank failed: exit codes {[proc.exitcode for proc in procs]}")
        return 1
    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    print(f"Wan 1.3B widths, {args.layers} layers, {tokens} tokens ({args.frames} frames of {(h // 2) * (w // 2)}), "
          f"blocks of {args.nfpb} frames, {args.dtype}, sp = {args.sp}, on {name}, torch {torch.__version__}")
    print("relative error against one float32 process with SDPA and the dense mask")
    print(f"{'case':>8}  {'1 process out':>13}  {'grad':>8}  {'sp out':>8}  {'grad':>8}  worst gradient")
    for case, (o1, g1, _), (o2, g2, worst) in rows:
        print(f"{case:>8}  {o1:13.2e}  {g1:8.2e}  {o2:8.2e}  {g2:8.2e}  {worst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
