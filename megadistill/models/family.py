"""What a model family gives the generic distill job (jobs/distill.py).

A family is one folder ``models/<name>/`` whose ``family.py`` defines a ``ModelFamily`` subclass,
named in ``models/registry.py`` (models/README.md is the checklist). The job never imports a family:
it asks the one ``model.family`` names for its typed config sections (``model``, ``data``, ``eval``),
its input checks, its networks loaded into their shards, the denoiser the methods call, its data
batches, its parallel plan and its evaluation. The rollout, the method, the trainer and the
checkpoints are generic.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import torch
from torch import nn

from megadistill.diffusion.noise_schedule import NoiseSchedule
from megadistill.methods.base import Denoiser, DistillBatch, MethodNeeds


@dataclass
class Networks:
    """The job's networks, as the family built them (plain or already split into this rank's shards):
    a frozen ``teacher`` (also the source of the others' initial weights), the trained ``generator``
    and, for a method with a critic, the trained ``critic``; for a method that needs one
    (``MethodNeeds.target``), a ``target`` built like the generator (the method sets its weights);
    ``teacher_settings``: how the teacher samples, when its checkpoint says (the demo teacher's
    guidance and steps), for the evaluator."""

    teacher: nn.Module
    generator: nn.Module
    critic: Optional[nn.Module] = None
    teacher_settings: Any = None
    target: Optional[nn.Module] = None


@dataclass
class RunSummary:
    """What the trainer did, for the evaluator's result: the weights evaluated (``ema`` or
    ``generator``), the final step, the world size and the ZeRO stage."""

    method: str
    evaluated: str
    step: int
    world_size: int
    zero_stage: int


class Evaluator(abc.ABC):
    """Rank 0's measure of a run, built before training from the unsplit teacher. ``start`` sees a plain
    copy of the generator as training starts, ``finish`` the trained student (same copy, trained
    weights loaded) and returns the result (written to ``result.json``); ``final_line`` is the line
    the job prints last."""

    def start(self, generator: nn.Module) -> None:
        """Before training (default: nothing)."""

    @abc.abstractmethod
    def finish(self, student: nn.Module, summary: RunSummary) -> Dict[str, Any]:
        ...

    @abc.abstractmethod
    def final_line(self, result: Dict[str, Any]) -> str:
        ...


class ModelFamily(abc.ABC):
    """One model family. ``model_config`` / ``data_config`` / ``eval_config``: the dataclasses that type
    the experiment's ``model``, ``data`` and ``eval`` sections (the model section has a ``family``
    field); ``causal``: the family's denoiser implements ``rollout.causal_denoiser.CausalDenoiser``, so
    ``rollout.kind: causal`` (Self-Forcing) can run it; ``rollout_defaults``: the family's defaults of
    the ``rollout`` section, laid over the generic ones. ``cfg`` below is the whole ExperimentConfig."""

    name: str = ""
    model_config: type
    data_config: type
    eval_config: type
    causal: bool = False
    rollout_defaults: Dict[str, Any] = {}

    def noise_schedule(self, model_cfg) -> NoiseSchedule:
        """The teacher's noise schedule (``model_cfg``: the typed ``model`` section): the timestep range
        its denoiser takes and the shift the method's and the rollout's schedule fields default to
        (diffusion/noise_schedule.py). Read at config load (a small file at most); default: the generic
        ``NoiseSchedule()``."""
        return NoiseSchedule()

    # ------------------------------------------------------------------ checks (no process group yet)
    def validate(self, cfg) -> None:
        """Cross-section checks at config load (no files read); ValueError names the keys."""

    @abc.abstractmethod
    def check_inputs(self, cfg, needs: MethodNeeds) -> None:
        """Every file and name the run will read, before any process group exists."""

    def model_heads(self, cfg, needs: MethodNeeds) -> Dict[str, int]:
        """'<role> (<architecture>)' -> attention heads, for the tp / sp divisibility checks (default:
        none: a family without attention heads runs data parallel only)."""
        return {}

    # ------------------------------------------------------------------ build
    @abc.abstractmethod
    def prepare_data(self, cfg, mesh) -> Any:
        """What every batch draws from (prompt embeddings, a data set), made once, before the networks."""

    @abc.abstractmethod
    def build_networks(self, cfg, needs: MethodNeeds, data: Any, mesh, partition) -> Networks:
        """teacher, generator (in the rollout's mode) and the critic when ``needs.critic``; ``partition``
        (ZeRO-3) partitions a module as soon as it is loaded."""

    @abc.abstractmethod
    def denoiser(self, network: nn.Module) -> Denoiser:
        """The network as methods and rollouts call it."""

    def critic(self, network: nn.Module, cfg, critic_kind: str) -> nn.Module:
        """The critic as the method sees it: its denoiser (``critic_kind`` "denoiser", a score critic) or a
        discriminator over its features ("discriminator")."""
        if critic_kind != "denoiser":
            raise ValueError(f"model family {self.name!r} has no {critic_kind} critic")
        return self.denoiser(network)

    def parallelize(self, network: nn.Module, mesh) -> None:
        """Apply the mesh's tensor / sequence parallelism in place (default: nothing to split)."""

    @abc.abstractmethod
    def batches(self, cfg, needs: MethodNeeds, data: Any) -> Callable[[torch.Generator], DistillBatch]:
        """``make_batch(rng)`` of ``train.micro_batch_size`` samples for the configured method."""

    def network_config(self, network: nn.Module) -> Dict[str, Any]:
        """The architecture a checkpoint records for ``network`` (``model_configs`` in trainer_state)."""
        return {}

    def evaluator(self, cfg, data: Any, networks: Networks) -> Optional[Evaluator]:
        """Rank 0's evaluation of the run (from the unsplit networks), or None when the family has none
        for this config."""
        return None

    def sampler(self, cfg, method, data: Any) -> Optional[Callable]:
        """The trainer's ``sample_fn`` (sample videos every ``train.sample_every`` steps), or None."""
        return None

    def plain_copy(self, network: nn.Module) -> nn.Module:
        """A single-process copy of ``network`` to evaluate in (default: a deep copy)."""
        import copy

        return copy.deepcopy(network)
