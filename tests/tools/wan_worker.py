"""One rank of a tiny Wan flow-fit run on the real trainer, saved for merge_checkpoint (launched by
tests/tools/test_merge_checkpoint.py through tests/helpers/ranks.py).

    python tests/tools/wan_worker.py SPEC.json

SPEC: {"results": "out.pt", "runs": [{"stage": 0-3, "checkpoint_dir": ..., "precision": "fp32"}, ...]}.
Generator and critic are both tiny Wan DiTs (build_wan("tiny-t2v"), different seeds) fitted to the
flow target of random latents; the EMA starts at step 1. After training, every rank runs the
generator and the critic on a fixed input (ZeRO-3 gathers parameters inside the call, so all ranks
take part) and rank 0 writes those reference outputs with the gathered weights and EMA.
"""
from __future__ import annotations

import dataclasses

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megadistill.engine.config import EMAConfig, OptimConfig, TrainConfig, load_ds_config  # noqa: E402
from megadistill.engine.data_source import SeededBatchSource  # noqa: E402
from megadistill.engine.engines import full_state_dict, init_distributed  # noqa: E402
from megadistill.engine.rng import derive_seed  # noqa: E402
from megadistill.engine.trainer import Trainer  # noqa: E402
from megadistill.methods.base import Denoiser, DistillationMethod, trainable  # noqa: E402
from megadistill.models.wan import build_wan  # noqa: E402

LATENT = (16, 1, 4, 4)  # C, F, H, W of tiny-t2v latents
TEXT_LEN, TEXT_DIM, BATCH, STEPS = 8, 32, 2, 3


def tiny_wan(seed: int) -> Denoiser:
    torch.manual_seed(seed)
    return Denoiser(build_wan("tiny-t2v"))


def flow_fit_loss(model: Denoiser, batch) -> torch.Tensor:
    x0, eps, t, context = batch
    sigma = (t / 1000).view(-1, 1, 1, 1, 1)
    return ((model.flow((1 - sigma) * x0 + sigma * eps, t, context) - (eps - x0)) ** 2).mean()


class WanFlowFit(DistillationMethod):
    """Generator and critic each regress the flow target: just enough to train both engines."""

    name = "wan_flow_fit"
    has_critic = True

    def __init__(self):
        self.generator, self.critic = tiny_wan(0), tiny_wan(1)

    def generator_parameters(self):
        return trainable(self.generator)

    def generator_loss(self, batch, step):
        loss = flow_fit_loss(self.generator, batch)
        return loss, {}

    def critic_loss(self, batch, step):
        loss = flow_fit_loss(self.critic, batch)
        return loss, {}


def make_batch(g: torch.Generator):
    x0 = torch.randn(BATCH, *LATENT, generator=g)
    eps = torch.randn(BATCH, *LATENT, generator=g)
    t = torch.rand(BATCH, generator=g) * 1000
    return x0, eps, t, torch.randn(BATCH, TEXT_LEN, TEXT_DIM, generator=g)


def probe_input():
    g = torch.Generator().manual_seed(99)
    return (torch.randn(1, *LATENT, generator=g), torch.tensor([700.0]),
            torch.randn(1, TEXT_LEN, TEXT_DIM, generator=g))


def run(run_spec: dict, rank: int) -> dict:
    train = TrainConfig(max_steps=STEPS, micro_batch_size=BATCH, dfake_gen_update_ratio=1, seed=5,
                        precision=run_spec.get("precision", "fp32"), save_every=0, keep_last=1, log_every=0,
                        generator_optim=OptimConfig(lr=1e-3), critic_optim=OptimConfig(lr=1e-3),
                        ema=EMAConfig(decay=0.5, start_step=1))
    ds = load_ds_config({"zero_optimization": {"stage": run_spec["stage"]}}, train, init_distributed().world_size)
    method = WanFlowFit()
    data = SeededBatchSource(make_batch, derive_seed(train.seed, rank, "data"))
    # Only the generator's config is recorded: the critic exercises the explicit --wan-config path.
    metadata = {"model_configs": {"generator": dataclasses.asdict(method.generator.net.config)}}
    trainer = Trainer(method, data, train, ds, run_spec["checkpoint_dir"], metadata=metadata)
    trainer.train()
    x, t, context = probe_input()
    with torch.no_grad():
        outputs = {"generator": method.generator.flow(x, t, context), "critic": method.critic.flow(x, t, context)}
    return {"outputs": outputs, "generator": full_state_dict(method.generator),
            "critic": full_state_dict(method.critic), "ema": trainer.ema.gather()}


def main() -> None:
    (spec_path,) = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    with open(spec_path) as f:
        spec = json.load(f)
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    results = [run(r, rank) for r in spec["runs"]]
    if rank == 0:
        torch.save(results, spec["results"])


if __name__ == "__main__":
    main()
