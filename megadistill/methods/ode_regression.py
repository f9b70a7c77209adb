"""ODE regression (CausVid / Self-Forcing ODE initialisation) on teacher trajectories.

Trajectories are stored at EXACTLY the student's training step list (upstream's pair script stores
Euler indices [0, 12, 24, 36, -1] of a 48-step shift-8 run, which do not land on the warped step
list: a reported bug). ``generate_ode_pairs`` integrates the guided teacher ODE on a fine Euler
grid that contains every step of the list and records the state at each step and the clean end.

Loss: per sample an index k ~ U{0..K-1}; x0_pred = G(traj[k], step_list[k]); MSE(x0_pred, clean)
over samples with step_list[k] != 0. Stored steps are checked against the configured list.

Block-causal students (``num_frame_per_block`` set; video samples [B, C, F, H, W], frame axis from the latents):
the causal ODE-init stage of CausVid / Self-Forcing. Each block of frames of each sample draws its
own index, so the input mixes trajectory states frame block by frame block, the generator sees
per-frame timesteps t [B, F] in one parallel block-causal forward, and the MSE is averaged over the
frames with t != 0.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Dict, List, Optional, Sequence, Tuple

import torch

from megadistill.diffusion.latents import DenseLatents, frame_mean, per_frame, require_dense
from megadistill.diffusion.noise_schedule import GENERIC
from megadistill.diffusion.samplers import flow_inference_sigmas
from .base import Denoiser, DistillationMethod, DistillBatch, logs_to_floats


@dataclass
class ODERegressionConfig:
    """``num_frame_per_block``: None = one index per sample; an int = one index per block of frames."""

    SCHEDULE_FIELDS: ClassVar[Dict[str, str]] = {"num_train_timesteps": "num_train_timesteps"}

    step_list: List[float] = field(default_factory=lambda: [1000.0, 750.0, 500.0, 250.0])
    num_train_timesteps: int = GENERIC.num_train_timesteps
    num_frame_per_block: Optional[int] = None

    def __post_init__(self):
        if self.num_frame_per_block is not None and self.num_frame_per_block < 1:
            raise ValueError(f"num_frame_per_block must be None or >= 1, got {self.num_frame_per_block}")
        steps = [float(s) for s in self.step_list]
        if not steps:
            raise ValueError("step_list must not be empty")
        if any(a <= b for a, b in zip(steps, steps[1:])):
            raise ValueError(f"step_list must be strictly decreasing, got {steps}")
        if steps[0] > self.num_train_timesteps or steps[-1] < 0:
            raise ValueError(f"step_list entries must lie in [0, {self.num_train_timesteps}], got {steps}")


def ode_grid(step_sigmas: Sequence[float], num_inference_steps: int, shift: float) -> torch.Tensor:
    """Descending float64 sigma grid from 1 to 0: the N-step Euler grid merged with the step sigmas."""
    base = flow_inference_sigmas(num_inference_steps, shift)
    merged = torch.cat([base, torch.tensor([1.0, *step_sigmas, 0.0], dtype=torch.float64)])
    # Merge points closer than 1e-9 so a step already on the grid does not create a zero-length step.
    merged = torch.unique(torch.round(merged * 1e9) / 1e9)
    return torch.flip(merged, dims=[0])


def generate_ode_pairs(
    v_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    step_list: Sequence[float],
    num_inference_steps: int = 48,
    shift: float = 1.0,
    num_train_timesteps: int = 1000,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Euler-integrate v_fn (CFG inside) from sigma 1; record the state at each step and the end.

    Returns (trajectory [B, K + 1, *shape] in noise dtype, steps float64 [K]). The state recorded for
    step k is the ODE state at sigma = step_list[k] / T exactly (the grid contains those sigmas).
    """
    steps = torch.tensor([float(s) for s in step_list], dtype=torch.float64)
    if len(steps) == 0 or (steps[1:] >= steps[:-1]).any():
        raise ValueError(f"step_list must be non-empty and strictly decreasing, got {steps.tolist()}")
    step_sigmas = (steps / num_train_timesteps).tolist()
    grid = ode_grid(step_sigmas, num_inference_steps, shift)
    wanted = {round(s * 1e9): k for k, s in enumerate(step_sigmas)}
    states: List[Optional[torch.Tensor]] = [None] * len(step_sigmas)
    x = noise
    with torch.no_grad():
        for i in range(len(grid)):
            sigma = float(grid[i])
            k = wanted.get(round(sigma * 1e9))
            if k is not None:
                states[k] = x.clone()
            if i + 1 == len(grid):
                break
            t = torch.full((x.shape[0],), sigma * num_train_timesteps, dtype=torch.float64, device=x.device)
            x = x + v_fn(x, t).to(x.dtype) * (float(grid[i + 1]) - sigma)
    if any(s is None for s in states):
        missing = [float(steps[k]) for k, s in enumerate(states) if s is None]
        raise RuntimeError(f"ODE grid missed steps {missing}")
    return torch.stack([*states, x], dim=1), steps


def guided_flow_fn(teacher: Denoiser, cond, uncond, scale: float, form: str = "standard"):
    """v_fn(x_t, t) for generate_ode_pairs: the teacher's CFG flow for fixed conditions."""
    return lambda x, t: teacher.flow_guided(x, t, cond, uncond, scale, form)


def check_trajectory_steps(stored: torch.Tensor, step_list: Sequence[float]) -> None:
    expected = torch.tensor([float(s) for s in step_list], dtype=torch.float64)
    stored = torch.as_tensor(stored, dtype=torch.float64).cpu()
    if stored.shape != expected.shape or not torch.allclose(stored, expected, rtol=0, atol=1e-6):
        raise ValueError(
            f"trajectory stored at steps {stored.tolist()} but the training step list is {expected.tolist()}"
        )


def ode_regression_loss(
    generator: Denoiser, trajectory: torch.Tensor, steps: torch.Tensor, cond, index: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-sample squared errors [B] of x0_pred at trajectory[b, index[b]] vs the clean end, and t [B]."""
    arange = torch.arange(trajectory.shape[0], device=trajectory.device)
    x_t = trajectory[arange, index]
    t = steps.to(trajectory.device)[index]
    x0 = generator.x0(x_t, t, cond)
    clean = trajectory[:, -1]
    err = DenseLatents(clean.shape[0], clean.shape[1:]).per_sample_mean((x0.double() - clean.double()) ** 2)
    return err, t


def per_block_index(
    batch_size: int, num_frames: int, num_frame_per_block: int, num_steps: int,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Long [B, F]: one index ~ U{0..num_steps-1} per block of ``num_frame_per_block`` frames, repeated
    over the block's frames (upstream ``_get_timestep(..., uniform_timestep=False)``)."""
    if num_frames % num_frame_per_block:
        raise ValueError(f"{num_frames} frames do not split into blocks of {num_frame_per_block}")
    index = torch.randint(0, num_steps, (batch_size, num_frames // num_frame_per_block), generator=generator)
    return index.repeat_interleave(num_frame_per_block, dim=1)


def ode_regression_loss_per_frame(
    generator: Denoiser, trajectory: torch.Tensor, steps: torch.Tensor, cond, index: torch.Tensor,
    *, frame_dim: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Squared errors [B, F] (mean over each frame) of x0_pred vs the clean end and timesteps t [B, F].

    trajectory [B, K + 1, *sample_shape] with a sample's frames along ``frame_dim`` (of the sample
    tensor [B, *sample_shape]); index [B, F]: frame f of sample b is taken from state index[b, f]
    and predicted at timestep steps[index[b, f]] (the generator gets t as [B, F]).
    """
    clean = trajectory[:, -1]
    b, f = clean.shape[0], clean.shape[frame_dim]
    if index.shape != (b, f):
        raise ValueError(f"index must be [B, F] = {[b, f]}, got {list(index.shape)}")
    index = index.to(trajectory.device)
    gather = per_frame(index, clean.dim(), frame_dim).expand(clean.shape).unsqueeze(1)
    x_t = trajectory.gather(1, gather).squeeze(1)
    t = steps.to(trajectory.device)[index]
    x0 = generator.x0(x_t, t, cond)
    err = frame_mean((x0.double() - clean.double()) ** 2, frame_dim)
    return err, t


class ODERegression(DistillationMethod):
    name = "ode_regression"
    has_critic = False
    needs_trajectory = True
    generator_forward = "parallel"

    @classmethod
    def bind_rollout(cls, config: ODERegressionConfig, rollout) -> ODERegressionConfig:
        """The student's step list; one index per causal block for a block-causal student."""
        return dataclasses.replace(config, step_list=rollout.steps.timesteps(),
                                   num_frame_per_block=rollout.num_frame_per_block if rollout.causal else None)

    def __init__(self, cfg: ODERegressionConfig, *, generator: Denoiser, rng: Optional[torch.Generator] = None, **_):
        self.cfg = cfg
        self.generator = generator
        self.rng = rng


    def generator_loss(self, batch: DistillBatch, step: int) -> Tuple[torch.Tensor, Dict[str, float]]:
        if batch.trajectory is None or batch.trajectory_steps is None:
            raise ValueError("ODE regression needs batch.trajectory and batch.trajectory_steps")
        check_trajectory_steps(batch.trajectory_steps, self.cfg.step_list)
        k = len(self.cfg.step_list)
        if self.cfg.num_frame_per_block is None:
            index = torch.randint(0, k, (batch.batch_size,), generator=self.rng).to(batch.trajectory.device)
            err, t = ode_regression_loss(self.generator, batch.trajectory, batch.trajectory_steps, batch.cond, index)
        else:
            frame_dim = require_dense(batch.latents, "per-block ODE regression").video_frame_dim()
            num_frames = batch.latents.shape[frame_dim]
            index = per_block_index(batch.batch_size, num_frames, self.cfg.num_frame_per_block, k, self.rng)
            index = index.to(batch.trajectory.device)
            err, t = ode_regression_loss_per_frame(
                self.generator, batch.trajectory, batch.trajectory_steps, batch.cond, index, frame_dim=frame_dim
            )
        keep = t != 0  # a state at t = 0 is already clean: nothing to regress
        loss = err[keep].mean() if keep.any() else err.sum() * 0.0
        logs = {"ode_loss": loss}
        for j, s in enumerate(self.cfg.step_list):
            sel = index == j
            if sel.any():
                logs[f"ode_loss_t{int(round(s))}"] = err[sel].mean()
        return loss, logs_to_floats(**logs)
