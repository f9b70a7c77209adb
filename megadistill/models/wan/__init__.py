"""Wan2.1 / Wan2.2 DiT: one module for T2V, I2V and TI2V, the A14B two-expert wrapper, and checkpoints.

Public API::

    from megadistill.models.wan import build_wan, load_wan_checkpoint, save_wan_checkpoint

    model = build_wan("wan2.1-t2v-1.3b", grad_checkpointing=True)   # preset name + WanConfig overrides
    load_wan_checkpoint(model, "Wan2.1-T2V-1.3B/")                   # original or diffusers keys; a file,
                                                                     # a sharded *.index.json, or a folder
    v = model(x, t, context)                                         # flow prediction, float32

    x        latents [B, C, F, H, W] (C = out_dim; F, H, W multiples of patch_size (1, 2, 2))
    t        timesteps in [0, 1000]: [B], or per token [B, L] with L = F * H/2 * W/2 (Wan2.2 TI2V)
    context  umT5 embeddings [B, <=512, text_dim]; shorter inputs are zero-padded to 512 as upstream
    clip_fea CLIP image features [B, 257, 1280]           (Wan2.1 I2V only)
    y        I2V condition [B, in_dim - C, F, H, W]      (mask + first-frame latent; i2v only)

Presets: wan2.1-t2v-1.3b, wan2.1-t2v-14b, wan2.1-i2v-14b, wan2.2-ti2v-5b, wan2.2-a14b and
wan2.2-i2v-a14b (WanMoE: two experts, high-noise expert for t >= boundary * 1000), and tiny-t2v,
tiny-i2v, tiny-ti2v, tiny-a14b for tests. ``build_wan(..., device="meta")`` builds real sizes without
memory; ``dtype=torch.bfloat16`` keeps norms, modulation, time MLPs and head in float32.
``save_wan_checkpoint(model, dir, key_format="diffusers", max_shard_size="5GB")`` writes a diffusers
folder (config.json + sharded safetensors + index) for ``WanTransformer3DModel.from_pretrained``.
"""
from megadistill.models.wan.attention import attention
from megadistill.models.wan.checkpoint import (
    CheckpointMismatchError,
    LoadResult,
    convert_state_dict,
    detect_key_format,
    load_wan_checkpoint,
    save_wan_checkpoint,
    wan_state_dict,
)
from megadistill.models.wan.config import PRESETS, WanConfig, from_diffusers_config, to_diffusers_config, wan_config
from megadistill.models.wan.model import WanModel, WanMoE, build_wan, cast_model

__all__ = [
    "attention", "CheckpointMismatchError", "LoadResult", "convert_state_dict", "detect_key_format",
    "load_wan_checkpoint", "save_wan_checkpoint", "wan_state_dict", "PRESETS", "WanConfig",
    "from_diffusers_config", "to_diffusers_config", "wan_config", "WanModel", "WanMoE", "build_wan", "cast_model",
]
