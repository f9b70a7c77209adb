"""One rank of the Ulysses tests (run by tests/parallel/test_sequence_parallel.py through tests/helpers/ranks.py).

Also imported by the test for ``make_case`` and ``run_case``, so the single-process reference and the
ranks build the same models and inputs and run the same procedure. Four ranks (gloo) run every case
under sp = 4 (one group) and sp = 2 (groups {0, 1} and {2, 3}), each rank backpropagating loss / sp,
and some cases under tensor parallelism (tp = 2, groups {0, 1}, {2, 3}) composed with sp = 2 (groups
{0, 2}, {1, 3}: TP innermost, as the mesh lays them out), and save their outputs and gradients; they
also record the no-op and error paths of ``apply_sequence_parallel``.
"""
from __future__ import annotations

import copy
import json
import os
import sys
import time

import torch

from megadistill.models.wan import CrossAttnCache, build_wan, new_kv_cache

LATENT_HW = 6  # 6 x 6 latents -> 3 x 3 patches: 9 tokens per frame, so L is odd and divides by neither 2 nor 4
FRAME_TOKENS = (LATENT_HW // 2) ** 2
BATCH = 2

# name -> (preset, config overrides, frames, timestep form, mode)
CASES = {
    "t2v": ("tiny-t2v", {}, 3, "batch", "forward"),                                    # L = 27
    "i2v": ("tiny-i2v", {}, 3, "batch", "forward"),
    "ti2v_per_token": ("tiny-ti2v", dict(fused_qkv=True), 3, "token", "forward"),     # v a strided view of qkv
    "moe": ("tiny-a14b", {}, 3, "straddle", "forward"),                               # one sample per expert
    "causal_per_frame": ("tiny-t2v", dict(num_frame_per_block=2, grad_checkpointing=True), 5, "frame", "forward"),
    "window_per_frame": ("tiny-t2v", dict(num_frame_per_block=1, local_attn_size=2, sink_size=1), 5, "frame",
                         "forward"),
    "causal_steps": ("tiny-t2v", dict(num_frame_per_block=2), 5, "frame", "steps"),  # blocks of 18, 18, 9 tokens
    "window_steps": ("tiny-t2v", dict(num_frame_per_block=1, local_attn_size=2, sink_size=1, grad_checkpointing=True),
                     5, "frame", "steps"),                                             # evicts from frame 3 on
}


def make_case(name: str):
    """(model, inputs) of one case, deterministic: every process builds the same ones."""
    preset, overrides, frames, t_form, _ = CASES[name]
    torch.manual_seed(0)
    model = build_wan(preset, text_len=8, **overrides)
    with torch.no_grad():  # the upstream init zeroes the head, which would make every output zero
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    c = model.config
    g = torch.Generator().manual_seed(1)
    num_tokens = frames * FRAME_TOKENS
    inputs = dict(
        x=torch.randn(BATCH, c.out_dim, frames, LATENT_HW, LATENT_HW, generator=g),
        x0=torch.randn(BATCH, c.out_dim, frames, LATENT_HW, LATENT_HW, generator=g),  # clean frames of a refresh
        context=torch.randn(BATCH, 8, c.text_dim, generator=g),
        t={"batch": torch.rand(BATCH, generator=g) * 1000,
           "token": torch.rand(BATCH, num_tokens, generator=g) * 1000,
           "frame": torch.rand(BATCH, frames, generator=g) * 1000,
           "straddle": torch.tensor([950.0, 120.0])}[t_form],
    )
    if c.model_type == "i2v":
        inputs["y"] = torch.randn(BATCH, c.condition_dim, frames, LATENT_HW, LATENT_HW, generator=g)
        inputs["clip_fea"] = torch.randn(BATCH, 257, c.image_dim, generator=g)
    inputs["weights"] = torch.randn(BATCH, c.out_dim, frames, LATENT_HW, LATENT_HW, generator=g)
    return model, inputs


def run_case(name: str, model, inputs, loss_scale: float = 1.0) -> dict:
    """Outputs, parameter gradients of loss_scale * sum(weights * outputs), the KV-cache head count and
    the token counts the blocks saw (the shard length under sequence parallelism)."""
    from megadistill.models.wan.blocks import WanBlock

    mode = CASES[name][4]
    model.zero_grad(set_to_none=True)
    block_tokens = set()
    hooks = [m.register_forward_pre_hook(lambda _, args: block_tokens.add(args[0].shape[1]))
             for m in model.modules() if isinstance(m, WanBlock)]
    if mode == "forward":
        out = model(inputs["x"], inputs["t"], inputs["context"], clip_fea=inputs.get("clip_fea"), y=inputs.get("y"))
        outputs, loss, cache_heads = [out], (out * inputs["weights"]).sum(), None
    else:
        outputs, loss, cache_heads = _causal_steps(model, inputs)
    (loss * loss_scale).backward()
    for h in hooks:
        h.remove()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return dict(outputs=[o.detach() for o in outputs], grads=grads, cache_heads=cache_heads,
                block_tokens=sorted(block_tokens))


def _causal_steps(model, inputs):
    """A Self-Forcing-like rollout: each block denoised with gradients at per-frame timesteps, then
    re-run clean (t = 0, no grad) at the same start frame to refresh its cache slot."""
    x, x0, t, w = inputs["x"], inputs["x0"], inputs["t"], inputs["weights"]
    frames, nfpb = x.shape[2], model.config.num_frame_per_block
    caches = new_kv_cache(model, BATCH, FRAME_TOKENS, max_frames=frames)
    cross = CrossAttnCache()
    outputs, loss = [], 0.0
    for s in range(0, frames, nfpb):
        e = min(s + nfpb, frames)
        out = model.forward_causal_step(x[:, :, s:e], t[:, s:e], inputs["context"], caches, cross, start_frame=s)
        loss = loss + (out * w[:, :, s:e]).sum()
        with torch.no_grad():
            clean = model.forward_causal_step(x0[:, :, s:e], torch.zeros(BATCH), inputs["context"], caches, cross,
                                              start_frame=s)
        outputs += [out, clean]
    return outputs, loss, caches[0].k.shape[2]


def generate(model) -> torch.Tensor:
    """The streaming few-step rollout of the inference code (causal_generate), unchanged, on the
    ``causal_steps`` case: 4 denoising steps per block with re-noising draws, cache refresh between blocks."""
    from megadistill.rollout.causal_inference import causal_generate
    from megadistill.rollout.steps import StepListConfig
    from megadistill.models.wan.denoiser import WanCondition, WanDenoiser

    _, inputs = make_case("causal_steps")
    return causal_generate(WanDenoiser(model), WanCondition(inputs["context"]), inputs["x"], StepListConfig(),
                           torch.Generator().manual_seed(0), context_noise=50.0)


def bf16_forward(name: str, sp_group=None) -> torch.Tensor:
    """The block-causal forward of a bf16 copy of a case (with sequence parallelism if a group is given)."""
    from megadistill.models.wan.parallelize import apply_sequence_parallel

    model, inputs = make_case(name)
    preset, overrides = CASES[name][:2]
    low = build_wan(preset, text_len=8, dtype=torch.bfloat16, **overrides)
    low.load_state_dict(model.state_dict())
    if sp_group is not None:
        apply_sequence_parallel(low, sp_group)
    with torch.no_grad():
        return low(inputs["x"], inputs["t"], inputs["context"])


def _api_checks(rank: int, groups: dict) -> dict:
    """No-op at sp = 1, errors before any change, deep copies of a parallel model."""
    from megadistill.models.wan.parallelize import WanUlyssesLayout, apply_sequence_parallel
    from megadistill.parallel.sequence_parallel import UlyssesAttention
    from megadistill.models.wan.attention import SelfAttentionCore
    from megadistill.models.wan.model import TokenLayout

    def untouched(model):
        return type(model.token_layout) is TokenLayout and all(
            type(b.self_attn.core) is SelfAttentionCore for b in model.blocks)

    out = {}
    model, inputs = make_case("t2v")
    reference, _ = make_case("t2v")
    with torch.no_grad():
        expected = reference(inputs["x"], inputs["t"], inputs["context"])
        same = apply_sequence_parallel(model, groups["single"])
        out["sp1_noop"] = same is model and untouched(model) and torch.equal(
            model(inputs["x"], inputs["t"], inputs["context"]), expected)

    if rank < 3:  # 4 heads over a group of 3
        model, _ = make_case("t2v")
        try:
            apply_sequence_parallel(model, groups["three"])
            out["sp3_error"] = None
        except ValueError as err:
            out["sp3_error"] = str(err)
        out["sp3_untouched"] = untouched(model)

    # the module's current (tensor-parallel local) head count is what must divide: 2 local heads, sp = 4;
    # only the last block is short, so a check that stopped at the first block would miss it
    model, _ = make_case("t2v")
    model.blocks[-1].self_attn.num_heads = 2
    try:
        apply_sequence_parallel(model, groups[4])
        out["tp_local_error"] = None
    except ValueError as err:
        out["tp_local_error"] = str(err)
    out["tp_local_untouched"] = untouched(model)

    model, inputs = make_case("t2v")
    apply_sequence_parallel(model, groups[4])
    try:
        apply_sequence_parallel(model, groups[4])
        out["twice_error"] = None
    except ValueError as err:
        out["twice_error"] = str(err)
    twin = copy.deepcopy(model)  # EMA / frozen-teacher copies of a parallel model
    out["deepcopy_layout"] = isinstance(twin.token_layout, WanUlyssesLayout) and all(
        isinstance(b.self_attn.core, UlyssesAttention) for b in twin.blocks)
    with torch.no_grad():
        out["deepcopy_equal"] = torch.equal(twin(inputs["x"], inputs["t"], inputs["context"]),
                                            model(inputs["x"], inputs["t"], inputs["context"]))
    return out


def main(spec_path: str) -> None:
    import torch.distributed as dist

    from megadistill.models.wan.parallelize import apply_sequence_parallel, apply_tensor_parallel

    torch.set_num_threads(1)
    spec = json.loads(open(spec_path).read())
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 4, world
    # every rank takes part in creating every group, including the ones it is not in
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    singles = [dist.new_group([r]) for r in range(world)]
    three = dist.new_group([0, 1, 2])
    sp_across_tp = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    groups = {4: dist.new_group([0, 1, 2, 3]), 2: pairs[rank // 2], "single": singles[rank], "three": three}

    results, clock = {}, time.perf_counter()

    def log(what):  # per-phase times in the rank's log
        nonlocal clock
        print(f"rank {rank}: {what} {time.perf_counter() - clock:.2f} s", flush=True)
        clock = time.perf_counter()

    log("groups")
    for sp in spec["sp"]:
        for name in spec["cases"]:
            model, inputs = make_case(name)
            apply_sequence_parallel(model, groups[sp])
            results[(sp, name)] = run_case(name, model, inputs, loss_scale=1.0 / sp)
            log(f"sp={sp} {name}")
        model, _ = make_case("causal_steps")
        apply_sequence_parallel(model, groups[sp])
        results[(sp, "generate")] = generate(model)
        results[(sp, "bf16")] = bf16_forward("causal_per_frame", groups[sp])
        log(f"sp={sp} generate, bf16")
    for name in spec["tp_sp_cases"]:
        model, inputs = make_case(name)
        apply_tensor_parallel(model, pairs[rank // 2])  # tp first: sp then splits the tp-local heads
        apply_sequence_parallel(model, sp_across_tp[rank % 2])
        results[("tp2sp2", name)] = run_case(name, model, inputs, loss_scale=1.0 / 2)
        results[("tp2sp2", name)]["partition"] = {
            n: (p.partition_dim, p.partition_chunks) for n, p in model.named_parameters()
            if getattr(p, "tensor_model_parallel", False)}
        log(f"tp=2 x sp=2 {name}")
    results["api"] = _api_checks(rank, groups)
    log("api")
    torch.save(results, os.path.join(spec["out_dir"], f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
