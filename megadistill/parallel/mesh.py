"""The device mesh: tp x sp x cfg x dp process groups, the DeepSpeed mpu interface, per-rank seeds.

Rank layout (TP innermost, so a TP group is consecutive ranks inside one node, then SP, CFG, DP):

    global_rank = tp_rank + tp * (sp_rank + sp * (cfg_rank + cfg * dp_rank))

- tp: Megatron tensor parallel (heads and FFN columns split; ``tensor_parallel.py``).
- sp: Ulysses sequence parallel (tokens split; ``sequence_parallel.py``).
- cfg: classifier-free-guidance parallel: the conditional and unconditional teacher passes of the same
  sample run on two groups (1 or 2).
- dp: data parallel: replicas that see different samples.

The "sequence_data" group (dp x sp x cfg at fixed tp) holds every copy of one TP shard of the
parameters: it is the group ZeRO partitions over and reduces gradients over.

DeepSpeed (0.19, read from deepspeed/runtime/engine.py, zero/stage3.py, zero/parameter_offload.py,
runtime/config.py, utils/groups.py) uses the mpu as follows, which fixes what each method returns:

- ZeRO sharding and gradient reduction: ``engine.seq_data_parallel_group`` =
  ``mpu.get_sequence_data_parallel_group()`` is the optimizer's ``dp_process_group`` (stages 1-3) and
  the partition group of every parameter (``_resolve_zero3_param_placement``). How the SP ranks'
  partial gradients are weighed depends on the path: ZeRO-3 with ``reduce_scatter`` (the default)
  AVERAGES over the whole sequence_data group, stages 0-2 SUM over SP and average over dp x cfg (cfg
  ranks hold identical gradients). Where every SP rank computes the full loss
  (``sequence_parallel.py``: the head runs on the gathered sequence, and the SP group's gradients sum
  to sp x the single-process one), the loss scale that gives the dp mean is therefore 1 under ZeRO-3
  and 1 / sp under stages 0-2: ``engine.engines.sequence_parallel_loss_scale`` (measured in
  tests/parallel/test_parallel_training.py, with a gradient-scale-sensitive optimizer).
- ``get_data_parallel_world_size()`` is DeepSpeedConfig's ``world_size`` (train_batch_size =
  micro_batch x grad_accum x it) and the data sampler's replica count: it must count the replicas that
  see DIFFERENT samples, i.e. dp alone (one sample per tp x sp x cfg group). So the data_parallel
  methods return the pure dp group, as Megatron-DeepSpeed's Ulysses mpu does.
- Consequence: parameters must be partitioned over the sequence_data group BEFORE
  ``deepspeed.initialize``: build under ``deepspeed.zero.Init(**mesh.zero_init_kwargs())``, or (tensor
  parallel: build, load, ``apply_tensor_parallel``, then) convert the built module with
  ``deepspeed.zero.Init(module=model, config_dict_or_path=ds, **mesh.zero_init_kwargs())``. A module
  left unpartitioned is converted by DeepSpeedZeRoOffload with ``mpu.get_data_parallel_group()`` (dp
  only): the wrong group. (Both paths are tested in tests/parallel/test_mesh.py.)
- ``get_model_parallel_*`` is the TP group (pipe = 1): ZeRO reduces gradient norms over it and counts
  parameters flagged ``tensor_model_parallel`` on every rank, replicated ones on model-parallel rank 0
  only; checkpoint files are named by model-parallel rank.
- The mesh must NOT define ``initialize_sequence_parallel``: DeepSpeed takes an mpu with that method
  for its SP-only helper and then ignores its data/model-parallel groups.

Seeds: every draw that defines a training sample (noise, timesteps, exit steps, data order) must be
identical on all ranks that cooperate on that sample (its tp, sp and cfg groups: cfg ranks run the
cond/uncond passes of the same noisy sample) and different across dp ranks. So per-rank seeds are
derived from ``dp_rank`` alone (``seed_rank``, ``rank_seed``), with ``engine.rng.derive_seed``.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Optional

import torch.distributed as dist

from megadistill.engine.rng import derive_seed

# Mesh dimensions, innermost first (the rank layout above).
DIMS = ("tp", "sp", "cfg", "dp")


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass
class ParallelConfig:
    """Parallel degrees: tp (tensor), sp (Ulysses sequence), cfg (guidance passes, 1 or 2); dp is what
    is left of the world size (``check``)."""

    tp: int = 1
    sp: int = 1
    cfg: int = 1

    def __post_init__(self):
        for name in ("tp", "sp", "cfg"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"parallel.{name} must be a positive int, got {value!r}")
        if self.cfg not in (1, 2):
            raise ValueError(f"parallel.cfg must be 1 or 2 (the conditional and unconditional passes), got {self.cfg}")

    @property
    def model_parallel(self) -> int:
        """Ranks that share one sample: tp x sp x cfg."""
        return self.tp * self.sp * self.cfg

    def check(self, world_size: int, num_heads: Optional[int] = None, model: str = "the model") -> int:
        """Validate against a world size (and a head count) before anything is built; returns dp.

        tp x sp must divide the head count (TP splits heads, Ulysses splits each rank's heads again)
        and tp x sp x cfg must divide the world size.
        """
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive int, got {world_size!r}")
        tp_sp = self.tp * self.sp
        if num_heads is not None and num_heads % tp_sp != 0:
            valid = ", ".join(str(d) for d in divisors(num_heads))
            raise ValueError(f"{model} has {num_heads} heads: tp x sp must be one of {valid}, got "
                             f"tp={self.tp} x sp={self.sp} = {tp_sp}")
        if world_size % self.model_parallel != 0:
            valid = ", ".join(str(d) for d in divisors(world_size))
            raise ValueError(f"tp x sp x cfg = {self.tp} x {self.sp} x {self.cfg} = {self.model_parallel} does not "
                             f"divide the world size {world_size} (must be one of {valid})")
        return world_size // self.model_parallel

    def sizes(self, world_size: int) -> dict[str, int]:
        """{"tp", "sp", "cfg", "dp"} degrees for ``world_size`` (validated)."""
        return {"tp": self.tp, "sp": self.sp, "cfg": self.cfg, "dp": self.check(world_size)}


def coordinates(rank: int, sizes: dict[str, int]) -> dict[str, int]:
    """Mesh coordinates of a global rank (inverse of the layout in the module docstring)."""
    coords = {}
    for name in DIMS:
        rank, coords[name] = divmod(rank, sizes[name])
    return coords


def global_rank(coords: dict[str, int], sizes: dict[str, int]) -> int:
    rank = 0
    for name in reversed(DIMS):
        rank = rank * sizes[name] + coords[name]
    return rank


def rank_groups(sizes: dict[str, int], dims: tuple[str, ...]) -> list[list[int]]:
    """All groups of ranks that vary along ``dims`` with the other coordinates fixed, in a fixed order
    (every rank must create them in the same order). Each group lists its ranks in increasing order."""
    fixed = [d for d in DIMS if d not in dims]
    groups = []
    for outer in itertools.product(*(range(sizes[d]) for d in fixed)):
        base = dict(zip(fixed, outer))
        groups.append(sorted(global_rank({**base, **dict(zip(dims, inner))}, sizes)
                             for inner in itertools.product(*(range(sizes[d]) for d in dims))))
    return groups


# Named groups of the mesh: the dims each one varies along.
GROUP_DIMS: dict[str, tuple[str, ...]] = {
    "tp": ("tp",),
    "sp": ("sp",),
    "cfg": ("cfg",),
    "dp": ("dp",),
    "sequence_data": ("sp", "cfg", "dp"),
    "pipe": (),  # pipeline degree 1: each rank alone
}


class ParallelMesh:
    """The process groups of a ParallelConfig on the initialised default group.

    ``group(name)``, ``size(name)``, ``rank(name)`` and ``ranks(name)`` for name in GROUP_DIMS; the
    attributes ``tp_group``, ``sp_group``, ... are shortcuts. Every group is created on every rank,
    in the same order (``dist.new_group`` is collective).
    """

    def __init__(self, config: ParallelConfig, num_heads: Optional[int] = None):
        if not dist.is_initialized():
            raise RuntimeError("ParallelMesh needs an initialised default process group (dist.init_process_group)")
        self.config = config
        self.world_size, self.global_rank = dist.get_world_size(), dist.get_rank()
        config.check(self.world_size, num_heads)
        self.sizes = config.sizes(self.world_size)
        self.coords = coordinates(self.global_rank, self.sizes)
        self._groups: dict[str, Any] = {}
        self._ranks: dict[str, list[int]] = {}
        for name, dims in GROUP_DIMS.items():
            for members in rank_groups(self.sizes, dims):
                group = dist.new_group(members)
                if self.global_rank in members:
                    self._groups[name], self._ranks[name] = group, members

    # -- generic accessors -------------------------------------------------------------------------
    def group(self, name: str):
        return self._groups[name]

    def ranks(self, name: str) -> list[int]:
        """Global ranks of this rank's group ``name``, in group-rank order."""
        return list(self._ranks[name])

    def size(self, name: str) -> int:
        return len(self._ranks[name])

    def rank(self, name: str) -> int:
        """This rank's index in its group ``name``."""
        return self._ranks[name].index(self.global_rank)

    tp = property(lambda self: self.sizes["tp"])
    sp = property(lambda self: self.sizes["sp"])
    cfg = property(lambda self: self.sizes["cfg"])
    dp = property(lambda self: self.sizes["dp"])
    tp_group = property(lambda self: self._groups["tp"])
    sp_group = property(lambda self: self._groups["sp"])
    cfg_group = property(lambda self: self._groups["cfg"])
    dp_group = property(lambda self: self._groups["dp"])
    sequence_data_group = property(lambda self: self._groups["sequence_data"])
    tp_rank = property(lambda self: self.coords["tp"])
    sp_rank = property(lambda self: self.coords["sp"])
    cfg_rank = property(lambda self: self.coords["cfg"])
    dp_rank = property(lambda self: self.coords["dp"])

    def __repr__(self) -> str:
        return (f"ParallelMesh(rank {self.global_rank}/{self.world_size}: "
                + ", ".join(f"{d} {self.coords[d]}/{self.sizes[d]}" for d in DIMS) + ")")

    # -- seeds ---------------------------------------------------------------------------------------
    @property
    def seed_rank(self) -> int:
        """The rank to seed with (``engine.rng.seed_everything(seed, mesh.seed_rank)``): dp_rank, shared by
        the tp, sp and cfg ranks of one sample, distinct across data replicas."""
        return self.dp_rank

    def seed_offset(self, name: str = "") -> int:
        """Offset of this rank's stream ``name`` from a base seed (``rank_seed(s, name) = s + offset``
        modulo 2**63): equal within tp, sp and cfg groups, different across dp ranks and names."""
        return derive_seed(0, self.seed_rank, name)

    def rank_seed(self, seed: int, name: str = "") -> int:
        """This rank's seed for stream ``name``: ``engine.rng.derive_seed(seed, dp_rank, name)``."""
        return derive_seed(seed, self.seed_rank, name)

    # -- ZeRO ----------------------------------------------------------------------------------------
    def zero_init_kwargs(self) -> dict[str, Any]:
        """Arguments for ``deepspeed.zero.Init`` so parameters are partitioned over the sequence_data
        group (the group the engine's ZeRO optimizer reduces over; see the module docstring)."""
        return {"data_parallel_group": self.sequence_data_group, "mpu": self}

    # -- DeepSpeed / Megatron mpu interface ----------------------------------------------------------
    def get_model_parallel_group(self):
        return self._groups["tp"]

    def get_model_parallel_rank(self) -> int:
        return self.rank("tp")

    def get_model_parallel_world_size(self) -> int:
        return self.size("tp")

    def get_model_parallel_src_rank(self) -> int:
        return self._ranks["tp"][0]

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_src_rank = get_model_parallel_src_rank

    def get_data_parallel_group(self):
        return self._groups["dp"]

    def get_data_parallel_rank(self) -> int:
        return self.rank("dp")

    def get_data_parallel_world_size(self) -> int:
        return self.size("dp")

    def get_data_parallel_group_ranks(self) -> list[int]:
        return self.ranks("dp")

    def get_sequence_parallel_group(self):
        return self._groups["sp"]

    def get_sequence_parallel_rank(self) -> int:
        return self.rank("sp")

    def get_sequence_parallel_world_size(self) -> int:
        return self.size("sp")

    def get_sequence_data_parallel_group(self):
        return self._groups["sequence_data"]

    def get_sequence_data_parallel_rank(self) -> int:
        return self.rank("sequence_data")

    def get_sequence_data_parallel_world_size(self) -> int:
        return self.size("sequence_data")

    def get_pipe_parallel_group(self):
        return self._groups["pipe"]

    def get_pipe_parallel_rank(self) -> int:
        return 0

    def get_pipe_parallel_world_size(self) -> int:
        return 1

    get_pipeline_model_parallel_group = get_pipe_parallel_group
    get_pipeline_model_parallel_rank = get_pipe_parallel_rank
    get_pipeline_model_parallel_world_size = get_pipe_parallel_world_size
