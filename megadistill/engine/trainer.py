"""The distillation training loop over a ``DistillationMethod`` on DeepSpeed engines.

One step (upstream Self-Forcing order):
    if step % dfake_gen_update_ratio == 0 (every step for methods without a critic):
        generator update: grad_accum micro-batches, engine.backward + engine.step each
        (DeepSpeed averages over micro-batches and ranks, clips, and steps the optimizer and LR
        schedule at the accumulation boundary); then the sharded EMA update
    critic update (methods with a critic): the same with the critic engine
While one model is updated the other trained model's parameters are frozen (requires_grad off), so a
loss that backpropagates through it (SiD's generator loss goes through the critic) leaves no stray
gradients in its optimizer. Logged values are averaged over micro-batches and then over ranks.

Seeds: rank 0's seed is broadcast, then python/numpy/torch and the named generators are seeded with
seed + rank.

Parallel mesh (``mesh``: a ``parallel.mesh.ParallelMesh``; the method's models already parallelized
by their family's ``parallelize``, the teacher's guided calls split over the cfg group with
``parallel.cfg_parallel.cfg_parallel``): the ranks of one tp x sp x cfg group work on ONE sample, so
"rank" above means the data-parallel coordinate: seeds are derived from ``mesh.seed_rank`` (dp rank),
the DeepSpeed batch counts dp replicas (train_batch_size = micro x accum x dp), and the engines get
the mesh as mpu (engines.py). Every SP rank computes the full loss (Ulysses gathers the sequence
before the head); each rank backpropagates it scaled by ``engines.sequence_parallel_loss_scale`` (1
under ZeRO-3, which averages over dp x sp x cfg; 1 / sp under stages 0-2, which sum over sp and
average over dp x cfg), so the update is exactly the single-process one on the dp replicas' samples.
The two ranks of a cfg group compute the same loss and, summed over the pair, twice the generator /
critic gradient (identical gradients when the teacher's output is not differentiated; otherwise the
cfg all-gather's backward hands each rank its branch's share, see cfg_parallel.py): the average over
cfg that both ZeRO paths take is exactly it, so cfg needs no loss scale of its own. Logged values
are averaged over all ranks: they are identical within a tp x sp x cfg group, so this is the mean over dp.

Checkpoints every ``save_every`` steps, where the method asks (``checkpoint_due``: kept whatever
``keep_last`` says; the method's own state, ``state_dict``, goes in every one), at the last step, and
when SIGTERM / SIGUSR1
arrives on any rank (SLURM preemption): the current step is finished, everything is saved, and
``train`` returns. A new run in the same checkpoint dir resumes from the latest complete checkpoint and
continues the loss trajectory bit-for-bit on CPU.

Reporting (rank 0: TensorBoard under ``log_dir``, tqdm bar, console line) is ``train_log.TrainLogger``.
``sample_fn(trainer) -> {tag: tensor}`` runs on every rank (it may gather ZeRO-3 parameters) before
every ``sample_every``-th step and after the last one, under no_grad and with the global RNG states
restored afterwards, so sampling never changes the training trajectory; rank 0 logs the tensors.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch
import torch.distributed as dist

from megadistill.methods.base import DistillationMethod

from . import checkpoint as ckpt
from .config import TrainConfig, load_ds_config
from .data_source import DataSource
from .ema import ShardedEMA
from .engines import (Engines, begin_micro_batch, build_engines, init_distributed, method_modules,
                      sequence_parallel_loss_scale, set_requires_grad)
from .rng import broadcast_seed, capture_rng_state, restore_rng_state, seed_everything
from .train_log import TrainLogger

logger = logging.getLogger(__name__)

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
TRAINER_STATE_KEYS = frozenset({"step", "world_size", "zero_stage", "engines", "seed", "ema_started", "parallel",
                                "tensor_parallel"})
Callback = Callable[["Trainer", Dict[str, float]], None]
SampleFn = Callable[["Trainer"], Mapping[str, torch.Tensor]]


class PreemptionHandler:
    """Records SIGTERM / SIGUSR1 instead of dying, so the step in flight can finish and be saved."""

    def __init__(self, signals: Sequence[int] = PREEMPT_SIGNALS):
        self.signals = tuple(signals)
        self.requested = False
        self._previous: Dict[int, Any] = {}

    def _handle(self, signum, frame):
        self.requested = True
        logger.warning("received signal %d: finishing the current step, then saving a checkpoint", signum)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on at least one (preemption reaches ranks unevenly)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def mean_over_ranks(logs: Dict[str, float]) -> Dict[str, float]:
    """Average every logged float over the ranks that logged it (methods may log a key only when it
    occurs in the batch, e.g. per-timestep-bucket losses, so key sets can differ between ranks)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return dict(logs)
    key_sets: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(key_sets, sorted(logs))
    keys = sorted(set().union(*key_sets))
    t = torch.tensor([[logs.get(k, 0.0), float(k in logs)] for k in keys], dtype=torch.float64).reshape(-1, 2)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    t = t.cpu()
    return {k: float(total / count) for k, (total, count) in zip(keys, t.tolist())}


def _grad_norm(module: torch.nn.Module) -> float:
    """Global L2 norm of the (already data-parallel averaged) gradients of ``module``, pre-clipping."""
    grads = [p.grad.detach().double() for p in module.parameters() if p.grad is not None]
    return float(torch.sqrt(sum((g * g).sum() for g in grads))) if grads else 0.0


def _float(value: Any) -> float:
    return float(value.detach()) if torch.is_tensor(value) else float(value)


def tensor_parallel_partitions(module: torch.nn.Module) -> Dict[str, List[int]]:
    """name -> [dim, chunks] of every TP-sharded parameter of ``module`` (parallel/tensor_parallel.py's
    layout: concatenating the TP ranks' shards along ``dim``, per chunk, gives the full tensor)."""
    from megadistill.parallel.parallelize import tensor_parallel_layout

    return {name: [dim, chunks] for name, (_, dim, chunks) in tensor_parallel_layout(module).items()}


class Trainer:
    """Builds engines for ``method`` and trains it; see the module docstring.

    ``data`` is this rank's stream (seed it with ``rng.derive_seed(seed, rank, "data")``).
    ``generators`` are named torch.Generators the method uses (e.g. its ``rng``), seeded per rank.
    ``shared_generators`` are seeded identically on every rank: ZeRO-3 gathers parameters inside
    every module call, so a random choice that changes which modules run (the rollout's exit step,
    upstream's ``generate_and_sync_list``) must be drawn the same on all ranks or the collectives
    mismatch. Both kinds are checkpointed with the other RNG states. The method's models must be
    identical on every rank when passed in (same seed or same checkpoint).
    """

    def __init__(
        self,
        method: DistillationMethod,
        data: DataSource,
        train: TrainConfig,
        ds_config: Union[str, Dict[str, Any]],
        checkpoint_dir: Optional[str] = None,
        generators: Optional[Mapping[str, torch.Generator]] = None,
        shared_generators: Optional[Mapping[str, torch.Generator]] = None,
        callbacks: Sequence[Callback] = (),
        log_dir: Optional[str] = None,
        sample_fn: Optional[SampleFn] = None,
        metadata: Optional[Mapping[str, Any]] = None,
        mesh: Optional[Any] = None,
    ):
        self.method, self.data, self.train_cfg = method, data, train
        self.mesh = mesh
        self.checkpoint_dir = checkpoint_dir
        self.generators = dict(generators or {})
        self.shared_generators = dict(shared_generators or {})
        overlap = sorted(set(self.generators) & set(self.shared_generators))
        if overlap:
            raise ValueError(f"generator names {overlap} are both per-rank and shared")
        self.callbacks = list(callbacks)
        self.log_dir, self.sample_fn = log_dir, sample_fn
        # JSON-able facts saved with every checkpoint (the experiment config, the models' configs), so
        # a checkpoint is self-describing: the merge tool rebuilds the family's network without being told.
        self.metadata = dict(metadata or {})
        clash = sorted(set(self.metadata) & TRAINER_STATE_KEYS)
        if clash:
            raise ValueError(f"metadata keys {clash} are reserved for the trainer state")
        self.dist = init_distributed()
        # Everything that can be wrong with the configs fails here, before any engine exists.
        ds = load_ds_config(ds_config, train, self.dp_size)
        # What each rank backpropagates per unit of loss (ZeRO's weighting of the SP ranks, see engines.py).
        self.loss_scale = sequence_parallel_loss_scale(ds, self.parallel_sizes["sp"])
        self.resume_path = self._resume_path(checkpoint_dir, train)
        self.seed = broadcast_seed(train.seed)
        seed_everything(self.seed, self.seed_rank, self.generators, self.shared_generators)
        self.engines: Engines = build_engines(method, ds, train.generator_optim, train.critic_optim, self.dist.device,
                                              mesh)
        self.ema: Optional[ShardedEMA] = None
        if train.ema.enabled:
            named = [(n, p) for n, p in method.generator.named_parameters() if p.requires_grad]
            # Sharded like ZeRO: over the mesh's sequence_data group (the world for tp = 1), each TP rank
            # keeping the EMA of its own TP shard; gather() unshards both.
            if mesh is not None:
                group, rank, size = mesh.sequence_data_group, mesh.rank("sequence_data"), mesh.size("sequence_data")
            else:
                group, rank, size = None, self.dist.rank, self.dist.world_size
            self.ema = ShardedEMA(named, train.ema.decay, train.ema.start_step, rank, size, group=group,
                                  tp_module=method.generator)
        self.step = 0  # completed steps
        self.resumed_from: Optional[str] = None
        if self.resume_path is not None:
            self.resume(self.resume_path)

    def _resume_path(self, checkpoint_dir: Optional[str], train: TrainConfig) -> Optional[str]:
        """The checkpoint this run starts from, checked before any engine is built."""
        if train.resume_from:
            path = train.resume_from
            if not os.path.isdir(path):
                raise FileNotFoundError(f"train.resume_from: checkpoint directory not found: {path}")
            if not ckpt.is_complete(path):
                raise FileNotFoundError(f"train.resume_from: {path} is not a complete checkpoint "
                                        f"(no {ckpt.COMPLETE} marker: the save was interrupted)")
        elif checkpoint_dir is not None and train.resume:
            path = ckpt.find_latest(checkpoint_dir)
            if path is None:
                return None
        else:
            return None
        saved = ckpt.read_trainer_state(path)
        saved_world = saved["world_size"]
        if saved_world != self.dist.world_size:
            raise ValueError(f"checkpoint {path} was written by {saved_world} ranks, this run has "
                             f"{self.dist.world_size}; resume with the same world size")
        layout = saved.get("parallel", {"tp": 1, "sp": 1, "cfg": 1, "dp": saved_world})
        if layout != self.parallel_sizes:
            raise ValueError(f"checkpoint {path} was written with parallel layout {layout}, this run has "
                             f"{self.parallel_sizes}; resume with the same parallel sizes")
        return path

    @property
    def rank(self) -> int:
        return self.dist.rank

    @property
    def dp_size(self) -> int:
        """Data-parallel replicas (ranks that see different samples): the world without a mesh."""
        return self.mesh.dp if self.mesh is not None else self.dist.world_size

    @property
    def seed_rank(self) -> int:
        """The rank per-rank streams are derived from: the dp coordinate, shared by a tp x sp x cfg group."""
        return self.mesh.seed_rank if self.mesh is not None else self.dist.rank

    @property
    def parallel_sizes(self) -> Dict[str, int]:
        if self.mesh is None:
            return {"tp": 1, "sp": 1, "cfg": 1, "dp": self.dist.world_size}
        return dict(self.mesh.sizes)

    # ------------------------------------------------------------------ one model update
    def _update(self, role: str) -> Dict[str, float]:
        engine = self.engines.generator if role == "generator" else self.engines.critic
        loss_fn = self.method.generator_loss if role == "generator" else self.method.critic_loss
        other = self.method.critic_parameters() if role == "generator" else self.method.generator_parameters()
        lr = float(engine.get_lr()[0])  # the rate this update uses (the schedule steps with it)
        set_requires_grad(other, False)
        try:
            totals: Dict[str, float] = {}
            counts: Dict[str, int] = {}
            plain_norm = None
            for micro in range(self.train_cfg.grad_accum):
                begin_micro_batch(engine)
                loss, logs = loss_fn(self.data.next_batch(), self.step)
                engine.backward(loss * self.loss_scale if self.loss_scale != 1.0 else loss)
                if micro == self.train_cfg.grad_accum - 1 and engine.zero_optimization_stage() == 0:
                    plain_norm = _grad_norm(engine.module)  # DeepSpeed records none without ZeRO
                engine.step()
                for k, v in {"loss": loss, **logs}.items():
                    totals[k] = totals.get(k, 0.0) + _float(v)
                    counts[k] = counts.get(k, 0) + 1
        finally:
            set_requires_grad(other, True)
        out = {f"{role}/{k}": v / counts[k] for k, v in totals.items()}
        grad_norm = engine.get_global_grad_norm()
        grad_norm = plain_norm if grad_norm is None else grad_norm
        if grad_norm is not None:
            out[f"{role}/grad_norm"] = _float(grad_norm)
        out[f"{role}/lr"] = lr
        return out

    def train_step(self) -> Dict[str, float]:
        ratio = self.train_cfg.dfake_gen_update_ratio if self.method.has_critic else 1
        start = time.perf_counter()
        if self.ema is not None:
            self.ema.maybe_start(self.step)
        logs: Dict[str, float] = {}
        if self.step % ratio == 0:
            logs.update(self._update("generator"))
            if self.ema is not None:
                self.ema.update()
        if self.method.has_critic:
            logs.update(self._update("critic"))
        logs = mean_over_ranks(logs)
        logs["step"] = float(self.step)
        logs["step_time_s"] = time.perf_counter() - start
        self.step += 1
        return logs

    def train(self) -> List[Dict[str, float]]:
        """Run to ``max_steps`` (or preemption); returns the logs of every step run here."""
        cfg = self.train_cfg
        history: List[Dict[str, float]] = []
        sampling = self.sample_fn is not None and cfg.sample_every > 0
        with PreemptionHandler() as preempt, self._train_logger() as report:
            while self.step < cfg.max_steps:
                if sampling and self.step % cfg.sample_every == 0:
                    self.sample(report)
                logs = self.train_step()
                history.append(logs)
                report.log_step(logs)
                for cb in self.callbacks:
                    cb(self, logs)
                stop = any_rank(preempt.requested)
                periodic = cfg.save_every and self.step % cfg.save_every == 0
                due = self.method.checkpoint_due(self.step)  # e.g. a progressive stage ended: kept
                if self.checkpoint_dir is not None and (periodic or due or stop or self.step == cfg.max_steps):
                    self.save(keep=due)
                if stop:
                    if self.rank == 0:
                        logger.warning("preempted after step %d; checkpoint saved", self.step)
                    break
            if sampling and history and self.step == cfg.max_steps:
                self.sample(report)  # the final weights
        return history

    def _train_logger(self) -> TrainLogger:
        cfg = self.train_cfg
        return TrainLogger(
            cfg.max_steps, cfg.micro_batch_size * cfg.grad_accum * self.dp_size, self.rank, self.log_dir,
            initial_step=self.step, log_every=cfg.log_every, tensorboard=cfg.tensorboard,
            progress_bar=cfg.progress_bar,
        )

    def sample(self, report: TrainLogger) -> None:
        """``sample_fn`` on every rank at the current weights; rank 0 logs what it returns."""
        state = capture_rng_state()
        try:
            with torch.no_grad():
                samples = self.sample_fn(self)
        finally:
            restore_rng_state(state)
        report.log_samples(self.step, samples)

    # ------------------------------------------------------------------ checkpoints
    def trainer_state(self) -> Dict[str, Any]:
        state = {
            "step": self.step, "world_size": self.dist.world_size, "zero_stage": self.engines.zero_stage,
            "engines": sorted(self.engines.trained()), "seed": self.seed,
            "ema_started": bool(self.ema is not None and self.ema.started), "parallel": self.parallel_sizes,
        }
        if self.parallel_sizes["tp"] > 1:  # what a merge needs to unshard the per-TP-rank files
            state["tensor_parallel"] = {role: tensor_parallel_partitions(module)
                                        for role, module in method_modules(self.method).items()
                                        if role in self.engines.trained()}
        return {**self.metadata, **state}

    def rank_state(self) -> Dict[str, Any]:
        return {
            "rng": capture_rng_state({**self.generators, **self.shared_generators}),
            "data": self.data.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "method": self.method.state_dict(),
        }

    def save(self, keep: bool = False) -> str:
        """A checkpoint of the current step; ``keep``: exempt from ``train.keep_last`` pruning."""
        if self.checkpoint_dir is None:
            raise ValueError("Trainer has no checkpoint_dir")
        return ckpt.save_checkpoint(
            self.checkpoint_dir, self.step, self.engines.trained(), self.rank_state(), self.trainer_state(),
            self.train_cfg.keep_last, self.rank, keep=keep,
        )

    def resume(self, path: Optional[str] = None) -> Optional[str]:
        """Load ``path`` (default: the latest complete checkpoint); None when there is none."""
        path = path or ckpt.find_latest(self.checkpoint_dir)
        if path is None:
            return None
        rank_state, state = ckpt.load_checkpoint(path, self.engines.trained(), self.rank, self.dist.world_size)
        if self.ema is not None:
            if rank_state["ema"] is None:
                raise ValueError(f"checkpoint {path} has no EMA state but train.ema is enabled")
            self.ema.load_state_dict(rank_state["ema"])
        self.data.load_state_dict(rank_state["data"])
        self.method.load_state_dict(rank_state.get("method", {}))
        restore_rng_state(rank_state["rng"], {**self.generators, **self.shared_generators})
        self.step = int(state["step"])
        self.resumed_from = path
        if self.rank == 0:
            logger.info("resumed from %s at step %d", path, self.step)
        return path

