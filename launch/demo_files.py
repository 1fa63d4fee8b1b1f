"""Inputs for the README's walkthroughs ("Use it on your model and data"), written locally (nothing is downloaded):

    python -m launch.demo_files runs/demo

writes runs/demo/hf_model (a tiny random Llama saved by `transformers`, with the sample BPE tokenizer of tests/data)
and one file per preference format, all about additions ("Question: what is a+b?\\nAnswer:"), where a wrong answer
carries a learnable hedge (", I think") so that training has something to learn quickly (the point is the
pipeline, not model quality): pairs.jsonl (pairwise: the right sum chosen, a wrong one rejected), steps.jsonl
(stepwise: a+b+c with the first partial sum as the prefix), lists.jsonl (ranked: four answers scored by minus
their error), labels.jsonl (unpaired: one answer per question, labelled right or wrong) and trajectories.jsonl
(trajectory: two steps, reward 1 when both are right). They stand in for a checkpoint and data files of your own;
needs the `bench` extra (torch, transformers), which `make` installs.
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


def question(a: int, b: int) -> str:
    return f"Question: what is {a}+{b}?\nAnswer:"


def wrong(answer: int, rng: np.random.Generator) -> str:
    return f" {answer + int(rng.integers(1, 9))}, I think"


def pair_rows(num_pairs: int, seed: int = 0) -> list[dict]:
    """pairwise: the right sum chosen, a wrong sum with the hedge rejected."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(num_pairs):
        a, b = (int(x) for x in rng.integers(1, 100, 2))
        rows.append({"prompt": question(a, b), "chosen": f" {a + b}", "rejected": wrong(a + b, rng)})
    return rows


def step_rows(num_rows: int, seed: int = 1) -> list[dict]:
    """stepwise: a+b+c solved in two steps; the first (right) step is the prefix, the second is chosen right or
    rejected wrong."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(num_rows):
        a, b, c = (int(x) for x in rng.integers(1, 50, 3))
        rows.append({"prompt": f"Question: what is {a}+{b}+{c}?\nAnswer:", "prefix": [f" {a}+{b}={a + b};"],
                     "chosen": f" {a + b}+{c}={a + b + c}", "rejected": f" {a + b}+{c}={wrong(a + b + c, rng)[1:]}"})
    return rows


def list_rows(num_rows: int, seed: int = 2) -> list[dict]:
    """ranked: the right sum and three wrong ones, each scored by minus its distance to the right sum."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(num_rows):
        a, b = (int(x) for x in rng.integers(1, 100, 2))
        errors = [0, *(int(e) for e in rng.choice(np.arange(1, 9), 3, replace=False))]
        rows.append({"prompt": question(a, b),
                     "completions": [f" {a + b}" if e == 0 else f" {a + b + e}, I think" for e in errors],
                     "scores": [-float(e) for e in errors]})
    return rows


def label_rows(num_rows: int, seed: int = 3) -> list[dict]:
    """unpaired: one answer per question, right (label true) or wrong with the hedge (false), about half each."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(num_rows):
        a, b = (int(x) for x in rng.integers(1, 100, 2))
        right = bool(rng.random() < 0.5)
        rows.append({"prompt": question(a, b), "completion": f" {a + b}" if right else wrong(a + b, rng),
                     "label": right})
    return rows


def trajectory_rows(num_rows: int, seed: int = 4) -> list[dict]:
    """trajectory: a+b+c in two steps, each wrong with probability 0.3; reward 1 when the final sum is right."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(num_rows):
        a, b, c = (int(x) for x in rng.integers(1, 50, 3))
        s1 = a + b + (int(rng.integers(1, 9)) if rng.random() < 0.3 else 0)
        s2 = s1 + c + (int(rng.integers(1, 9)) if rng.random() < 0.3 else 0)
        rows.append({"prompt": f"Question: what is {a}+{b}+{c}?\nAnswer:",
                     "steps": [f" {a}+{b}={s1};", f" {s1}+{c}={s2}"], "reward": float(s2 == a + b + c)})
    return rows


FILES = {"pairs.jsonl": pair_rows, "steps.jsonl": step_rows, "lists.jsonl": list_rows, "labels.jsonl": label_rows,
         "trajectories.jsonl": trajectory_rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="directory to write hf_model/ and the data files into")
    parser.add_argument("--rows", type=int, default=400, help="rows per data file")
    args = parser.parse_args(argv)
    write_model(os.path.join(args.out, "hf_model"))
    for name, make_rows in FILES.items():
        with open(os.path.join(args.out, name), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in make_rows(args.rows))
    print(f"wrote {args.out}/hf_model and {', '.join(FILES)} ({args.rows} rows each)")


if __name__ == "__main__":
    main()
