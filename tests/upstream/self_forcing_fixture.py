"""Outputs of the official Self-Forcing code (fixtures/self_forcing_33593df.*) and the tools to replay
them in megadistill: the tiny models with the same weights, and upstream's random draws served to
megadistill's draw points (``CausalStream.eps_like``, ``SelfForcingRollout.initial_noise``,
``ScoreDistillationMethod.draw_score_noise``) in megadistill's layout.

How the fixture was made is recorded in the JSON file (``method``): guandeh17/Self-Forcing at commit
33593df run on CPU in float32, its own classes called directly, every torch.randn / randn_like /
randint it made recorded in order with the function that made it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

import torch
from safetensors.torch import load_file

from megadistill.models.wan import build_wan
from megadistill.models.wan.denoiser import WanCondition, WanDenoiser

FIXTURE = Path(__file__).parent / "fixtures" / "self_forcing_33593df"


class UpstreamFixture:
    def __init__(self, path: Path = FIXTURE):
        self.tensors = load_file(str(path.with_suffix(".safetensors")))
        self.meta = json.loads(path.with_suffix(".json").read_text())
        self.tiny = self.meta["tiny_model"]

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def case(self, name: str) -> dict:
        return self.meta["cases"][name]

    def weights(self, role: str) -> Dict[str, torch.Tensor]:
        prefix = f"weights/{role}/"
        return {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    def grads(self, case: str) -> Dict[str, torch.Tensor]:
        prefix = f"{case}/grad/"
        return {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    def tape(self, case: str) -> List[dict]:
        """[{caller, kind, value}] in the order upstream drew them."""
        return [dict(entry, value=self.tensors[f"{case}/tape/{i}"])
                for i, entry in enumerate(self.case(case)["tape"])]

    def model(self, role: str, **overrides) -> WanDenoiser:
        t = self.tiny
        net = build_wan("tiny-t2v", dim=t["dim"], ffn_dim=t["ffn_dim"], num_heads=t["num_heads"],
                        num_layers=t["num_layers"], text_dim=t["text_dim"], freq_dim=t["freq_dim"],
                        text_len=t["text_len"], **overrides)
        net.load_state_dict(self.weights(role))
        return WanDenoiser(net)

    def condition(self, batch_size: int = 1) -> tuple[WanCondition, WanCondition]:
        cond = self["text/cond"].expand(batch_size, -1, -1)
        uncond = self["text/uncond"].expand(batch_size, -1, -1)
        return WanCondition(cond.contiguous()), WanCondition(uncond.contiguous())


def to_megadistill(x: torch.Tensor) -> torch.Tensor:
    """Upstream latents [B, F, C, H, W] -> megadistill's [B, C, F, H, W]."""
    return x.permute(0, 2, 1, 3, 4).contiguous()


class Replay:
    """Serves upstream's recorded draws, in order, to megadistill's draw points."""

    def __init__(self, entries: List[dict]):
        self.entries = list(entries)

    def next(self, kind: str, caller: str) -> torch.Tensor:
        """The first remaining draw of ``kind`` made in an upstream function whose name contains ``caller``
        (draws of one function are served in upstream's order)."""
        for i, entry in enumerate(self.entries):
            if entry["kind"] == kind and caller in entry["caller"]:
                return self.entries.pop(i)["value"]
        raise AssertionError(f"megadistill drew more than upstream did: no {kind} from {caller} left "
                             f"(left: {[e['caller'] for e in self.entries]})")

    def eps(self, x0: torch.Tensor) -> torch.Tensor:
        """A re-noising eps for a block x0 [B, C, Fb, H, W] (upstream: randn_like of [B*Fb, C, H, W])."""
        b, c, f, h, w = x0.shape
        value = self.next("randn_like", "inference")
        return value.reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4).to(x0.dtype)
