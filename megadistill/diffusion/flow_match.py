"""Rectified-flow (FlowMatch) schedule of the flow-prediction video DiTs Self-Forcing and CausVid distil.

Convention (shared by every model and method in megadistill):
    timestep t in [0, T] with T = num_train_timesteps (1000); sigma = t / T
    x_t = (1 - sigma) * x0 + sigma * eps
    the network predicts the flow v = eps - x0 ("flow" prediction)

Two forms live here:
  * the discrete upstream grid (``FlowMatchSchedule``): 1000 shifted sigmas; ``add_noise``,
    ``training_weight`` and ``step`` snap t to the nearest grid point exactly like upstream, so a
    checkpoint trained upstream sees identical inputs here;
  * the continuous form (``add_noise_continuous``, ``shift_sigma``) for arbitrary sigma, used by
    the toy lab and by anything that samples t off the grid.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def shift_sigma(sigma, shift: float):
    """Timestep shift s*sigma / (1 + (s-1)*sigma); maps 0->0 and 1->1, s>1 spends more time at high noise."""
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def add_noise_continuous(x0: torch.Tensor, eps: torch.Tensor, sigma) -> torch.Tensor:
    """x_t = (1 - sigma) x0 + sigma eps for any sigma (broadcast over trailing dims)."""
    sigma = _expand_like(torch.as_tensor(sigma, dtype=x0.dtype, device=x0.device), x0)
    return (1.0 - sigma) * x0 + sigma * eps


def flow_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Training target of a flow-prediction network: v = eps - x0."""
    return eps - x0


def _expand_like(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Right-pad a [B] (or [B, L]) tensor with singleton dims so it broadcasts against x."""
    while v.dim() < x.dim():
        v = v.unsqueeze(-1)
    return v


@dataclass(frozen=True)
class FlowMatchSchedule:
    """Upstream FlowMatchScheduler in training mode (Self-Forcing ``utils/scheduler.py``).

    ``set_timesteps(N, training=True, shift=s, sigma_min=0, extra_one_step=True)`` builds
    sigma = linspace(1, 0, N+1)[:-1], shifted; timesteps = T * sigma. The grid and the training
    weights are computed in float32 exactly as upstream (bit-identical) and handed out as float64;
    snapping compares in float64, which can differ from upstream's float32 argmin only at exact ties.
    (Upstream's class default sigma_min = 0.003/1.002 is overridden to 0 by every Self-Forcing model.)
    """

    num_train_timesteps: int = 1000
    shift: float = 1.0
    sigma_max: float = 1.0
    sigma_min: float = 0.0
    extra_one_step: bool = True

    def __post_init__(self):
        if self.num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be >= 1, got {self.num_train_timesteps}")
        if self.shift <= 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")
        if not 0.0 <= self.sigma_min < self.sigma_max <= 1.0:
            raise ValueError(f"need 0 <= sigma_min < sigma_max <= 1, got {self.sigma_min}, {self.sigma_max}")

    @property
    def sigmas(self) -> torch.Tensor:
        """The shifted grid, computed in float32 like upstream (bit-identical values), returned as float64."""
        n = self.num_train_timesteps
        count = n + 1 if self.extra_one_step else n
        s = torch.linspace(self.sigma_max, self.sigma_min, count, dtype=torch.float32)
        if self.extra_one_step:
            s = s[:-1]
        return shift_sigma(s, self.shift).double()

    @property
    def timesteps(self) -> torch.Tensor:
        """T * sigmas, rounded in float32 as upstream so nearest-grid snapping sees the same grid."""
        return (self.sigmas.float() * self.num_train_timesteps).double()

    def grid_index(self, t: torch.Tensor) -> torch.Tensor:
        """Index of the nearest grid timestep for each element of t (upstream argmin snapping)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        ts = self.timesteps.to(t.device)
        return (t.reshape(-1, 1) - ts.reshape(1, -1)).abs().argmin(dim=1).reshape(t.shape)

    def sigma_at(self, t: torch.Tensor) -> torch.Tensor:
        """Grid sigma nearest to t (float64, same shape as t)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        return self.sigmas.to(t.device)[self.grid_index(t)]

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Upstream add_noise: snap each t to the grid, then x_t = (1-sigma) x0 + sigma eps.

        Like upstream, the blend runs in at least float32 (a float32 sigma promotes bf16 inputs) and
        the result takes eps's dtype (``type_as(noise)``).
        """
        dtype = torch.promote_types(x0.dtype, torch.float32)
        sigma = self.sigma_at(t).to(x0.device, dtype)
        return add_noise_continuous(x0.to(dtype), eps.to(dtype), sigma).to(eps.dtype)

    def training_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Upstream 'bsmntw' weight: Gaussian bump around T/2 over the grid, min 0, mean 1 (float32 math)."""
        n = self.num_train_timesteps
        x = self.timesteps.float()
        y = torch.exp(-2.0 * ((x - n / 2) / n) ** 2)
        y = y - y.min()
        w = (y * (len(x) / y.sum())).double()
        t = torch.as_tensor(t, dtype=torch.float64)
        return w.to(t.device)[self.grid_index(t)]

    def step(self, v: torch.Tensor, t: torch.Tensor, x: torch.Tensor, to_final: bool = False) -> torch.Tensor:
        """Euler step from grid point t to the next grid point: x + v (sigma_next - sigma).

        The last grid point (and ``to_final``) steps to sigma 0. Computed in at least float32, returned
        in x's dtype (upstream ``type_as(sample)``).
        """
        idx = self.grid_index(t)
        sig = self.sigmas.to(x.device)
        sigma = sig[idx]
        nxt = torch.where(idx + 1 < len(sig), sig[(idx + 1).clamp(max=len(sig) - 1)], torch.zeros_like(sigma))
        if to_final:
            nxt = torch.zeros_like(sigma)
        dtype = torch.promote_types(x.dtype, torch.float32)
        out = x.to(dtype) + v.to(dtype) * _expand_like((nxt - sigma).to(dtype), x)
        return out.to(x.dtype)


def warp_step_list(steps, shift: float, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Self-Forcing's ``warp_denoising_step``: map a nominal step list onto the shifted grid.

    timesteps_ext = cat(schedule.timesteps, [0]); warped = timesteps_ext[T - steps].
    shift 5: [1000, 750, 500, 250] -> [1000, 937.5, 833.33, 625.0].
    """
    steps = torch.as_tensor(steps, dtype=torch.long)
    if (steps < 0).any() or (steps > num_train_timesteps).any():
        raise ValueError(f"step list entries must lie in [0, {num_train_timesteps}], got {steps.tolist()}")
    sched = FlowMatchSchedule(num_train_timesteps=num_train_timesteps, shift=shift)
    ext = torch.cat([sched.timesteps, torch.zeros(1, dtype=torch.float64)])
    return ext[num_train_timesteps - steps]


def shift_timestep(t, shift: float, num_train_timesteps: int = 1000):
    """Shift a timestep (not a sigma): T * shift_sigma(t / T). Used for DMD/critic t sampling."""
    return shift_sigma(t / num_train_timesteps, shift) * num_train_timesteps
