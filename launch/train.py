#!/usr/bin/env python
"""megadistill main entry point.

    deepspeed launch/train.py --ds_config configs/zero3.json [--config configs/X.yaml] [key.path=value ...]
    torchrun --nproc_per_node 2 launch/train.py --ds_config configs/zero3.json ...
    python launch/train.py --ds_config configs/zero3.json ...     (one process)
    python launch/train.py --config configs/toylab.yaml           (the toy lab table; no DeepSpeed)
    python launch/train.py [--config X.yaml] --print-config       (the resolved config)

Without ``--config`` it runs the embedded default, ``configs/demo_dmd.yaml``: Self-Forcing DMD of the
shipped demo teacher into a 4-step causal student (``configs/toylab_dmd.yaml``: the same on the toy
family). ``job:`` in the config picks what runs (see megadistill/experiment.py): ``distill`` trains
``method`` on ``model.family`` through the DeepSpeed trainer and needs ``--ds_config``;
``toylab_table`` does not. The config, the DeepSpeed config and every file the job will read are
checked (unknown keys, wrong types, missing files, ZeRO stage, batch sizes, resume checkpoint) before
any process group, model or output directory exists; a bad input exits with code 2 and a message
naming the file or key.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, "configs", "demo_dmd.yaml")
if REPO not in sys.path:  # runnable from a checkout without `pip install -e .`
    sys.path.insert(0, REPO)

from megadistill.config import ConfigError, dump_config, load_config  # noqa: E402
from megadistill.experiment import ExperimentConfig  # noqa: E402

CHECKPOINT_SUBDIR = "checkpoints"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help=f"experiment YAML (default: {os.path.relpath(DEFAULT_CONFIG)})")
    p.add_argument("--ds_config", default=None, help="DeepSpeed JSON: train the configured method on the trainer")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    # Added by the `deepspeed` launcher; the rank layout itself is read from the environment.
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides (YAML values)")
    return p.parse_args(argv)


def launcher_world_size() -> int:
    """World size the launcher promised (1 under plain ``python``), known before any process group."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def checkpoint_dir(cfg: ExperimentConfig) -> str:
    return os.path.join(cfg.run.output_dir, CHECKPOINT_SUBDIR)


def data_parallel_size(cfg: ExperimentConfig, world_size: int) -> int:
    """dp, the replicas that see different samples: the world over tp x sp x cfg (one sample per such
    group), checked against every model's heads and a resumed layout."""
    try:
        from megadistill.jobs.distill import check_parallel

        return check_parallel(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_trainer_inputs(cfg: ExperimentConfig, ds_config_path: str) -> dict:
    """Everything the trainer would reject, checked before anything is built or written.

    Returns the validated DeepSpeed config, its global batch filled in as micro x accum x dp (what the
    trainer counts: the ranks of one tp x sp group share a sample); raises ConfigError naming the
    file or key.
    """
    from megadistill.engine import checkpoint as ckpt
    from megadistill.engine.config import load_ds_config

    world_size = launcher_world_size()
    resume = None
    if cfg.train.resume_from:
        resume = cfg.train.resume_from
        if not os.path.isdir(resume):
            raise ConfigError(f"train.resume_from: checkpoint directory not found: {resume}")
        if not ckpt.is_complete(resume):
            raise ConfigError(f"train.resume_from: {resume} is not a complete checkpoint (no {ckpt.COMPLETE} "
                              "marker: the save was interrupted)")
    elif cfg.train.resume:
        resume = ckpt.find_latest(checkpoint_dir(cfg))
    if resume is not None:
        saved = ckpt.read_trainer_state(resume)["world_size"]
        if saved != world_size:
            raise ConfigError(f"checkpoint {resume} was written by {saved} ranks, this run has {world_size}; "
                              "resume with the same world size (or set train.resume=false / another run.output_dir)")
    return load_ds_config(ds_config_path, cfg.train, data_parallel_size(cfg, world_size))


def setup_logging(rank: int) -> None:
    """One readable console on rank 0; DeepSpeed's own INFO chatter silenced."""
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s",
                        stream=sys.stdout, force=True)
    # DeepSpeed 0.19 calls torch's deprecated collective names on every step.
    warnings.filterwarnings("ignore", message=r".*is deprecated. Please use `torch\.distributed\.", category=FutureWarning)
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)


def check_job_inputs(cfg: ExperimentConfig, ds_config_path) -> dict | None:
    """Everything the job would reject, before anything is built; ConfigError names the problem."""
    if not cfg.uses_trainer:
        return None
    if not ds_config_path:
        raise ConfigError(f"job {cfg.job!r} trains through DeepSpeed: pass --ds_config (e.g. configs/zero3.json)")
    ds = check_trainer_inputs(cfg, ds_config_path)
    from megadistill.jobs.distill import check_inputs

    try:
        check_inputs(cfg)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from None
    return ds


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(ExperimentConfig, args.config or DEFAULT_CONFIG, args.overrides)
        if args.print_config:
            print(dump_config(cfg), end="")
            return 0
        ds = check_job_inputs(cfg, args.ds_config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.job == "toylab_table":
        from megadistill.jobs.toylab_job import run_table

        return run_table(cfg)
    setup_logging(int(os.environ.get("RANK", "0")))
    from megadistill.jobs.distill import run

    return run(cfg, ds)


if __name__ == "__main__":
    sys.exit(main())
