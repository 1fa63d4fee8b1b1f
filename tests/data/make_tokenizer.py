"""Builds tests/data/tokenizer/tokenizer.json: a tiny byte-level BPE tokenizer for the data-pipeline tests.

Run once with `python tests/data/make_tokenizer.py`; the result is committed (a few kB), so no test trains or
downloads a tokenizer. Byte-level, so every string is tokenizable; a handful of merges learnt from the sample
files, so that tokens span several characters and token-level prefix extraction is exercised for real. The chat
special tokens are added tokens, matched whole in rendered templates.
"""
from __future__ import annotations

import glob
import json
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

HERE = os.path.dirname(os.path.abspath(__file__))
SPECIAL = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def corpus() -> list[str]:
    """Every string value of the sample preference files (the merges then fit the test data)."""
    texts = []

    def walk(value):
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)

    for path in sorted(glob.glob(os.path.join(HERE, "preferences", "*.jsonl"))):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    walk(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return texts


def main() -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=256 + len(SPECIAL) + 40, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer=trainer)
    out = os.path.join(HERE, "tokenizer")
    os.makedirs(out, exist_ok=True)
    tok.save(os.path.join(out, "tokenizer.json"))


if __name__ == "__main__":
    main()
