"""One rank of the CFG-parallel tests (run by tests/parallel/test_cfg_parallel.py through tests/helpers/ranks.py).

Also imported by the test for ``make_denoiser``, ``make_sample``, ``loss_weights`` and the case tables,
so the single-process reference and the ranks build the same teacher and inputs. Two launches:

- 2 ranks, cfg group ``dist.new_group([0, 1])``, both ranks on sample 0;
- 4 ranks, ``ParallelMesh(ParallelConfig(cfg=2))``: cfg groups {0, 1} and {2, 3}, each on the sample of
  its dp coordinate (sample = dp_rank, as the mesh seeds them).

For every case each rank runs the wrapped teacher's guided call on a leaf x_t, backpropagates
``sum(weights(global rank) * output)`` (different weights on each rank, so the test sees the summed-
gradient rule of the exchange, not just a symmetric special case) and, for one case, the same loss on
both ranks; it saves outputs, x_t gradients, and how many network forwards and exchanges it ran.
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch

from megadistill.models.wan import build_wan
from megadistill.models.wan.denoiser import WanCondition, WanDenoiser

BATCH, FRAMES, LATENT_HW, TEXT_LEN = 2, 3, 4, 8

# name -> (preset, timestep form, first-frame conditioning)
CASES = {
    "t2v_per_sample": ("tiny-t2v", "sample", False),   # t [B]
    "t2v_per_frame": ("tiny-t2v", "frame", False),     # t [B, F]
    "ti2v_first_frame": ("tiny-ti2v", "sample", True),  # WanDenoiser's frame-0 overrides
}
GUIDANCE = [("standard", 3.0), ("upstream", 2.0)]
UNGUIDED = [("standard", 1.0), ("upstream", 0.0)]
FNS = ("x0_guided", "flow_guided")
SAME_LOSS_CASE = ("t2v_per_frame", "standard", "x0_guided")


def make_denoiser(preset: str) -> WanDenoiser:
    torch.manual_seed(0)
    model = build_wan(preset, text_len=TEXT_LEN)
    with torch.no_grad():  # the upstream init zeroes the head, which would make every output zero
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return WanDenoiser(model)


def make_sample(name: str, sample: int, net) -> dict:
    """x_t, t, cond, uncond of one training sample (``sample`` = the dp coordinate)."""
    _, t_form, first_frame = CASES[name]
    c = net.config
    g = torch.Generator().manual_seed(1000 * sample + list(CASES).index(name))
    x = torch.randn(BATCH, c.out_dim, FRAMES, LATENT_HW, LATENT_HW, generator=g)
    t = torch.rand(BATCH, FRAMES, generator=g) * 1000 if t_form == "frame" else torch.rand(BATCH, generator=g) * 1000
    image = torch.randn(BATCH, c.out_dim, 1, LATENT_HW, LATENT_HW, generator=g) if first_frame else None
    cond = WanCondition(torch.randn(BATCH, TEXT_LEN, c.text_dim, generator=g), first_frame=image)
    uncond = WanCondition(torch.randn(BATCH, TEXT_LEN, c.text_dim, generator=g), first_frame=image)
    return dict(x=x, t=t, cond=cond, uncond=uncond)


def loss_weights(key: str, rank: int, shape) -> torch.Tensor:
    """The weights rank ``rank`` contracts the output with (``rank`` -1: the shared same-loss weights)."""
    stable = sum((i + 1) * ord(ch) for i, ch in enumerate(key)) % 100_003  # str hash() is salted per process
    return torch.randn(shape, generator=torch.Generator().manual_seed(stable * 10 + rank + 1))


def gather_weights(rank: int, world: int, n: int = 5) -> torch.Tensor:
    """c[r] of the direct all_gather check: rank r's loss is sum_k c[r, k] * gathered[k]."""
    return torch.randn(world, n, generator=torch.Generator().manual_seed(77 + rank))


def gather_input(rank: int, n: int = 5) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float32) * (rank + 1) - 1.5


def _count_forwards(module) -> list:
    count = [0]
    module.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    return count


def _api_checks(group, world_group, odd_group, rank: int, den: WanDenoiser) -> dict:
    from megadistill.parallel.cfg_parallel import CFGParallelDenoiser, all_gather_with_grad, cfg_parallel

    out = {}
    wrapped = cfg_parallel(den, group)
    out["type"] = type(wrapped).__name__
    out["net_is_same"] = wrapped.net is den.net
    out["num_train_timesteps"] = wrapped.num_train_timesteps
    out["param_names"] = sorted(n for n, _ in wrapped.named_parameters())
    out["same_params"] = {id(p) for p in wrapped.parameters()} == {id(p) for p in den.parameters()}
    s = make_sample("t2v_per_frame", 0, den.net)
    with torch.no_grad():
        out["flow_equal"] = torch.equal(wrapped.flow(s["x"], s["t"], s["cond"]), den.flow(s["x"], s["t"], s["cond"]))
        out["x0_equal"] = torch.equal(wrapped.x0(s["x"], s["t"], s["cond"]), den.x0(s["x"], s["t"], s["cond"]))
        v = torch.randn_like(s["x"])
        out["flow_to_x0_equal"] = torch.equal(wrapped.flow_to_x0(v, s["x"], s["t"]), den.flow_to_x0(v, s["x"], s["t"]))
        out["sigma_equal"] = torch.equal(wrapped.sigma(s["t"]), den.sigma(s["t"]))
        out["network_inputs_equal"] = all(torch.equal(a, b) for a, b in zip(
            wrapped.network_inputs(s["x"], s["t"][:, 0], s["cond"]), den.network_inputs(s["x"], s["t"][:, 0], s["cond"])))
    out["size1_unchanged"] = cfg_parallel(den, world_group["single"]) is den
    out["none_unchanged"] = cfg_parallel(den, None) is den
    for key, bad in (("world", world_group["world"]), ("three", odd_group)):
        if bad is None:
            continue
        for label, fn in (("fn", lambda: cfg_parallel(den, bad)), ("cls", lambda: CFGParallelDenoiser(den, bad))):
            try:
                fn()
                out[f"error_{key}_{label}"] = None
            except ValueError as err:
                out[f"error_{key}_{label}"] = str(err)
    try:
        wrapped.x0_guided(s["x"], s["t"], s["cond"], s["uncond"], 2.0, "bogus")
        out["bad_form_error"] = None
    except ValueError as err:
        out["bad_form_error"] = str(err)

    # the exchange itself: rank r's loss sum_k c[r, k] . gathered[k]
    x = gather_input(rank).requires_grad_(True)
    gathered = all_gather_with_grad(x, group)
    c = gather_weights(rank, gathered.shape[0])
    (c * gathered).sum().backward()
    out["gather_value"] = gathered.detach()
    out["gather_grad"] = x.grad
    return out


def run(group, sample: int, rank: int) -> dict:
    import megadistill.parallel.cfg_parallel as cfg_mod

    exchanges = [0]
    real_gather = cfg_mod.all_gather_with_grad

    def counting_gather(x, grp):
        exchanges[0] += 1
        return real_gather(x, grp)

    cfg_mod.all_gather_with_grad = counting_gather
    out = {"cases": {}, "unguided": {}}
    for name, (preset, _, _) in CASES.items():
        den = make_denoiser(preset)
        forwards = _count_forwards(den.net)
        wrapped = cfg_mod.cfg_parallel(den, group)
        s = make_sample(name, sample, den.net)
        for form, scale in GUIDANCE:
            for fn in FNS:
                runs = [("distinct", rank)] + ([("same", -1)] if (name, form, fn) == SAME_LOSS_CASE else [])
                for loss_kind, weight_rank in runs:
                    forwards[0] = exchanges[0] = 0
                    x = s["x"].clone().requires_grad_(True)
                    y = getattr(wrapped, fn)(x, s["t"], s["cond"], s["uncond"], scale, form)
                    key = f"{name}/{form}/{fn}"
                    (loss_weights(key, weight_rank, y.shape) * y).sum().backward()
                    out["cases"][f"{key}/{loss_kind}"] = dict(
                        y=y.detach(), grad=x.grad, forwards=forwards[0], exchanges=exchanges[0])
        for form, scale in UNGUIDED:
            for fn in FNS:
                forwards[0] = exchanges[0] = 0
                with torch.no_grad():
                    y = getattr(wrapped, fn)(s["x"], s["t"], s["cond"], None, scale, form)
                out["unguided"][f"{name}/{form}/{fn}"] = dict(y=y, forwards=forwards[0], exchanges=exchanges[0])
    cfg_mod.all_gather_with_grad = real_gather
    return out


def main(spec_path: str) -> None:
    import torch.distributed as dist

    spec = json.loads(open(spec_path).read())
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    start = time.time()
    single = [dist.new_group([r]) for r in range(world)][rank]
    odd = dist.new_group([0, 1, 2]) if world >= 3 else None
    result = {"world": world, "rank": rank}
    if world == 2:
        group = dist.new_group([0, 1])
        result["sample"], result["group_ranks"] = 0, [0, 1]
    else:
        from megadistill.parallel.mesh import ParallelConfig, ParallelMesh

        mesh = ParallelMesh(ParallelConfig(cfg=2))
        group = mesh.cfg_group
        result["sample"], result["group_ranks"] = mesh.dp_rank, mesh.ranks("cfg")
        result["mesh_cfg_rank"], result["group_rank"] = mesh.cfg_rank, dist.get_rank(group)
    result["api"] = _api_checks(group, {"single": single, "world": dist.group.WORLD if world > 2 else None},
                                odd if (odd is not None and rank < 3) else None, rank, make_denoiser("tiny-t2v"))
    result.update(run(group, result["sample"], rank))
    dist.barrier()
    torch.save(result, os.path.join(spec["out_dir"], f"rank{rank}.pt"))
    print(f"rank {rank}: done in {time.time() - start:.1f} s", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
