"""The tiny CPU profile's tokenizer (``configs/tokenizer_tiny``): Qwen2.5's, cut to 4,096 tokens.

Usage:
    python -m distilled_plugins.devtools.tiny_tokenizer [--out configs/tokenizer_tiny]

Qwen2.5's byte-level BPE numbers its tokens in merge order (token 256 + i is what merge i makes), so its first
4,074 tokens with the merges that make them are a BPE tokenizer of their own. It still encodes any text losslessly
(every byte is one of the first 256 tokens), in ~1.3x as many tokens on MATH solutions. The rest is Qwen2.5's
unchanged: the NFC normaliser, the pre-tokenizer, the decoder, the chat template and the 22 special tokens,
numbered after the vocabulary. The tiny profile (``configs/finetune_tiny_cpu.yaml``: the demo's and the tests')
then spends its steps on the data, not on an embedding and output layer of 151,936 rows: ~40-60 ms a step, not
~1 s. The demo and the tests give this folder as ``tokenizer_dir``; the preflight refuses a tokenizer with more
tokens than the profile's ``vocab_size``; mindformers generation refuses it too.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from distilled_plugins.core import configs
from distilled_plugins.core.io import atomic_dir

VOCAB_SIZE = 4096  # the profile's vocab_size: the BPE tokens, then Qwen2.5's 22 special tokens
BYTE_TOKENS = 256  # byte-level BPE: one token per byte value before any merge


def build(out: Path = configs.TINY_TOKENIZER, qwen: Path = configs.QWEN_TOKENIZER) -> Path:
    """Write the tiny tokenizer to ``out`` (a transformers tokenizer folder) from Qwen2.5's in ``qwen``."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads((qwen / "tokenizer.json").read_text(encoding="utf-8"))
    qwen_config = json.loads((qwen / "tokenizer_config.json").read_text(encoding="utf-8"))
    specials = spec["added_tokens"]
    base = VOCAB_SIZE - len(specials)
    merges = spec["model"]["merges"][: base - BYTE_TOKENS]
    vocab = {token: i for token, i in spec["model"]["vocab"].items() if i < base}
    for i, (left, right) in enumerate(merges):  # the numbering this cut relies on
        if vocab.get(left + right) != BYTE_TOKENS + i:
            raise ValueError(f"{qwen}: merge {i} ({left!r} + {right!r}) does not make token {BYTE_TOKENS + i}")
    spec["model"] = {**spec["model"], "vocab": vocab, "merges": merges}
    spec["added_tokens"] = [{**token, "id": base + i} for i, token in enumerate(specials)]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        chat_template=qwen_config["chat_template"],
        pad_token=qwen_config["pad_token"],
        eos_token=qwen_config["eos_token"],
        additional_special_tokens=qwen_config["additional_special_tokens"],
        clean_up_tokenization_spaces=False,
        model_max_length=qwen_config["model_max_length"],
    )
    configs.check_built_tokenizer(configs.FINETUNE_TINY, tokenizer, "tiny tokenizer")
    with atomic_dir(out) as tmp:
        tokenizer.save_pretrained(str(tmp))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=configs.TINY_TOKENIZER, help="folder to write (default: %(default)s)"
    )
    parser.add_argument("--qwen", type=Path, default=configs.QWEN_TOKENIZER, help="Qwen2.5's tokenizer folder")
    args = parser.parse_args(argv)
    print(build(args.out, args.qwen))


if __name__ == "__main__":
    main()
