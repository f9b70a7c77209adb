"""One rank of a tiny Wan DMD (or GAN) run through the real Trainer on a parallel mesh (launched by
test_parallel_training.py through tests/helpers/ranks.py).

    python tests/parallel/train_sp_worker.py SPEC.json

SPEC: {"results": "out.pt", "grad_accum": 1, "runs": [{"tp": 1, "sp": 2, "ema": true, "stage": 3}, ...]} (the runs
share the process group; results: one dict per run). A run may also name "cfg" (parallel.cfg),
"method" ("dmd", the default, or "gan"), "checkpoint" (a checkpoint directory: saved every 2 steps and
at the end, the step-2 one kept) and "resume_from" (a checkpoint to resume from: the run then trains
only the steps after it). Teacher, generator and critic are one tiny randomly initialised Wan T2V (27
tokens: not divisible by sp), parallelized with ``parallelize_wan``; DMD (guidance scale 3, the
teacher wrapped by the wan job's ``teacher_denoiser``: CFG-parallel when cfg = 2) or GAN (the wan job's
``wan_discriminator`` on blocks 0 and 1, critic denoising loss on; real samples drawn per sample)
with the bidirectional rollout of the wan job; ZeRO-3 (or 2), fp32.

The same global batch in every layout: sample ``v`` of update ``u`` is defined by its global index,
v = dp_rank x grad_accum + micro-batch index (``GlobalSampleSource``): its prompt embedding, the
rollout noise, the real sample (GAN) and the method's timestep / noise draws come from streams seeded
with (u, v), the rollout's exit
step from a stream seeded with u alone (shared by every rank, as ZeRO-3 requires). So dp ranks x
grad_accum is the number of samples per update, however they are spread over ranks: 2 dp ranks x 1
micro-batch (4 ranks with sp=2) against 1 process x 2 accumulated micro-batches.

Rank 0 writes the step logs, the gathered final generator / critic (full, unsharded) and EMA, and the
critic's Wan denoiser after loading the generator's full weights into it (load_full_state_dict); every
rank also reports one draw of the trainer-seeded method stream (the seed rule: equal within a
tp x sp x cfg group, different across dp).
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megadistill.diffusion.latents import DenseLatents
from megadistill.engine.config import EMAConfig, OptimConfig, TrainConfig  # noqa: E402
from megadistill.engine.engines import full_state_dict, init_distributed, load_full_state_dict  # noqa: E402
from megadistill.engine.trainer import Trainer  # noqa: E402
from megadistill.rollout.config import RolloutConfig, build_rollout  # noqa: E402
from megadistill.methods.base import DistillBatch  # noqa: E402
from megadistill.methods.dmd import DMD, DMDConfig  # noqa: E402
from megadistill.methods.gan import GANConfig, GANDistillation  # noqa: E402
from megadistill.models.wan.discriminator import wan_discriminator  # noqa: E402
from megadistill.models.wan import build_wan  # noqa: E402
from megadistill.parallel.cfg_parallel import CFGParallelDenoiser, cfg_parallel  # noqa: E402
from megadistill.parallel.mesh import ParallelConfig, ParallelMesh  # noqa: E402
from megadistill.models.wan.parallelize import parallelize_wan  # noqa: E402
from megadistill.rollout.steps import StepListConfig  # noqa: E402
from megadistill.models.wan.denoiser import WanCondition, WanDenoiser  # noqa: E402

LATENT = (16, 3, 6, 6)  # [C, F, H, W]: 3 x 3 x 3 = 27 tokens with patch (1, 2, 2)
TEXT_LEN, STEPS = 8, 3
SEED = 2  # the rollout's exit steps of the three generator updates are then 0, 2, 1
# AdamW with eps = 1 (>> |gradient|) updates by about lr x gradient: unlike eps = 1e-8 (about lr x
# sign(gradient)) it is sensitive to the gradients' scale, so a wrong SP weighting shows in the weights.
LR, EPS = 0.5, 1.0


def tiny_wan(num_heads: int):
    """The tiny Wan with every parameter drawn (the upstream init zeroes the head: trivial outputs)."""
    torch.manual_seed(0)
    model = build_wan("tiny-t2v", text_len=TEXT_LEN, num_heads=num_heads)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(1 + 0.2 * noise)
            elif name.endswith("bias") or name.endswith("head.weight"):
                p.copy_(0.05 * noise)
            elif p.dim() == 2:
                p.copy_(noise / p.shape[1] ** 0.5)
    return model


class GlobalSampleSource:
    """Batches (and the method's draws) defined by the global sample index; see the module docstring."""

    def __init__(self, per_sample, shared, dp_rank: int, grad_accum: int, text_dim: int, real: bool = False):
        self.per_sample, self.shared = per_sample, shared
        self.dp_rank, self.grad_accum, self.text_dim, self.real = dp_rank, grad_accum, text_dim, real
        self.negative = torch.randn(1, TEXT_LEN, text_dim, generator=torch.Generator().manual_seed(99))
        self.position = 0

    def next_batch(self) -> DistillBatch:
        update, micro = divmod(self.position, self.grad_accum)
        sample = self.dp_rank * self.grad_accum + micro
        self.position += 1
        for g in self.shared:
            g.manual_seed(SEED * 7919 + update)
        for g in self.per_sample:
            g.manual_seed((SEED * 7919 + update) * 1009 + sample)
        data = torch.Generator().manual_seed((SEED * 7919 + update) * 1013 + sample)
        context = torch.randn(1, TEXT_LEN, self.text_dim, generator=data)
        real = torch.randn(1, *LATENT, generator=data) if self.real else None
        return DistillBatch(cond=WanCondition(context), uncond=WanCondition(self.negative), latents=DenseLatents(1, LATENT, frame_dim=2), real=real)

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def run(run_spec: dict, grad_accum: int, info) -> dict:
    parallel = ParallelConfig(tp=run_spec.get("tp", 1), sp=run_spec.get("sp", 1), cfg=run_spec.get("cfg", 1))
    gan = run_spec.get("method", "dmd") == "gan"
    mesh = ParallelMesh(parallel, num_heads=4)
    nets = [tiny_wan(num_heads=4) for _ in range(3)]  # teacher, generator, critic: the same weights
    for net in nets:
        parallelize_wan(net, mesh)
    teacher, generator, critic = nets

    rollout_cfg = RolloutConfig(kind="bidirectional", steps=StepListConfig(steps=[1000.0, 750.0, 500.0]))
    rng, rollout_rng = torch.Generator(), torch.Generator()
    rollout = build_rollout(rollout_cfg, rollout_rng, rng)
    if gan:
        torch.manual_seed(3)  # the register heads' initialisation, the same on every rank and in every layout
        critic = wan_discriminator(WanDenoiser(critic), [0, 1])
        method = GANDistillation(GANConfig(gan_g_weight=1.0, gan_d_weight=1.0, critic_denoising_weight=0.5),
                                 generator=WanDenoiser(generator), critic=critic, rollout=rollout, rng=rng)
    else:
        method = DMD(DMDConfig(guidance_scale=3.0), generator=WanDenoiser(generator),
                     teacher=cfg_parallel(WanDenoiser(teacher), mesh.cfg_group), critic=WanDenoiser(critic),
                     rollout=rollout, rng=rng)
    optim = OptimConfig(lr=LR, betas=(0.0, 0.999), eps=EPS, weight_decay=0.0, grad_clip=10.0)
    train = TrainConfig(max_steps=STEPS, micro_batch_size=1, grad_accum=grad_accum, precision="fp32",
                        dfake_gen_update_ratio=1, log_every=0, seed=SEED, generator_optim=optim,
                        critic_optim=optim, ema=EMAConfig(decay=0.9 if run_spec["ema"] else 0.0, start_step=1),
                        save_every=2, keep_last=0, resume_from=run_spec.get("resume_from", ""))
    data = GlobalSampleSource([rng], [rollout_rng], mesh.dp_rank, grad_accum, generator.config.text_dim, real=gan)
    stage = run_spec.get("stage", 3)
    trainer = Trainer(method, data, train, {"zero_optimization": {"stage": stage}},
                      checkpoint_dir=run_spec.get("checkpoint"), generators={"method": rng},
                      shared_generators={"rollout": rollout_rng}, mesh=mesh)
    # The trainer's seeding of the per-rank stream, before the data source reseeds it per sample.
    seeded = torch.randn(4, generator=torch.Generator().set_state(rng.get_state()))
    seeded_all = [torch.zeros_like(seeded) for _ in range(info.world_size)]
    dist.all_gather(seeded_all, seeded)

    history = trainer.train()
    out = {
        "history": [{k: v for k, v in h.items() if k != "step_time_s"} for h in history],
        "generator": full_state_dict(method.generator), "critic": full_state_dict(method.critic),
        "ema": trainer.ema.gather() if trainer.ema is not None else None,
        "seeded": torch.stack(seeded_all), "coords": [None] * info.world_size,
        "zero3": all(hasattr(p, "ds_id") for p in method.generator.parameters()),
        "sizes": dict(mesh.sizes),
        "cfg_parallel_teacher": isinstance(getattr(method, "teacher", None), CFGParallelDenoiser),
    }
    if stage == 3:
        params = list(method.generator.parameters())
        out.update(local_numel=sum(p.ds_tensor.numel() for p in params), num_params=len(params),
                   tp_numel=sum(p.ds_numel for p in params))  # this rank's TP shard, unpartitioned
    dist.all_gather_object(out["coords"], dict(mesh.coords))
    # Full weights back into a split model (each TP rank takes its shard, ZeRO-3 re-partitions): the
    # critic's Wan denoiser (the GAN's backbone) has the generator's architecture, so it must then gather
    # to the generator's weights.
    backbone = method.critic.backbone.denoiser if gan else method.critic
    out["critic_backbone"] = full_state_dict(backbone) if gan else out["critic"]
    load_full_state_dict(backbone, out["generator"])
    out["critic_reloaded"] = full_state_dict(backbone)
    return out


def main(spec_path: str) -> None:
    torch.set_num_threads(1)
    with open(spec_path) as f:
        spec = json.load(f)
    info = init_distributed()
    results = []
    for r in spec["runs"]:
        start = time.perf_counter()
        results.append(run(r, spec["grad_accum"], info))
        results[-1]["seconds"] = time.perf_counter() - start  # reported, never compared
    if info.rank == 0:
        torch.save(results, spec["results"])
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
