"""WanConfig presets (published sizes) and validation errors."""
import pytest

from megadistill.models.wan import PRESETS, WanConfig, build_wan, from_diffusers_config, to_diffusers_config, wan_config


def test_presets_match_published_configs():
    """Values from the Wan2.1 / Wan2.2 config table (shared/reference/wan.md)."""
    expected = {
        "wan2.1-t2v-1.3b": (1536, 8960, 12, 30, 16, 16, "t2v", None),
        "wan2.1-t2v-14b": (5120, 13824, 40, 40, 16, 16, "t2v", None),
        "wan2.1-i2v-14b": (5120, 13824, 40, 40, 36, 16, "i2v", 1280),
        "wan2.2-ti2v-5b": (3072, 14336, 24, 30, 48, 48, "ti2v", None),
        "wan2.2-a14b": (5120, 13824, 40, 40, 16, 16, "t2v", None),
        "wan2.2-i2v-a14b": (5120, 13824, 40, 40, 36, 16, "i2v", None),
    }
    for name, (dim, ffn, heads, layers, in_dim, out_dim, kind, image_dim) in expected.items():
        c = wan_config(name)
        assert (c.dim, c.ffn_dim, c.num_heads, c.num_layers, c.in_dim, c.out_dim, c.model_type, c.image_dim) == (
            dim, ffn, heads, layers, in_dim, out_dim, kind, image_dim), name
        assert (c.patch_size, c.text_len, c.text_dim, c.freq_dim, c.eps) == ((1, 2, 2), 512, 4096, 256, 1e-6)
        assert c.head_dim == 128 and c.rope_dims == (44, 42, 42)
    assert wan_config("wan2.2-a14b").expert_boundary == 0.875
    assert wan_config("wan2.2-i2v-a14b").expert_boundary == 0.900
    assert {"tiny-t2v", "tiny-i2v", "tiny-ti2v"} <= set(PRESETS)


def test_overrides_and_diffusers_round_trip():
    c = wan_config("wan2.1-t2v-1.3b", num_layers=2, fused_qkv=True)
    assert c.num_layers == 2 and c.fused_qkv and c.dim == 1536
    for name in ("wan2.1-t2v-1.3b", "wan2.1-i2v-14b", "wan2.2-ti2v-5b", "tiny-i2v"):
        c = wan_config(name)
        assert from_diffusers_config(to_diffusers_config(c)) == c
    assert WanConfig(patch_size=[1, 2, 2]).patch_size == (1, 2, 2)  # YAML lists become tuples


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError, match=r"unknown Wan preset 'wan3'.*wan2\.1-t2v-1\.3b.*tiny-t2v"):
        wan_config("wan3")
    with pytest.raises(ValueError, match="unknown Wan preset"):
        build_wan("nope")


@pytest.mark.parametrize("overrides,match", [
    (dict(dim=100, num_heads=12), r"dim \(100\) must be divisible by num_heads \(12\)"),
    (dict(dim=36, num_heads=4), "head_dim .* must be even"),
    (dict(model_type="v2v"), "model_type must be one of"),
    (dict(num_layers=0), "num_layers must be a positive int"),
    (dict(patch_size=(1, 2)), "patch_size must be three"),
    (dict(image_dim=1280), "image_dim .* needs model_type 'i2v'"),
    (dict(model_type="i2v", in_dim=16), r"in_dim \(16\) must exceed out_dim"),
    (dict(expert_boundary=1.5), "expert_boundary must lie in"),
    (dict(eps=0.0), "eps must be > 0"),
])
def test_validation_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        wan_config("tiny-t2v", **overrides)


def test_unknown_override_field():
    with pytest.raises(ValueError, match=r"unknown WanConfig field\(s\) \['heads'\]"):
        wan_config("tiny-t2v", heads=3)
