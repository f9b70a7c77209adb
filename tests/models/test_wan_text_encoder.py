"""WanTextEncoder against transformers' UMT5EncoderModel on a tiny random config (CPU, no downloads)."""
import pytest
import torch

from megadistill.models.wan.text_encoder import (
    WanTextEncoder,
    WanTextEncoderConfig,
    clean_prompt,
    tiny_tokenizer,
    tiny_umt5_config,
)

def tiny_encoder(dtype="float32", **fields):
    return WanTextEncoder.from_umt5_config(tiny_umt5_config(), tokenizer=tiny_tokenizer(), seed=0,
                                           config=WanTextEncoderConfig(dtype=dtype, **fields))


def right_padded(lengths, total, vocab=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (len(lengths), total), generator=g)
    mask = (torch.arange(total)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask  # pad id 0 past each prompt


def reference_alone(te, ids):
    """UMT5EncoderModel on one prompt's real tokens only: no padding, no mask."""
    with torch.no_grad():
        return te.encoder(input_ids=ids[None]).last_hidden_state[0]


def test_encode_ids_shape_zero_padding_and_real_positions():
    te = tiny_encoder()
    lengths = [5, 1, 9]
    ids, mask = right_padded(lengths, 12)
    out = te.encode_ids(ids, mask)
    assert out.shape == (3, 512, 32) and out.dtype == torch.float32
    with torch.no_grad():  # diffusers' recipe: run all positions with the mask, trim, zero-pad
        full = te.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    for b, n in enumerate(lengths):
        assert torch.count_nonzero(out[b, n:]) == 0
        torch.testing.assert_close(out[b, :n], reference_alone(te, ids[b, :n]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[b, :n], full[b, :n], rtol=1e-5, atol=1e-5)
        assert out[b, :n].abs().min() > 0  # real positions are real embeddings, not zeros


def test_encode_prompts_with_tokenizer_cleans_and_pads():
    te = tiny_encoder(text_len=16)
    prompts = ["a  cat surfing\n on a big   wave", "the red dog &amp; the sea", "night"]
    out = te.encode(prompts)
    assert out.shape == (3, 16, 32)
    tok = te.tokenizer
    for b, prompt in enumerate(prompts):
        ids = torch.tensor(tok(clean_prompt(prompt)).input_ids)  # words + </s>
        assert ids[-1] == 1 and (ids != 2).all()
        n = len(ids)
        torch.testing.assert_close(out[b, :n], reference_alone(te, ids), rtol=1e-5, atol=1e-5)
        assert torch.count_nonzero(out[b, n:]) == 0
    assert clean_prompt("the red dog &amp;amp; the  sea ") == "the red dog & the sea"


def test_truncation_to_text_len():
    te = tiny_encoder(text_len=6)
    prompt = "a cat surfing on a big red wave at night"
    out = te.encode([prompt])
    ids = torch.tensor(te.tokenizer([prompt], max_length=6, truncation=True).input_ids[0])
    assert out.shape == (1, 6, 32) and len(ids) == 6
    torch.testing.assert_close(out[0], reference_alone(te, ids), rtol=1e-5, atol=1e-5)


def test_negative_embedding_is_cached():
    te = tiny_encoder(text_len=16, negative_prompt="blue sea at night")
    calls = []
    te.encoder.register_forward_pre_hook(lambda *a: calls.append(1))
    neg = te.negative_embedding(batch_size=2)
    again = te.negative_embedding(batch_size=3)
    assert len(calls) == 1
    assert neg.shape == (2, 16, 32) and again.shape == (3, 16, 32)
    expected = te.encode(["blue sea at night"])
    torch.testing.assert_close(neg, expected.expand(2, -1, -1), rtol=0, atol=0)
    neg.zero_()  # callers get their own copy
    torch.testing.assert_close(te.negative_embedding()[0], expected[0], rtol=0, atol=0)


def test_bfloat16_outputs_and_exact_zeros():
    te = tiny_encoder(dtype="bfloat16")
    ids, mask = right_padded([3, 7], 7, seed=1)
    out = te.encode_ids(ids, mask)
    assert out.dtype == torch.bfloat16 and te.encoder.dtype == torch.bfloat16
    assert torch.count_nonzero(out[0, 3:]) == 0 and torch.count_nonzero(out[1, 7:]) == 0
    torch.testing.assert_close(out[1, :7], reference_alone(te, ids[1, :7]), rtol=0, atol=0)


def test_cpu_offload_keeps_encoder_out_of_module_tree():
    te = tiny_encoder(cpu_offload=True)
    assert list(te.parameters()) == [] and te.state_dict() == {}
    te.to(torch.float64)  # would cast a registered submodule
    assert te.encoder.dtype == torch.float32 and te.encoder_device.type == "cpu"
    ids, mask = right_padded([4], 4)
    out = te.encode_ids(ids, mask, device="meta")  # outputs move to the requested device
    assert out.device.type == "meta" and out.shape == (1, 512, 32)
    regular = tiny_encoder()
    assert len(list(regular.parameters())) > 0


def test_input_errors():
    te = tiny_encoder(text_len=8)
    ids, mask = right_padded([3], 9)
    with pytest.raises(ValueError, match="text_len=8"):
        te.encode_ids(ids, mask)
    left = torch.tensor([[0, 0, 1, 1]])
    with pytest.raises(ValueError, match="right-padded"):
        te.encode_ids(torch.ones(1, 4, dtype=torch.long), left)
    with pytest.raises(ValueError, match="\\[B, L\\]"):
        te.encode_ids(torch.ones(4, dtype=torch.long), torch.ones(4, dtype=torch.long))
    bare = WanTextEncoder.from_umt5_config(tiny_umt5_config())
    with pytest.raises(RuntimeError, match="no tokenizer"):
        bare.encode(["a cat"])
    with pytest.raises(ValueError, match="text_len"):
        WanTextEncoderConfig(text_len=0)
    with pytest.raises(ValueError, match="dtype"):
        WanTextEncoderConfig(dtype="int8")


def test_from_pretrained_round_trip(tmp_path):
    te = tiny_encoder(text_len=16)
    te.encoder.save_pretrained(str(tmp_path / "text_encoder"))  # diffusers pipeline layout
    te.tokenizer.save_pretrained(str(tmp_path / "tokenizer"))
    loaded = WanTextEncoder.from_pretrained(str(tmp_path), text_len=16, dtype="float32")
    prompts = ["a cat surfing", "the big blue sea at night"]
    torch.testing.assert_close(loaded.encode(prompts), te.encode(prompts), rtol=0, atol=0)
    encoder_only = WanTextEncoder.from_pretrained(str(tmp_path / "text_encoder"))
    assert encoder_only.tokenizer is None and encoder_only.encoder.dtype == torch.bfloat16
    with pytest.raises(FileNotFoundError, match="not found"):
        WanTextEncoder.from_pretrained(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        WanTextEncoder.from_pretrained(str(tmp_path / "tokenizer"))
