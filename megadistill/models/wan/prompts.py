"""The prompts of a Wan run, encoded once at start: ``PromptSet`` holds the text embeddings (and TI2V
first-frame latents) every batch indexes, and builds the ``WanCondition`` of a draw.

    prompts = encode_prompts(cfg.data, text_len)          # demo encoder or a local umT5 folder
    cond, uncond = prompts.condition(idx), prompts.uncondition(idx)
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from .denoiser import WanCondition
from .run_config import DEMO, WanDataConfig


@dataclass
class PromptSet:
    prompts: List[str]
    context: torch.Tensor  # [N, Lt, text_dim]
    negative: torch.Tensor  # [1, Lt, text_dim]
    first_frames: Optional[torch.Tensor] = None  # [N, C, 1, H, W] TI2V image latents

    def condition(self, idx: torch.Tensor) -> WanCondition:
        first = self.first_frames[idx] if self.first_frames is not None else None
        return WanCondition(self.context[idx], first_frame=first)

    def uncondition(self, idx: torch.Tensor) -> WanCondition:
        """CFG's unconditional branch: the negative prompt, the same image conditioning."""
        first = self.first_frames[idx] if self.first_frames is not None else None
        return WanCondition(self.negative.expand(len(idx), -1, -1), first_frame=first)


def load_first_frames(path: str, num_prompts: int, latent_shape: Sequence[int]) -> torch.Tensor:
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"data.first_frames: file not found: {path}")
    tensors = load_file(path)
    if "latents" not in tensors:
        raise ValueError(f"data.first_frames: {path} has no 'latents' tensor (has {sorted(tensors)})")
    latents = tensors["latents"].float()
    c, _, h, w = latent_shape
    if latents.shape != (num_prompts, c, 1, h, w):
        raise ValueError(f"data.first_frames: latents are {list(latents.shape)}, expected one image latent "
                         f"per prompt [{num_prompts}, {c}, 1, {h}, {w}]")
    return latents


def read_prompts(path: str) -> List[str]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data.prompts: prompt file not found: {path}")
    with open(path) as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ValueError(f"data.prompts: {path} holds no prompts")
    return prompts


def encode_prompts(data: WanDataConfig, text_len: Optional[int] = None) -> PromptSet:
    """``data.prompts`` (the demo's prompts when empty, with the demo encoder) encoded, plus the TI2V
    first frames of ``data.first_frames``."""
    if data.text_encoder == DEMO:
        from megadistill.demo.videos import all_prompts

        prompt_set = encode_prompt_list(data, read_prompts(data.prompts) if data.prompts else all_prompts())
    else:
        if not data.prompts:
            raise ValueError("data.prompts is required with a umT5 text encoder")
        prompt_set = encode_prompt_list(data, read_prompts(data.prompts), text_len)
    if data.first_frames:
        prompt_set.first_frames = load_first_frames(data.first_frames, len(prompt_set.prompts), data.latent_shape)
    return prompt_set


def encode_prompt_list(data: WanDataConfig, prompts: List[str], text_len: Optional[int] = None) -> PromptSet:
    """``prompts`` and ``data.negative_prompt`` encoded by the run's text encoder: the demo's, or umT5
    from a local folder to ``text_len`` tokens (the DiT's; Wan: 512), bf16 on GPU as upstream, float32
    on CPU."""
    if data.text_encoder == DEMO:
        from megadistill.demo.text import PromptEncoder

        encoder = PromptEncoder()
        return PromptSet(prompts, encoder.encode(prompts), encoder.encode([data.negative_prompt]))
    from .text_encoder import WanTextEncoder

    encoder = WanTextEncoder.from_pretrained(data.text_encoder, negative_prompt=data.negative_prompt, text_len=text_len,
                                             dtype="bfloat16" if torch.cuda.is_available() else "float32")
    context = torch.cat([encoder.encode(prompts[i:i + 16]) for i in range(0, len(prompts), 16)])
    return PromptSet(prompts, context.float(), encoder.negative_embedding(1).float())
