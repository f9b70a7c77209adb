"""A tiny deterministic prompt encoder for the demo: each vocabulary word is a fixed random vector.

No training and no downloads: word i of ``VOCABULARY`` maps to row i of a [V, text_dim] table of
N(0, 1) vectors drawn from a seeded generator. A prompt encodes to its words' vectors in order,
zero-padded to ``text_len`` tokens (Wan zero-pads T5 output the same way); the empty prompt "" encodes
to all zeros and is the unconditional / negative prompt of classifier-free guidance.

The demo prompts' words are disjoint by role (colour, shape, direction), so the Wan cross-attention,
which carries no text positions, can read a prompt as a bag of words.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .videos import COLOURS, DIRECTIONS, SHAPES

VOCABULARY: tuple[str, ...] = ("a", *COLOURS, *SHAPES, "moving", *DIRECTIONS)
EMPTY_PROMPT = ""


class PromptEncoder:
    """Prompts -> context [B, text_len, text_dim] (float32), the Wan teacher's text input."""

    def __init__(self, text_dim: int = 32, text_len: int = 8, seed: int = 0,
                 vocabulary: Sequence[str] = VOCABULARY):
        if text_dim < 1 or text_len < 1:
            raise ValueError(f"text_dim and text_len must be >= 1, got {text_dim}, {text_len}")
        if len(set(vocabulary)) != len(vocabulary) or any(not w or w != w.strip() or " " in w for w in vocabulary):
            raise ValueError(f"vocabulary must be distinct single words, got {list(vocabulary)}")
        self.text_dim, self.text_len, self.seed = int(text_dim), int(text_len), int(seed)
        self.vocabulary = tuple(vocabulary)
        self._index = {w: i for i, w in enumerate(self.vocabulary)}
        g = torch.Generator().manual_seed(self.seed)
        self.table = torch.randn(len(self.vocabulary), self.text_dim, generator=g, dtype=torch.float64).float()

    def tokenize(self, prompt: str) -> list[int]:
        """Word indices of a whitespace-split prompt ("" -> [])."""
        words = prompt.split()
        unknown = [w for w in words if w not in self._index]
        if unknown:
            raise ValueError(f"unknown word(s) {unknown} in prompt {prompt!r}; the vocabulary is {list(self.vocabulary)}")
        if len(words) > self.text_len:
            raise ValueError(f"prompt {prompt!r} has {len(words)} words, more than text_len = {self.text_len}")
        return [self._index[w] for w in words]

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """[B, text_len, text_dim]: the words' vectors, then zeros."""
        if isinstance(prompts, str):
            raise TypeError("encode takes a sequence of prompts; wrap a single prompt in a list")
        out = torch.zeros(len(prompts), self.text_len, self.text_dim)
        for b, prompt in enumerate(prompts):
            ids = self.tokenize(prompt)
            out[b, :len(ids)] = self.table[ids]
        return out

    def negative(self, batch_size: int) -> torch.Tensor:
        """The empty prompt's context repeated: [batch_size, text_len, text_dim] zeros."""
        return self.encode([EMPTY_PROMPT] * batch_size)

    def settings(self) -> dict:
        """What rebuilds this encoder (stored with the teacher)."""
        return {"text_dim": self.text_dim, "text_len": self.text_len, "seed": self.seed,
                "vocabulary": list(self.vocabulary)}
