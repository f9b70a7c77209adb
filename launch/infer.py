#!/usr/bin/env python
"""Few-step inference with a distilled student: prompts in, MP4 out.

    python launch/infer.py --checkpoint outputs/demo_dmd/checkpoints --prompt "a red square moving left" \\
        [--prompt ...] [--prompts-file prompts.txt] [--model ema|generator] [--num-frames F] [--seed 0] \\
        [--vae DIR] [--out outputs/demo_dmd/infer.mp4] [--fps 16] [--refresh clean|noised]

``--checkpoint`` is a trainer checkpoint (its root or a step_* directory): it records the experiment
config and the generator's WanConfig, so the student runs exactly as trained: causal streaming (block by
block with a KV cache; with the model's local window for videos longer than the training window) or
bidirectional, at the SAME step list (``rollout.steps``), prompts encoded by the run's text encoder.
``--num-frames`` (latent frames; default: the training length) may exceed the training window for a
causal student. ``--refresh`` (causal students; default: the run's ``rollout.inference_refresh``)
is what the KV-cache refresh after each block sees: ``clean`` x0, as upstream Self-Forcing's inference
(use it for students trained upstream), or ``noised`` x0 as in the training rollout. The demo's latents are pixels; real Wan latents are decoded with the Wan VAE from a
local folder (``--vae``). One MP4 holds the prompts' videos stacked, one per row.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="trainer checkpoint root or step_* directory")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", default=None, help="text file, one prompt per line")
    p.add_argument("--model", default="ema", choices=("ema", "generator"),
                   help="which weights (default: the EMA, falling back to the generator before it starts)")
    p.add_argument("--num-frames", type=int, default=None, help="latent frames (default: the training length)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae", default=None, help="local Wan VAE folder (real Wan latents; not needed for the demo)")
    p.add_argument("--out", default=None, help="output MP4 (default: <run.output_dir>/infer.mp4)")
    p.add_argument("--fps", type=int, default=16)
    p.add_argument("--refresh", default=None, choices=("clean", "noised"),
                   help="causal students: the KV-cache refresh input (default: the run's rollout.inference_refresh)")
    return p.parse_args(argv)


def load_run(checkpoint: str, model: str):
    """(experiment config, generator WanModel with the merged weights, which weights were used)."""
    from megadistill.config import ConfigError, from_dict
    from megadistill.engine import merge
    from megadistill.experiment import ExperimentConfig
    from megadistill.models.wan import build_wan

    info = merge.read_checkpoint_info(checkpoint)
    if "config" not in info.trainer_state or "generator" not in info.trainer_state.get(merge.MODEL_CONFIG_KEY, {}):
        raise ValueError(f"{info.path} does not record the experiment and generator configs (written by an older "
                         "trainer or another job); it cannot be run by launch/infer.py")
    try:
        cfg = from_dict(ExperimentConfig, info.trainer_state["config"])
    except ConfigError as e:
        raise ValueError(f"{info.path}: its recorded experiment config does not load ({e})") from None
    if cfg.job != "distill" or cfg.model.family != "wan":
        raise ValueError(f"{info.path} is a {cfg.job!r} run of model family {cfg.model.family!r}; launch/infer.py "
                         "runs Wan students")
    used = model if model == "generator" or info.ema is not None else "generator"
    net = build_wan(merge.wan_config_from_checkpoint(info, "generator"))
    net.load_state_dict(merge.merged_state_dict(info, used))
    return cfg, net.eval(), used


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        from megadistill.models.wan.prompts import read_prompts

        prompts = list(args.prompt) + (read_prompts(args.prompts_file) if args.prompts_file else [])
        if not prompts:
            raise ValueError("give at least one --prompt or a --prompts-file")
        if args.vae is not None and not os.path.isdir(args.vae):
            raise FileNotFoundError(f"--vae: folder not found: {args.vae}")
        import torch

        from megadistill.engine.merge import MergeError

        try:
            cfg, net, used = load_run(args.checkpoint, args.model)
        except MergeError as e:
            raise ValueError(str(e)) from None
        rollout, data = cfg.rollout, cfg.data
        if args.refresh is not None:
            rollout = dataclasses.replace(rollout, inference_refresh=args.refresh)
        demo = data.text_encoder == "demo"
        if not demo and args.vae is None:
            raise ValueError("this run's latents are Wan VAE latents: pass --vae with a local Wan VAE folder")
        frames = args.num_frames or data.latent_shape[1]
        if rollout.kind == "causal" and frames % rollout.num_frame_per_block:
            raise ValueError(f"--num-frames {frames} must be a multiple of num_frame_per_block "
                             f"{rollout.num_frame_per_block}")
        if rollout.kind == "bidirectional" and frames != data.latent_shape[1]:
            raise ValueError("a bidirectional student generates its training length only; drop --num-frames")
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from megadistill.data.video_io import upscale_nearest, viewable_factor, write_mp4
    from megadistill.models.wan.denoiser import WanDenoiser
    from megadistill.models.wan.prompts import encode_prompt_list
    from megadistill.rollout.config import generate

    prompt_set = encode_prompt_list(data, prompts, net.config.text_len)
    c, _, h, w = data.latent_shape
    g = torch.Generator().manual_seed(args.seed)
    noise = torch.randn((len(prompts), c, frames, h, w), generator=g)
    with torch.no_grad():
        latents = generate(rollout, WanDenoiser(net), prompt_set.condition(torch.arange(len(prompts))), noise, g)
        if demo:
            videos = latents
        else:
            from megadistill.models.wan.vae import WanVAE

            videos = WanVAE.from_pretrained(args.vae).decode(latents)
    grid = torch.cat(list(videos.clamp(-1, 1)), dim=2)  # prompts stacked along H
    out = args.out or os.path.join(cfg.run.output_dir, "infer.mp4")
    write_mp4(out, upscale_nearest(grid, viewable_factor(grid.shape[-2], grid.shape[-1])), fps=args.fps)
    print(f"wrote {out}: {len(prompts)} video(s), {frames} latent frames, {len(rollout.steps.steps)} steps "
          f"({rollout.kind}, {used} weights, timesteps {[round(t, 1) for t in rollout.steps.timesteps()]}"
          + (f", {rollout.inference_refresh} cache refresh" if rollout.kind == "causal" else "") + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
