"""The one model-agnostic interface every distillation method is written against.

Pieces (all small on purpose; every model family plugs into the same ones):

``Denoiser``
    Wraps a flow-prediction network ``net(x_t, t, cond) -> v`` (v = eps - x0, t in [0, T]).
    ``flow`` calls the network, ``x0`` converts to a clean-sample prediction x_t - sigma v in
    float64 and returns the input dtype, ``x0_guided`` applies CFG in either the standard form
    (u + s (c - u)) or the upstream form (c + g (c - u)). sigma is t / T unless the caller passes
    the noise level of x_t (``sigma=``, e.g. a grid-snapped one). ``cond`` is opaque to everything
    here: a class-id tensor for the toy MLP, a dict of text embeddings for a text-to-video family.

``DistillBatch``
    What one optimisation step sees: ``cond`` / ``uncond`` conditions, the per-sample shape of a
    generated sample, and optionally ``real`` clean samples (GAN/APT/progressive) and a stored ODE
    ``trajectory`` with the timesteps it was stored at (ODE regression).

``Rollout`` / ``RolloutOutput`` / ``FewStepRollout``
    A rollout turns noise into generator samples that carry gradient. ``FewStepRollout`` is the
    bidirectional (single-block) case of the Self-Forcing training rollout: draw an exit step
    (``last_step_only`` forces the final one), run the steps before it under no_grad with x0
    prediction and fresh re-noising, and run only the exit step with gradient. It reports
    ``denoised_timestep_from/to`` exactly as upstream (nominal, un-shifted timesteps of the exit
    step and the next step, used by ts_schedule / ts_schedule_max). The block-causal KV-cache rollout
    implements the same ``__call__`` and adds per-block semantics (same_step_across_blocks,
    gradient_mask for the re-encoded first block).

``DistillationMethod``
    ``generator_loss(batch, step)`` and ``critic_loss(batch, step)`` return ``(loss, logs)`` with
    ``logs`` a dict of floats. ``has_critic`` says whether the trainer should run critic steps;
    ``generator_parameters()`` / ``critic_parameters()`` are what each optimizer owns. Methods
    that need a notion of the student's inference steps expose ``student_step_list()``.
    What a method needs from the job (a teacher, its guided passes, a critic, real samples, stored
    trajectories, how the generator runs) it declares as class attributes, read through
    ``needs(config)`` (``MethodNeeds``): the jobs, the input checks and the memory planner ask it,
    never a list of method names.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Protocol, Sequence, Tuple

import torch
from torch import nn

from megadistill.diffusion.flow_match import FlowMatchSchedule, _expand_like, add_noise_continuous
from megadistill.diffusion.guidance import cfg, cfg_upstream
from megadistill.diffusion.latents import Latents, require_dense
from megadistill.diffusion.parameterization import flow_to_x0

GUIDANCE_FORMS = ("standard", "upstream")


def check_guidance_form(form: str, field: str = "guidance_form") -> None:
    if form not in GUIDANCE_FORMS:
        raise ValueError(f"{field} must be one of {GUIDANCE_FORMS}, got {form!r}")


def is_unguided(scale: float, form: str) -> bool:
    """True when CFG reduces to the conditional model (standard scale 1, upstream g 0)."""
    return scale == (1.0 if form == "standard" else 0.0)


class Denoiser(nn.Module):
    """A flow-prediction network seen through the flow convention (see diffusion/flow_match.py)."""

    def __init__(self, net: nn.Module, num_train_timesteps: int = 1000):
        super().__init__()
        self.net = net
        self.num_train_timesteps = num_train_timesteps

    def flow(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any, **kwargs) -> torch.Tensor:
        return self.net(x_t, t, cond, **kwargs)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(t, dtype=torch.float64) / self.num_train_timesteps

    def flow_to_x0(self, v: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                   sigma: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x_t - sigma v in float64 (at sigma ~ 1 the subtraction cancels), in x_t's dtype; ``sigma``
        (shape of t) defaults to ``self.sigma(t)``."""
        sigma = self.sigma(t) if sigma is None else torch.as_tensor(sigma, dtype=torch.float64)
        return flow_to_x0(v.double(), x_t.double(), _expand_like(sigma.to(x_t.device), x_t)).to(x_t.dtype)

    def x0(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any, sigma: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.flow_to_x0(self.flow(x_t, t, cond), x_t, t, sigma)

    def x0_guided(
        self, x_t: torch.Tensor, t: torch.Tensor, cond: Any, uncond: Any, scale: float, form: str = "standard",
        sigma: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """CFG on x0 predictions; one conditional call when the guidance is the identity."""
        check_guidance_form(form, "form")
        x0_c = self.x0(x_t, t, cond, sigma)
        if is_unguided(scale, form):
            return x0_c
        x0_u = self.x0(x_t, t, uncond, sigma)
        return cfg(x0_c, x0_u, scale) if form == "standard" else cfg_upstream(x0_c, x0_u, scale)

    def generated_mask(self, cond: Any, samples: torch.Tensor) -> Optional[torch.Tensor]:
        """bool, broadcastable to ``samples``: the elements the generator produces, leaving out those a
        condition pins (e.g. a first frame given as an image); None = all of them."""
        return None

    def flow_guided(
        self, x_t: torch.Tensor, t: torch.Tensor, cond: Any, uncond: Any, scale: float, form: str = "standard"
    ) -> torch.Tensor:
        """CFG on flow predictions (equal to CFG on x0: the conversion is affine in v)."""
        check_guidance_form(form, "form")
        v_c = self.flow(x_t, t, cond)
        if is_unguided(scale, form):
            return v_c
        v_u = self.flow(x_t, t, uncond)
        return cfg(v_c, v_u, scale) if form == "standard" else cfg_upstream(v_c, v_u, scale)


@dataclass
class DistillBatch:
    """Inputs of one step. ``latents`` is the layout of a generated sample batch (dense
    ``[B, *sample_shape]`` or packed sequences, diffusion/latents.py); ``real`` has that layout."""

    cond: Any
    latents: Latents
    uncond: Any = None
    real: Optional[torch.Tensor] = None
    trajectory: Optional[torch.Tensor] = None  # [B, K + 1, *sample_shape]: states at steps, then clean
    trajectory_steps: Optional[torch.Tensor] = None  # [K] timesteps the trajectory states were stored at
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32

    def __post_init__(self):
        if not isinstance(self.latents, Latents):
            raise TypeError(f"latents must be a Latents (DenseLatents / PackedLatents), got {type(self.latents).__name__}")
        if self.real is not None:
            self.latents.check(self.real, "real")
        if self.trajectory is not None:
            dense = require_dense(self.latents, "a stored trajectory")
            if self.trajectory.shape[0] != dense.batch_size or tuple(self.trajectory.shape[2:]) != dense.sample_shape:
                raise ValueError(f"trajectory has shape {tuple(self.trajectory.shape)}, expected "
                                 f"[{dense.batch_size}, K + 1, {', '.join(map(str, dense.sample_shape))}]")

    @property
    def batch_size(self) -> int:
        return self.latents.batch_size

    def noise(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return self.latents.noise(generator, self.device, self.dtype)

    def per_row(self, values: torch.Tensor) -> torch.Tensor:
        """Per-sample values (timesteps, noise levels) laid out against x: ``latents.per_row``."""
        return self.latents.per_row(values)


@dataclass
class RolloutOutput:
    samples: torch.Tensor  # generator x0 at the exit step, with grad when the rollout was asked for it
    denoised_timestep_from: Optional[float] = None  # nominal timestep of the exit step
    denoised_timestep_to: Optional[float] = None  # nominal timestep of the next step (0 after the last)
    gradient_mask: Optional[torch.Tensor] = None  # bool, broadcastable to samples; None = all elements
    exit_index: int = 0


class Rollout(Protocol):
    def __call__(self, generator: Denoiser, batch: DistillBatch, *, grad: bool) -> RolloutOutput: ...


def nominal_timestep(t: float, schedule: FlowMatchSchedule) -> float:
    """Upstream ``T - argmin |schedule.timesteps - t|``: the un-shifted timestep of a (warped) step.

    DMD's ts_schedule draws t0 in [to, from] in this nominal space and then applies the timestep
    shift, so the range lands back on the exit step's noise level.
    """
    idx = int(schedule.grid_index(torch.tensor([float(t)]))[0])
    return float(schedule.num_train_timesteps - idx)


class FewStepRollout:
    """Self-Forcing training rollout for a single (bidirectional) block; see the module docstring.

    ``schedule`` (optional) makes re-noising snap to its grid like upstream ``scheduler.add_noise``
    and defines the nominal timesteps reported for ts_schedule; without it re-noising is continuous
    and the nominal timestep is the step itself.

    ``generator`` draws the exit step and ``noise_generator`` (default: ``generator``) the initial and
    re-noising noise. Under ZeRO-3 the exit step decides which modules run, so the trainer seeds
    ``generator`` identically on every rank; the noise must differ per data-parallel rank.
    """

    def __init__(
        self,
        step_list: Sequence[float],
        last_step_only: bool = False,
        schedule: Optional[FlowMatchSchedule] = None,
        generator: Optional[torch.Generator] = None,
        num_train_timesteps: int = 1000,
        noise_generator: Optional[torch.Generator] = None,
    ):
        steps = [float(s) for s in step_list]
        if not steps:
            raise ValueError("step_list is empty")
        if any(a <= b for a, b in zip(steps, steps[1:])):
            raise ValueError(f"step_list must be strictly decreasing, got {steps}")
        self.step_list = steps
        self.last_step_only = last_step_only
        self.schedule = schedule
        self.generator = generator
        self.noise_generator = noise_generator if noise_generator is not None else generator
        self.num_train_timesteps = num_train_timesteps

    def _nominal(self, t: float) -> float:
        return nominal_timestep(t, self.schedule) if self.schedule is not None else t

    @staticmethod
    def _timesteps(batch: DistillBatch, t: float, device: torch.device) -> torch.Tensor:
        """Step t for every sample, laid out against x (``batch.per_row``)."""
        return batch.per_row(torch.full((batch.batch_size,), t, dtype=torch.float64, device=device))

    def _renoise(self, x0: torch.Tensor, t_b: torch.Tensor) -> torch.Tensor:
        eps = torch.randn(x0.shape, generator=self.noise_generator, dtype=x0.dtype, device=x0.device)
        if self.schedule is not None:
            return self.schedule.add_noise(x0, eps, t_b)
        return add_noise_continuous(x0, eps, (t_b / self.num_train_timesteps).to(x0.dtype))

    def __call__(self, generator: Denoiser, batch: DistillBatch, *, grad: bool) -> RolloutOutput:
        n = len(self.step_list)
        if self.last_step_only:
            exit_index = n - 1
        else:
            exit_index = int(torch.randint(0, n, (1,), generator=self.generator))
        x = batch.noise(self.noise_generator)
        with torch.no_grad():
            for i in range(exit_index):
                t = self._timesteps(batch, self.step_list[i], x.device)
                x = self._renoise(generator.x0(x, t, batch.cond), self._timesteps(batch, self.step_list[i + 1], x.device))
        t = self._timesteps(batch, self.step_list[exit_index], x.device)
        with torch.set_grad_enabled(grad):
            samples = generator.x0(x, t, batch.cond)
        t_from = self._nominal(self.step_list[exit_index])
        t_to = 0.0 if exit_index == n - 1 else self._nominal(self.step_list[exit_index + 1])
        return RolloutOutput(samples, t_from, t_to, None, exit_index)


GENERATOR_FORWARDS = ("rollout", "parallel")


@dataclass(frozen=True)
class MethodNeeds:
    """What a method needs from the job. ``teacher``: a frozen teacher is held during training;
    ``guided_teacher``: its guided (CFG) passes run every step, which ``parallel.cfg`` can split;
    ``critic``: a trainable critic and critic steps; ``real``: clean samples (``batch.real``);
    ``trajectory``: stored teacher trajectories (``batch.trajectory``); ``generator_forward``:
    ``rollout`` (the configured rollout generates the samples) or ``parallel`` (one forward of the
    generator on inputs the method makes); ``target``: a frozen copy of the generator (its weights at
    the start) that the method updates itself, e.g. consistency's EMA target."""

    teacher: bool
    guided_teacher: bool
    critic: bool
    real: bool
    trajectory: bool
    generator_forward: str
    target: bool = False

    def __post_init__(self):
        if self.generator_forward not in GENERATOR_FORWARDS:
            raise ValueError(f"generator_forward must be one of {GENERATOR_FORWARDS}, got {self.generator_forward!r}")
        if self.guided_teacher and not self.teacher:
            raise ValueError("guided_teacher needs teacher")


class DistillationMethod(abc.ABC):
    """Base of every method; see the module docstring for the contract."""

    name: str = "base"
    has_critic: bool = False
    uses_teacher: bool = False
    guided_teacher: bool = False
    needs_real: bool = False
    needs_trajectory: bool = False
    generator_forward: str = "rollout"
    needs_target: bool = False
    critic_kind: str = "denoiser"  # the critic as the method calls it: a score denoiser or a "discriminator"
    # How the trained student samples: "renoise" (few-step x0 prediction, fresh noise between steps) or
    # "euler" (deterministic steps along its flow: students trained on the teacher's ODE states).
    student_sampling: str = "renoise"

    @classmethod
    def bind_rollout(cls, config: Any, rollout: Any) -> Any:
        """``config`` with what it takes from the run's rollout config (``rollout.config.RolloutConfig``):
        a method whose settings follow the generator's step list or causal block returns a copy with
        them filled in, and raises ValueError when it cannot work with that rollout. Default: unchanged."""
        return config

    @classmethod
    def check_steps(cls, config: Any, max_steps: int) -> None:
        """Raise ValueError when ``train.max_steps`` cannot run this method's schedule. Default: any."""

    @classmethod
    def needs(cls, config: Any = None) -> MethodNeeds:
        """What this method needs with ``config`` (the class attributes; a method whose needs depend on
        its config overrides this)."""
        return MethodNeeds(teacher=cls.uses_teacher, guided_teacher=cls.guided_teacher, critic=cls.has_critic,
                           real=cls.needs_real, trajectory=cls.needs_trajectory,
                           generator_forward=cls.generator_forward, target=cls.needs_target)

    @abc.abstractmethod
    def generator_loss(self, batch: DistillBatch, step: int) -> Tuple[torch.Tensor, Dict[str, float]]:
        ...

    def critic_loss(self, batch: DistillBatch, step: int) -> Tuple[torch.Tensor, Dict[str, float]]:
        raise NotImplementedError(f"method {self.name!r} has no critic (has_critic is False)")

    def generator_parameters(self) -> List[nn.Parameter]:
        """What the generator optimizer owns: the trainable parameters of ``self.generator``."""
        return trainable(self.generator)

    def critic_parameters(self) -> List[nn.Parameter]:
        """What the critic optimizer owns: ``self.critic`` (score network or discriminator), if any."""
        critic = getattr(self, "critic", None)
        return trainable(critic) if critic is not None else []

    def student(self) -> Denoiser:
        """The network used at inference (methods keep it as ``self.generator``)."""
        return self.generator

    def state_dict(self) -> Dict[str, Any]:
        """Training state the method holds besides the trained engines (a target's weights, a stage),
        this rank's part: the trainer saves it with every checkpoint. Default: none."""
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state:
            raise ValueError(f"method {self.name!r} keeps no state, but the checkpoint holds {sorted(state)}")

    def checkpoint_due(self, step: int) -> bool:
        """True when the trainer must save after ``step`` completed steps and keep that checkpoint
        whatever ``train.keep_last`` says (e.g. the end of a progressive stage). Default: never."""
        return False


def trainable(module: nn.Module) -> List[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def freeze(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def masked_mean(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean of x over the elements where mask is True (all elements when mask is None)."""
    if mask is None:
        return x.mean()
    return x[mask.expand_as(x)].mean()


def logs_to_floats(**values: Any) -> Dict[str, float]:
    return {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in values.items()}


__all__ = [
    "Denoiser", "DistillBatch", "RolloutOutput", "Rollout", "FewStepRollout", "DistillationMethod", "MethodNeeds",
    "nominal_timestep", "trainable", "freeze", "masked_mean", "logs_to_floats",
    "check_guidance_form", "is_unguided", "GUIDANCE_FORMS",
]
