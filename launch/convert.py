"""`jaxalign convert`: Hugging Face checkpoints <-> jaxalign model directories.

    jaxalign convert hf-to-jaxalign SRC DST [--dtype float32|bfloat16]
    jaxalign convert jaxalign-to-hf SRC DST [--family llama|mistral|qwen2|gemma] [--dtype float32|bfloat16]

SRC/DST of the Hugging Face side: a directory with config.json and model.safetensors (or shards listed in
model.safetensors.index.json), as transformers' save_pretrained writes it. The jaxalign side: a directory with
jaxalign_config.json (the ModelConfig and the family it came from) and params.safetensors (our parameter paths,
e.g. layer_0/attn/q/kernel, float32), see `jaxalign.models.hf.save_native`. --family defaults to the family
recorded when the model was imported. --dtype is the dtype of the tensors written to a Hugging Face checkpoint.
"""
from __future__ import annotations

import argparse
import json

DIRECTIONS = ("hf-to-jaxalign", "jaxalign-to-hf")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("direction", choices=DIRECTIONS)
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--family", default=None, help="jaxalign-to-hf: llama, mistral, qwen2 or gemma "
                        "(default: the family the model was imported from)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="jaxalign-to-hf: dtype of the written tensors")


def command(args) -> int:
    """Run one conversion and print a one-line JSON summary; errors are ValueErrors (one line from the CLI)."""
    import jax.numpy as jnp
    import numpy as np

    from jaxalign.models import hf
    from jaxalign.models.llama import count_params

    if args.direction == "hf-to-jaxalign":
        cfg, family = hf.read_hf_config(args.src)
        params, cfg = hf.from_pretrained(args.src)
        hf.save_native(params, cfg, args.dst, family=family)
    else:
        params, cfg, recorded = hf.load_native(args.src)
        family = args.family or recorded
        if family is None:
            raise ValueError(f"{args.src}: no family recorded with this model; pass --family "
                             f"({', '.join(hf.FAMILIES)})")
        dtype = np.float32 if args.dtype == "float32" else jnp.bfloat16
        hf.save_pretrained(params, cfg, args.dst, family, dtype=dtype)
    print(json.dumps({"direction": args.direction, "src": args.src, "dst": args.dst, "family": family,
                      "parameters": count_params(params)}))
    return 0
