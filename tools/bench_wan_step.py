"""Speed and memory of real-size Wan generator updates on one GPU, next to the memory plan's estimates.

    python tools/bench_wan_step.py                        # Wan2.1 1.3B, 81 x 480 x 832, bf16, checkpointing
    python tools/bench_wan_step.py --cases rollout --frames 81 --height 720 --width 1280
    python tools/bench_wan_step.py --preset tiny-t2v --latent 6 4 4 --device cpu   # smoke run

Cases (each from a clean allocator; "extra" = peak allocated minus weights and gradients):
- ``bidir``: one forward + backward of a whole clip through the generator (bidirectional few-step
  student, critic update). Reports time, model TFLOP/s and MFU (model FLOPs only: recomputation under
  checkpointing is not counted), and the extra memory next to ``bidirectional_activations``.
- ``rollout`` / ``rollout_copy``: the Self-Forcing generator rollout (block by block against the KV
  cache, exit step with gradient for every block, clean refresh) and its backward, with the
  checkpointing snapshot as it is (copy-on-write, kv_cache.py) and, for comparison, copied up front
  (the previous behaviour). Extra memory next to ``causal_activations`` + ``kv_cache_bytes``.
- ``flex`` / ``sdpa_mask``: the parallel block-causal forward + backward (ODE regression, causal
  diffusion) with the flex_attention BlockMask (CUDA) and with the dense boolean mask through SDPA;
  ``flex`` also reports the largest relative difference of its output and gradients from ``sdpa_mask``.

Numbers are for one GPU and batch 1 with every weight local (no ZeRO): the activation side of a plan.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megadistill.diffusion.latents import DenseLatents
from megadistill.methods.base import DistillBatch  # noqa: E402
from megadistill.models.wan import build_wan  # noqa: E402
from megadistill.models.wan.kv_cache import KVCache  # noqa: E402
from megadistill.models.wan.memory import (  # noqa: E402
    bidirectional_activations, causal_activations, kv_cache_bytes, latent_grid, vae_stride,
)
from megadistill.parallel.memory_plan import GIB  # noqa: E402
from megadistill.rollout.self_forcing import SelfForcingConfig, SelfForcingRollout  # noqa: E402
from megadistill.rollout.steps import StepListConfig  # noqa: E402
from megadistill.models.wan.denoiser import WanCondition, WanDenoiser  # noqa: E402
from megadistill.models.wan.networks import rebuild  # noqa: E402
from megadistill.models.wan.run_config import SHIFT  # noqa: E402

CASES = ("bidir", "rollout", "rollout_copy", "flex", "sdpa_mask")
# Dense bf16 tensor-core peak of the GPUs this is run on (H100 / H200 SXM, from NVIDIA's data sheets).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}


def forward_flops(cfg, tokens: int, kv_tokens: Optional[float] = None) -> float:
    """Model FLOPs of one forward over ``tokens`` query tokens attending to ``kv_tokens`` keys on
    average (default: all of them): the block GEMMs, self- and cross-attention scores and values."""
    d, f, n = cfg.dim, cfg.ffn_dim, cfg.num_layers
    kv = tokens if kv_tokens is None else kv_tokens
    gemm = 2 * tokens * (4 * d * d + 2 * d * d + 2 * d * f) + 2 * cfg.text_len * 2 * d * d
    attention = 4 * tokens * kv * d + 4 * tokens * cfg.text_len * d
    return n * (gemm + attention)


def static_bytes(model: torch.nn.Module) -> int:
    """Weights and their gradients (the part a plan counts as exact, outside the activations)."""
    return 2 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


@contextlib.contextmanager
def copied_snapshots():
    """The previous behaviour: every checkpointing snapshot copies the visible past up front."""
    begin = KVCache.begin

    def eager(self, start, num_tokens, snapshot=False):
        step = begin(self, start, num_tokens, snapshot)
        if snapshot:
            step.own_past()
            self._views.discard(step)
        return step

    KVCache.begin = eager
    try:
        yield
    finally:
        KVCache.begin = begin


class Meter:
    """Time (synchronised) and peak allocated memory of a callable on ``device``."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(self, fn: Callable[[], None], repeats: int) -> tuple[Optional[float], Optional[int]]:
        """(median seconds of ``repeats`` runs after one warm-up, peak bytes over the last run);
        (None, None) if the device runs out of memory."""
        try:
            return self._run(fn, repeats)
        except torch.cuda.OutOfMemoryError:
            gc.collect()
            torch.cuda.empty_cache()
            return None, None

    def _run(self, fn: Callable[[], None], repeats: int) -> tuple[float, int]:
        fn()  # warm-up: kernels, compilation, mask caches
        times, peak = [], 0
        for _ in range(repeats):
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(self.device)
            self.sync()
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t0)
            if self.device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(self.device)
        times.sort()
        return times[len(times) // 2], peak


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--preset", default="wan2.1-t2v-1.3b")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--latent", type=int, nargs=3, metavar=("F", "H", "W"), help="latent size instead of pixels")
    p.add_argument("--num-frame-per-block", type=int, default=3)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--reference", action="store_true",
                   help="compare flex / sdpa_mask outputs and gradients with float32 SDPA + dense mask")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also print the N kernels taking the most GPU time in one bidir step")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    cb = 2 if dtype == torch.bfloat16 else 4
    torch.manual_seed(0)
    model = build_wan(args.preset, device=device, dtype=dtype, grad_checkpointing=args.checkpointing)
    causal = build_wan(model.config.replace(num_frame_per_block=args.num_frame_per_block), device=device,
                       dtype=dtype, grad_checkpointing=args.checkpointing)
    with torch.no_grad():  # the upstream init zeroes the head: give every output and gradient a value
        for m in (model, causal):
            m.head.head.weight.normal_(0, 0.02)
        causal.load_state_dict(model.state_dict())
    cfg = model.config
    grid = tuple(args.latent) if args.latent else latent_grid(args.frames, args.height, args.width, vae_stride(cfg))
    f, h, w = grid
    pt, ph, pw = cfg.patch_size
    frame_tokens, tokens = (h // ph) * (w // pw), (f // pt) * (h // ph) * (w // pw)
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(1, cfg.in_dim, f, h, w, device=device, dtype=dtype, generator=gen)
    context = torch.randn(1, cfg.text_len, cfg.text_dim, device=device, dtype=dtype, generator=gen)
    t = torch.full((1,), 700.0, device=device)
    meter = Meter(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak_tflops = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    print(f"{args.preset} on {name}: latent {f}x{h}x{w} = {tokens} tokens, {args.dtype}, "
          f"checkpointing {'on' if args.checkpointing else 'off'}, torch {torch.__version__}")

    outputs = {}
    widths = (12, 9, 8, 6, 10, 12)
    line = lambda *cells: print("  ".join(str(c).rjust(w) for c, w in zip(cells, widths)), flush=True)  # noqa: E731
    line("case", "seconds", "TFLOP/s", "MFU", "extra GiB", "planned GiB")

    def record(case, seconds, peak, flops, planned, static):
        if seconds is None:
            total = torch.cuda.get_device_properties(device).total_memory / GIB
            line(case, "out of memory", "", "", f"> {total - static / GIB:.1f}", f"{planned / GIB:.2f}")
            return
        extra = (peak - static) / GIB if device.type == "cuda" else float("nan")
        tflops = flops / seconds / 1e12
        mfu = f"{100 * tflops / peak_tflops:.1f}%" if peak_tflops else "-"
        line(case, f"{seconds:.3f}", f"{tflops:.1f}", mfu, f"{extra:.2f}", f"{planned / GIB:.2f}")

    if "bidir" in args.cases:
        def bidir():
            model.zero_grad(set_to_none=False)
            out = model(x, t, context)
            out.float().square().mean().backward()
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        seconds, peak = meter.run(bidir, args.repeats)
        if args.profile:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                bidir()
                meter.sync()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.profile, max_name_column_width=70))
        planned = bidirectional_activations(cfg, tokens, 1, 1, 1, cb, args.checkpointing).peak
        record("bidir", seconds, peak, 3 * forward_flops(cfg, tokens), planned, static_bytes(model))
        model.zero_grad(set_to_none=True)

    steps = StepListConfig(shift=SHIFT)  # the Wan presets' schedule
    blocks = f // args.num_frame_per_block
    sf = SelfForcingConfig(num_training_frames=blocks * args.num_frame_per_block, last_step_only=True)
    denoiser = WanDenoiser(causal)
    batch = DistillBatch(cond=WanCondition(context=context), latents=DenseLatents(1, (cfg.out_dim, sf.num_training_frames, h, w), frame_dim=2), device=device, dtype=dtype)
    for case in ("rollout", "rollout_copy"):
        if case not in args.cases:
            continue

        def rollout():
            causal.zero_grad(set_to_none=False)
            rng = torch.Generator(device=device).manual_seed(2)
            out = SelfForcingRollout(steps, sf, generator=torch.Generator().manual_seed(3), noise_generator=rng)(
                denoiser, batch, grad=True)
            out.samples.float().square().mean().backward()
        for p in causal.parameters():
            p.grad = torch.zeros_like(p)
        with copied_snapshots() if case == "rollout_copy" else contextlib.nullcontext():
            seconds, peak = meter.run(rollout, args.repeats)
        q = args.num_frame_per_block * frame_tokens
        # per block: (steps - 1) no-grad forwards + the exit forward + its backward (2x) + the refresh
        mean_kv = sum(q * (j + 1) for j in range(blocks)) / blocks
        flops = blocks * forward_flops(cfg, q, mean_kv) * (len(steps.steps) + 2 + 1)
        planned = (causal_activations(cfg, frame_tokens, blocks * args.num_frame_per_block, args.num_frame_per_block,
                                      1, 1, 1, cb, args.checkpointing).peak
                   + kv_cache_bytes(cfg, frame_tokens, blocks * args.num_frame_per_block, 1, 1, 1, cb))
        record(case, seconds, peak, flops, planned, static_bytes(causal))
        causal.zero_grad(set_to_none=True)

    for case in ("sdpa_mask", "flex"):
        if case not in args.cases:
            continue
        if case == "flex" and device.type != "cuda":
            print("flex: skipped (flex_attention trains on CUDA only)")
            continue
        causal = rebuild(causal, attention="flex" if case == "flex" else "sdpa")  # back-end fixed at build
        ts = torch.linspace(100, 900, f // args.num_frame_per_block, device=device)
        t_frames = ts.repeat_interleave(args.num_frame_per_block)[None]

        def parallel_causal():
            causal.zero_grad(set_to_none=False)
            out = causal(x, t_frames, context)
            out.float().square().mean().backward()
            outputs[case] = (out.detach().float(), {n: p.grad.detach().float().clone()
                                                    for n, p in causal.named_parameters() if "blocks.0." in n})
        for p in causal.parameters():
            p.grad = torch.zeros_like(p)
        seconds, peak = meter.run(parallel_causal, args.repeats)
        visible = sum(min(f, (j // args.num_frame_per_block + 1) * args.num_frame_per_block) for j in range(f))
        flops = 3 * forward_flops(cfg, tokens, visible / f * frame_tokens)  # mean visible frames x tokens
        planned = bidirectional_activations(cfg, tokens, 1, 1, 1, cb, args.checkpointing).peak
        record(case, seconds, peak, flops, planned, static_bytes(causal))
        causal.zero_grad(set_to_none=True)

    if outputs and args.reference:
        # Both masked paths against float32 SDPA with the dense mask: a backend is right when its error
        # is that of its precision (the other path's), not larger.
        causal = rebuild(causal.float(), attention="sdpa")
        x, context = x.float(), context.float()
        for p in causal.parameters():
            p.grad = torch.zeros_like(p)
        case = "reference"
        parallel_causal()
        o0, g0 = outputs.pop("reference")
        rel = lambda a, b: float((a - b).norm() / b.norm().clamp_min(1e-30))  # noqa: E731
        # A key bias shifts every score of a query equally: softmax cancels it, its true gradient is 0.
        names = [n for n in g0 if not n.endswith("k.bias")]
        for case, (o1, g1) in outputs.items():
            worst = max(names, key=lambda n: rel(g1[n], g0[n]))
            print(f"{case} vs float32 SDPA + dense mask: output rel. error {rel(o1, o0):.2e}; block 0 gradients: "
                  f"worst rel. error {rel(g1[worst], g0[worst]):.2e} ({worst})")
    print("extra = peak allocated minus weights and gradients; planned = memory_plan's activations "
          "(+ KV cache for the rollouts) for batch 1, no parallelism.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
