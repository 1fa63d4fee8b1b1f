"""Inputs for the README's "Your own data and model" walkthrough, written locally (nothing is downloaded):

    python -m launch.demo_files runs/demo

writes runs/demo/hf_model (a tiny random Llama saved by `transformers`, with the sample BPE tokenizer of tests/data)
and runs/demo/pairs.jsonl (400 pairwise rows: "Question: what is a+b?\\nAnswer:", the right sum as chosen, a wrong sum
followed by a hedge as rejected). It stands in for a checkpoint and a data file of your own; needs the `bench` extra
(torch, transformers), which `make` installs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import numpy as np

SAMPLE_TOKENIZER = Path(__file__).resolve().parents[1] / "tests" / "data" / "tokenizer"


def write_model(directory: str, seed: int = 0) -> None:
    """A 2-layer Llama whose vocabulary (320) covers the sample tokenizer's ids, saved as config.json + safetensors."""
    import torch
    import transformers

    config = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      tie_word_embeddings=False)
    torch.manual_seed(seed)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(SAMPLE_TOKENIZER / name, os.path.join(directory, name))


def pair_rows(num_pairs: int, seed: int = 0) -> list[dict]:
    """Addition questions; the rejected answer is wrong and carries a learnable hedge, so DPO has something to learn
    quickly (the point is the pipeline, not model quality)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(num_pairs):
        a, b = (int(x) for x in rng.integers(1, 100, 2))
        rows.append({"prompt": f"Question: what is {a}+{b}?\nAnswer:", "chosen": f" {a + b}",
                     "rejected": f" {a + b + int(rng.integers(1, 9))}, I think"})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="directory to write hf_model/ and pairs.jsonl into")
    parser.add_argument("--pairs", type=int, default=400)
    args = parser.parse_args(argv)
    write_model(os.path.join(args.out, "hf_model"))
    with open(os.path.join(args.out, "pairs.jsonl"), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in pair_rows(args.pairs))
    print(f"wrote {args.out}/hf_model and {args.out}/pairs.jsonl ({args.pairs} pairs)")


if __name__ == "__main__":
    main()
