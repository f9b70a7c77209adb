"""The student's denoising step list: ONE setting read by the training rollout and by inference.

Self-Forcing trains on ``warp_step_list([1000, 750, 500, 250], shift)`` (the nominal list mapped onto
the shifted FlowMatch grid); upstream forks have shipped inference with the unwarped list or another
shift, so the student ran at timesteps it never saw. Here both sides call ``StepListConfig.timesteps()``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Dict, List, Optional

from megadistill.diffusion.flow_match import FlowMatchSchedule, warp_step_list
from megadistill.diffusion.noise_schedule import GENERIC


@dataclass
class StepListConfig:
    """``steps``: nominal timesteps in (0, T], strictly decreasing; ``warp``: map them onto the grid of
    ``shift`` (upstream ``warp_denoising_step``); ``shift`` also defines the re-noising grid; ``grid``:
    re-noising between steps snaps to that grid (upstream ``scheduler.add_noise``), or, when false,
    noises at the exact timestep (the toy lab's continuous schedule). ``shift`` and
    ``num_train_timesteps`` default to the model family's noise schedule (diffusion/noise_schedule.py)."""

    SCHEDULE_FIELDS: ClassVar[Dict[str, str]] = {"shift": "shift", "num_train_timesteps": "num_train_timesteps"}

    steps: List[float] = field(default_factory=lambda: [1000.0, 750.0, 500.0, 250.0])
    warp: bool = True
    shift: float = GENERIC.shift
    num_train_timesteps: int = GENERIC.num_train_timesteps
    grid: bool = True

    def __post_init__(self):
        self.steps = [float(s) for s in self.steps]
        if not self.steps:
            raise ValueError("steps must not be empty")
        if any(a <= b for a, b in zip(self.steps, self.steps[1:])):
            raise ValueError(f"steps must be strictly decreasing, got {self.steps}")
        if self.steps[0] > self.num_train_timesteps or self.steps[-1] <= 0:
            raise ValueError(f"steps must lie in (0, {self.num_train_timesteps}], got {self.steps}")
        if self.warp and any(s != int(s) for s in self.steps):
            raise ValueError(f"warped steps index the timestep grid and must be integers, got {self.steps}")
        if self.shift <= 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")

    def timesteps(self) -> List[float]:
        """The timesteps the student runs at, in training and at inference."""
        if not self.warp:
            return list(self.steps)
        return [float(t) for t in warp_step_list(self.steps, self.shift, self.num_train_timesteps)]

    def schedule(self) -> Optional[FlowMatchSchedule]:
        """The grid that re-noising between steps snaps to (upstream ``scheduler.add_noise``); None
        without ``grid`` (continuous re-noising)."""
        if not self.grid:
            return None
        return FlowMatchSchedule(num_train_timesteps=self.num_train_timesteps, shift=self.shift)
