#!/usr/bin/env python
"""Generate ODE-regression pairs from a Wan teacher at EXACTLY the student's training step list.

    python tools/generate_ode_pairs.py --checkpoint TEACHER --prompts EMB.pt --latent-shape F H W --out DIR
        [--wan-config PRESET_OR_CONFIG_JSON] [--negative NEG.pt]
        [--steps 1000 750 500 250] [--no-warp] [--shift 5.0]        # the student's StepListConfig
        [--ode-steps 48] [--ode-shift 8.0] [--cfg-scale 6.0]       # teacher Euler run, standard CFG
        [--samples-per-prompt 1] [--batch-size 4] [--shard-size 256] [--seed 0]
        [--dtype fp32|bf16] [--device cpu] [--overwrite]
    python tools/generate_ode_pairs.py --demo --out DIR [--checkpoint DEMO.safetensors]
        [--prompt "a red disc moving left" ...]

TEACHER: a Wan checkpoint (file, sharded index or folder; original or diffusers keys). Its config is
``--wan-config`` (a preset name or a config.json) or the config.json next to the weights.
EMB: text embeddings [N, L <= text_len, text_dim] in a .pt / .safetensors file: a bare tensor or the
key ``context``; the negative prompt's embedding [L, text_dim] (or [1, L, text_dim]) is ``--negative``
or the key ``negative`` of the same file (needed unless --cfg-scale is 1).
``--demo``: the demo teacher (megadistill.demo; default: the shipped weights) with its settings JSON:
prompts (``--prompt``, default all demo prompts) encoded by its prompt encoder, "" as the negative,
its video geometry as the latent shape; the prompt strings are stored in the shard metadata.

The steps are those of ``StepListConfig(steps, warp, shift).timesteps()``, the list the student trains
and samples at; the teacher's Euler grid (``--ode-steps`` at ``--ode-shift``) is merged with it so each
stored state lies on the ODE at exactly that timestep (``methods.ode_regression.generate_ode_pairs``).
CFG is the standard form u + s (c - u); upstream Self-Forcing's guidance g is s = g + 1 here.

Output: ``DIR/ode_pairs_00000.safetensors``, ... each holding ``trajectory`` [n, K + 1, C, F, H, W]
(states at the K steps, then the clean end), ``steps`` [K] float64 and ``prompt_index`` [n] int64 (row
of EMB), with the generation settings in the file metadata. ``load_ode_pairs`` reads them back.
Everything (files, shapes, config, step list) is checked before the teacher runs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from megadistill.data.ode_pairs import SHARD_PATTERN, load_ode_pairs  # noqa: E402,F401  (re-exported)
from megadistill.engine.merge import load_wan_config  # noqa: E402
from megadistill.methods.ode_regression import generate_ode_pairs, guided_flow_fn  # noqa: E402
from megadistill.models.wan import WanConfig, build_wan, load_wan_checkpoint  # noqa: E402
from megadistill.rollout.steps import StepListConfig  # noqa: E402
from megadistill.models.wan.denoiser import WanCondition, WanDenoiser  # noqa: E402
from megadistill.models.wan.run_config import SHIFT  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class PairsError(ValueError):
    """A request that cannot run (raised before the teacher is evaluated)."""


@dataclass
class PairsRequest:
    """Everything checked and loaded: the work can start."""

    model: torch.nn.Module
    config: WanConfig
    context: torch.Tensor  # [N, L, text_dim]
    negative: Optional[torch.Tensor]  # [1, L, text_dim]
    steps: StepListConfig
    latent_shape: tuple  # (C, F, H, W)
    prompts: Optional[List[str]] = None  # the prompt strings (--demo), stored in the shard metadata


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None, help="teacher weights: file, sharded index json or folder")
    p.add_argument("--wan-config", default=None,
                   help="preset name or config.json (default: the config.json beside the weights)")
    p.add_argument("--prompts", default=None, help=".pt / .safetensors: text embeddings [N, L, text_dim]")
    p.add_argument("--negative", default=None, help="negative prompt embedding [L, text_dim] (default: key 'negative')")
    p.add_argument("--latent-shape", type=int, nargs=3, default=None, metavar=("F", "H", "W"))
    p.add_argument("--demo", action="store_true",
                   help="the demo teacher (megadistill.demo): its prompt encoder, settings and shipped weights")
    p.add_argument("--prompt", action="append", default=None,
                   help="with --demo: a prompt to encode (repeat the flag; default: every demo prompt)")
    p.add_argument("--out", required=True, help="output directory for the safetensors shards")
    p.add_argument("--steps", type=float, nargs="+", default=[1000.0, 750.0, 500.0, 250.0],
                   help="the student's nominal step list (StepListConfig.steps)")
    p.add_argument("--no-warp", action="store_true", help="use --steps as given (StepListConfig.warp=False)")
    p.add_argument("--shift", type=float, default=SHIFT, help="StepListConfig.shift (warp grid; default: the Wan "
                   "presets' noise-schedule shift, what a run's rollout.steps.shift takes)")
    p.add_argument("--ode-steps", type=int, default=48, help="Euler steps of the teacher run")
    p.add_argument("--ode-shift", type=float, default=8.0, help="timestep shift of the teacher's Euler grid")
    p.add_argument("--cfg-scale", type=float, default=6.0, help="standard CFG scale s: u + s (c - u)")
    p.add_argument("--samples-per-prompt", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--shard-size", type=int, default=256, help="samples per output file")
    p.add_argument("--seed", type=int, default=0, help="noise seed (sample i gets the i-th draw)")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="teacher weights dtype")
    p.add_argument("--device", default="cpu")
    p.add_argument("--overwrite", action="store_true", help="replace existing shards in --out")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- inputs


def read_tensors(path: Path) -> Dict[str, torch.Tensor]:
    """{name: tensor} of a .safetensors file or a .pt file holding a tensor or a dict of tensors."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if torch.is_tensor(obj):
        return {"context": obj}
    if isinstance(obj, dict) and all(torch.is_tensor(v) for v in obj.values()):
        return dict(obj)
    raise PairsError(f"{path}: expected a tensor or a dict of tensors")


def pick(tensors: Dict[str, torch.Tensor], key: str, path: Path) -> torch.Tensor:
    if key in tensors:
        return tensors[key]
    if len(tensors) == 1 and key == "context":
        return next(iter(tensors.values()))
    raise PairsError(f"{path}: no tensor {key!r} (found {sorted(tensors)})")


def check_embeddings(name: str, emb: torch.Tensor, config: WanConfig) -> None:
    if emb.dim() != 3 or emb.shape[-1] != config.text_dim or not 1 <= emb.shape[1] <= config.text_len:
        raise PairsError(f"{name} must be [N, L <= {config.text_len}, text_dim = {config.text_dim}], "
                         f"got {list(emb.shape)}")


def resolve_config_file(checkpoint: str) -> WanConfig:
    """The config.json beside (or inside) the weights."""
    ckpt = Path(checkpoint)
    candidate = (ckpt if ckpt.is_dir() else ckpt.parent) / "config.json"
    if not candidate.is_file():
        raise PairsError(f"no --wan-config given and no config.json next to {ckpt}")
    return load_wan_config(str(candidate))


def check_teacher_config(config: WanConfig) -> None:
    if config.model_type != "t2v":
        raise PairsError(f"only text-to-video teachers are supported (I2V / TI2V pairs need image latents); "
                         f"the config is {config.model_type!r}")
    if config.is_causal:
        raise PairsError("the teacher must be bidirectional (num_frame_per_block is set in its config)")


def file_inputs(args: argparse.Namespace, config: WanConfig):
    """(context [N, L, D], negative [1, L, D] or None) from --prompts / --negative."""
    prompts_path = Path(args.prompts)
    tensors = read_tensors(prompts_path)
    context = pick(tensors, "context", prompts_path).float()
    negative = None
    if args.negative is not None:
        neg_path = Path(args.negative)
        negative = pick(read_tensors(neg_path), "negative" if neg_path == prompts_path else "context", neg_path)
    elif "negative" in tensors:
        negative = tensors["negative"]
    if negative is not None:
        negative = negative.float()
        negative = negative.unsqueeze(0) if negative.dim() == 2 else negative
    return context, negative


def demo_inputs(args: argparse.Namespace):
    """(config, context, negative, (F, H, W), prompts) of the demo teacher (megadistill.demo)."""
    try:
        from megadistill.demo.teacher import DEFAULT_WEIGHTS, DemoSettings, settings_path
        from megadistill.demo.videos import all_prompts
    except ImportError as e:
        raise PairsError(f"--demo needs the megadistill.demo package ({e})") from e
    if args.checkpoint is None:
        args.checkpoint = str(DEFAULT_WEIGHTS)
    path = settings_path(args.checkpoint)
    if not path.is_file():
        raise PairsError(f"--demo: no settings file {path} beside the weights (tools/train_demo_teacher.py writes it)")
    settings = DemoSettings.from_dict(json.loads(path.read_text()))
    encoder = settings.encoder()
    prompts = list(args.prompt) if args.prompt else all_prompts()
    context = encoder.encode(prompts)  # ValueError naming unknown words
    return settings.model, context, encoder.negative(1), settings.video.shape[1:], prompts


def prepare(args: argparse.Namespace) -> PairsRequest:
    """Every check before any work: files, step list, config, embedding and latent shapes, weights."""
    if not args.demo:
        missing = [flag for flag, value in (("--checkpoint", args.checkpoint), ("--prompts", args.prompts),
                                            ("--latent-shape", args.latent_shape)) if value is None]
        if missing:
            raise PairsError(f"{', '.join(missing)} required (or --demo)")
    elif args.prompts is not None or args.wan_config is not None:
        raise PairsError("--demo reads the prompts and the config from the demo teacher; drop --prompts / --wan-config")
    for flag, value in (("--checkpoint", args.checkpoint), ("--prompts", args.prompts), ("--negative", args.negative)):
        if value is not None and not Path(value).exists():
            raise PairsError(f"{flag} {value}: no such file or directory")
    for flag in ("ode_steps", "samples_per_prompt", "batch_size", "shard_size"):
        if getattr(args, flag) < 1:
            raise PairsError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.ode_shift <= 0:
        raise PairsError(f"--ode-shift must be > 0, got {args.ode_shift}")
    out = Path(args.out)
    existing = sorted(out.glob("ode_pairs_*.safetensors")) if out.is_dir() else []
    if existing and not args.overwrite:
        raise PairsError(f"{out} already holds {len(existing)} shard(s); pass --overwrite to replace them")
    steps = StepListConfig(steps=list(args.steps), warp=not args.no_warp, shift=args.shift)

    prompts = None
    if args.demo:
        config, context, negative, demo_fhw, prompts = demo_inputs(args)
        f, h, w = args.latent_shape if args.latent_shape is not None else demo_fhw
    else:
        config = load_wan_config(args.wan_config) if args.wan_config else resolve_config_file(args.checkpoint)
        context, negative = file_inputs(args, config)
        f, h, w = args.latent_shape
    check_teacher_config(config)
    check_embeddings("prompt embeddings", context, config)
    if negative is not None:
        check_embeddings("negative embedding", negative, config)
        if negative.shape[0] != 1:
            raise PairsError(f"the negative embedding must be one prompt, got {negative.shape[0]}")
    elif args.cfg_scale != 1.0:
        raise PairsError("--cfg-scale != 1 needs a negative embedding (--negative or key 'negative' in --prompts)")
    pt, ph, pw = config.patch_size
    if min(f, h, w) < 1 or f % pt or h % ph or w % pw:
        raise PairsError(f"--latent-shape {f} {h} {w} must be positive multiples of patch_size {config.patch_size}")

    model = build_wan(config, dtype=DTYPES[args.dtype] if args.dtype != "fp32" else None)
    try:
        load_wan_checkpoint(model, args.checkpoint)
    except ValueError as e:  # CheckpointMismatchError: keys / shapes do not match the config
        raise PairsError(str(e)) from e
    model = model.to(args.device).eval().requires_grad_(False)
    return PairsRequest(model, config, context, negative, steps, (config.out_dim, f, h, w), prompts)


# ---------------------------------------------------------------------------------------------- output


def write_shard(path: Path, trajectory: torch.Tensor, steps: torch.Tensor, prompt_index: torch.Tensor,
                metadata: Dict[str, str]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({"trajectory": trajectory.contiguous(), "steps": steps.contiguous(),
               "prompt_index": prompt_index.contiguous()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)  # a crash never leaves a half-written shard under the final name


def generate(args: argparse.Namespace) -> List[Path]:
    try:
        req = prepare(args)
    except ValueError as e:  # StepListConfig / WanConfig / config-file validation
        raise e if isinstance(e, PairsError) else PairsError(str(e)) from e
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("ode_pairs_*.safetensors"):
        old.unlink()
    device = torch.device(args.device)
    teacher = WanDenoiser(req.model, num_train_timesteps=req.steps.num_train_timesteps)
    step_list = req.steps.timesteps()
    metadata = {k: json.dumps(v) for k, v in dict(
        step_list=step_list, nominal_steps=req.steps.steps, warp=req.steps.warp, shift=req.steps.shift,
        ode_steps=args.ode_steps, ode_shift=args.ode_shift, cfg_scale=args.cfg_scale, cfg_form="standard",
        seed=args.seed, checkpoint=str(args.checkpoint), model_type=req.config.model_type,
        prompts=req.prompts).items()}

    prompt_index = torch.arange(req.context.shape[0]).repeat_interleave(args.samples_per_prompt)
    noise_gen = torch.Generator().manual_seed(args.seed)
    written: List[Path] = []
    pending: List[torch.Tensor] = []
    pending_idx: List[torch.Tensor] = []

    def flush():
        path = out / SHARD_PATTERN.format(len(written))
        write_shard(path, torch.cat(pending), torch.tensor(step_list, dtype=torch.float64), torch.cat(pending_idx),
                    metadata)
        written.append(path)
        pending.clear()
        pending_idx.clear()

    bar = tqdm(total=len(prompt_index), desc="ODE pairs", unit="sample", disable=args.no_progress)
    for start in range(0, len(prompt_index), args.batch_size):
        idx = prompt_index[start:start + args.batch_size]
        b = len(idx)
        # One CPU draw per sample, in sample order: the pairs do not depend on batch size or device.
        noise = torch.stack([torch.randn(req.latent_shape, generator=noise_gen) for _ in range(b)]).to(device)
        cond = WanCondition(context=req.context[idx].to(device))
        uncond = WanCondition(context=req.negative.expand(b, -1, -1).to(device)) if req.negative is not None else None
        v_fn = guided_flow_fn(teacher, cond, uncond, args.cfg_scale, "standard")
        traj, _ = generate_ode_pairs(v_fn, noise, step_list, args.ode_steps, args.ode_shift,
                                     req.steps.num_train_timesteps)
        for i in range(b):  # shards hold exactly shard_size samples (the last one fewer)
            pending.append(traj[i:i + 1].cpu())
            pending_idx.append(idx[i:i + 1])
            if len(pending) == args.shard_size:
                flush()
        bar.update(b)
    bar.close()
    if pending:
        flush()
    return written


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        written = generate(args)
    except PairsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} shard(s) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
