"""Wan checkpoints: key mapping, formats (single / sharded / .pth), wrapper prefixes, fused qkv, errors."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from megadistill.models.wan import (
    CheckpointMismatchError,
    build_wan,
    convert_state_dict,
    detect_key_format,
    load_wan_checkpoint,
    save_wan_checkpoint,
    wan_state_dict,
)
from megadistill.io.tensors import strip_wrappers
from megadistill.models.wan.checkpoint import convert_key
from megadistill.models.wan.config import to_diffusers_config


def _random_model(preset="tiny-i2v", seed=0, **overrides):
    torch.manual_seed(seed)
    model = build_wan(preset, **overrides)
    with torch.no_grad():  # every tensor distinct from the init (the upstream head init is zero)
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _assert_same_weights(a, b):
    sa, sb = wan_state_dict(a), wan_state_dict(b)
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ------------------------------------------------------------------------------------------- key mapping

def test_key_mapping_matches_reference_table():
    """Spot checks of the original -> diffusers table in shared/reference/wan.md, both directions."""
    cases = {
        "time_embedding.0.weight": "condition_embedder.time_embedder.linear_1.weight",
        "time_embedding.2.bias": "condition_embedder.time_embedder.linear_2.bias",
        "text_embedding.2.weight": "condition_embedder.text_embedder.linear_2.weight",
        "time_projection.1.weight": "condition_embedder.time_proj.weight",
        "head.modulation": "scale_shift_table",
        "head.head.bias": "proj_out.bias",
        "patch_embedding.weight": "patch_embedding.weight",
        "blocks.7.modulation": "blocks.7.scale_shift_table",
        "blocks.7.ffn.0.weight": "blocks.7.ffn.net.0.proj.weight",
        "blocks.7.ffn.2.bias": "blocks.7.ffn.net.2.bias",
        "blocks.12.norm3.weight": "blocks.12.norm2.weight",
        "blocks.12.norm2.weight": "blocks.12.norm3.weight",
        "blocks.3.self_attn.o.weight": "blocks.3.attn1.to_out.0.weight",
        "blocks.3.self_attn.norm_k.weight": "blocks.3.attn1.norm_k.weight",
        "blocks.3.cross_attn.q.bias": "blocks.3.attn2.to_q.bias",
        "blocks.3.cross_attn.k_img.weight": "blocks.3.attn2.add_k_proj.weight",
        "blocks.3.cross_attn.v_img.bias": "blocks.3.attn2.add_v_proj.bias",
        "blocks.3.cross_attn.norm_k_img.weight": "blocks.3.attn2.norm_added_k.weight",
        "img_emb.proj.0.weight": "condition_embedder.image_embedder.norm1.weight",
        "img_emb.proj.1.weight": "condition_embedder.image_embedder.ff.net.0.proj.weight",
        "img_emb.proj.3.bias": "condition_embedder.image_embedder.ff.net.2.bias",
        "img_emb.proj.4.weight": "condition_embedder.image_embedder.norm2.weight",
        "img_emb.emb_pos": "condition_embedder.image_embedder.pos_embed",
    }
    for original, diffusers_name in cases.items():
        assert convert_key(original, "original", "diffusers") == diffusers_name
        assert convert_key(diffusers_name, "diffusers", "original") == original


@pytest.mark.parametrize("preset", ["wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.1-i2v-14b", "wan2.2-ti2v-5b"])
def test_real_sizes_have_diffusers_names_and_shapes(preset):
    """At real sizes (meta device) our converted names and shapes equal diffusers' model exactly, and the
    tensor counts are the published 15 + 27 L (T2V) and 23 + 32 L (Wan2.1 I2V)."""
    diffusers = pytest.importorskip("diffusers")
    model = build_wan(preset, device="meta")
    with torch.device("meta"):
        ref = diffusers.WanTransformer3DModel(**to_diffusers_config(model.config))
    ours = {k: tuple(v.shape) for k, v in wan_state_dict(model, "diffusers").items()}
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ours == theirs
    layers = model.config.num_layers
    assert len(ours) == (23 + 32 * layers if model.config.image_dim else 15 + 27 * layers)


def test_detect_key_format():
    model = build_wan("tiny-t2v")
    assert detect_key_format(wan_state_dict(model)) == "original"
    assert detect_key_format(wan_state_dict(model, "diffusers")) == "diffusers"
    with pytest.raises(ValueError, match="cannot tell the key format"):
        detect_key_format(["foo.weight", "bar.bias"])


def test_strip_wrappers():
    keys = ["model._fsdp_wrapped_module.blocks.0._checkpoint_wrapped_module.self_attn.q.weight",
            "model._orig_mod.head.head.bias"]
    assert strip_wrappers(keys) == {"blocks.0.self_attn.q.weight": keys[0], "head.head.bias": keys[1]}


# ------------------------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("key_format", ["original", "diffusers"])
@pytest.mark.parametrize("filename", ["weights.safetensors", "weights.pth"])
def test_single_file_round_trip(tmp_path, key_format, filename):
    src, dst = _random_model(seed=0), _random_model(seed=1)
    save_wan_checkpoint(src, tmp_path / filename, key_format=key_format)
    result = load_wan_checkpoint(dst, tmp_path / filename)
    assert result.key_format == key_format and not result.missing and not result.unexpected
    _assert_same_weights(src, dst)


@pytest.mark.parametrize("key_format", ["original", "diffusers"])
def test_sharded_round_trip(tmp_path, key_format):
    src, dst = _random_model(seed=0), _random_model(seed=1)
    files = save_wan_checkpoint(src, tmp_path / "ckpt", key_format=key_format, max_shard_size="100KB")
    index = tmp_path / "ckpt" / "diffusion_pytorch_model.safetensors.index.json"
    assert index in files
    weight_map = json.loads(index.read_text())["weight_map"]
    shards = sorted(set(weight_map.values()))
    assert len(shards) >= 3 and set(weight_map) == set(wan_state_dict(src, key_format))
    for shard in shards:  # every shard obeys the limit unless it holds a single larger tensor
        tensors = load_file(str(tmp_path / "ckpt" / shard))
        assert len(tensors) == 1 or sum(t.numel() * t.element_size() for t in tensors.values()) <= 100_000
    load_wan_checkpoint(dst, index)
    _assert_same_weights(src, dst)
    # a directory resolves to its index too
    load_wan_checkpoint(_random_model(seed=2), tmp_path / "ckpt")


def test_wrapper_prefixes_and_container_are_stripped(tmp_path):
    """A training checkpoint: {'state_dict': ...} with DDP/FSDP/activation-checkpoint/compile wrappers."""
    src, dst = _random_model(seed=0), _random_model(seed=1)
    wrapped = {}
    for k, v in wan_state_dict(src).items():
        k = k.replace("self_attn.", "_checkpoint_wrapped_module.self_attn.")
        wrapped[f"module._orig_mod._fsdp_wrapped_module.{k}"] = v.clone()
    torch.save({"state_dict": wrapped, "step": 3}, tmp_path / "train.pt")
    load_wan_checkpoint(dst, tmp_path / "train.pt")
    _assert_same_weights(src, dst)


def test_model_wrappers_are_unwrapped(tmp_path):
    src, dst = _random_model(seed=0), _random_model(seed=1)
    save_wan_checkpoint(torch.nn.DataParallel(src), tmp_path / "w.safetensors")
    assert set(load_file(str(tmp_path / "w.safetensors"))) == set(wan_state_dict(src))
    load_wan_checkpoint(torch.nn.DataParallel(dst), tmp_path / "w.safetensors")
    _assert_same_weights(src, dst)


def test_fused_qkv_loads_from_and_saves_to_separate_weights(tmp_path):
    plain = _random_model("tiny-t2v", seed=0)
    fused = build_wan("tiny-t2v", fused_qkv=True)
    save_wan_checkpoint(plain, tmp_path / "plain.safetensors")
    load_wan_checkpoint(fused, tmp_path / "plain.safetensors")
    q, k, v = (getattr(plain.blocks[1].self_attn, n).weight for n in "qkv")
    assert torch.equal(fused.blocks[1].self_attn.qkv.weight, torch.cat([q, k, v]))
    # saved from the fused model, the file holds original separate q/k/v names
    save_wan_checkpoint(fused, tmp_path / "fused.safetensors")
    assert set(load_file(str(tmp_path / "fused.safetensors"))) == set(wan_state_dict(plain))
    back = _random_model("tiny-t2v", seed=3)
    load_wan_checkpoint(back, tmp_path / "fused.safetensors")
    _assert_same_weights(plain, back)
    # a checkpoint with a stored fused qkv (diffusers' fuse_projections name to_qkv) loads into both
    sd = wan_state_dict(plain)
    for i in range(plain.config.num_layers):
        for p in ("weight", "bias"):
            parts = [sd.pop(f"blocks.{i}.self_attn.{n}.{p}") for n in "qkv"]
            sd[f"blocks.{i}.self_attn.qkv.{p}"] = torch.cat(parts)
    save_file(convert_state_dict(sd, "original", "diffusers"), str(tmp_path / "stored_fused.safetensors"))
    for target in (build_wan("tiny-t2v"), build_wan("tiny-t2v", fused_qkv=True)):
        load_wan_checkpoint(target, tmp_path / "stored_fused.safetensors")
        x, t, c = torch.randn(1, 16, 1, 2, 2), torch.tensor([500.0]), torch.randn(1, 512, 32)
        with torch.no_grad():
            torch.testing.assert_close(target(x, t, c), plain(x, t, c), rtol=1e-5, atol=1e-5)


def test_saved_dtype_and_meta_model(tmp_path):
    src = _random_model("tiny-t2v", seed=0)
    save_wan_checkpoint(src, tmp_path / "bf16.safetensors", dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in load_file(str(tmp_path / "bf16.safetensors")).values())
    meta = build_wan("tiny-t2v", device="meta")
    load_wan_checkpoint(meta, tmp_path / "bf16.safetensors")
    for (name, p), ref in zip(meta.named_parameters(), src.parameters()):
        assert not p.is_meta and p.dtype == torch.float32, name
        assert torch.equal(p, ref.detach().to(torch.bfloat16).float()), name


def test_moe_round_trip(tmp_path):
    src, dst = _random_model("tiny-a14b", seed=0), _random_model("tiny-a14b", seed=1)
    save_wan_checkpoint(src, tmp_path / "a14b")
    assert (tmp_path / "a14b" / "high_noise_model" / "diffusion_pytorch_model.safetensors").exists()
    load_wan_checkpoint(dst, tmp_path / "a14b")
    _assert_same_weights(src.high_noise_model, dst.high_noise_model)
    _assert_same_weights(src.low_noise_model, dst.low_noise_model)
    assert not torch.equal(dst.high_noise_model.blocks[0].modulation, dst.low_noise_model.blocks[0].modulation)


# ------------------------------------------------------------------------------------------- errors

def _broken_file(tmp_path, edit):
    sd = {k: v.clone() for k, v in wan_state_dict(_random_model("tiny-t2v")).items()}
    edit(sd)
    path = tmp_path / "broken.safetensors"
    save_file(sd, str(path))
    return path


def _assert_untouched_on_error(path, match):
    model = _random_model("tiny-t2v", seed=5)
    before = {k: v.clone() for k, v in wan_state_dict(model).items()}
    with pytest.raises(CheckpointMismatchError, match=match):
        load_wan_checkpoint(model, path)
    after = wan_state_dict(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing written before the check


def test_missing_key_is_named(tmp_path):
    path = _broken_file(tmp_path, lambda sd: sd.pop("blocks.1.cross_attn.norm_k.weight"))
    _assert_untouched_on_error(path, r"missing \(1\): blocks\.1\.cross_attn\.norm_k\.weight")
    result = load_wan_checkpoint(build_wan("tiny-t2v"), path, strict=False)
    assert result.missing == ["blocks.1.cross_attn.norm_k.weight"] and result.unexpected == []


def test_unexpected_key_is_named(tmp_path):
    path = _broken_file(tmp_path, lambda sd: sd.update({"blocks.0.lora_A.weight": torch.zeros(2)}))
    _assert_untouched_on_error(path, r"unexpected \(1\): blocks\.0\.lora_A\.weight")
    result = load_wan_checkpoint(build_wan("tiny-t2v"), path, strict=False)
    assert result.unexpected == ["blocks.0.lora_A.weight"] and result.missing == []


def test_wrong_shape_is_named_even_when_not_strict(tmp_path):
    path = _broken_file(tmp_path, lambda sd: sd.update({"blocks.0.ffn.0.weight": torch.zeros(256, 64)}))
    _assert_untouched_on_error(path, r"shape mismatch \(1\): blocks\.0\.ffn\.0\.weight .*\[256, 64\].*\[128, 64\]")
    with pytest.raises(CheckpointMismatchError, match="blocks.0.ffn.0.weight"):
        load_wan_checkpoint(build_wan("tiny-t2v"), path, strict=False)


def test_wrong_model_size_lists_everything(tmp_path):
    save_wan_checkpoint(_random_model("tiny-t2v"), tmp_path / "t2v.safetensors")
    with pytest.raises(CheckpointMismatchError, match=r"(?s)missing \(\d+\): .*img_emb.*shape mismatch.*patch_embedding"):
        load_wan_checkpoint(build_wan("tiny-i2v"), tmp_path / "t2v.safetensors")


def test_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_wan_checkpoint(build_wan("tiny-t2v"), tmp_path / "nope.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_wan_checkpoint(build_wan("tiny-t2v"), tmp_path / "empty")
    index = tmp_path / "x.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"head.head.weight": "gone.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="gone.safetensors"):
        load_wan_checkpoint(build_wan("tiny-t2v"), index)
