"""The Wan family's batches (``make_batch(rng)`` for the trainer's SeededBatchSource): prompt draws
for rollout methods, with the real clean latents a GAN critic or causal diffusion needs (the demo's
videos rendered for the drawn prompts), or stored teacher trajectories (ODE pairs).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from megadistill.diffusion.latents import DenseLatents
from megadistill.methods.base import DistillBatch, MethodNeeds

from .prompts import PromptSet

LATENT_FRAME_DIM = 2  # Wan latents are [B, C, F, H, W]


class PromptBatches:
    """Prompt indices drawn per rank, plus the demo's videos for them when ``needs_real``."""

    def __init__(self, prompts: PromptSet, latent_shape: Sequence[int], micro_batch: int, needs_real: bool):
        self.prompts, self.latent_shape, self.micro = prompts, tuple(latent_shape), micro_batch
        self.needs_real = needs_real

    def __call__(self, generator: torch.Generator) -> DistillBatch:
        idx = torch.randint(0, len(self.prompts.prompts), (self.micro,), generator=generator)
        real = None
        if self.needs_real:
            from megadistill.demo.videos import render_videos

            real = render_videos([self.prompts.prompts[i] for i in idx.tolist()], generator)
        return DistillBatch(cond=self.prompts.condition(idx), uncond=self.prompts.uncondition(idx),
                            latents=DenseLatents(self.micro, self.latent_shape, frame_dim=LATENT_FRAME_DIM), real=real)


class ODEPairBatches:
    """Stored teacher trajectories: for ODE regression the trajectory and its prompt; with
    ``real_only`` (the GAN critic's real data, as Self-Forcing's GAN uses its ODE set) only the clean
    end as ``real``."""

    def __init__(self, prompts: PromptSet, path: str, micro_batch: int, latent_shape: Sequence[int],
                 real_only: bool = False, step_list: Optional[Sequence[float]] = None):
        self.real_only = real_only
        from megadistill.data.ode_pairs import load_ode_pairs, shard_paths

        pairs = load_ode_pairs(shard_paths(path))
        self.trajectory, self.steps, self.prompt_index = pairs["trajectory"], pairs["steps"], pairs["prompt_index"]
        if tuple(self.trajectory.shape[2:]) != tuple(latent_shape):
            raise ValueError(f"data.ode_pairs: trajectories are {list(self.trajectory.shape[2:])} per state, "
                             f"data.latent_shape is {list(latent_shape)}")
        if step_list is not None and [round(float(t), 3) for t in self.steps] != [round(t, 3) for t in step_list]:
            raise ValueError(f"data.ode_pairs were stored at steps {[float(t) for t in self.steps]}, the student "
                             f"trains at {step_list} (rollout.steps); regenerate them with the same steps")
        if int(self.prompt_index.max()) >= len(prompts.prompts):
            raise ValueError(f"data.ode_pairs index prompt {int(self.prompt_index.max())}, but the prompt list "
                             f"has {len(prompts.prompts)}: use the prompt list the pairs were generated from")
        self.prompts, self.micro = prompts, micro_batch

    def __call__(self, generator: torch.Generator) -> DistillBatch:
        idx = torch.randint(0, self.trajectory.shape[0], (self.micro,), generator=generator)
        prompt_idx = self.prompt_index[idx].long()
        trajectory = self.trajectory[idx].float()
        stored = {"real": trajectory[:, -1]} if self.real_only else \
            {"trajectory": trajectory, "trajectory_steps": self.steps}
        return DistillBatch(cond=self.prompts.condition(prompt_idx), uncond=self.prompts.uncondition(prompt_idx),
                            latents=DenseLatents(self.micro, tuple(self.trajectory.shape[2:]), frame_dim=LATENT_FRAME_DIM), **stored)


def make_batches(cfg, needs: MethodNeeds, prompts: PromptSet):
    """The batches of the configured method. Real clean latents (GAN critic, causal diffusion): the
    clean ends of ``data.ode_pairs`` when given, else the demo's procedural videos rendered for the
    drawn prompts (the demo's latents are its pixels)."""
    micro, data = cfg.train.micro_batch_size, cfg.data
    if needs.trajectory or (needs.real and data.ode_pairs):
        return ODEPairBatches(prompts, data.ode_pairs, micro, data.latent_shape, real_only=needs.real,
                              step_list=None if needs.real else cfg.rollout.steps.timesteps())
    return PromptBatches(prompts, data.latent_shape, micro, needs_real=needs.real)
