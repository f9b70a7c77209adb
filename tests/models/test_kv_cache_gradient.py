"""The two cache gradients of the Self-Forcing rollout, on one attention layer.

Reference: upstream's mechanism written with plain torch, one persistent buffer written in place
(the noisy exit-step keys of a block with gradient, then its clean refresh under no_grad, then the
next block's keys with gradient) and attended through slices. ``KVCache(grad_history=True)`` must
give its values and gradients; the default cache gives the same values and no gradient into the
overwritten keys.
"""
import pytest
import torch

from megadistill.ops.attention import attention
from megadistill.models.wan.kv_cache import KVCache

B, N, H, D = 1, 3, 2, 4  # tokens per block


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    make = (lambda: torch.randn(B, N, H, D, generator=g))
    noisy = [make().requires_grad_(True) for _ in range(4)]  # k1, v1, k2, v2 of the exit steps
    clean = [make() for _ in range(2)]  # block 1's refresh (no gradient)
    return noisy, clean, make()


def upstream_buffer(noisy, clean, q2):
    k1, v1, k2, v2 = noisy
    buf_k, buf_v = torch.zeros(B, 2 * N, H, D), torch.zeros(B, 2 * N, H, D)
    buf_k[:, :N], buf_v[:, :N] = k1, v1  # block 1's exit step, with gradient
    with torch.no_grad():
        buf_k[:, :N], buf_v[:, :N] = clean  # its refresh overwrites the values, not the history
    buf_k[:, N:], buf_v[:, N:] = k2, v2  # block 2's exit step
    return attention(q2, buf_k[:, :2 * N], buf_v[:, :2 * N])


def with_cache(noisy, clean, q2, grad_history, snapshot):
    k1, v1, k2, v2 = noisy
    cache = KVCache(torch.zeros(B, 2 * N, H, D), torch.zeros(B, 2 * N, H, D), grad_history=grad_history)
    step = cache.begin(0, N, snapshot=snapshot)
    step.extend(k1, v1)
    step.commit()
    with torch.no_grad():
        step = cache.begin(0, N, snapshot=snapshot)
        step.extend(*clean)
        step.commit()
    step = cache.begin(N, N, snapshot=snapshot)
    k, v = step.extend(k2, v2)
    out = attention(q2, k, v)
    step.commit()
    return out


def grads(out, noisy):
    weight = torch.linspace(-1, 2, out.numel()).view_as(out)
    return torch.autograd.grad((out * weight).sum(), noisy, allow_unused=True)


@pytest.mark.parametrize("snapshot", [False, True], ids=["plain", "checkpoint-snapshot"])
def test_grad_history_is_upstreams_in_place_buffer(snapshot):
    noisy, clean, q2 = inputs()
    ref = upstream_buffer(noisy, clean, q2)
    ref_grads = grads(ref, noisy)
    assert ref_grads[0].abs().sum() > 0  # upstream: block 2 reaches block 1's overwritten noisy keys

    noisy, clean, q2 = inputs()
    out = with_cache(noisy, clean, q2, grad_history=True, snapshot=snapshot)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for mine, theirs in zip(grads(out, noisy), ref_grads):
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-7)

    noisy, clean, q2 = inputs()
    detached = with_cache(noisy, clean, q2, grad_history=False, snapshot=snapshot)
    torch.testing.assert_close(detached, ref, rtol=0, atol=0)  # same values either way
    g = grads(detached, noisy)
    assert g[0] is None and g[1] is None  # the refreshed past is a constant
    torch.testing.assert_close(g[2], ref_grads[2], rtol=1e-6, atol=1e-7)  # block 2's own keys: same


def test_grad_history_write_hides_what_it_covers():
    """A later write with gradient replaces the history of the rows it covers, partly or wholly."""
    cache = KVCache(torch.zeros(1, 6, 1, 1), torch.zeros(1, 6, 1, 1), grad_history=True)
    a, b = torch.ones(1, 4, 1, 1), 2 * torch.ones(1, 2, 1, 1)
    cache.record(0, a, a)
    cache.record(1, b, b)
    assert [(s, e, float(k.sum())) for s, e, k, _ in cache._history] == [(0, 1, 1.0), (1, 3, 4.0), (3, 4, 1.0)]
    cache.reset()
    assert cache._history == ()


def test_grad_history_cache_refuses_to_evict():
    cache = KVCache(torch.zeros(1, 4, 1, 1), torch.zeros(1, 4, 1, 1), sink_tokens=0, window_tokens=4,
                    grad_history=True)
    for start in (0, 2):
        cache.begin(start, 2).extend(torch.ones(1, 2, 1, 1), torch.ones(1, 2, 1, 1))
    with pytest.raises(ValueError, match="cannot evict"):
        cache.begin(4, 2)
