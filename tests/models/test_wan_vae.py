"""WanVAE against diffusers' AutoencoderKLWan on tiny random Wan2.1 / Wan2.2 layouts (CPU, no downloads)."""
import json

import pytest
import torch
from torch import nn

from megadistill.models.wan.vae import (
    WAN21_LATENTS_MEAN,
    WanVAE,
    WanVAEConfig,
    tiny_vae_config,
    vae_config_from_diffusers,
)

FACTOR = {"wan2.1": 8, "wan2.2": 16}
Z_DIM = {"wan2.1": 16, "wan2.2": 48}


def tiny_vae(layout: str, seed: int = 0, **overrides) -> WanVAE:
    torch.manual_seed(seed)
    if layout == "wan2.2":
        # Non-trivial statistics so that a missing or transposed normalisation shows up.
        g = torch.Generator().manual_seed(1)
        overrides.setdefault("latents_mean", tuple((torch.randn(48, generator=g) * 0.3).tolist()))
        overrides.setdefault("latents_std", tuple((torch.rand(48, generator=g) + 0.5).tolist()))
    return WanVAE(tiny_vae_config(layout, **overrides))


def random_video(frames: int, height: int, width: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, height, width, generator=g) * 2 - 1


def stats(vae: WanVAE):
    view = (1, -1, 1, 1, 1)
    return torch.tensor(vae.config.latents_mean).view(view), torch.tensor(vae.config.latents_std).view(view)


@pytest.mark.parametrize("layout", ["wan2.1", "wan2.2"])
def test_shapes_and_normalisation_match_diffusers(layout):
    vae = tiny_vae(layout)
    f = FACTOR[layout]
    video = random_video(5, 2 * f, 3 * f, batch=2)
    assert vae.config.spatial_factor == f and vae.z_dim == Z_DIM[layout]
    assert vae.latent_shape(5, 2 * f, 3 * f) == (Z_DIM[layout], 2, 2, 3)

    with torch.no_grad():
        z = vae.encode(video)
        recon = vae.decode(z)
        # Independent reference: diffusers' posterior mean, normalised by hand with the config constants.
        mu = vae.vae.encode(video).latent_dist.mode()
        raw = vae.vae.decode(mu).sample
    mean, std = stats(vae)
    assert z.shape == (2, Z_DIM[layout], 2, 2, 3) and z.dtype == torch.float32
    torch.testing.assert_close(z, (mu - mean) / std, rtol=1e-5, atol=1e-6)
    assert recon.shape == video.shape
    torch.testing.assert_close(recon, raw, rtol=1e-5, atol=1e-6)
    assert recon.abs().max() <= 1.0
    assert z.std() > 1e-3 and raw.std() > 1e-3  # the tiny random VAE is not degenerate


def test_layout_defaults():
    import inspect

    from diffusers import AutoencoderKLWan

    # Wan2.1 statistics and sizes: diffusers' AutoencoderKLWan defaults are the released Wan2.1 VAE.
    defaults = {k: p.default for k, p in inspect.signature(AutoencoderKLWan.__init__).parameters.items()}
    cfg = WanVAEConfig()
    assert list(cfg.latents_mean) == defaults["latents_mean"] and list(cfg.latents_std) == defaults["latents_std"]
    assert (cfg.z_dim, cfg.spatial_factor, cfg.temporal_factor) == (defaults["z_dim"], 8, 4)
    assert (cfg.base_dim, list(cfg.dim_mult), cfg.num_res_blocks) == (defaults["base_dim"], defaults["dim_mult"], 2)
    # Wan2.2: the Wan2.2-TI2V-5B-Diffusers vae config (wan.md).
    kwargs = WanVAEConfig(layout="wan2.2").diffusers_kwargs()
    assert {k: kwargs[k] for k in ("base_dim", "decoder_base_dim", "z_dim", "is_residual", "in_channels",
                                   "out_channels", "patch_size", "scale_factor_spatial")} == dict(
        base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True, in_channels=12, out_channels=12,
        patch_size=2, scale_factor_spatial=16)
    assert len(kwargs["latents_mean"]) == len(kwargs["latents_std"]) == 48
    # A custom base_dim sizes the decoder too (tiny test VAEs), unless decoder_base_dim is given.
    assert WanVAEConfig(layout="wan2.2", base_dim=8).decoder_base_dim == 8


def test_latent_shape_of_released_sizes():
    vae21 = tiny_vae("wan2.1")
    assert vae21.latent_shape(81, 480, 832) == (16, 21, 60, 104)
    vae22 = tiny_vae("wan2.2")
    assert vae22.latent_shape(121, 704, 1280) == (48, 31, 44, 80)


def test_sampled_encoding_is_reproducible_and_differs_from_mean():
    vae = tiny_vae("wan2.1")
    video = random_video(5, 16, 16)
    with torch.no_grad():
        mode = vae.encode(video)
        a = vae.encode(video, sample=True, generator=torch.Generator().manual_seed(3))
        b = vae.encode(video, sample=True, generator=torch.Generator().manual_seed(3))
        posterior = vae.vae.encode(video).latent_dist
        ref = posterior.sample(generator=torch.Generator().manual_seed(3))
    mean, std = stats(vae)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, (ref - mean) / std, rtol=1e-5, atol=1e-6)
    assert (a - mode).abs().max() > 1e-3


@pytest.mark.parametrize("frames,height,width,match", [
    (4, 16, 16, "4k\\+1"), (6, 16, 16, "4k\\+1"), (5, 12, 16, "multiples of 8"), (5, 16, 20, "multiples of 8"),
])
def test_video_shape_errors_before_compute(frames, height, width, match):
    vae = tiny_vae("wan2.1")
    calls = []
    vae.vae.encoder.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match=match):
        vae.encode(random_video(frames, height, width))
    with pytest.raises(ValueError, match=match):
        vae.latent_shape(frames, height, width)
    assert not calls


def test_wan22_needs_multiples_of_16_and_input_checks():
    vae = tiny_vae("wan2.2")
    with pytest.raises(ValueError, match="multiples of 16"):
        vae.encode(random_video(5, 24, 32))
    with pytest.raises(ValueError, match="5-D"):
        vae.encode(torch.zeros(3, 5, 16, 16))
    with pytest.raises(ValueError, match="3 channels"):
        vae.encode(torch.zeros(1, 4, 5, 16, 16))
    with pytest.raises(ValueError, match="\\[-1, 1\\]"):
        vae.encode(random_video(5, 16, 16) * 127.5 + 127.5)
    with pytest.raises(ValueError, match="latent must be 5-D \\[B, 48"):
        vae.decode(torch.zeros(1, 16, 2, 1, 1))


def test_config_validation():
    with pytest.raises(ValueError, match="layout"):
        WanVAEConfig(layout="wan3")
    with pytest.raises(ValueError, match="latents_mean"):
        WanVAEConfig(layout="wan2.2", latents_mean=WAN21_LATENTS_MEAN)
    with pytest.raises(ValueError, match="temperal_downsample"):
        WanVAEConfig(temperal_downsample=(False, False, True))
    with pytest.raises(ValueError, match="tile_sample_min_height"):
        WanVAEConfig(tile_sample_min_height=100)
    with pytest.raises(ValueError, match="tile_sample_stride_width"):
        WanVAEConfig(tile_sample_min_width=64, tile_sample_stride_width=128)
    with pytest.raises(ValueError, match="dtype"):
        WanVAEConfig(dtype="float64")


def _make_spatially_local(vae: nn.Module) -> None:
    """Keep only the centre tap of every spatial kernel and silence the attention blocks.

    Each output pixel then depends on one latent pixel (and its past frames only), so tiled decoding must
    reproduce untiled decoding exactly: any error in tile placement, cropping or blend weights shows up.
    """
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanAttentionBlock

    with torch.no_grad():
        for m in vae.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                kh, kw = m.weight.shape[-2:]
                mask = torch.zeros_like(m.weight)
                mask[..., kh // 2, kw // 2] = 1
                m.weight.mul_(mask)
            if isinstance(m, WanAttentionBlock):  # global over the frame: make it the identity
                m.proj.weight.zero_()
                m.proj.bias.zero_()


@pytest.mark.parametrize("layout", ["wan2.1", "wan2.2"])
def test_tiled_decode_matches_untiled(layout):
    f = FACTOR[layout]
    tiles = dict(tile_sample_min_height=2 * f, tile_sample_min_width=2 * f,
                 tile_sample_stride_height=f, tile_sample_stride_width=f)
    plain = tiny_vae(layout)
    _make_spatially_local(plain.vae)
    tiled = tiny_vae(layout, tiling=True, **tiles)
    tiled.vae.load_state_dict(plain.vae.state_dict())
    calls = []
    tiled.vae.decoder.register_forward_pre_hook(lambda *a: calls.append(1))

    video = random_video(5, 4 * f, 5 * f)
    with torch.no_grad():
        z = plain.encode(video)
        z_tiled = tiled.encode(video)
        out = plain.decode(z)
        out_tiled = tiled.decode(z)
    # 2 latent frames x (4 x 5 tiles at stride 1 latent): the frame really was split.
    assert len(calls) == 2 * 4 * 5
    assert out.std() > 1e-3
    torch.testing.assert_close(z_tiled, z, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_tiled, out, rtol=1e-5, atol=1e-6)


def test_tiling_and_slicing_flags_reach_diffusers():
    """With the ordinary (non-local) random VAE, our flags give exactly diffusers' own tiled/sliced result."""
    tiles = dict(tile_sample_min_height=16, tile_sample_min_width=16,
                 tile_sample_stride_height=8, tile_sample_stride_width=8)
    vae = tiny_vae("wan2.1", tiling=True, slicing=True, **tiles)
    reference = tiny_vae("wan2.1")
    reference.vae.enable_tiling(**tiles)
    reference.vae.enable_slicing()
    assert (vae.vae.use_tiling, vae.vae.use_slicing) == (True, True)
    z = torch.randn(2, 16, 2, 3, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = vae.decode(z)
        mean, std = stats(vae)
        theirs = reference.vae.decode(z * std + mean).sample
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["wan2.1", "wan2.2"])
def test_from_pretrained_round_trip(tmp_path, layout):
    vae = tiny_vae(layout)
    vae.save_pretrained(str(tmp_path / "vae"))  # pipeline layout: <root>/vae/
    loaded = WanVAE.from_pretrained(str(tmp_path), tiling=True)
    assert loaded.config.layout == layout and loaded.config.tiling
    assert loaded.config.latents_mean == pytest.approx(vae.config.latents_mean)
    assert loaded.config.decoder_base_dim == vae.config.decoder_base_dim == 8
    video = random_video(5, FACTOR[layout], FACTOR[layout])
    loaded.set_tiling(False)
    assert not loaded.vae.use_tiling and not loaded.config.tiling
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(video), vae.encode(video), rtol=1e-5, atol=1e-6)
    direct = WanVAE.from_pretrained(str(tmp_path / "vae"))  # the VAE folder itself
    assert direct.config == loaded.config
    for name, tensor in vae.vae.state_dict().items():
        assert torch.equal(direct.vae.state_dict()[name], tensor), name


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        WanVAE.from_pretrained(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        WanVAE.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLWan"}))
    with pytest.raises(FileNotFoundError, match="no diffusion_pytorch_model"):
        WanVAE.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="cannot override"):
        vae_config_from_diffusers({"z_dim": 16}, base_dim=8)
    with pytest.raises(ValueError, match="neither"):
        vae_config_from_diffusers({"z_dim": 48})
