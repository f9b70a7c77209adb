"""WanConfig: the hyper-parameters of one Wan DiT, named presets, and the diffusers config mapping."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from megadistill.ops.attention import BACKENDS

MODEL_TYPES = ("t2v", "i2v", "ti2v")


@dataclass
class WanConfig:
    """One Wan DiT (field names follow the original Wan ``WanModel`` arguments).

    ``model_type``: t2v (text only), i2v (channel-concatenated condition ``y``; a CLIP image branch
    when ``image_dim`` is set, as in Wan2.1 I2V), ti2v (Wan2.2 5B: per-token timesteps, no ``y``).
    ``expert_boundary``: Wan2.2 A14B, two experts of this config; the high-noise expert runs for
    t >= expert_boundary * num_train_timesteps.

    Block-causal mode (Self-Forcing / CausVid) is on when ``num_frame_per_block`` is set: latent frames
    are grouped in blocks of that many frames and a token attends only to its own and earlier blocks.
    ``local_attn_size`` (frames, counted back from the end of the query's block, current block
    included) limits attention to a sliding window; ``sink_size`` first frames then stay visible too
    (attention sink), so a KV cache holds at most ``sink_size + local_attn_size`` frames. Upstream
    Self-Forcing's rollout cache of ``local_attn_size`` frames holds the sink frames inside it:
    upstream (L, S) is ours (L - S, S). These fields change attention only, never the parameters:
    one checkpoint loads into either mode.

    ``attention``: the attention back-end by name (``ops.attention.BACKENDS``; a run's
    ``model.kernels.attention``), resolved when the model is built. Like ``fused_qkv`` and
    ``grad_checkpointing`` it changes how the network computes, never its parameters.
    """

    model_type: str = "t2v"
    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    in_dim: int = 16
    out_dim: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_len: int = 512
    text_dim: int = 4096
    freq_dim: int = 256
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True
    image_dim: Optional[int] = None
    rope_theta: float = 10000.0
    fused_qkv: bool = False
    grad_checkpointing: bool = False
    attention: str = "auto"
    expert_boundary: Optional[float] = None
    num_train_timesteps: int = 1000
    num_frame_per_block: Optional[int] = None
    local_attn_size: Optional[int] = None
    sink_size: int = 0

    def __post_init__(self):
        # YAML gives lists; the unpatchify view needs a tuple.
        self.patch_size = tuple(int(p) for p in self.patch_size)
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        for name in ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "text_len", "text_dim",
                     "freq_dim", "num_train_timesteps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be three positive ints (t, h, w), got {self.patch_size}")
        if self.dim % self.num_heads != 0:
            raise ValueError(f"dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")
        if self.head_dim % 2 != 0:
            # RoPE rotates complex pairs of channels.
            raise ValueError(f"head_dim = dim / num_heads must be even, got {self.head_dim}")
        if self.freq_dim % 2 != 0:
            raise ValueError(f"freq_dim must be even (cos and sin halves), got {self.freq_dim}")
        if self.eps <= 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")
        if self.attention not in BACKENDS:
            raise ValueError(f"attention: unknown back-end {self.attention!r}; known: {sorted(BACKENDS)}")
        if self.image_dim is not None:
            if self.model_type != "i2v":
                raise ValueError(f"image_dim (CLIP branch) needs model_type 'i2v', got {self.model_type!r}")
            if self.image_dim < 1:
                raise ValueError(f"image_dim must be a positive int or None, got {self.image_dim}")
        if self.model_type == "i2v" and self.in_dim <= self.out_dim:
            raise ValueError(
                f"i2v concatenates the condition y onto the latents, so in_dim ({self.in_dim}) must exceed "
                f"out_dim ({self.out_dim})")
        if self.expert_boundary is not None and not 0.0 < self.expert_boundary < 1.0:
            raise ValueError(f"expert_boundary must lie in (0, 1), got {self.expert_boundary}")
        self._check_causal()

    def _check_causal(self):
        nfpb, local, sink = self.num_frame_per_block, self.local_attn_size, self.sink_size
        if nfpb is None:
            if local is not None or sink:
                raise ValueError("local_attn_size and sink_size need block-causal mode (set num_frame_per_block)")
            return
        if not isinstance(nfpb, int) or isinstance(nfpb, bool) or nfpb < 1:
            raise ValueError(f"num_frame_per_block must be a positive int or None, got {nfpb!r}")
        if self.patch_size[0] != 1:
            # Blocks, RoPE offsets and cache slots are counted in latent frames = token frames.
            raise ValueError(f"block-causal mode needs a temporal patch size of 1, got patch_size {self.patch_size}")
        if local is not None and (not isinstance(local, int) or isinstance(local, bool) or local < nfpb):
            # A window shorter than a block would hide part of the query's own block.
            raise ValueError(f"local_attn_size must be None or an int >= num_frame_per_block ({nfpb}), got {local!r}")
        if not isinstance(sink, int) or isinstance(sink, bool) or sink < 0:
            raise ValueError(f"sink_size must be a non-negative int, got {sink!r}")
        if sink and local is None:
            raise ValueError("sink_size needs local_attn_size: without a window every frame is visible anyway")

    @property
    def is_causal(self) -> bool:
        """Block-causal attention (num_frame_per_block set)."""
        return self.num_frame_per_block is not None

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_dims(self) -> tuple[int, int, int]:
        """Channels of each head given to (frame, height, width) positions: 44/42/42 for head_dim 128."""
        d = self.head_dim
        return d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)

    @property
    def condition_dim(self) -> int:
        """Channels of the i2v condition ``y`` (mask + first-frame latent): in_dim - out_dim."""
        return self.in_dim - self.out_dim if self.model_type == "i2v" else 0

    def replace(self, **overrides) -> "WanConfig":
        return dataclasses.replace(self, **overrides)


_14B = dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
_TINY = dict(dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=32, freq_dim=32)

PRESETS: dict[str, dict[str, Any]] = {
    "wan2.1-t2v-1.3b": dict(model_type="t2v", dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "wan2.1-t2v-14b": dict(model_type="t2v", **_14B),
    "wan2.1-i2v-14b": dict(model_type="i2v", in_dim=36, image_dim=1280, **_14B),
    "wan2.2-ti2v-5b": dict(model_type="ti2v", dim=3072, ffn_dim=14336, num_heads=24, num_layers=30,
                           in_dim=48, out_dim=48),
    # Each A14B expert is a Wan2.1-14B-shaped network; Wan2.2 I2V drops the CLIP branch.
    "wan2.2-a14b": dict(model_type="t2v", expert_boundary=0.875, **_14B),
    "wan2.2-i2v-a14b": dict(model_type="i2v", in_dim=36, expert_boundary=0.900, **_14B),
    "tiny-t2v": dict(model_type="t2v", **_TINY),
    "tiny-i2v": dict(model_type="i2v", in_dim=36, image_dim=48, **_TINY),
    "tiny-ti2v": dict(model_type="ti2v", in_dim=48, out_dim=48, **_TINY),
    "tiny-a14b": dict(model_type="t2v", expert_boundary=0.875, **_TINY),
}


def wan_config(preset: str, **overrides) -> WanConfig:
    """The named preset with field overrides, e.g. ``wan_config("wan2.1-t2v-1.3b", num_layers=2)``."""
    if preset not in PRESETS:
        raise ValueError(f"unknown Wan preset {preset!r}; known presets: {', '.join(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(WanConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown WanConfig field(s) {unknown}; fields: {sorted(fields)}")
    return WanConfig(**{**PRESETS[preset], **overrides})


def to_diffusers_config(cfg: WanConfig) -> dict[str, Any]:
    """Constructor arguments of diffusers' ``WanTransformer3DModel`` for the same network."""
    if not cfg.qk_norm:
        raise ValueError("diffusers' WanTransformer3DModel always normalises q and k; qk_norm=False has no equivalent")
    return dict(
        patch_size=list(cfg.patch_size),
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim,
        out_channels=cfg.out_dim,
        text_dim=cfg.text_dim,
        freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim,
        num_layers=cfg.num_layers,
        cross_attn_norm=cfg.cross_attn_norm,
        qk_norm="rms_norm_across_heads",
        eps=cfg.eps,
        image_dim=cfg.image_dim,
        added_kv_proj_dim=cfg.dim if cfg.image_dim is not None else None,
        rope_max_seq_len=1024,
        pos_embed_seq_len=None,
    )


def from_diffusers_config(d: dict[str, Any], model_type: Optional[str] = None, **overrides) -> WanConfig:
    """WanConfig from a diffusers ``config.json`` dict (model_type inferred unless given)."""
    if d.get("pos_embed_seq_len") is not None:
        raise ValueError("first-last-frame models (pos_embed_seq_len) are not supported")
    if d.get("qk_norm") != "rms_norm_across_heads":
        raise ValueError(f"unsupported qk_norm {d.get('qk_norm')!r} (Wan uses 'rms_norm_across_heads')")
    in_dim, out_dim = d.get("in_channels", 16), d.get("out_channels", 16)
    if model_type is None:
        model_type = "i2v" if in_dim > out_dim else ("ti2v" if in_dim == 48 else "t2v")
    heads, head_dim = d.get("num_attention_heads", 40), d.get("attention_head_dim", 128)
    fields = dict(
        model_type=model_type, dim=heads * head_dim, num_heads=heads, ffn_dim=d.get("ffn_dim", 13824),
        num_layers=d.get("num_layers", 40), in_dim=in_dim, out_dim=out_dim,
        patch_size=tuple(d.get("patch_size", (1, 2, 2))), text_dim=d.get("text_dim", 4096),
        freq_dim=d.get("freq_dim", 256), eps=d.get("eps", 1e-6), cross_attn_norm=d.get("cross_attn_norm", True),
        image_dim=d.get("image_dim"),
    )
    return WanConfig(**{**fields, **overrides})
