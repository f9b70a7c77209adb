"""Every Wan parameter is read only inside its own module's call (what ZeRO-3 relies on).

ZeRO-3 gathers a module's own parameters in a forward pre-hook and frees them after the call, so
code that reads a parameter of a module it does not call through ``__call__`` sees an empty tensor
(a real 2-rank ZeRO-3 rollout crashed this way on ``WanBlock.modulation``). The stand-in below does
exactly that in one process: parameters hold data only between their module's hooks.
"""
from __future__ import annotations

import torch

from megadistill.models.wan import build_wan
from megadistill.rollout.causal_inference import causal_generate
from megadistill.rollout.steps import StepListConfig
from megadistill.models.wan.denoiser import WanCondition, WanDenoiser


def partition_like_zero3(model: torch.nn.Module) -> None:
    for module in model.modules():
        own = dict(module.named_parameters(recurse=False))
        if not own:
            continue
        full = {n: p.data for n, p in own.items()}

        def gather(m, args, _own=own, _full=full):
            for n, p in _own.items():
                p.data = _full[n]

        def release(m, args, out, _own=own):
            for p in _own.values():
                p.data = torch.empty(0, dtype=p.dtype)

        module.register_forward_pre_hook(gather)
        module.register_forward_hook(release)
        release(module, None, None)


def _pair(**overrides):
    net = build_wan("tiny-t2v", text_len=8, **overrides)
    reference = build_wan("tiny-t2v", text_len=8, **overrides)
    reference.load_state_dict(net.state_dict())
    partition_like_zero3(net)
    return net, reference


def test_bidirectional_forward_reads_parameters_only_inside_module_calls():
    net, reference = _pair()
    x, t, context = torch.randn(2, 16, 3, 4, 4), torch.tensor([300.0, 800.0]), torch.randn(2, 8, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(x, t, context), reference(x, t, context), rtol=0, atol=0)


def test_causal_streaming_reads_parameters_only_inside_module_calls():
    net, reference = _pair(num_frame_per_block=2)
    cond, noise, steps = WanCondition(torch.randn(2, 8, 32)), torch.randn(2, 16, 4, 4, 4), StepListConfig()
    with torch.no_grad():
        out = causal_generate(WanDenoiser(net), cond, noise, steps, torch.Generator().manual_seed(0))
        ref = causal_generate(WanDenoiser(reference), cond, noise, steps, torch.Generator().manual_seed(0))
    assert ref.abs().max() > 0
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
