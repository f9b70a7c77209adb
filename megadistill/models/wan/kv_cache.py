"""KV caches of the block-causal rollout: per-layer self-attention keys/values and the context cache.

A rollout generates latent frames one block at a time. Each self-attention layer keeps the keys
(already rotated with their absolute frame positions) and values of every block written so far, so a
new block attends to them without recomputing the past. Bookkeeping follows upstream Self-Forcing:

- ``global_end_index``: absolute token position after the last written token;
  ``local_end_index``: buffer position after it. Their difference is the number of evicted tokens.
- Appending a block (start == global_end_index) writes after the last token. When the buffer is
  full (local window), the oldest tokens after the sink are evicted by shifting the rest left: the
  first ``sink_tokens`` stay, and the buffer then holds the sink plus the last ``window_tokens``,
  exactly the keys the block-causal mask (``causal.py``) shows that block.
- Re-running the last block (same start) overwrites its own slot: this is how the rollout replaces
  the keys of a noisy pass by those of the clean-context pass. Re-running an earlier block rewinds
  the cache to that block's end, as long as nothing it could see has been evicted.

Gradients: the buffers hold detached tensors. Within one call the new block's own keys/values stay
differentiable (the layer attends to cat(cached past, new)); cached past keys carry no gradient: the
clean-context refresh that rewrites them runs under no_grad, so they are constants of the graph.
Under no_grad the new keys are written first and the layer attends to a view of the buffer (no copy).

``grad_history`` reproduces upstream Self-Forcing instead, which writes keys in place into one
buffer: a write made with gradient stays in the buffer's autograd history after a no_grad write
(the refresh) has replaced its values, so later blocks' gradients reach the overwritten noisy
exit-step keys. Here each write made with gradient is kept per buffer slot, and the past a call
attends to is the buffer's values with the gradient of the last such write to each slot. Upstream's
training cache never evicts (it holds every frame), so neither may a cache with this history.

Activation checkpointing recomputes a layer call in backward, after later calls have changed the
buffer, so such a call needs the past exactly as it saw it. Copying it up front costs one copy of the
whole visible past per layer and gradient block: quadratic in the number of blocks, most of the
generator's memory in a long rollout. The snapshot is copy-on-write instead: a view of the buffer,
copied only when a later write (eviction's shift, a rewind's overwrite) is about to change the rows it
covers. Appending and re-running the last block never touch earlier rows, so a rollout without a
local window copies nothing.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn


@dataclass
class KVCache:
    """One layer's self-attention cache: k, v [B, S_max, heads, head_dim] and the write position."""

    k: torch.Tensor
    v: torch.Tensor
    sink_tokens: int = 0
    window_tokens: Optional[int] = None
    global_end_index: int = 0
    local_end_index: int = 0
    grad_history: bool = False
    # Steps whose snapshot still views the buffer (copy-on-write); gone once their call is freed.
    _views: weakref.WeakSet = field(default_factory=weakref.WeakSet, init=False, repr=False, compare=False)
    # grad_history: (start, end, k, v) of the last write made with gradient to buffer rows [start, end).
    _history: tuple = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.k.dim() != 4 or self.k.shape != self.v.shape:
            raise ValueError(f"KVCache k and v must both be [B, S_max, heads, head_dim], got "
                             f"{tuple(self.k.shape)} and {tuple(self.v.shape)}")
        if self.window_tokens is None:
            if self.sink_tokens:
                raise ValueError("sink_tokens needs window_tokens (a cache without a window never evicts)")
        elif self.window_tokens < 1 or self.sink_tokens < 0 or self.capacity != self.sink_tokens + self.window_tokens:
            # Eviction keeps sink + window tokens; any other size would show a block more or fewer
            # keys than the block-causal mask does.
            raise ValueError(f"a windowed KVCache must hold exactly sink_tokens + window_tokens = "
                             f"{self.sink_tokens} + {self.window_tokens} tokens, got {self.capacity}")

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    @property
    def evicted_tokens(self) -> int:
        return self.global_end_index - self.local_end_index

    def reset(self):
        """Empty the cache (the buffers are reused; stale contents are never read)."""
        self.global_end_index = self.local_end_index = 0
        self._history = ()

    def record(self, start: int, k: torch.Tensor, v: torch.Tensor):
        """grad_history: rows [start, start + n) were last written with gradient by k, v [B, n, H, D]."""
        end = start + k.shape[1]
        kept = []
        for s0, e0, hk, hv in self._history:  # a new write hides what it covers of older ones
            if s0 < start:
                kept.append((s0, min(e0, start), hk[:, :min(e0, start) - s0], hv[:, :min(e0, start) - s0]))
            if e0 > end:
                kept.append((max(s0, end), e0, hk[:, max(s0, end) - s0:], hv[:, max(s0, end) - s0:]))
        self._history = tuple(sorted(kept + [(start, end, k, v)], key=lambda h: h[0]))

    def begin(self, start: int, num_tokens: int, snapshot: bool = False) -> "KVCacheStep":
        """Reserve the slot of tokens [start, start + num_tokens), evicting if needed, and return the
        step through which one layer call reads the past and writes the new tokens.

        ``snapshot`` keeps the visible past as this call saw it, for a call that may be recomputed
        later (activation checkpointing) while this buffer keeps changing: copy-on-write, see above.
        """
        end = start + num_tokens
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        if self.window_tokens is not None and num_tokens > self.window_tokens:
            raise ValueError(f"a call of {num_tokens} tokens does not fit the local window of {self.window_tokens}")
        if start == self.global_end_index:  # append
            overflow = self.local_end_index + num_tokens - self.capacity
            if overflow > 0:
                self._evict(overflow, num_tokens)
            local_end = self.local_end_index + num_tokens
        elif start < self.global_end_index and end <= self.global_end_index:  # overwrite / rewind
            offset = self.evicted_tokens
            if offset and end - self.window_tokens < self.sink_tokens + offset:
                raise ValueError(f"cannot re-run tokens [{start}, {end}): keys they attend to were evicted "
                                 f"(cache holds the sink and positions >= {self.sink_tokens + offset})")
            local_end = end - offset
        else:
            raise ValueError(f"KVCache write at tokens [{start}, {end}) must append at {self.global_end_index} "
                             f"or re-run already written tokens")
        self.global_end_index, self.local_end_index = end, local_end
        step = KVCacheStep(self, local_end - num_tokens, local_end)
        if snapshot:
            self._views.add(step)
        return step

    def before_write(self, start: int):
        """Copy the snapshots that view buffer rows >= ``start``: those rows are about to change."""
        for step in list(self._views):
            if step.local_start > start:
                step.own_past()
                self._views.discard(step)

    def _evict(self, overflow: int, num_tokens: int):
        if self.window_tokens is None:
            raise ValueError(f"KVCache full: {self.capacity} tokens hold {self.local_end_index}, cannot add "
                             f"{num_tokens}; allocate more frames (new_kv_cache max_frames) or set a local window")
        if self.grad_history:
            raise ValueError("a KVCache with grad_history (upstream cache gradient) cannot evict: upstream's "
                             "training cache holds every frame; use the detached cache gradient with a local window")
        sink, keep = self.sink_tokens, self.local_end_index - overflow - self.sink_tokens
        self.before_write(sink)
        for buf in (self.k, self.v):  # shift left; clone because source and destination overlap
            buf[:, sink:sink + keep] = buf[:, sink + overflow:sink + overflow + keep].clone()
        self.local_end_index -= overflow  # global positions are absolute: only the buffer mapping moves


class KVCacheStep:
    """One layer call's view of a KVCache: the visible past and the slot for the new tokens."""

    def __init__(self, cache: KVCache, local_start: int, local_end: int):
        self.cache, self.local_start, self.local_end = cache, local_start, local_end
        self.past = (cache.k[:, :local_start], cache.v[:, :local_start])
        self.history = tuple(h for h in cache._history if h[0] < local_start)  # immutable: no copy needed
        self._pending: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self._recorded: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def own_past(self):
        """Replace the view of the past by a copy (the buffer rows under it are about to change)."""
        self.past = (self.past[0].clone(), self.past[1].clone())

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """New roped keys and values [B, n, H, D] -> all keys/values this call attends to."""
        buf_k, buf_v = self.cache.k, self.cache.v
        slot = self.local_end - self.local_start
        if k.shape[0] != buf_k.shape[0] or k.shape[2:] != buf_k.shape[2:] or k.shape[1] != slot:
            raise ValueError(f"keys {tuple(k.shape)} do not fit the cache slot: batch {buf_k.shape[0]}, "
                             f"(heads, head_dim) {tuple(buf_k.shape[2:])}, {slot} tokens")
        k, v = k.to(buf_k.dtype), v.to(buf_v.dtype)
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            self._pending = (k.detach(), v.detach())  # written by commit(), after the layer call
            self._recorded = (k, v) if self.cache.grad_history else None
            past_k, past_v = self._with_history(0), self._with_history(1)
            return torch.cat([past_k, k], dim=1), torch.cat([past_v, v], dim=1)
        self._pending = self._recorded = None
        self._write(k, v)
        return buf_k[:, :self.local_end], buf_v[:, :self.local_end]

    def _with_history(self, which: int) -> torch.Tensor:
        """The past's values, carrying the gradient of the last write with gradient to each row."""
        past = self.past[which]
        if not self.history:
            return past
        pieces, pos = [], 0
        for start, end, *kv in self.history:
            if start > pos:
                pieces.append(past.new_zeros(past.shape[0], start - pos, *past.shape[2:]))
            tensor = kv[which][:, :min(end, self.local_start) - start]
            pieces.append(tensor)
            pos = start + tensor.shape[1]
        if pos < self.local_start:
            pieces.append(past.new_zeros(past.shape[0], self.local_start - pos, *past.shape[2:]))
        shadow = torch.cat(pieces, dim=1)
        return past.detach() + (shadow - shadow.detach())

    def commit(self):
        """Write the new keys/values into the slot (a no-op when extend() already did)."""
        if self._pending is not None:
            self._write(*self._pending)
            self._pending = None
        if self._recorded is not None:
            self.cache.record(self.local_start, *self._recorded)
            self._recorded = None

    def _write(self, k: torch.Tensor, v: torch.Tensor):
        self.cache.before_write(self.local_start)
        with torch.no_grad():
            self.cache.k[:, self.local_start:self.local_end] = k
            self.cache.v[:, self.local_start:self.local_end] = v


@dataclass
class CrossAttnCache:
    """Per-layer context keys/values (text, plus CLIP image for Wan2.1 I2V), computed once per rollout.

    Entries computed under no_grad are recomputed (cheap: text_len tokens) by the first call that needs
    gradients, so the text embedding and cross-attention k/v projections get their gradient. Upstream
    does the same with gradient checkpointing on (its published configs; it then projects the
    context in every call); without it, it reuses the no_grad entries and those parameters get no
    gradient from the rollout. Entries computed with grad belong to one autograd graph: use a fresh
    cache (or ``reset()``) for each rollout, as upstream does.
    """

    layers: list = field(default_factory=list)
    with_grad: bool = False

    def get(self, compute) -> list:
        if not self.layers or (torch.is_grad_enabled() and not self.with_grad):
            self.layers, self.with_grad = compute(), torch.is_grad_enabled()
        return self.layers

    def reset(self):
        self.layers, self.with_grad = [], False


def new_kv_cache(model: nn.Module, batch_size: int, frame_seq_len: int, max_frames: Optional[int] = None,
                 dtype: Optional[torch.dtype] = None, device=None, grad_history: bool = False) -> list[KVCache]:
    """Empty per-layer KV caches for ``model`` (a WanModel) and a token grid of ``frame_seq_len`` tokens
    per latent frame ((H / 2) * (W / 2)).

    With a local window (config.local_attn_size) each holds sink_size + local_attn_size frames and
    evicts (``max_frames`` is not needed); otherwise ``max_frames`` frames (required) and a write past
    them is an error. dtype and device default to those of the self-attention projections (under
    autocast, pass the autocast dtype: attention runs in the dtype of the cached values). Each layer
    caches the heads its attention core attends with (``core.cache_heads``: fewer under tensor or
    sequence parallelism). ``grad_history``: the upstream cache gradient (module docstring).
    """
    c = model.config
    ref = model.blocks[0].self_attn.o.weight
    dtype, device = dtype or ref.dtype, device or ref.device
    if frame_seq_len < 1 or batch_size < 1:
        raise ValueError(f"batch_size and frame_seq_len must be >= 1, got {batch_size}, {frame_seq_len}")
    if c.local_attn_size is not None:
        frames, window, sink = c.sink_size + c.local_attn_size, c.local_attn_size * frame_seq_len, c.sink_size
    elif max_frames is None or max_frames < 1:
        raise ValueError(f"new_kv_cache needs max_frames >= 1 when the model has no local window, got {max_frames}")
    else:
        frames, window, sink = max_frames, None, 0
    caches = []
    for block in model.blocks:
        attn = block.self_attn
        shape = (batch_size, frames * frame_seq_len, attn.core.cache_heads(attn.num_heads), c.head_dim)
        caches.append(KVCache(torch.zeros(shape, dtype=dtype, device=device),
                              torch.zeros(shape, dtype=dtype, device=device),
                              sink_tokens=sink * frame_seq_len, window_tokens=window, grad_history=grad_history))
    return caches
