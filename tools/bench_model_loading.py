"""Peak host memory and wall time of loading a Wan checkpoint: today's path against the meta-device loader.

    python tools/bench_model_loading.py                                  # wan2.1-t2v-1.3b, random weights
    python tools/bench_model_loading.py --preset wan2.2-ti2v-5b --checkpoint /ckpt/Wan2.2-TI2V-5B --tp 1 2 4

Paths, each measured in a fresh process (peak RSS from ``getrusage(RUSAGE_SELF).ru_maxrss``, which
counts the file pages a process maps as well as its own allocations):
  current  build_wan (random init of the full fp32 model) + load_wan_checkpoint + apply_tensor_parallel
  meta     parallel.loading.load_wan: meta build, TP split, each tensor's slice for this rank from the file
  zero3    load_wan at tp = 1 handing each loaded block to deepspeed.zero.Init(module=block) (ZeRO-3 over
           --zero3 ranks, loading at the same time)
tp > 1 is simulated with gloo on this machine: all ranks of the group start and join it, then load one
after the other (the loads do not communicate), so the box holds one loading rank at a time; each rank
reports its own peak. "before load" is the process after imports (the floor of every number).
Without --checkpoint a random checkpoint of the preset is written (sharded safetensors, 1 GB shards,
original key names) to a temporary directory and removed afterwards.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GIB = 2 ** 30


def peak_rss_bytes() -> int:
    """This process's peak RSS. Linux carries ru_maxrss over fork + exec from the parent, so the parent
    of the measured processes stays small (it imports no torch; the checkpoint is written by a child)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def high_water_bytes() -> int:
    """VmHWM of /proc/self/status: the same peak, counted from this exec on (a cross-check)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return -1


def write_random_checkpoint(preset: str, folder: Path, shard_bytes: int = 10 ** 9, seed: int = 0) -> Path:
    """Random N(0, 0.02) weights under the preset's original key names, a shard at a time: the model is
    never built (meta device), so writing needs one shard of memory."""
    import torch
    from safetensors.torch import save_file

    from megadistill.models.wan import build_wan, wan_state_dict
    from megadistill.io.tensors import split_into_shards

    shapes = {k: (tuple(v.shape), v.dtype) for k, v in wan_state_dict(build_wan(preset, device="meta")).items()}
    meta = {k: torch.empty(s, dtype=d, device="meta") for k, (s, d) in shapes.items()}
    groups = split_into_shards(meta, shard_bytes)
    g = torch.Generator().manual_seed(seed)
    weight_map, folder = {}, Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, group in enumerate(groups):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: torch.randn(t.shape, generator=g, dtype=t.dtype) * 0.02 for k, t in group.items()},
                  str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in group})
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def _worker(args) -> None:
    """One rank of one measurement; prints a JSON line."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    if args.path == "zero3":
        return _zero3_worker(args)
    from megadistill.models.wan import build_wan, load_wan_checkpoint
    from megadistill.models.wan.loading import load_wan
    from megadistill.models.wan.parallelize import apply_tensor_parallel

    dtype = getattr(torch, args.dtype)
    group = None
    if args.world > 1:
        dist.init_process_group("gloo", rank=args.rank, world_size=args.world,
                                init_method=f"tcp://127.0.0.1:{args.port}")
        group = dist.new_group(list(range(args.world)))
    before = peak_rss_bytes()
    seconds, numel, checksum = 0.0, 0, 0.0
    for turn in range(args.world):  # one rank loads at a time (see the module docstring)
        if turn == args.rank:
            start = time.perf_counter()
            if args.path == "current":
                model = build_wan(args.preset, dtype=dtype)
                load_wan_checkpoint(model, args.checkpoint)
                apply_tensor_parallel(model, group)
            else:
                model = load_wan(args.preset, args.checkpoint, tp_group=group, dtype=dtype)
            seconds = time.perf_counter() - start
            # Touch every weight: a tensor that is a view of the mapped file costs memory only once read.
            checksum = sum(t.double().sum().item() for t in model.state_dict().values())
            numel = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        if group is not None:
            dist.barrier(group)
    print(json.dumps(dict(path=args.path, tp=args.world, rank=args.rank, seconds=seconds, peak=peak_rss_bytes(),
                          hwm=high_water_bytes(), before=before, model_bytes=numel, checksum=checksum)), flush=True)
    if group is not None:
        dist.destroy_process_group()


def _zero3_worker(args) -> None:
    """tp = 1, ZeRO-3 over ``world`` data-parallel ranks loading at once: load_wan partitions each block
    as soon as it is loaded (``deepspeed.zero.Init(module=block)``). The checksum is of the gathered
    full weights (taken after the peak is read)."""
    import deepspeed
    import torch

    from megadistill.engine.engines import init_distributed
    from megadistill.models.wan.loading import load_wan

    init_distributed()
    ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    before = peak_rss_bytes()
    start = time.perf_counter()
    model = load_wan(args.preset, args.checkpoint, dtype=getattr(torch, args.dtype),
                     partition=lambda m: deepspeed.zero.Init(module=m, config_dict_or_path=ds))
    seconds = time.perf_counter() - start
    peak, hwm = peak_rss_bytes(), high_water_bytes()
    kept = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in model.parameters())
    checksum = 0.0
    for p in model.parameters():
        with deepspeed.zero.GatheredParameters([p]):
            checksum += p.detach().double().sum().item()
    print(json.dumps(dict(path="zero3", tp=1, dp=args.world, rank=args.rank, seconds=seconds, peak=peak, hwm=hwm,
                          before=before, model_bytes=kept, checksum=checksum)), flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(path: str, tp: int, preset: str, checkpoint: Path, dtype: str) -> list[dict]:
    """Run one measurement (tp ranks in fresh processes); one result dict per rank."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    port = _free_port()
    procs = []
    for r in range(tp):  # the zero3 worker joins through deepspeed, from the launcher's variables
        launcher = dict(RANK=str(r), WORLD_SIZE=str(tp), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, __file__, "--_worker", "--path", path, "--preset", preset,
                                       "--checkpoint", str(checkpoint), "--dtype", dtype, "--rank", str(r),
                                       "--world", str(tp), "--port", str(port)],
                                      env={**env, **launcher}, stdout=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode:
            raise RuntimeError(f"{path} tp={tp}: a rank exited with {p.returncode}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="wan2.1-t2v-1.3b")
    ap.add_argument("--checkpoint", help="an existing checkpoint of the preset (default: write a random one)")
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--paths", nargs="+", default=["current", "meta"], choices=["current", "meta"])
    ap.add_argument("--zero3", type=int, nargs="*", default=[2],
                    help="also measure load_wan partitioning each block for ZeRO-3 over this many ranks (tp = 1)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="model dtype (build_wan's; a frozen teacher would use bfloat16)")
    ap.add_argument("--workdir", default=None, help="where the random checkpoint goes (default: the temp dir)")
    ap.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--_write", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--path", "--rank", "--world", "--port"):
        ap.add_argument(hidden, help=argparse.SUPPRESS, type=str if hidden == "--path" else int)
    args = ap.parse_args(argv)
    if args._worker:
        return _worker(args)
    if args._write:
        write_random_checkpoint(args.preset, Path(args.checkpoint))
        return

    tmp = None
    if args.checkpoint:
        checkpoint = Path(args.checkpoint)
    else:
        tmp = Path(tempfile.mkdtemp(prefix="bench_wan_ckpt_", dir=args.workdir))
        start = time.perf_counter()
        checkpoint = tmp / "diffusion_pytorch_model.safetensors.index.json"
        subprocess.run([sys.executable, __file__, "--_write", "--preset", args.preset, "--checkpoint", str(tmp)],
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}, check=True)
        size = sum(f.stat().st_size for f in tmp.iterdir())
        print(f"wrote a random {args.preset} checkpoint ({size / GIB:.2f} GiB) in {time.perf_counter() - start:.0f} s")
    try:
        rows = []
        for tp in args.tp:
            for path in args.paths:
                rows += measure(path, tp, args.preset, checkpoint, args.dtype)
        for dp in args.zero3:
            rows += measure("zero3", dp, args.preset, checkpoint, args.dtype)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{args.preset}, model dtype {args.dtype} (peak RSS per rank, GiB; 'before load' = after imports)")
    print(f"{'path':<8} {'tp':>3} {'dp':>3} {'rank':>4} {'seconds':>8} {'peak RSS':>9} {'(VmHWM)':>8} "
          f"{'before load':>12} {'weights kept':>13} {'checksum':>16}")
    for r in rows:
        print(f"{r['path']:<8} {r['tp']:>3} {r.get('dp', 1):>3} {r['rank']:>4} {r['seconds']:>8.1f} {r['peak'] / GIB:>9.2f} "
              f"{r['hwm'] / GIB:>8.2f} {r['before'] / GIB:>12.2f} {r['model_bytes'] / GIB:>13.2f} {r['checksum']:>16.6f}")
    sums = {}
    for r in rows:  # a zero3 rank's checksum is of the gathered full weights: the tp = 1 model's
        sums.setdefault((r["tp"], 0 if r["path"] == "zero3" else r["rank"]), set()).add(r["checksum"])
    print("every path gives each rank the same weights (checksums equal):", all(len(v) == 1 for v in sums.values()))
    if any(r["path"] == "zero3" for r in rows):
        print("zero3: 'weights kept' is the rank's ZeRO-3 partition (ds_tensor); its checksum is of the gathered weights")


if __name__ == "__main__":
    main()
