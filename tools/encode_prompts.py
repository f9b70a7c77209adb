#!/usr/bin/env python
"""Encode a prompt file with Wan's umT5 text encoder into the embeddings file other tools read.

    python tools/encode_prompts.py --text-encoder DIR --prompts prompts.txt --out prompts.pt
        [--negative-prompt TEXT] [--text-len 512] [--batch-size 16] [--device cpu]

DIR: a local diffusers Wan pipeline folder (text_encoder/ + tokenizer/) or a umT5 folder with
tokenizer files (nothing is downloaded). prompts.txt: one prompt per line (blank lines skipped).
Output (torch.save): {"context": [N, text_len, dim] (zero past each prompt's tokens, as Wan pads),
"negative": [1, text_len, dim]} -- the ``--prompts`` input of
tools/generate_ode_pairs.py, whose ``prompt_index`` then indexes this prompt list.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from megadistill.models.wan.prompts import read_prompts  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text-encoder", required=True, help="local umT5 / diffusers Wan pipeline folder")
    p.add_argument("--prompts", required=True, help="text file, one prompt per line")
    p.add_argument("--out", required=True, help="output .pt file")
    p.add_argument("--negative-prompt", default="", help="the unconditional prompt of CFG")
    p.add_argument("--text-len", type=int, default=512, help="the DiT's text_len (Wan: 512)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if not os.path.isdir(args.text_encoder):
            raise FileNotFoundError(f"--text-encoder: folder not found: {args.text_encoder}")
        prompts = read_prompts(args.prompts)
        if args.batch_size < 1 or args.text_len < 1:
            raise ValueError(f"--batch-size and --text-len must be >= 1, got {args.batch_size}, {args.text_len}")
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from megadistill.models.wan.text_encoder import WanTextEncoder

    encoder = WanTextEncoder.from_pretrained(args.text_encoder, negative_prompt=args.negative_prompt,
                                             text_len=args.text_len).to(args.device)
    chunks = []
    for i in tqdm(range(0, len(prompts), args.batch_size), desc="encoding", unit="batch"):
        chunks.append(encoder.encode(prompts[i:i + args.batch_size], device="cpu"))
    out = {"context": torch.cat(chunks), "negative": encoder.negative_embedding(1, device="cpu")}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    torch.save(out, args.out)
    print(f"wrote {args.out}: {len(prompts)} prompts, context {list(out['context'].shape)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
