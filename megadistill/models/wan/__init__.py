"""Wan2.1 / Wan2.2 DiT: one module for T2V, I2V and TI2V, the A14B two-expert wrapper, and checkpoints.

Public API::

    from megadistill.models.wan import build_wan, load_wan_checkpoint, save_wan_checkpoint

    model = build_wan("wan2.1-t2v-1.3b", grad_checkpointing=True)   # preset name + WanConfig overrides
    load_wan_checkpoint(model, "Wan2.1-T2V-1.3B/")                   # original or diffusers keys; a file,
                                                                     # a sharded *.index.json, or a folder
    v = model(x, t, context)                                         # flow prediction, float32

    x        latents [B, C, F, H, W] (C = out_dim; F, H, W multiples of patch_size (1, 2, 2))
    t        timesteps in [0, 1000]: [B], per token [B, L] with L = F * H/2 * W/2 (Wan2.2 TI2V), or
             per latent frame [B, F] (block-causal training; one modulation row per frame, not per token)
    context  umT5 embeddings [B, <=512, text_dim]; shorter inputs are zero-padded to 512 as upstream
    clip_fea CLIP image features [B, 257, 1280]           (Wan2.1 I2V only)
    y        I2V condition [B, in_dim - C, F, H, W]      (mask + first-frame latent; i2v only)

Presets: wan2.1-t2v-1.3b, wan2.1-t2v-14b, wan2.1-i2v-14b, wan2.2-ti2v-5b, wan2.2-a14b and
wan2.2-i2v-a14b (WanMoE: two experts, high-noise expert for t >= boundary * 1000), and tiny-t2v,
tiny-i2v, tiny-ti2v, tiny-a14b for tests. ``build_wan(..., device="meta")`` builds real sizes without
memory; ``dtype=torch.bfloat16`` keeps norms, modulation, time MLPs and head in float32.
``save_wan_checkpoint(model, dir, key_format="diffusers", max_shard_size="5GB")`` writes a diffusers
folder (config.json + sharded safetensors + index) for ``WanTransformer3DModel.from_pretrained``.

Block-causal mode (Self-Forcing / CausVid), a mode of the same WanModel and the same weights::

    model = build_wan("wan2.1-t2v-1.3b", num_frame_per_block=3)    # + local_attn_size=L, sink_size=S
    v = model(x, t, context)              # parallel training forward under the block-causal mask;
                                          # t [B], per frame [B, F] or per token [B, L]
    kv = new_kv_cache(model, batch, frame_seq_len=(H // 2) * (W // 2), max_frames=F)  # one KVCache per layer
    cross = CrossAttnCache()                                       # context k/v, projected on first use
    for f0 in range(0, F, 3):                                      # one block of frames at a time
        v_blk = model.forward_causal_step(x[:, :, f0:f0 + 3], t_blk, context, kv, cross, start_frame=f0)
        model.forward_causal_step(x0_blk, t_ctx, context, kv, cross, start_frame=f0)  # same start: overwrite

A token attends to its own and earlier blocks; with local_attn_size L only the last L frames up to
the end of its block, plus the first S (sink) frames. With a window the cache holds S + L frames and
evicts the oldest non-sink frames (upstream Self-Forcing's rollout cache of local_attn_size frames
holds the sink inside it: upstream (L, S) = ours (L - S, S)). The structure is the attention
metadata ``ops.block_causal.BlockCausal`` (a dense bool mask for SDPA, a flex_attention BlockMask
for ``attention: flex`` / ``auto`` on CUDA), its masks cached per geometry.
Cached keys carry no gradient, the current block's do (``new_kv_cache(..., grad_history=True)``:
upstream's in-place cache gradient instead, see kv_cache.py).

VAE and text encoder (thin wrappers over diffusers ``AutoencoderKLWan`` and transformers
``UMT5EncoderModel``; local folders only, nothing is downloaded)::

    vae = WanVAE.from_pretrained("Wan2.1-T2V-1.3B-Diffusers")        # pipeline folder or its vae/
    z = vae.encode(video)       # video [B, 3, 4k+1, H, W] in [-1, 1] -> (mu - mean) / std
    video = vae.decode(z)       # unnormalises first; WanVAEConfig(tiling=True) for long / large videos
    te = WanTextEncoder.from_pretrained("Wan2.1-T2V-1.3B-Diffusers")
    ctx = te.encode(["a red ball rolls left"])   # [B, 512, 4096], zero beyond each prompt's tokens
    neg = te.negative_embedding(batch_size=1)    # Wan's negative prompt, encoded once and cached
"""
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
from megadistill.models.wan.kv_cache import CrossAttnCache, KVCache, new_kv_cache
from megadistill.models.wan.model import WanModel, WanMoE, build_wan, cast_model
from megadistill.models.wan.text_encoder import (
    WAN_NEGATIVE_PROMPT,
    WanTextEncoder,
    WanTextEncoderConfig,
    tiny_umt5_config,
    umt5_xxl_config,
)
from megadistill.models.wan.vae import (
    WAN21_LATENTS_MEAN,
    WAN21_LATENTS_STD,
    WAN22_LATENTS_MEAN,
    WAN22_LATENTS_STD,
    WanVAE,
    WanVAEConfig,
    tiny_vae_config,
    vae_config_from_diffusers,
)

__all__ = [
    "CheckpointMismatchError", "LoadResult", "convert_state_dict", "detect_key_format",
    "load_wan_checkpoint", "save_wan_checkpoint", "wan_state_dict", "PRESETS", "WanConfig",
    "from_diffusers_config", "to_diffusers_config", "wan_config", "WanModel", "WanMoE", "build_wan", "cast_model",
    "CrossAttnCache", "KVCache", "new_kv_cache",
    "WAN_NEGATIVE_PROMPT", "WanTextEncoder", "WanTextEncoderConfig", "tiny_umt5_config", "umt5_xxl_config",
    "WAN21_LATENTS_MEAN", "WAN21_LATENTS_STD", "WAN22_LATENTS_MEAN", "WAN22_LATENTS_STD", "WanVAE",
    "WanVAEConfig", "tiny_vae_config", "vae_config_from_diffusers",
]
