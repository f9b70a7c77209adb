"""One rank of tiny distillation runs on the real trainer (launched by the engine tests).

    python tests/engine/train_worker.py SPEC.json

SPEC: {"ds_config": {...}, "results": "out.pt", "runs": [{"method": "dmd" | "ode", "checkpoint_dir": ...,
"max_steps": N, "save_every": K, "sigterm_at_batch": B or null, "record_weights": bool}, ...]}.
The runs share the process group. Rank 0 writes, per run, the step logs, the gathered generator
weights after every step (when asked), the gathered EMA and the final gathered generator / critic.
"""
from __future__ import annotations

import json
import os
import signal
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megadistill.diffusion.latents import DenseLatents
from megadistill.engine.config import EMAConfig, OptimConfig, TrainConfig  # noqa: E402
from megadistill.engine.data_source import SeededBatchSource  # noqa: E402
from megadistill.engine.config import load_ds_config  # noqa: E402
from megadistill.engine.engines import (  # noqa: E402
    full_state_dict, init_distributed, load_full_state_dict, model_init_context,
)
from megadistill.engine.rng import derive_seed  # noqa: E402
from megadistill.engine.trainer import Trainer  # noqa: E402
from megadistill.methods.base import Denoiser, DistillBatch, FewStepRollout  # noqa: E402
from megadistill.methods.dmd import DMD, DMDConfig  # noqa: E402
from megadistill.methods.ode_regression import (  # noqa: E402
    ODERegression, ODERegressionConfig, generate_ode_pairs, guided_flow_fn,
)
from megadistill.models.toy.mlp import ToyFlowMLP  # noqa: E402

NUM_CLASSES, DIM, BATCH = 4, 2, 16
ODE_STEPS = [1000.0, 500.0]
ODE_POOL = 512


def tiny_mlp(seed: int) -> ToyFlowMLP:
    torch.manual_seed(seed)
    return ToyFlowMLP(dim=DIM, num_classes=NUM_CLASSES, hidden=32, depth=2, time_dim=16)


def conditions(g: torch.Generator, n: int):
    cond = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    return cond, torch.full_like(cond, NUM_CLASSES)


def partitioned_teacher(rank: int, ds: dict) -> Denoiser:
    """The teacher built already partitioned (deepspeed.zero.Init) and loaded from rank 0's weights;
    rank 1 offers zeros, so a broken broadcast would show in the gathered teacher."""
    source = tiny_mlp(0).state_dict()
    if rank != 0:
        source = {k: torch.zeros_like(v) for k, v in source.items()}
    with model_init_context(ds):
        teacher = Denoiser(tiny_mlp(0))
    load_full_state_dict(teacher, {f"net.{k}": v for k, v in source.items()})
    return teacher


def dmd_setup(rank: int, seed: int, ds: dict):
    """DMD with a two-step rollout: the exit step is drawn from a generator shared by all ranks."""
    rng, rollout_rng = torch.Generator(), torch.Generator()
    cfg = DMDConfig(guidance_scale=2.0, guidance_form="standard", timestep_shift=1.0, snap_noise_to_grid=False)
    method = DMD(cfg, generator=Denoiser(tiny_mlp(0)), teacher=partitioned_teacher(rank, ds),
                 critic=Denoiser(tiny_mlp(1)), rollout=FewStepRollout([1000.0, 500.0], generator=rollout_rng), rng=rng)

    def make_batch(g):
        cond, uncond = conditions(g, BATCH)
        return DistillBatch(cond=cond, uncond=uncond, latents=DenseLatents(BATCH, (DIM,)))

    return method, make_batch, {"method": rng}, {"rollout": rollout_rng}


def ode_setup(rank: int, seed: int, ds: dict):
    """ODE regression of a fresh student onto a (random) teacher's guided trajectories."""
    teacher = Denoiser(tiny_mlp(0))
    pool_rng = torch.Generator().manual_seed(123)  # the same stored pairs on every rank
    cond, uncond = conditions(pool_rng, ODE_POOL)
    noise = torch.randn(ODE_POOL, DIM, generator=pool_rng)
    trajectory, stored = generate_ode_pairs(guided_flow_fn(teacher, cond, uncond, 2.0), noise, ODE_STEPS, 16)
    rng = torch.Generator()
    method = ODERegression(ODERegressionConfig(step_list=ODE_STEPS), generator=Denoiser(tiny_mlp(2)), rng=rng)

    def make_batch(g):
        idx = torch.randint(0, ODE_POOL, (BATCH,), generator=g)
        return DistillBatch(cond=cond[idx], uncond=uncond[idx], latents=DenseLatents(BATCH, (DIM,)),
                            trajectory=trajectory[idx], trajectory_steps=stored)

    return method, make_batch, {"method": rng}, {}


def run(spec: dict, run_spec: dict, rank: int) -> dict:
    train = TrainConfig(
        max_steps=run_spec["max_steps"], micro_batch_size=BATCH, grad_accum=spec.get("grad_accum", 1),
        dfake_gen_update_ratio=2, seed=7, precision="fp32", save_every=run_spec["save_every"], keep_last=2,
        log_every=0, generator_optim=OptimConfig(lr=1e-3, grad_clip=1.0, warmup_steps=2),
        critic_optim=OptimConfig(lr=3e-3, grad_clip=1.0), ema=EMAConfig(decay=0.9, start_step=2),
    )
    ds = load_ds_config(spec["ds_config"], train, init_distributed().world_size)
    setup = dmd_setup if run_spec["method"] == "dmd" else ode_setup
    method, make_batch, generators, shared = setup(rank, train.seed, ds)
    data = SeededBatchSource(make_batch, derive_seed(train.seed, rank, "data"))
    sigterm_at = run_spec.get("sigterm_at_batch")
    if sigterm_at is not None and rank == 0:
        def make_batch_then_signal(g):  # SIGTERM in the middle of a step, like SLURM preemption
            if data.position == sigterm_at:
                signal.raise_signal(signal.SIGTERM)
            return make_batch(g)

        data.make_batch = make_batch_then_signal

    weights = []

    def record(trainer, logs):
        if run_spec.get("record_weights"):
            weights.append({k: v.double() for k, v in full_state_dict(method.generator).items()})

    trainer = Trainer(method, data, train, ds, run_spec.get("checkpoint_dir"),
                      generators=generators, shared_generators=shared, callbacks=[record])
    history = trainer.train()
    started = trainer.ema.started
    return {
        "history": history, "weights": weights, "resumed_from": trainer.resumed_from, "step": trainer.step,
        "ema": trainer.ema.gather() if started else None,
        "ema_shard_numel": sum(s.numel() for s in trainer.ema.shards.values()) if started else 0,
        "generator": full_state_dict(method.generator),
        "critic": full_state_dict(method.critic) if method.has_critic else None,
        "zero_stage": trainer.engines.zero_stage,
        "teacher": full_state_dict(method.teacher) if hasattr(method, "teacher") else None,
        "teacher_source": {f"net.{k}": v for k, v in tiny_mlp(0).state_dict().items()},
        "teacher_local_numel": _teacher_local_numel(method),
    }


def _teacher_local_numel(method):
    """Elements of the teacher this rank holds (its ZeRO-3 partitions), None without a teacher."""
    teacher = getattr(method, "teacher", None)
    if teacher is None:
        return None
    return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in teacher.parameters())


def main() -> None:
    # the `deepspeed` launcher adds --local_rank=N (launch/train.py must accept it too)
    (spec_path,) = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    with open(spec_path) as f:
        spec = json.load(f)
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))  # absent under a plain `python` start
    results = [run(spec, r, rank) for r in spec["runs"]]
    if rank == 0:
        torch.save(results, spec["results"])


if __name__ == "__main__":
    main()
