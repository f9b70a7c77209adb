"""The demo prompt encoder: fixed seeded word vectors, zero padding, the empty prompt, clear errors."""
import pytest
import torch

from megadistill.demo.text import EMPTY_PROMPT, VOCABULARY, PromptEncoder
from megadistill.demo.videos import all_prompts


def test_deterministic_per_seed_and_seed_dependent():
    prompts = ["a red square moving left", "a blue disc moving up"]
    a, b, c = PromptEncoder(seed=0), PromptEncoder(seed=0), PromptEncoder(seed=1)
    assert torch.equal(a.encode(prompts), b.encode(prompts))
    assert not torch.equal(a.encode(prompts), c.encode(prompts))
    # The table is the seeded N(0, 1) draw, independent of anything else in the process.
    expected = torch.randn(len(VOCABULARY), 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(a.table, expected.float())


def test_words_in_order_then_zero_padding():
    enc = PromptEncoder(text_dim=16, text_len=8)
    ctx = enc.encode(["a green disc moving down", "a yellow square moving right"])
    assert ctx.shape == (2, 8, 16) and ctx.dtype == torch.float32
    for row, prompt in zip(ctx, ["a green disc moving down", "a yellow square moving right"]):
        words = prompt.split()
        for i, w in enumerate(words):
            assert torch.equal(row[i], enc.table[VOCABULARY.index(w)])
        assert (row[len(words):] == 0).all()


def test_every_demo_prompt_encodes_and_prompts_differ():
    ctx = PromptEncoder().encode(all_prompts())
    assert ctx.shape == (32, 8, 32)
    flat = ctx.flatten(1)
    assert torch.cdist(flat, flat).add(torch.eye(32) * 1e9).min() > 1.0


def test_empty_prompt_is_all_zeros_and_is_the_negative():
    enc = PromptEncoder()
    assert enc.tokenize(EMPTY_PROMPT) == []
    assert (enc.encode([EMPTY_PROMPT]) == 0).all()
    assert torch.equal(enc.negative(3), torch.zeros(3, 8, 32))


def test_unknown_word_error_lists_the_vocabulary():
    with pytest.raises(ValueError, match=r"unknown word\(s\) \['purple'\].*'red'.*'moving'"):
        PromptEncoder().encode(["a purple square moving left"])


def test_other_errors():
    with pytest.raises(ValueError, match="text_len"):
        PromptEncoder(text_len=3).encode(["a red square moving left"])
    with pytest.raises(TypeError, match="sequence of prompts"):
        PromptEncoder().encode("a red square moving left")
    with pytest.raises(ValueError, match="distinct single words"):
        PromptEncoder(vocabulary=("a", "a"))
    assert PromptEncoder(seed=5).settings()["seed"] == 5
