"""megadistill against the official Self-Forcing code (guandeh17/Self-Forcing @ 33593df), run on CPU.

The fixture holds what upstream computed on tiny models (weights included) and every random draw it
made; megadistill is given the same weights and draws. With the three upstream switches
(``score_sigma: upstream``, ``cache_gradient: upstream``, ``refresh: clean``) the DMD / SiD / critic
losses and gradients, the rollout's parameter gradients and the streamed latents equal upstream's to
float32 precision; with megadistill's defaults they differ by what the README's "Differences from
upstream" table states, which these tests also check, so neither side can pass by accident.
"""
from pathlib import Path

import pytest
import torch

from megadistill.diffusion.latents import DenseLatents
from megadistill.diffusion.flow_match import shift_timestep
from megadistill.methods.base import DistillBatch, RolloutOutput
from megadistill.methods.dmd import DMD, DMDConfig
from megadistill.methods.sid import SiD, SiDConfig
from megadistill.rollout.causal_inference import CausalStream, causal_generate
from megadistill.rollout.self_forcing import RolloutPlan, SelfForcingConfig, SelfForcingRollout
from megadistill.rollout.steps import StepListConfig
from tests.helpers.scripts import load_module

_fx = load_module("self_forcing_fixture", Path(__file__).parent / "self_forcing_fixture.py")
Replay, to_megadistill = _fx.Replay, _fx.to_megadistill

FLOAT32 = 2e-5  # relative error (norm) that float32 rounding reaches here; measured <= 3e-6
FIXTURE = _fx.UpstreamFixture()
# Without gradient checkpointing upstream reuses the cross-attention cache computed under no_grad:
# the text embedding and the context keys/values get no gradient from the rollout (megadistill's do).
CROSS_ATTN_CONTEXT = ("text_embedding.", ".cross_attn.k.", ".cross_attn.v.", ".cross_attn.norm_k.")
UPSTREAM_SHIFT = 5.0  # the fixture's run: Self-Forcing's timestep_shift and denoising-step warp shift


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def grad_error(module: torch.nn.Module, reference: dict) -> float:
    mine = dict(module.named_parameters())
    a = torch.cat([mine[n].grad.flatten() for n in sorted(reference)])
    b = torch.cat([reference[n].flatten() for n in sorted(reference)])
    return rel(a, b)


def score_timesteps(t0: torch.Tensor) -> torch.Tensor:
    """Upstream's t from its randint draw: shift 5, clamped to [20, 980] (float64 here, float32 there)."""
    return shift_timestep(t0.reshape(-1).double(), UPSTREAM_SHIFT).clamp(20.0, 980.0)


class FixedRollout:
    """The samples upstream's loss was given, with gradient."""

    def __init__(self, x):
        self.x = x

    def __call__(self, generator, batch, *, grad):
        return RolloutOutput(self.x, None, None, None, 0)


def score_method(cls, config_cls, case: str, score_sigma: str):
    teacher, critic = FIXTURE.model("teacher"), FIXTURE.model("critic")
    teacher.requires_grad_(False)
    x = to_megadistill(FIXTURE[f"{case}/x"]).requires_grad_(True)
    cond, uncond = FIXTURE.condition(x.shape[0])
    batch = DistillBatch(cond=cond, uncond=uncond, latents=DenseLatents(x.shape[0], tuple(x.shape[1:]), frame_dim=2))
    method = cls(config_cls(score_sigma=score_sigma, timestep_shift=UPSTREAM_SHIFT), generator=None, teacher=teacher, critic=critic,
                 rollout=FixedRollout(x))
    tape = Replay(FIXTURE.tape(case))
    t, eps = score_timesteps(tape.next("randint", "_get_timestep")), to_megadistill(tape.next("randn_like", ""))
    method.draw_score_noise = lambda *_: (t, eps)
    return method, batch, x, critic


def test_replayed_score_timesteps_are_upstreams():
    """The fixture's forced draws reach the clamp at both ends, where the score sigmas differ most."""
    t0 = FIXTURE.tape("dmd_loss")[0]["value"]
    t = score_timesteps(t0)
    assert torch.allclose(t, FIXTURE["dmd_loss/timestep"][:, 0].double(), rtol=1e-6)
    assert t.min() == 20.0 and t.max() == 980.0


@pytest.mark.parametrize("case, cls, config_cls", [("dmd_loss", DMD, DMDConfig), ("sid_loss", SiD, SiDConfig)])
def test_generator_score_losses_match_upstream(case, cls, config_cls):
    errors = {}
    for score_sigma in ("upstream", "exact"):
        method, batch, x, critic = score_method(cls, config_cls, case, score_sigma)
        loss, _ = method.generator_loss(batch, 0)
        loss.backward()
        errors[score_sigma] = (abs(float(loss.detach()) / float(FIXTURE[f"{case}/loss"]) - 1),
                               rel(x.grad, to_megadistill(FIXTURE[f"{case}/grad_x"])))
        if case == "sid_loss":  # SiD's loss also reaches the critic's parameters (upstream's too)
            errors[score_sigma] += (grad_error(critic.net, FIXTURE.grads(case)),)
    assert max(errors["upstream"]) < FLOAT32, errors
    # measured: DMD loss 7.9e-2, grad 8.4e-2; SiD loss 1.8e-3, grad 5.8e-3 (sigma errors up to 19% at t = 20)
    assert min(errors["exact"]) > 1e-3, errors


def test_critic_loss_matches_upstream():
    errors = {}
    for score_sigma in ("upstream", "exact"):
        method, batch, x, critic = score_method(DMD, DMDConfig, "critic_loss", score_sigma)
        loss, _ = method.critic_loss(batch, 0)
        loss.backward()
        errors[score_sigma] = (abs(float(loss.detach()) / float(FIXTURE["critic_loss/loss"]) - 1),
                               grad_error(critic.net, FIXTURE.grads("critic_loss")))
    assert max(errors["upstream"]) < FLOAT32, errors
    assert min(errors["exact"]) > 1e-3, errors  # measured: loss 3.5e-3, gradients 1.0e-1


def replay_draws(monkeypatch, tape: Replay):
    monkeypatch.setattr(CausalStream, "eps_like", lambda self, x0: tape.eps(x0))


def run_rollout(monkeypatch, case: str, cache_gradient: str, checkpointing: bool):
    generator = FIXTURE.model("generator", num_frame_per_block=3, grad_checkpointing=checkpointing)
    noise = to_megadistill(FIXTURE[f"{case}/noise"])
    tape = Replay(FIXTURE.tape(case))
    exits = tuple(tape.next("randint", "generate_and_sync_list").tolist())
    replay_draws(monkeypatch, tape)
    frames = noise.shape[2]
    rollout = SelfForcingRollout(StepListConfig(shift=UPSTREAM_SHIFT), SelfForcingConfig(num_training_frames=frames,
                                                                     cache_gradient=cache_gradient))
    monkeypatch.setattr(rollout, "initial_noise", lambda shape, batch: noise)
    cond, _ = FIXTURE.condition(1)
    batch = DistillBatch(cond=cond, latents=DenseLatents(1, tuple(noise.shape[1:]), frame_dim=2))
    out = rollout.run(generator, batch, RolloutPlan(frames, exits), grad=True)
    (out.video * to_megadistill(FIXTURE[f"{case}/weight"])).sum().backward()
    # upstream also refreshes after the last block, which nothing reads: its one draw is left over
    assert [e["caller"] for e in tape.entries] == ["pipeline/self_forcing_training.py:inference_with_trajectory"]
    return generator, out


@pytest.mark.parametrize("checkpointing", [True, False], ids=["ckpt", "no-ckpt"])
@pytest.mark.parametrize("case", ["rollout_ckpt", "rollout_nockpt"])
def test_rollout_parameter_gradients_match_upstream(monkeypatch, case, checkpointing):
    """The fixture's cases: upstream with gradient checkpointing (exit step 2 of 4) and without (exit 1)."""
    reference = FIXTURE.grads(case)
    generator, out = run_rollout(monkeypatch, case, "upstream", checkpointing)
    assert rel(out.video.detach(), to_megadistill(FIXTURE[f"{case}/output"])) < FLOAT32
    assert grad_error(generator.net, reference) < FLOAT32
    missing = sorted(n for n, p in generator.net.named_parameters() if n not in reference)
    if FIXTURE.case(case)["gradient_checkpointing"]:
        assert missing == []
    else:
        assert missing and all(any(k in n for k in CROSS_ATTN_CONTEXT) for n in missing), missing
        assert all(generator.net.get_parameter(n).grad.abs().sum() > 0 for n in missing)

    detached, out_d = run_rollout(monkeypatch, case, "detached", checkpointing)
    assert torch.equal(out_d.video, out.video)  # forward values do not depend on the switch
    assert grad_error(detached.net, reference) > 1e-2  # measured 3.3e-2 / 2.8e-2 (cosine 0.9995)


def dmd_generator_step(monkeypatch, cache_gradient: str, score_sigma: str) -> tuple[float, float]:
    """Upstream's DMD.generator_loss replayed: a 21-frame rollout (7 blocks, exit step 1) and the DMD
    loss -> (relative error of the loss, of the generator's parameter gradients)."""
    case = "dmd_generator_step"
    generator = FIXTURE.model("generator", num_frame_per_block=3, grad_checkpointing=True)
    teacher, critic = FIXTURE.model("teacher"), FIXTURE.model("critic")
    teacher.requires_grad_(False)
    tape = Replay(FIXTURE.tape(case))
    assert int(tape.next("randint", "_run_generator")) == 7  # blocks: min = max = 21 frames upstream
    noise = to_megadistill(tape.next("randn", "_run_generator"))
    exits = tuple(tape.next("randint", "generate_and_sync_list").tolist())
    t = score_timesteps(tape.next("randint", "_get_timestep"))
    eps = to_megadistill(tape.next("randn_like", "compute_distribution_matching_loss"))
    replay_draws(monkeypatch, tape)
    rollout = SelfForcingRollout(StepListConfig(shift=UPSTREAM_SHIFT), SelfForcingConfig(num_training_frames=21,
                                                                     cache_gradient=cache_gradient))
    monkeypatch.setattr(rollout, "draw_plan", lambda nfpb: RolloutPlan(21, exits))
    monkeypatch.setattr(rollout, "initial_noise", lambda shape, batch: noise)
    method = DMD(DMDConfig(score_sigma=score_sigma, timestep_shift=UPSTREAM_SHIFT), generator=generator, teacher=teacher, critic=critic,
                 rollout=rollout)
    monkeypatch.setattr(method, "draw_score_noise", lambda *_: (t, eps))
    cond, uncond = FIXTURE.condition(1)
    batch = DistillBatch(cond=cond, uncond=uncond, latents=DenseLatents(1, tuple(noise.shape[1:]), frame_dim=2))
    loss, _ = method.generator_loss(batch, 0)
    loss.backward()
    monkeypatch.undo()
    return abs(float(loss.detach()) / float(FIXTURE[f"{case}/loss"]) - 1), grad_error(generator.net, FIXTURE.grads(case))


def test_dmd_generator_step_matches_upstream(monkeypatch):
    assert max(dmd_generator_step(monkeypatch, "upstream", "upstream")) < FLOAT32
    _, grad = dmd_generator_step(monkeypatch, "detached", "upstream")
    assert grad > 1e-2, grad  # the cache gradient alone: measured 6.0e-2


@pytest.mark.parametrize("case", ["inference", "inference_window", "inference_context_noise"])
def test_causal_inference_matches_upstream(monkeypatch, case):
    """Upstream's CausalInferencePipeline: no window (9 frames), a local window of 6 frames with a
    3-frame sink over 15 frames (ours: window 3 + sink 3), context_noise 100."""
    meta = FIXTURE.case(case)
    window = {}
    if meta["local_attn_size"] != -1:
        window = dict(local_attn_size=meta["local_attn_size"] - meta["sink_size"], sink_size=meta["sink_size"])
    generator = FIXTURE.model("generator", num_frame_per_block=3, **window)
    noise = to_megadistill(FIXTURE[f"{case}/noise"])
    cond, _ = FIXTURE.condition(1)
    reference = to_megadistill(FIXTURE[f"{case}/latents"])
    tape = Replay(FIXTURE.tape(case))
    replay_draws(monkeypatch, tape)
    out = causal_generate(generator, cond, noise, StepListConfig(shift=UPSTREAM_SHIFT), context_noise=meta["context_noise"],
                          refresh="clean")
    assert tape.entries == []
    assert rel(out, reference) < FLOAT32

    # The training rollout's refresh (x0 re-noised to context_noise): same denoising draws, the
    # refresh's own eps from another stream (upstream's inference draws none there).
    tape, refresh_rng, refreshing = Replay(FIXTURE.tape(case)), torch.Generator().manual_seed(0), []
    refresh = CausalStream.refresh

    def eps(stream, x0):
        return torch.randn(x0.shape, generator=refresh_rng) if refreshing else tape.eps(x0)

    def noised_refresh(stream, x0, start):
        refreshing.append(True)
        refresh(stream, x0, start)
        refreshing.pop()

    monkeypatch.setattr(CausalStream, "eps_like", eps)
    monkeypatch.setattr(CausalStream, "refresh", noised_refresh)
    noised = causal_generate(generator, cond, noise, StepListConfig(shift=UPSTREAM_SHIFT), context_noise=meta["context_noise"],
                             refresh="noised")
    assert tape.entries == []
    assert rel(noised, reference) > 5e-5  # measured 1.8e-4 (window 2.1e-4; context_noise 100: 4.0e-3)
