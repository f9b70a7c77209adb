"""Wan2.1 / Wan2.2 video VAE: a thin wrapper over diffusers' ``AutoencoderKLWan`` in Wan's latent space.

Public API::

    from megadistill.models.wan.vae import WanVAE, WanVAEConfig, tiny_vae_config

    vae = WanVAE.from_pretrained("Wan2.1-T2V-1.3B-Diffusers", tiling=True)  # pipeline root (uses vae/) or
                                                                            # the VAE folder; local only
    vae = WanVAE(WanVAEConfig(layout="wan2.2", dtype="bfloat16"))  # random weights, released 2.2 sizes
    vae = WanVAE(tiny_vae_config("wan2.2"))                         # tiny random VAE for tests
    z = vae.encode(video)       # video [B, 3, F, H, W] in [-1, 1] -> normalised latent (mu - mean) / std
    video = vae.decode(z)       # normalised latent -> video [B, 3, F, H, W] in [-1, 1] (float32)
    vae.latent_shape(81, 480, 832)                                    # (16, 21, 60, 104)

Layouts: ``wan2.1`` (z 16, 8x spatial) and ``wan2.2`` (z 48, 2x2 pixel patchify + residual blocks, 16x
spatial); both are causal in time with 4x temporal compression, so frames must be 4k+1 and H, W multiples
of the spatial factor (checked before any compute). ``encode`` returns the posterior mean by default
(``sample=True`` draws from the posterior). Latents are float32; the network runs in ``config.dtype``.
Long videos: ``tiling=True`` decodes (and encodes) in overlapping spatial tiles of the configured pixel
sizes, ``slicing=True`` runs the batch one video at a time; time is always processed chunk by chunk by
the causal VAE itself.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import nn

__all__ = [
    "WAN21_LATENTS_MEAN", "WAN21_LATENTS_STD", "WAN22_LATENTS_MEAN", "WAN22_LATENTS_STD",
    "WanVAEConfig", "WanVAE", "tiny_vae_config", "RUNTIME_FIELDS", "vae_config_from_diffusers", "check_video_shape", "check_latent_shape",
    "normalize_latents", "denormalize_latents",
]

# Published per-channel latent statistics (Wan2.1 VAE: also diffusers' AutoencoderKLWan defaults; Wan2.2
# VAE: Wan2_2_VAE in Wan-Video/Wan2.2 wan/modules/vae2_2.py and the Wan2.2-TI2V-5B-Diffusers vae config).
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)
WAN22_LATENTS_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)
WAN22_LATENTS_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)

# Per-layout architecture constants of the released VAEs (diffusers config names).
_LAYOUTS = {
    "wan2.1": dict(z_dim=16, base_dim=96, decoder_base_dim=96, patch_size=None, is_residual=False,
                   latents_mean=WAN21_LATENTS_MEAN, latents_std=WAN21_LATENTS_STD),
    "wan2.2": dict(z_dim=48, base_dim=160, decoder_base_dim=256, patch_size=2, is_residual=True,
                   latents_mean=WAN22_LATENTS_MEAN, latents_std=WAN22_LATENTS_STD),
}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# diffusers hard-codes the causal encoder's time chunks as 1 + 4k frames, so the temporal factor is fixed.
_TEMPORAL_FACTOR = 4


@dataclass
class WanVAEConfig:
    """Architecture (defaults: the released VAE of ``layout``), precision and long-video options.

    ``None`` fields take the layout's released value (``decoder_base_dim``: ``base_dim`` when that is
    set, so a tiny ``base_dim`` gives a tiny decoder). Tile sizes are in pixels, as in diffusers'
    ``enable_tiling``: a frame larger than ``tile_sample_min_*`` is cut into tiles of that size every
    ``tile_sample_stride_*`` pixels and the ``min - stride`` overlap is blended linearly.
    """

    layout: Literal["wan2.1", "wan2.2"] = "wan2.1"
    base_dim: Optional[int] = None          # released: 96 (2.1), 160 (2.2)
    decoder_base_dim: Optional[int] = None  # released: 96 (2.1), 256 (2.2)
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)  # diffusers' spelling
    latents_mean: Optional[tuple[float, ...]] = None
    latents_std: Optional[tuple[float, ...]] = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    tiling: bool = False
    tile_sample_min_height: int = 256
    tile_sample_min_width: int = 256
    tile_sample_stride_height: int = 192
    tile_sample_stride_width: int = 192
    slicing: bool = False
    # Reject videos outside [-1, 1] (e.g. uint8 range [0, 255]); costs one min/max reduction.
    check_range: bool = True

    def __post_init__(self):
        if self.layout not in _LAYOUTS:
            raise ValueError(f"WanVAEConfig.layout must be one of {sorted(_LAYOUTS)}, got {self.layout!r}")
        layout = _LAYOUTS[self.layout]
        if self.decoder_base_dim is None:
            # A custom base_dim (tiny test VAEs) also sizes the decoder, as in diffusers.
            self.decoder_base_dim = layout["decoder_base_dim"] if self.base_dim is None else self.base_dim
        if self.base_dim is None:
            self.base_dim = layout["base_dim"]
        if self.latents_mean is None:
            self.latents_mean = layout["latents_mean"]
        if self.latents_std is None:
            self.latents_std = layout["latents_std"]
        self.dim_mult = tuple(int(m) for m in self.dim_mult)
        self.attn_scales = tuple(float(s) for s in self.attn_scales)
        self.temperal_downsample = tuple(bool(t) for t in self.temperal_downsample)
        self.latents_mean = tuple(float(m) for m in self.latents_mean)
        self.latents_std = tuple(float(s) for s in self.latents_std)

        if self.base_dim <= 0:
            raise ValueError(f"WanVAEConfig.base_dim must be positive, got {self.base_dim}")
        if self.decoder_base_dim <= 0:
            raise ValueError(f"WanVAEConfig.decoder_base_dim must be positive, got {self.decoder_base_dim}")
        if len(self.dim_mult) < 2 or min(self.dim_mult) <= 0:
            raise ValueError(f"WanVAEConfig.dim_mult needs >= 2 positive entries, got {self.dim_mult}")
        if self.num_res_blocks <= 0:
            raise ValueError(f"WanVAEConfig.num_res_blocks must be positive, got {self.num_res_blocks}")
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"WanVAEConfig.temperal_downsample needs len(dim_mult) - 1 = {len(self.dim_mult) - 1} entries, "
                f"got {self.temperal_downsample}")
        if 2 ** sum(self.temperal_downsample) != _TEMPORAL_FACTOR:
            raise ValueError(
                f"WanVAEConfig.temperal_downsample must downsample time by exactly {_TEMPORAL_FACTOR} (two True "
                f"entries): diffusers encodes frames in chunks of 1 + 4k; got {self.temperal_downsample}")
        for name in ("latents_mean", "latents_std"):
            if len(getattr(self, name)) != self.z_dim:
                raise ValueError(f"WanVAEConfig.{name} needs z_dim = {self.z_dim} entries for layout "
                                 f"{self.layout!r}, got {len(getattr(self, name))}")
        if min(self.latents_std) <= 0:
            raise ValueError("WanVAEConfig.latents_std entries must be positive")
        if self.dtype not in _DTYPES:
            raise ValueError(f"WanVAEConfig.dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        f = self.spatial_factor
        for axis in ("height", "width"):
            lo = getattr(self, f"tile_sample_min_{axis}")
            stride = getattr(self, f"tile_sample_stride_{axis}")
            # diffusers floor-divides both by the spatial factor; a stride of zero latents never advances.
            if lo % f or stride % f or stride <= 0:
                raise ValueError(f"WanVAEConfig.tile_sample_min_{axis} ({lo}) and tile_sample_stride_{axis} "
                                 f"({stride}) must be positive multiples of the spatial factor {f}")
            if stride > lo:
                raise ValueError(f"WanVAEConfig.tile_sample_stride_{axis} ({stride}) must not exceed "
                                 f"tile_sample_min_{axis} ({lo}): tiles would leave gaps")

    @property
    def z_dim(self) -> int:
        return _LAYOUTS[self.layout]["z_dim"]

    @property
    def patch_size(self) -> Optional[int]:
        return _LAYOUTS[self.layout]["patch_size"]

    @property
    def is_residual(self) -> bool:
        return _LAYOUTS[self.layout]["is_residual"]

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1) * (self.patch_size or 1)

    @property
    def temporal_factor(self) -> int:
        return _TEMPORAL_FACTOR

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    def diffusers_kwargs(self) -> dict:
        """Constructor arguments of the equivalent ``AutoencoderKLWan``."""
        channels = 3 * (self.patch_size or 1) ** 2
        return dict(
            base_dim=self.base_dim, decoder_base_dim=self.decoder_base_dim, z_dim=self.z_dim,
            dim_mult=list(self.dim_mult), num_res_blocks=self.num_res_blocks, attn_scales=list(self.attn_scales),
            temperal_downsample=list(self.temperal_downsample), dropout=0.0,
            latents_mean=list(self.latents_mean), latents_std=list(self.latents_std),
            is_residual=self.is_residual, in_channels=channels, out_channels=channels, patch_size=self.patch_size,
            scale_factor_temporal=self.temporal_factor, scale_factor_spatial=self.spatial_factor,
        )


def tiny_vae_config(layout: str = "wan2.1", **overrides) -> WanVAEConfig:
    """A VAE of the given layout small enough for CPU tests (base_dim 8, one res block per level)."""
    fields = dict(layout=layout, base_dim=8, dim_mult=(1, 1, 1, 1), num_res_blocks=1)
    fields.update(overrides)
    return WanVAEConfig(**fields)


# WanVAEConfig fields that do not change the network, so they may differ from a checkpoint's config.json.
RUNTIME_FIELDS = ("dtype", "tiling", "tile_sample_min_height", "tile_sample_min_width",
                  "tile_sample_stride_height", "tile_sample_stride_width", "slicing", "check_range")


def vae_config_from_diffusers(cfg: dict, **runtime) -> WanVAEConfig:
    """Map an ``AutoencoderKLWan`` config (dict from its config.json) to ``WanVAEConfig``.

    ``runtime`` sets the fields in ``RUNTIME_FIELDS``; the architecture always comes from ``cfg``.
    """
    bad = sorted(set(runtime) - set(RUNTIME_FIELDS))
    if bad:
        raise ValueError(f"cannot override {bad} of a pretrained VAE; allowed: {list(RUNTIME_FIELDS)}")
    z_dim = cfg.get("z_dim", 16)
    layouts = [name for name, lay in _LAYOUTS.items()
               if lay["z_dim"] == z_dim and lay["patch_size"] == cfg.get("patch_size")
               and lay["is_residual"] == cfg.get("is_residual", False)]
    if not layouts:
        raise ValueError(f"AutoencoderKLWan config (z_dim={z_dim}, patch_size={cfg.get('patch_size')}, "
                         f"is_residual={cfg.get('is_residual', False)}) matches neither the Wan2.1 layout "
                         f"(16, None, False) nor the Wan2.2 layout (48, 2, True)")
    # Missing keys take diffusers' constructor defaults, not our per-layout defaults.
    base_dim = cfg.get("base_dim", 96)
    config = WanVAEConfig(
        layout=layouts[0], base_dim=base_dim, decoder_base_dim=cfg.get("decoder_base_dim") or base_dim,
        dim_mult=cfg.get("dim_mult", (1, 2, 4, 4)), num_res_blocks=cfg.get("num_res_blocks", 2),
        attn_scales=cfg.get("attn_scales", ()), temperal_downsample=cfg.get("temperal_downsample", (False, True, True)),
        latents_mean=cfg.get("latents_mean", WAN21_LATENTS_MEAN), latents_std=cfg.get("latents_std", WAN21_LATENTS_STD),
        **runtime)
    declared = cfg.get("scale_factor_spatial")
    if declared is not None and declared != config.spatial_factor:
        raise ValueError(f"AutoencoderKLWan config declares scale_factor_spatial={declared} but its architecture "
                         f"downsamples by {config.spatial_factor}")
    return config


def check_video_shape(shape, temporal_factor: int, spatial_factor: int, channels: int = 3) -> None:
    """Raise ValueError unless ``shape`` is [B, channels, 4k+1, H, W] with H, W multiples of the factor."""
    if len(shape) != 5:
        raise ValueError(f"video must be 5-D [B, {channels}, F, H, W], got shape {tuple(shape)}")
    _, c, frames, height, width = shape
    if c != channels:
        raise ValueError(f"video must have {channels} channels (dim 1 of [B, C, F, H, W]), got shape {tuple(shape)}")
    if frames < 1 or (frames - 1) % temporal_factor:
        raise ValueError(f"video frame count must be {temporal_factor}k+1 (1, 5, 9, ..., 81), got {frames}")
    if height % spatial_factor or width % spatial_factor or height == 0 or width == 0:
        raise ValueError(f"video height and width must be positive multiples of {spatial_factor}, "
                         f"got {height}x{width}")


def check_latent_shape(shape, z_dim: int) -> None:
    if len(shape) != 5 or shape[1] != z_dim or min(shape[2:]) < 1:
        raise ValueError(f"latent must be 5-D [B, {z_dim}, F, H, W], got shape {tuple(shape)}")


def normalize_latents(mu: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(mu - mean) / std per channel, in float32; ``mean`` and ``std`` are [C]."""
    view = (1, -1, 1, 1, 1)
    return (mu.float() - mean.float().view(view)) / std.float().view(view)


def denormalize_latents(z: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize_latents`: z * std + mean, in float32."""
    view = (1, -1, 1, 1, 1)
    return z.float() * std.float().view(view) + mean.float().view(view)


def _find_vae_folder(path: str) -> str:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"Wan VAE folder not found: {path!r} (expected a local diffusers folder; "
                                f"nothing is downloaded)")
    for folder in (path, os.path.join(path, "vae")):
        if os.path.isfile(os.path.join(folder, "config.json")):
            weights = glob.glob(os.path.join(folder, "diffusion_pytorch_model*.safetensors")) + \
                glob.glob(os.path.join(folder, "diffusion_pytorch_model*.bin"))
            if not weights:
                raise FileNotFoundError(f"{folder!r} has a config.json but no diffusion_pytorch_model*.safetensors "
                                        f"/ *.bin weights")
            return folder
    raise FileNotFoundError(f"no config.json in {path!r} or {os.path.join(path, 'vae')!r}: expected a diffusers "
                            f"AutoencoderKLWan folder (config.json + diffusion_pytorch_model.safetensors) or a "
                            f"pipeline folder with a vae/ subfolder")


class WanVAE(nn.Module):
    """Frozen Wan VAE mapping videos in [-1, 1] to Wan's normalised latent space and back."""

    def __init__(self, config: WanVAEConfig, vae=None):
        super().__init__()
        from diffusers import AutoencoderKLWan

        self.config = config
        if vae is None:
            vae = AutoencoderKLWan(**config.diffusers_kwargs())
        elif (vae.config.z_dim, vae.config.patch_size) != (config.z_dim, config.patch_size):
            raise ValueError(f"AutoencoderKLWan (z_dim={vae.config.z_dim}, patch_size={vae.config.patch_size}) does "
                             f"not match WanVAEConfig layout {config.layout!r}")
        if vae.dtype != config.torch_dtype:
            vae = vae.to(config.torch_dtype)
        self.vae = vae.eval().requires_grad_(False)
        self.register_buffer("latents_mean", torch.tensor(config.latents_mean, dtype=torch.float32), persistent=False)
        self.register_buffer("latents_std", torch.tensor(config.latents_std, dtype=torch.float32), persistent=False)
        self.set_tiling(config.tiling)
        self.set_slicing(config.slicing)

    @classmethod
    def from_pretrained(cls, path: str, **runtime) -> "WanVAE":
        """Load a local diffusers ``AutoencoderKLWan`` folder (or a pipeline folder with ``vae/``).

        ``runtime`` sets ``WanVAEConfig`` fields that leave the network unchanged (``RUNTIME_FIELDS``:
        dtype, tiling, slicing, ...); the architecture and latent statistics come from config.json.
        """
        from diffusers import AutoencoderKLWan

        folder = _find_vae_folder(path)
        with open(os.path.join(folder, "config.json")) as f:
            cfg = json.load(f)
        if cfg.get("_class_name", "AutoencoderKLWan") != "AutoencoderKLWan":
            raise ValueError(f"{folder!r} holds a {cfg['_class_name']}, not an AutoencoderKLWan")
        config = vae_config_from_diffusers(cfg, **runtime)
        vae = AutoencoderKLWan.from_pretrained(folder, torch_dtype=config.torch_dtype, local_files_only=True)
        return cls(config, vae)

    def save_pretrained(self, path: str) -> None:
        """Write a diffusers folder that :meth:`from_pretrained` and ``AutoencoderKLWan`` load."""
        self.vae.save_pretrained(path)

    def set_tiling(self, enabled: bool) -> None:
        """Switch tiled encode/decode (tile sizes from the config) on or off."""
        self.config = dataclasses.replace(self.config, tiling=bool(enabled))
        c = self.config
        self.vae.use_tiling = c.tiling
        self.vae.tile_sample_min_height = c.tile_sample_min_height
        self.vae.tile_sample_min_width = c.tile_sample_min_width
        self.vae.tile_sample_stride_height = c.tile_sample_stride_height
        self.vae.tile_sample_stride_width = c.tile_sample_stride_width

    def set_slicing(self, enabled: bool) -> None:
        """Switch encoding/decoding one video of the batch at a time on or off."""
        self.config = dataclasses.replace(self.config, slicing=bool(enabled))
        self.vae.use_slicing = self.config.slicing

    @property
    def z_dim(self) -> int:
        return self.config.z_dim

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(z, F', H', W') of the latent of a [3, frames, height, width] video (shape checks included)."""
        c = self.config
        check_video_shape((1, 3, frames, height, width), c.temporal_factor, c.spatial_factor)
        return (c.z_dim, (frames - 1) // c.temporal_factor + 1, height // c.spatial_factor, width // c.spatial_factor)

    def encode(self, video: torch.Tensor, sample: bool = False,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """[B, 3, 4k+1, H, W] in [-1, 1] -> float32 latent (mu - mean) / std of shape [B, z, k+1, H/f, W/f]."""
        c = self.config
        check_video_shape(video.shape, c.temporal_factor, c.spatial_factor)
        if c.check_range:
            lo, hi = torch.aminmax(video.detach())
            if lo.item() < -1.001 or hi.item() > 1.001:
                raise ValueError(f"video values must lie in [-1, 1], got [{lo.item():.4g}, {hi.item():.4g}] "
                                 f"(map uint8 frames with x / 127.5 - 1; set check_range=False to skip)")
        posterior = self.vae.encode(video.to(self.vae.dtype)).latent_dist
        z = posterior.sample(generator=generator) if sample else posterior.mode()
        return normalize_latents(z, self.latents_mean, self.latents_std)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Normalised latent [B, z, F, h, w] -> float32 video [B, 3, 4(F-1)+1, h*f, w*f] clamped to [-1, 1]."""
        check_latent_shape(latent.shape, self.config.z_dim)
        mu = denormalize_latents(latent, self.latents_mean, self.latents_std)
        return self.vae.decode(mu.to(self.vae.dtype)).sample.float()

    def extra_repr(self) -> str:
        c = self.config
        return (f"layout={c.layout}, z_dim={c.z_dim}, factors=({c.temporal_factor}, {c.spatial_factor}, "
                f"{c.spatial_factor}), dtype={c.dtype}, tiling={c.tiling}, slicing={c.slicing}")
