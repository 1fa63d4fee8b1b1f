"""`jaxalign generate`: completions from a trained checkpoint of any LM experiment or from a Hugging Face directory.

    jaxalign generate --checkpoint WORKDIR|PHASE_DIR|STEP_DIR [--phase P] [--step N] --prompt TEXT [--prompt ...]
    jaxalign generate --model HF_DIR --prompts FILE.txt|FILE.jsonl [--chat [--system TEXT]] [--out FILE.jsonl]

Greedy by default (--temperature 0); --temperature, --top-k, --top-p and --seed sample. Each completion is printed
as a JSON line {"prompt", "completion"} (and written to --out). See `jaxalign.generation`.
"""
from __future__ import annotations

import argparse
import json
import os


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a work directory, one of its checkpoints/PHASE directories, or a step "
                                             "directory (LoRA adapters are merged into their base)")
    source.add_argument("--model", help="a Hugging Face model directory or a `jaxalign convert` output")
    parser.add_argument("--phase", default=None, help="with a work directory: the phase (default: dpo if it exists, "
                                                      "else the phase written last)")
    parser.add_argument("--step", type=int, default=None, help="the saved step (default: the newest)")
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    prompts.add_argument("--prompts", help="a file: one prompt per line (.txt) or JSON objects with 'prompt' (.jsonl)")
    parser.add_argument("--tokenizer", default=None, help="a tokenizer.json or its directory, or 'char' (the ARITH "
                                                          "task's); default: the run's or the model directory's")
    parser.add_argument("--chat", action="store_true", help="send each prompt as a user turn through the "
                                                            "tokenizer's chat template")
    parser.add_argument("--system", default=None, help="with --chat: a system turn before each prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (the default)")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the completions to this JSONL file (refused if it "
                                                    "exists)")
    return parser


def read_prompts(path: str) -> list[str]:
    """Prompts of a .txt file (one per non-empty line) or a .jsonl file (a "prompt" string per object)."""
    if not os.path.isfile(path):
        raise ValueError(f"--prompts {path}: no such file")
    prompts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            if not path.endswith(".jsonl"):
                prompts.append(line.rstrip("\n"))
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {number}: not valid JSON: {e.msg}") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise ValueError(f"{path} line {number}: expected an object with a string 'prompt'")
            prompts.append(row["prompt"])
    if not prompts:
        raise ValueError(f"{path}: no prompt in the file")
    return prompts


def command(args) -> int:
    from jaxalign.generation import generate_text, load_hf_policy, load_policy  # JAX only once a command runs
    from jaxalign.rundir import strict_json_line
    from jaxalign.sampling import SamplingConfig

    prompts = args.prompt or read_prompts(args.prompts)
    if args.out and os.path.exists(args.out):
        raise ValueError(f"--out {args.out} exists; choose another file (nothing is overwritten)")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p)
    policy = (load_policy(args.checkpoint, args.phase, args.step, args.tokenizer) if args.checkpoint else
              load_hf_policy(args.model, args.tokenizer))
    completions = generate_text(policy, prompts, sampling, args.seed, args.chat, args.system)
    lines = [strict_json_line({"prompt": p, "completion": c}) for p, c in zip(prompts, completions)]
    print("\n".join(lines))
    if args.out:
        with open(args.out, "x", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    return 0
