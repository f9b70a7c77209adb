"""The real trainer against independent references, started as a plain ``python`` process (the
trainer creates its own one-process group). Launched by test_update_equivalence.py.

    python tests/engine/single_process_worker.py OUT.pt

Gradient accumulation, for ZeRO stages 0, 2 and 3: the same samples as (a) 4 micro-batches of 8
accumulated per step and (b) one batch of 32 per step, and, without DeepSpeed, (c) plain torch AdamW +
clip_grad_norm_ on the batch of 32.
Alternation, for ZeRO stages 0 and 3: SiD (whose generator loss backpropagates through the critic)
on the trainer against the toy lab's plain-torch loop (toylab/loop.py), same batches and RNG streams;
under ZeRO-3 also with the models built inside ``model_init_context`` (deepspeed.zero.Init).
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megadistill.diffusion.latents import DenseLatents
from megadistill.engine.config import EMAConfig, OptimConfig, TrainConfig  # noqa: E402
from megadistill.engine.config import load_ds_config  # noqa: E402
from megadistill.engine.engines import (  # noqa: E402
    full_state_dict, init_distributed, load_full_state_dict, model_init_context, warmup_factor,
)
from megadistill.engine.trainer import Trainer  # noqa: E402
from megadistill.engine.rng import seed_everything  # noqa: E402
from megadistill.methods.base import Denoiser, DistillationMethod, DistillBatch, FewStepRollout, trainable  # noqa: E402
from megadistill.methods.sid import SiD, SiDConfig  # noqa: E402
from megadistill.models.toy.mlp import ToyFlowMLP  # noqa: E402
from megadistill.toylab.config import LoopConfig  # noqa: E402
from megadistill.toylab.loop import train_distillation  # noqa: E402

STEPS, BIG, K = 3, 32, 4
OPTIM = OptimConfig(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.01, grad_clip=0.5, warmup_steps=2)


class FlowFit(DistillationMethod):
    """Flow-matching regression: a loss that is a plain mean over the samples of a batch."""

    name = "flow_fit"

    def __init__(self, generator: Denoiser):
        self.generator = generator

    def generator_parameters(self):
        return trainable(self.generator)

    def generator_loss(self, batch, step):
        x_t, t, cond, target = batch
        loss = ((self.generator.flow(x_t, t, cond) - target) ** 2).mean()
        return loss, {"fit": float(loss.detach())}


def samples():
    g = torch.Generator().manual_seed(0)
    n = STEPS * BIG
    x0, eps = torch.randn(n, 2, generator=g) + 2.0, torch.randn(n, 2, generator=g)
    t = torch.rand(n, generator=g) * 1000
    sigma = (t / 1000)[:, None]
    return (1 - sigma) * x0 + sigma * eps, t, torch.randint(0, 4, (n,), generator=g), eps - x0


class Chunks:
    """Consecutive slices of the fixed sample pool: the same samples whatever the micro-batch size."""

    def __init__(self, size):
        self.data, self.size, self.position = samples(), size, 0

    def next_batch(self):
        lo = self.position * self.size
        self.position += 1
        return tuple(x[lo: lo + self.size] for x in self.data)

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def model():
    torch.manual_seed(1)
    return Denoiser(ToyFlowMLP(dim=2, num_classes=4, hidden=32, depth=2, time_dim=16))


def run_trainer(stage, micro, accum):
    method = FlowFit(model())
    train = TrainConfig(max_steps=STEPS, micro_batch_size=micro, grad_accum=accum, precision="fp32", log_every=0,
                        generator_optim=OPTIM, ema=EMAConfig(decay=0.0))
    trainer = Trainer(method, Chunks(micro), train, {"zero_optimization": {"stage": stage}})
    history = trainer.train()
    return {"loss": [h["generator/loss"] for h in history], "grad_norm": [h["generator/grad_norm"] for h in history],
            "weights": full_state_dict(method.generator)}


def run_plain_torch():
    net = model()
    opt = torch.optim.AdamW(net.parameters(), lr=OPTIM.lr, betas=OPTIM.betas, eps=OPTIM.eps,
                            weight_decay=OPTIM.weight_decay)
    data, losses, norms = Chunks(BIG), [], []
    for step in range(STEPS):
        for group in opt.param_groups:
            group["lr"] = OPTIM.lr * warmup_factor(step, OPTIM.warmup_steps)
        x_t, t, cond, target = data.next_batch()
        loss = ((net.flow(x_t, t, cond) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(net.parameters(), OPTIM.grad_clip)))
        opt.step()
        losses.append(float(loss))
    return {"loss": losses, "grad_norm": norms, "weights": {k: v.detach().clone() for k, v in net.named_parameters()}}


SID_STEPS, SID_RATIO, SID_BATCH = 4, 2, 16
SID_LOOP = LoopConfig(iterations=SID_STEPS, batch_size=SID_BATCH, lr=1e-3, lr_critic=3e-3, betas=[0.0, 0.999],
                      critic_ratio=SID_RATIO, grad_clip=1.0)


def sid_method():
    """SiD on tiny MLPs with its RNG streams reset: every call starts from the same state."""
    def mlp(seed):
        torch.manual_seed(seed)
        return Denoiser(ToyFlowMLP(dim=2, num_classes=4, hidden=32, depth=2, time_dim=16))

    rng, rollout_rng = torch.Generator().manual_seed(11), torch.Generator().manual_seed(12)
    cfg = SiDConfig(guidance_scale=2.0, guidance_form="standard", timestep_shift=1.0, snap_noise_to_grid=False)
    return SiD(cfg, generator=mlp(0), teacher=mlp(0), critic=mlp(1),
               rollout=FewStepRollout([1000.0, 500.0], generator=rollout_rng), rng=rng)


def sid_batches():
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(SID_STEPS * 2):
        cond = torch.randint(0, 4, (SID_BATCH,), generator=g)
        out.append(DistillBatch(cond=cond, uncond=torch.full_like(cond, 4), latents=DenseLatents(SID_BATCH, (2,))))
    return out


class Replay:
    """The pre-drawn batches, in order."""

    def __init__(self, batches):
        self.batches, self.position = batches, 0

    def next_batch(self):
        self.position += 1
        return self.batches[self.position - 1]

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def run_sid_reference():
    method, data = sid_method(), Replay(sid_batches())
    seed_everything(0, 0)
    train_distillation(method, lambda step: data.next_batch(), SID_LOOP)
    return {"generator": full_state_dict(method.generator), "critic": full_state_dict(method.critic)}


def run_sid_trainer(stage, zero_init=False):
    optim = dict(betas=tuple(SID_LOOP.betas), weight_decay=0.0, grad_clip=SID_LOOP.grad_clip)
    train = TrainConfig(max_steps=SID_STEPS, micro_batch_size=SID_BATCH, dfake_gen_update_ratio=SID_RATIO, seed=0,
                        precision="fp32", log_every=0, generator_optim=OptimConfig(lr=SID_LOOP.lr, **optim),
                        critic_optim=OptimConfig(lr=SID_LOOP.lr_critic, **optim), ema=EMAConfig(decay=0.0))
    ds = load_ds_config({"zero_optimization": {"stage": stage}}, train, init_distributed().world_size)
    if zero_init:  # models partitioned while they are built, then loaded, as a 14B teacher must be
        initial = sid_method()  # plays the checkpoint on disk
        with model_init_context(ds):
            method = sid_method()
        assert all(hasattr(p, "ds_id") for p in method.teacher.parameters())
        for role in ("generator", "teacher", "critic"):
            load_full_state_dict(getattr(method, role), full_state_dict(getattr(initial, role)))
    else:
        method = sid_method()
    # The method's generators are not handed to the trainer: they keep the reference's seeds.
    trainer = Trainer(method, Replay(sid_batches()), train, ds)
    trainer.train()
    return {"generator": full_state_dict(method.generator), "critic": full_state_dict(method.critic)}


def main():
    torch.set_num_threads(1)
    out = {"plain": run_plain_torch(), "sid_reference": run_sid_reference()}
    for stage in (0, 2, 3):
        out[f"accum_{stage}"] = run_trainer(stage, BIG // K, K)
        out[f"big_{stage}"] = run_trainer(stage, BIG, 1)
    for stage in (0, 3):
        out[f"sid_{stage}"] = run_sid_trainer(stage)
    out["sid_3_zero_init"] = run_sid_trainer(3, zero_init=True)
    out["rank_env"] = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
    torch.save(out, sys.argv[1])


if __name__ == "__main__":
    main()
