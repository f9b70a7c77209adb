"""Wan text encoder: umT5-xxl (transformers ``UMT5EncoderModel``) embeddings in the layout the Wan DiT expects.

Public API::

    from megadistill.models.wan.text_encoder import WanTextEncoder, WanTextEncoderConfig, tiny_umt5_config

    te = WanTextEncoder.from_pretrained("Wan2.1-T2V-1.3B-Diffusers")  # pipeline root (text_encoder/ +
                                                                       # tokenizer/) or one folder; local only
    context = te.encode(["a cat surfing a wave"], device="cuda")      # [B, 512, 4096]
    negative = te.negative_embedding(batch_size=2, device="cuda")     # cached; Wan's default negative prompt
    context = te.encode_ids(input_ids, attention_mask)                 # pre-tokenised, right-padded ids
    te = WanTextEncoder.from_umt5_config(tiny_umt5_config())           # tiny random encoder for tests

As upstream Wan (and diffusers' WanPipeline): prompts are cleaned (html unescape, ftfy when installed,
whitespace collapse), tokenised with EOS to at most ``text_len`` = 512 tokens, encoded with the padding
masked out, then trimmed to the real tokens and zero-padded back to ``text_len``: every position past a
prompt's last token is exactly zero. Only the longest prompt's length is actually run through the
encoder (the mask makes the real positions independent of padding). ``cpu_offload=True`` keeps the
encoder on the CPU, outside the module tree (``.to()``, FSDP and ``state_dict`` skip it), and moves the
embeddings to ``device``. Outputs have the encoder's dtype (bfloat16 upstream).
"""
from __future__ import annotations

import html
import os
import re
from dataclasses import dataclass
from typing import Literal, Optional, Sequence, Union

import torch
from torch import nn

__all__ = [
    "WAN_NEGATIVE_PROMPT", "WanTextEncoderConfig", "WanTextEncoder", "umt5_xxl_config", "tiny_umt5_config",
    "clean_prompt", "pad_to_text_len",
]

# wan_shared_cfg.sample_neg_prompt of Wan-Video/Wan2.1 and Wan2.2 (wan/configs/shared_config.py).
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，"
    "整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，"
    "画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def umt5_xxl_config():
    """The umT5-xxl encoder used by every Wan model (Wan's ``umt5_xxl``: 4096 dim, 24 layers, 64 heads)."""
    from transformers import UMT5Config

    return UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                      relative_attention_num_buckets=32, relative_attention_max_distance=128,
                      feed_forward_proj="gated-gelu", dropout_rate=0.0)


def tiny_umt5_config(**overrides):
    """A UMT5Config small enough for CPU tests (vocab 64, dim 32, 2 layers); ``overrides`` replace fields."""
    from transformers import UMT5Config

    fields = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                  relative_attention_num_buckets=8, relative_attention_max_distance=16,
                  feed_forward_proj="gated-gelu", dropout_rate=0.0)
    fields.update(overrides)
    return UMT5Config(**fields)


TINY_WORDS = "a cat dog surfing on wave big small red blue & <b> the sea at night".split()


def tiny_tokenizer(words=TINY_WORDS):
    """A word-level tokenizer built in code (T5 conventions: pad 0, eos 1 appended; no download), to
    pair with ``tiny_umt5_config`` in tests and tiny runs."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in words:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


@dataclass
class WanTextEncoderConfig:
    text_len: int = 512
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    cpu_offload: bool = False
    negative_prompt: str = WAN_NEGATIVE_PROMPT
    clean_prompts: bool = True

    def __post_init__(self):
        if self.text_len <= 0:
            raise ValueError(f"WanTextEncoderConfig.text_len must be positive, got {self.text_len}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"WanTextEncoderConfig.dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]


def clean_prompt(text: str) -> str:
    """Upstream prompt cleaning: ftfy (if installed), double html unescape, collapse whitespace."""
    try:
        import ftfy
        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def pad_to_text_len(hidden: torch.Tensor, lengths: torch.Tensor, text_len: int) -> torch.Tensor:
    """Zero every position >= lengths[b] of ``hidden`` [B, L, D] and zero-pad (or cut) it to [B, text_len, D]."""
    batch, length, dim = hidden.shape
    keep = torch.arange(length, device=hidden.device)[None, :] < lengths.to(hidden.device)[:, None]
    hidden = torch.where(keep[..., None], hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device))
    if length >= text_len:
        return hidden[:, :text_len].contiguous()
    return torch.cat([hidden, hidden.new_zeros(batch, text_len - length, dim)], dim=1)


def _real_lengths(attention_mask: torch.Tensor) -> torch.Tensor:
    """Token counts of a right-padded 0/1 mask; rejects masks with holes or left padding."""
    mask = attention_mask.long()
    lengths = mask.sum(dim=1)
    expected = (torch.arange(mask.shape[1], device=mask.device)[None, :] < lengths[:, None]).long()
    if not torch.equal(mask, expected):
        raise ValueError("attention_mask must be right-padded: ones for the real tokens, then zeros "
                         "(trimming to real tokens assumes the prompt starts at position 0)")
    return lengths


def _find_folders(path: str, tokenizer_path: Optional[str]) -> tuple[str, Optional[str]]:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"Wan text encoder folder not found: {path!r} (expected a local transformers "
                                f"folder; nothing is downloaded)")
    if os.path.isfile(os.path.join(path, "text_encoder", "config.json")):  # diffusers pipeline root
        encoder_dir = os.path.join(path, "text_encoder")
        default_tokenizer = os.path.join(path, "tokenizer")
    elif os.path.isfile(os.path.join(path, "config.json")):
        encoder_dir = default_tokenizer = path
    else:
        raise FileNotFoundError(f"no config.json in {path!r} or {os.path.join(path, 'text_encoder')!r}: expected a "
                                f"UMT5EncoderModel folder or a diffusers pipeline folder")
    if tokenizer_path is not None:
        if not os.path.isdir(tokenizer_path):
            raise FileNotFoundError(f"tokenizer folder not found: {tokenizer_path!r}")
        return encoder_dir, tokenizer_path
    has_tokenizer = any(os.path.isfile(os.path.join(default_tokenizer, name))
                        for name in ("tokenizer.json", "spiece.model", "tokenizer_config.json"))
    return encoder_dir, default_tokenizer if has_tokenizer else None


class WanTextEncoder(nn.Module):
    """Frozen umT5 encoder producing Wan's zero-padded [B, text_len, dim] text context."""

    def __init__(self, encoder, tokenizer=None, config: Optional[WanTextEncoderConfig] = None):
        super().__init__()
        self.config = config or WanTextEncoderConfig()
        encoder = encoder.to(self.config.torch_dtype).eval().requires_grad_(False)
        if self.config.cpu_offload:
            # Held outside the module tree so that .to(device), FSDP wrapping and state_dict leave it on CPU.
            self.__dict__["encoder"] = encoder.cpu()
        else:
            self.encoder = encoder
        self.tokenizer = tokenizer
        self._negative_cache: dict[str, torch.Tensor] = {}

    @classmethod
    def from_umt5_config(cls, umt5_config, tokenizer=None, config: Optional[WanTextEncoderConfig] = None,
                         seed: Optional[int] = None) -> "WanTextEncoder":
        """Randomly initialised encoder of the given ``UMT5Config`` (tests, meta-device planning)."""
        from transformers import UMT5EncoderModel

        if seed is not None:
            torch.manual_seed(seed)
        return cls(UMT5EncoderModel(umt5_config), tokenizer, config)

    @classmethod
    def from_pretrained(cls, path: str, tokenizer_path: Optional[str] = None, **config_fields) -> "WanTextEncoder":
        """Load a local UMT5EncoderModel folder, or a diffusers pipeline folder (text_encoder/, tokenizer/).

        The tokenizer comes from ``tokenizer_path``, else the pipeline's tokenizer/ or the encoder folder
        when it holds tokenizer files; without one only :meth:`encode_ids` works.
        """
        from transformers import AutoTokenizer, UMT5EncoderModel

        config = WanTextEncoderConfig(**config_fields)
        encoder_dir, tokenizer_dir = _find_folders(path, tokenizer_path)
        encoder = UMT5EncoderModel.from_pretrained(encoder_dir, dtype=config.torch_dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True) if tokenizer_dir else None
        return cls(encoder, tokenizer, config)

    @property
    def dim(self) -> int:
        return self.encoder.config.d_model

    @property
    def encoder_device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    @torch.no_grad()
    def encode_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   device: Optional[Union[str, torch.device]] = None) -> torch.Tensor:
        """Right-padded ids [B, L <= text_len] and 0/1 mask -> [B, text_len, dim], zero past each prompt.

        ``device``: where the embeddings go (default: the encoder's device).
        """
        text_len = self.config.text_len
        if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape:
            raise ValueError(f"input_ids and attention_mask must both be [B, L], got {tuple(input_ids.shape)} "
                             f"and {tuple(attention_mask.shape)}")
        if input_ids.shape[1] > text_len:
            raise ValueError(f"got {input_ids.shape[1]} tokens per prompt, more than text_len={text_len}: tokenize "
                             f"with max_length=text_len and truncation")
        lengths = _real_lengths(attention_mask)
        # Padding is masked out of attention, so running only the longest real prefix gives the same
        # real-token outputs as running all text_len positions.
        used = max(int(lengths.max()), 1)
        run_on = self.encoder_device
        hidden = self.encoder(input_ids=input_ids[:, :used].to(run_on),
                              attention_mask=attention_mask[:, :used].to(run_on)).last_hidden_state
        out = pad_to_text_len(hidden, lengths, text_len)
        return out.to(device) if device is not None else out

    def tokenize(self, prompts: Union[str, Sequence[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (input_ids, attention_mask) [B, text_len], right-padded, with EOS, truncated."""
        if self.tokenizer is None:
            raise RuntimeError("WanTextEncoder has no tokenizer: load it with from_pretrained(path) from a folder "
                               "holding tokenizer files, pass tokenizer=..., or call encode_ids()")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if self.config.clean_prompts:
            prompts = [clean_prompt(p) for p in prompts]
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.config.text_len, truncation=True,
                                add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        return tokens.input_ids, tokens.attention_mask

    def encode(self, prompts: Union[str, Sequence[str]],
               device: Optional[Union[str, torch.device]] = None) -> torch.Tensor:
        """Prompt(s) -> [B, text_len, dim] context, zero past each prompt's real tokens."""
        input_ids, attention_mask = self.tokenize(prompts)
        return self.encode_ids(input_ids, attention_mask, device=device)

    def negative_embedding(self, batch_size: int = 1,
                           device: Optional[Union[str, torch.device]] = None) -> torch.Tensor:
        """``config.negative_prompt`` encoded once and cached; returns a fresh [batch_size, text_len, dim]."""
        prompt = self.config.negative_prompt
        if prompt not in self._negative_cache:
            self._negative_cache[prompt] = self.encode([prompt])
        cached = self._negative_cache[prompt]
        return cached.to(device if device is not None else cached.device).repeat(batch_size, 1, 1)

    def forward(self, prompts: Union[str, Sequence[str]],
                device: Optional[Union[str, torch.device]] = None) -> torch.Tensor:
        return self.encode(prompts, device=device)
