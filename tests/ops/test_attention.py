"""ops.attention against softmax written out in float64: dense (bool and additive masks), block-causal
(its mask against the rule checked token by token; sdpa and flex back-ends), varlen (packed segments
against a block-diagonal mask over the packed rows); back-end names and their errors."""
import warnings

import pytest
import torch

from megadistill.models.wan.config import WanConfig
from megadistill.ops.attention import (
    BACKENDS, Dense, Varlen, attention, flex_available, register_backend, resolve_backend,
)
from megadistill.ops.block_causal import BlockCausal, block_causal_mask_mod
from megadistill.ops.kernels import KernelsConfig


def softmax_reference(q, k, v, keep=None, bias=None):
    """float64 softmax(q k^T / sqrt(D) + bias) v over kept keys; q [B, Lq, H, D] -> [B, Lq, H, D]."""
    q, k, v = q.double(), k.double(), v.double()
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    if bias is not None:
        scores = scores + bias.double()
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


def brute_force_mask(num_frames, frame_seq_len, nfpb, local=None, sink=0):
    """The rule written out token by token: own and earlier blocks; window of the last `local` frames
    before the end of the query's block; the first `sink` frames always."""
    n = num_frames * frame_seq_len
    mask = torch.zeros(n, n, dtype=torch.bool)
    for q in range(n):
        q_block = (q // frame_seq_len) // nfpb
        end_frame = min((q_block + 1) * nfpb, num_frames)
        for k in range(n):
            k_frame = k // frame_seq_len
            visible = (k_frame // nfpb) <= q_block
            if local is not None:
                visible = visible and (k_frame >= end_frame - local or k_frame < sink)
            mask[q, k] = visible
    return mask


def qkv(b, lq, lk, h=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, lq, h, d, generator=g), torch.randn(b, lk, h, d, generator=g), \
        torch.randn(b, lk, h, d, generator=g)


def test_dense_attention_with_and_without_masks():
    q, k, v = qkv(2, 5, 7)
    torch.testing.assert_close(attention(q, k, v).double(), softmax_reference(q, k, v), rtol=0, atol=2e-6)
    keep = torch.rand(5, 7, generator=torch.Generator().manual_seed(3)) > 0.4
    keep[:, 0] = True
    torch.testing.assert_close(attention(q, k, v, Dense(keep), "sdpa").double(), softmax_reference(q, k, v, keep),
                               rtol=0, atol=2e-6)
    bias = torch.randn(5, 7, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(attention(q, k, v, Dense(bias)).double(), softmax_reference(q, k, v, bias=bias),
                               rtol=0, atol=2e-6)
    with pytest.raises(ValueError, match=r"q \[B, Lq, H, D\]"):
        attention(q, k[:, :, :1], v)


@pytest.mark.parametrize("frames,nfpb,local,sink", [
    (6, 2, None, 0), (7, 3, None, 0), (5, 1, None, 0), (6, 6, None, 0),
    (7, 2, 3, 0), (7, 2, 3, 1), (9, 3, 4, 2), (8, 1, 2, 3),
])
def test_block_causal_mask_matches_the_rule(frames, nfpb, local, sink):
    expected = brute_force_mask(frames, 3, nfpb, local, sink)
    meta = BlockCausal(frames, 3, nfpb, local, sink)
    assert torch.equal(meta.dense_mask(), expected)
    q, k, v = qkv(2, frames * 3, frames * 3, seed=frames)
    torch.testing.assert_close(attention(q, k, v, meta, "sdpa").double(), softmax_reference(q, k, v, expected),
                               rtol=0, atol=2e-6)


def test_block_causal_masks_are_cached_per_geometry():
    small, large = BlockCausal(3, 4, 2).dense_mask(), BlockCausal(6, 4, 2).dense_mask()
    assert small.shape == (12, 12) and large.shape == (24, 24)
    assert torch.equal(large, brute_force_mask(6, 4, 2))
    assert BlockCausal(3, 4, 2).dense_mask() is small  # same key: served from the cache
    with pytest.raises(ValueError, match="local_attn_size"):
        BlockCausal(6, 4, 3, local_attn_size=2)
    with pytest.raises(ValueError, match="block-causal attention over 12 tokens"):
        attention(*qkv(1, 8, 8), BlockCausal(3, 4, 2))


def test_flex_backend_matches_the_dense_mask():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    frames, nfpb, local, sink = 7, 2, 3, 1
    meta = BlockCausal(frames, 3, nfpb, local, sink)
    mod = block_causal_mask_mod(frames, 3, nfpb, local, sink)
    assert torch.equal(flex.create_mask(mod, None, None, 21, 21, device="cpu")[0, 0], meta.dense_mask())
    q, k, v = qkv(2, 21, 21)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
        out = attention(q, k, v, meta, "flex")  # eager flex on CPU (forward only)
    torch.testing.assert_close(out.double(), softmax_reference(q, k, v, meta.dense_mask()), rtol=0, atol=2e-6)
    # dense attention under flex is sdpa's (cross-attention of a flex model)
    torch.testing.assert_close(attention(q, k, v, backend="flex"), attention(q, k, v, backend="sdpa"))


def test_auto_takes_flex_only_for_half_precision_on_cuda():
    """No GPU needed: the choice reads only the device type and the attention dtype. Float32 flex
    autotuning did not finish in 5 minutes on an H100 (tools/bench_wan_step.py), so float32 keeps SDPA."""
    cuda = torch.device("cuda")
    assert flex_available(cuda, torch.bfloat16) and flex_available(cuda, torch.float16) and flex_available(cuda)
    assert not flex_available(cuda, torch.float32)
    assert not flex_available(torch.device("cpu"), torch.bfloat16)


@pytest.mark.parametrize("q_lengths,k_lengths", [([3, 5, 2], None), ([3, 5, 2], [4, 2, 6]), ([4, 0, 3], [2, 3, 5])])
def test_varlen_segments_see_only_their_own_keys(q_lengths, k_lengths):
    meta = Varlen.from_lengths(q_lengths, k_lengths)
    k_lengths = k_lengths or q_lengths
    q, k, v = qkv(1, sum(q_lengths), sum(k_lengths), seed=len(q_lengths))
    qi = torch.repeat_interleave(torch.arange(len(q_lengths)), torch.tensor(q_lengths))
    ki = torch.repeat_interleave(torch.arange(len(k_lengths)), torch.tensor(k_lengths))
    block_diagonal = qi[:, None] == ki[None, :]
    expected = softmax_reference(q, k, v, block_diagonal)
    for backend in ("sdpa", "auto"):
        torch.testing.assert_close(attention(q, k, v, meta, backend).double(), expected, rtol=0, atol=2e-6)
    assert meta.cu_seqlens_q.dtype == torch.int32 and meta.cu_seqlens_q.tolist()[-1] == sum(q_lengths)


def test_varlen_shape_errors():
    meta = Varlen.from_lengths([3, 5])
    with pytest.raises(ValueError, match="B = 1"):
        attention(*qkv(2, 8, 8), meta)
    with pytest.raises(ValueError, match="offsets end at 8 queries"):
        attention(*qkv(1, 7, 7), meta)
    with pytest.raises(ValueError, match="non-decreasing offsets from 0"):
        Varlen(torch.tensor([0, 5, 3], dtype=torch.int32), torch.tensor([0, 5, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="2 query segments but 1 key segments"):
        Varlen.from_lengths([3, 5], [8])


def test_backend_names_are_checked_at_load_and_at_build():
    with pytest.raises(ValueError, match=r"unknown back-end 'flesh'; known: \['auto', 'flex', 'sdpa'"):
        KernelsConfig(attention="flesh")
    with pytest.raises(ValueError, match="unknown back-end 'flesh'"):
        WanConfig(attention="flesh")
    with pytest.raises(ValueError, match="unknown attention back-end"):
        resolve_backend("flesh")
    register_backend("test_unavailable", BACKENDS["sdpa"][0], lambda: "it needs a GPU this machine lacks")
    try:
        assert KernelsConfig(attention="test_unavailable").attention == "test_unavailable"  # known name: loads
        with pytest.raises(ValueError, match="cannot run here: it needs a GPU this machine lacks"):
            resolve_backend("test_unavailable")
    finally:
        BACKENDS.pop("test_unavailable")
