"""Softmax attention with typed metadata, and the named back-ends that compute it.

q, k, v are [B, L, H, D] (tokens before heads: the layout of the projections, of flash-attention
and of the Ulysses all-to-all, so no caller transposes). The metadata says which keys a query sees:

    Dense(mask)         every key; ``mask`` optional, bool (True = keep) or additive float,
                        broadcastable to [B, H, Lq, Lk]
    BlockCausal(...)    frame blocks of a causal video model (ops/block_causal.py)
    Varlen(cu_q, cu_k)  packed variable-length sequences in one row (B = 1): the queries of segment i
                        see only the keys of segment i (``cu_seqlens`` as flash-attention's varlen
                        API). Windowed attention is varlen over the windows a family cuts.

Back-ends, by name (``BACKENDS``; ``KernelsConfig.attention`` picks one): ``sdpa`` computes every kind
with torch's scaled_dot_product_attention (the reference, CPU included: the dense bool mask for
BlockCausal, one call per segment for Varlen); ``flex`` computes BlockCausal with flex_attention's
BlockMask (skips masked tiles; compiled on CUDA, eager elsewhere: forward only on CPU) and the rest
as sdpa; ``auto`` is flex for BlockCausal on CUDA in half precision, sdpa otherwise. Kernels
(Triton, flash) register further names with ``register_backend``; a model takes its back-end by
name at build (``KernelsConfig``, ops/kernels.py).

Precision: q and k are cast to v's dtype. After RoPE they are float32 (rotated in float64) while v
carries the projections' compute dtype (bf16 under mixed precision), which is also what the upstream video
DiTs' flash-attention calls cast all three to.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from .block_causal import BlockCausal

try:
    from torch.nn.attention.flex_attention import flex_attention
except ImportError:  # torch without flex_attention: sdpa still computes everything
    flex_attention = None


@dataclass(frozen=True)
class Dense:
    """Every query attends every key, under ``mask`` when given."""

    mask: Optional[torch.Tensor] = None


@dataclass(frozen=True, eq=False)
class Varlen:
    """Packed segments: ``cu_seqlens_q`` / ``cu_seqlens_k`` int32 [N + 1], 0 first, the totals last."""

    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor

    def __post_init__(self):
        for name, cu in (("cu_seqlens_q", self.cu_seqlens_q), ("cu_seqlens_k", self.cu_seqlens_k)):
            if cu.dim() != 1 or cu.numel() < 2 or int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()):
                raise ValueError(f"{name} must be [N + 1] non-decreasing offsets from 0, got {cu.tolist()}")
        if self.cu_seqlens_q.numel() != self.cu_seqlens_k.numel():
            raise ValueError(f"{self.cu_seqlens_q.numel() - 1} query segments but "
                             f"{self.cu_seqlens_k.numel() - 1} key segments")

    @classmethod
    def from_lengths(cls, q_lengths, k_lengths=None, device=None) -> "Varlen":
        """Offsets of segments of these lengths (keys: the queries' lengths when not given)."""
        def offsets(lengths):
            t = torch.as_tensor(list(lengths), dtype=torch.int32, device=device)
            return torch.cat([torch.zeros(1, dtype=torch.int32, device=device), t.cumsum(0, dtype=torch.int32)])

        q = offsets(q_lengths)
        return cls(q, q if k_lengths is None else offsets(k_lengths))


Metadata = Union[Dense, BlockCausal, Varlen]


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta) -> None:
    if q.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"attention expects q [B, Lq, H, D] and k, v [B, Lk, H, D]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if isinstance(meta, BlockCausal) and not q.shape[1] == k.shape[1] == meta.seq_len:
        raise ValueError(f"block-causal attention over {meta.seq_len} tokens got q {q.shape[1]}, k {k.shape[1]}")
    if isinstance(meta, Varlen):
        if q.shape[0] != 1:
            raise ValueError(f"varlen attention packs every segment into one row (B = 1), got B = {q.shape[0]}")
        if (q.shape[1], k.shape[1]) != (int(meta.cu_seqlens_q[-1]), int(meta.cu_seqlens_k[-1])):
            raise ValueError(f"varlen offsets end at {int(meta.cu_seqlens_q[-1])} queries / "
                             f"{int(meta.cu_seqlens_k[-1])} keys, got {q.shape[1]} / {k.shape[1]}")


# ------------------------------------------------------------------------------------- back-ends
# Each takes q, k, v as [B, H, L, D] in one dtype and returns [B, H, Lq, D].

def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: Metadata) -> torch.Tensor:
    if isinstance(meta, Dense):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=meta.mask)
    if isinstance(meta, BlockCausal):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=meta.dense_mask(q.device))
    out = q.new_empty(q.shape)
    cq, ck = meta.cu_seqlens_q.tolist(), meta.cu_seqlens_k.tolist()
    for (q0, q1), (k0, k1) in zip(zip(cq, cq[1:]), zip(ck, ck[1:])):
        if q1 > q0:
            out[:, :, q0:q1] = F.scaled_dot_product_attention(q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1])
    return out


@functools.lru_cache(maxsize=1)
def _compiled_flex_attention():
    # Uncompiled flex materialises the full score matrix; upstream Self-Forcing compiles it the same way.
    return torch.compile(flex_attention, dynamic=False, mode="max-autotune-no-cudagraphs")


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: Metadata) -> torch.Tensor:
    if not isinstance(meta, BlockCausal):
        return _sdpa(q, k, v, meta)
    fn = _compiled_flex_attention() if q.is_cuda else flex_attention
    return fn(q, k, v, block_mask=meta.block_mask(q.device))


def flex_available(device: torch.device, dtype: Optional[torch.dtype] = None) -> bool:
    """Where ``auto`` takes flex: CUDA (no backward on CPU, where SDPA is the reference), half precision
    only (inductor's float32 autotuning of it, head_dim 128 on an H100, failed most configs and had not
    finished after 5 minutes, while SDPA with the mask runs float32 at once)."""
    return (flex_attention is not None and device.type == "cuda"
            and dtype in (None, torch.bfloat16, torch.float16))


def _auto(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: Metadata) -> torch.Tensor:
    if isinstance(meta, BlockCausal) and flex_available(q.device, q.dtype):
        return _flex(q, k, v, meta)
    return _sdpa(q, k, v, meta)


Backend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Metadata], torch.Tensor]
BACKENDS: Dict[str, Tuple[Backend, Callable[[], Optional[str]]]] = {
    "auto": (_auto, lambda: None),
    "sdpa": (_sdpa, lambda: None),
    "flex": (_flex, lambda: None if flex_attention is not None else "this torch has no flex_attention"),
}


def register_backend(name: str, fn: Backend, unavailable: Callable[[], Optional[str]] = lambda: None) -> None:
    """Make ``fn`` the attention back-end ``name``; ``unavailable()`` says why it cannot run here (None: it can)."""
    BACKENDS[name] = (fn, unavailable)


def resolve_backend(name: str) -> Backend:
    """The back-end ``name`` names; ValueError when unknown or unavailable in this process."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention back-end {name!r}; known: {sorted(BACKENDS)}")
    fn, unavailable = BACKENDS[name]
    reason = unavailable()
    if reason:
        raise ValueError(f"attention back-end {name!r} cannot run here: {reason}")
    return fn


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: Optional[Metadata] = None,
              backend: Union[str, Backend] = "auto") -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v over the keys ``meta`` allows (None: Dense()), q [B, Lq, H, D],
    k / v [B, Lk, H, D] -> [B, Lq, H, D]."""
    meta = Dense() if meta is None else meta
    if not isinstance(meta, (Dense, BlockCausal, Varlen)):
        raise TypeError(f"attention metadata must be Dense, BlockCausal or Varlen, got {type(meta).__name__}")
    _check_shapes(q, k, v, meta)
    fn = resolve_backend(backend) if isinstance(backend, str) else backend
    dtype = v.dtype
    q, k, v = q.to(dtype).transpose(1, 2), k.to(dtype).transpose(1, 2), v.transpose(1, 2)
    return fn(q, k, v, meta).transpose(1, 2)
