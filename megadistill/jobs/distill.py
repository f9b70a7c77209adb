"""The one distill job: any method of ``methods/`` on any model family of ``models/registry.py``,
through the DeepSpeed trainer.

Order of work: the family's data (e.g. prompts encoded once), its networks loaded into this rank's
shards (ZeRO-3 partitions each block as soon as it is read), rank 0's evaluation prepared on the unsplit
networks, the family's parallel plan applied, the rollout and the method built (each method takes from
the run only what its class declares it needs), then the trainer; at the end rank 0 evaluates the
student (EMA weights when the EMA has started) and prints the family's final line. All ranks of one
tp x sp x cfg group work on one sample: the data stream and every per-rank random stream are seeded from
the dp rank. ``check_inputs`` runs before any process group exists.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Optional

import torch
import torch.distributed as dist

from megadistill.config import to_dict
from megadistill.engine.data_source import SeededBatchSource
from megadistill.engine.engines import full_state_dict, init_distributed, load_full_state_dict, zero3_partitioner
from megadistill.engine.trainer import Trainer
from megadistill.experiment import ExperimentConfig
from megadistill.methods import get_method, method_needs
from megadistill.methods.base import MethodNeeds, is_unguided
from megadistill.models.family import ModelFamily, Networks, RunSummary
from megadistill.parallel.cfg_parallel import cfg_parallel
from megadistill.parallel.mesh import ParallelMesh
from megadistill.parallel.parallelize import check_parallel_sizes
from megadistill.rollout.config import build_rollout

log = logging.getLogger("megadistill.distill")
RESULT_FILE = "result.json"


def needs(cfg: ExperimentConfig) -> MethodNeeds:
    """What the configured method needs (declared by its class)."""
    return method_needs(cfg.method.name, cfg.method.config)


# ---------------------------------------------------------------------------------------- checks
def check_inputs(cfg: ExperimentConfig) -> None:
    """Every file and name the job will read, checked before any process group or model exists."""
    family, need = cfg.family, needs(cfg)
    method_cls, _ = get_method(cfg.method.name)
    if cfg.rollout.causal and need.generator_forward == "rollout" and not family.causal:
        raise ValueError(f"rollout.kind=causal runs the generator block by block, which model family "
                         f"{family.name!r} does not support: set rollout.kind=bidirectional")
    bound = method_cls.bind_rollout(cfg.method.config, cfg.rollout)  # a method that cannot use this rollout says so
    method_cls.check_steps(bound, cfg.train.max_steps)
    family.check_inputs(cfg, need)
    check_parallel(cfg)


def check_parallel(cfg: ExperimentConfig) -> int:
    """``parallel`` against the launcher's world size (WORLD_SIZE, 1 under plain python) and every
    model's heads, before any process group exists; returns dp."""
    p = cfg.parallel
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    heads = cfg.family.model_heads(cfg, needs(cfg)) if p.tp * p.sp > 1 else {}
    if p.tp * p.sp > 1 and not heads:
        raise ValueError(f"parallel: model family {cfg.family.name!r} has no attention heads to split; set "
                         f"parallel.tp and parallel.sp to 1 (got tp={p.tp}, sp={p.sp})")
    dp = check_parallel_sizes(p, world_size, heads)
    if p.cfg > 1:
        check_cfg_parallel(cfg)
    resume = _resume_checkpoint(cfg)
    if resume is not None:
        from megadistill.engine import checkpoint as ckpt

        sizes = {"tp": p.tp, "sp": p.sp, "cfg": p.cfg, "dp": dp}
        saved = ckpt.read_trainer_state(resume)
        layout = saved.get("parallel", {"tp": 1, "sp": 1, "cfg": 1, "dp": saved["world_size"]})
        if layout != sizes:
            raise ValueError(f"checkpoint {resume} was written with parallel sizes {layout}, this run has {sizes}: "
                             "resume with the same parallel sizes (or set train.resume=false / another run.output_dir)")
    return dp


def check_cfg_parallel(cfg: ExperimentConfig) -> None:
    """parallel.cfg = 2 only where it pays: a method that calls the teacher's guided passes every step
    with a guidance that is not the identity. Anything else would leave the second rank of every cfg
    group computing exactly what the first computes (the same sample, one conditional pass each) --
    half the ranks wasted -- so it is refused, pointing at the ranks' better use (data parallel)."""
    name = cfg.method.name
    if not needs(cfg).guided_teacher:
        raise ValueError(f"parallel.cfg=2 splits the teacher's conditional and unconditional passes over two ranks, "
                         f"but method {name} makes no guided teacher call: set parallel.cfg=1 (the ranks then "
                         f"train data parallel)")
    m = cfg.method.config
    if is_unguided(m.guidance_scale, m.guidance_form):
        raise ValueError(f"parallel.cfg=2 with method.{name}.guidance_scale={m.guidance_scale} "
                         f"({m.guidance_form} form): the guidance is the identity, the teacher runs its conditional "
                         f"pass only, so there is nothing to split: set parallel.cfg=1")


def _resume_checkpoint(cfg: ExperimentConfig) -> Optional[str]:
    """The checkpoint the trainer will resume from, if any (as Trainer._resume_path finds it)."""
    from megadistill.engine import checkpoint as ckpt

    if cfg.train.resume_from:
        return cfg.train.resume_from if ckpt.is_complete(cfg.train.resume_from) else None
    if cfg.train.resume:
        return ckpt.find_latest(os.path.join(cfg.run.output_dir, "checkpoints"))
    return None


# ---------------------------------------------------------------------------------------- method
def build_method(cfg: ExperimentConfig, family: ModelFamily, networks: Networks, rollout, rng: torch.Generator,
                 mesh: Optional[ParallelMesh] = None):
    """The configured method, handed the roles its class declares: the generator's denoiser always; the
    frozen teacher (CFG-parallel over ``mesh.cfg_group`` when parallel.cfg = 2) when it uses one; the
    critic as its ``critic_kind`` says; the target copy when it keeps one; the rollout when the
    generator's forward is the rollout."""
    method_cls, _ = get_method(cfg.method.name)
    need = method_cls.needs(cfg.method.config)
    roles = {"generator": family.denoiser(networks.generator)}
    if need.teacher:
        roles["teacher"] = cfg_parallel(family.denoiser(networks.teacher), mesh.cfg_group if mesh else None)
    if need.critic:
        roles["critic"] = family.critic(networks.critic, cfg, method_cls.critic_kind)
    if need.target:
        roles["target"] = family.denoiser(networks.target)
    if need.generator_forward == "rollout":
        roles["rollout"] = rollout
    return method_cls(method_cls.bind_rollout(cfg.method.config, cfg.rollout), rng=rng, **roles)


# ---------------------------------------------------------------------------------------- the job
def run(cfg: ExperimentConfig, ds: dict) -> int:
    family, need = cfg.family, needs(cfg)
    start = time.perf_counter()
    info = init_distributed()
    rank = info.rank
    mesh = ParallelMesh(cfg.parallel)
    data = family.prepare_data(cfg, mesh)
    partition = zero3_partitioner(ds, mesh)  # ZeRO-3: each block partitioned as soon as it is loaded
    networks = family.build_networks(cfg, need, data, mesh, partition)
    evaluator = family.evaluator(cfg, data, networks) if rank == 0 else None
    student = family.plain_copy(networks.generator) if evaluator is not None else None  # to evaluate in
    if evaluator is not None:
        evaluator.start(student)
    # Rank 0's single-process evaluation above ran on the plain networks; from here on they are split.
    for net in (networks.teacher, networks.generator, networks.critic, networks.target):
        if net is not None:
            family.parallelize(net, mesh)
    rng, rollout_rng = torch.Generator(), torch.Generator()
    method = build_method(cfg, family, networks, build_rollout(cfg.rollout, rollout_rng, rng), rng, mesh)
    networks.teacher = networks.target = None  # the method holds them if it uses them; else freed here
    # One sample stream per tp x sp x cfg group: seeded from the dp coordinate (mesh.rank_seed).
    batches = SeededBatchSource(family.batches(cfg, need, data), mesh.rank_seed(cfg.train.seed, "data"))
    roles = {"generator": networks.generator, "critic": networks.critic}
    metadata = {"config": to_dict(cfg), "family": family.name, "model_configs": {
        role: family.network_config(net) for role, net in roles.items() if net is not None}}
    del networks
    trainer = Trainer(method, batches, cfg.train, ds, os.path.join(cfg.run.output_dir, "checkpoints"),
                      generators={"method": rng}, shared_generators={"rollout": rollout_rng},
                      log_dir=os.path.join(cfg.run.output_dir, "logs"), metadata=metadata,
                      sample_fn=family.sampler(cfg, method, data), mesh=mesh)
    train_start = time.perf_counter()
    trainer.train()
    if trainer.step < cfg.train.max_steps:  # preempted: the checkpoint is saved, the grace period is short
        return 0
    train_seconds = time.perf_counter() - train_start

    use_ema = trainer.ema is not None and trainer.ema.started
    weights = trainer.ema.gather() if use_ema else full_state_dict(method.generator)  # collective: every rank
    if evaluator is not None:
        load_full_state_dict(family.denoiser(student), weights)
        summary = RunSummary(cfg.method.name, "ema" if use_ema else "generator", trainer.step, info.world_size,
                             trainer.engines.zero_stage)
        result = evaluator.finish(student, summary)
        result.update(train_seconds=train_seconds, total_seconds=time.perf_counter() - start)
        os.makedirs(cfg.run.output_dir, exist_ok=True)
        with open(os.path.join(cfg.run.output_dir, RESULT_FILE), "w") as f:
            json.dump(result, f, indent=2)
        print(evaluator.final_line(result), flush=True)
    dist.barrier()
    return 0
