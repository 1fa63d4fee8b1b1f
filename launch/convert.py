"""`jaxalign convert`: Hugging Face checkpoints <-> jaxalign model directories.

    jaxalign convert hf-to-jaxalign SRC DST [--overwrite]
    jaxalign convert jaxalign-to-hf SRC DST [--family FAMILY] [--dtype float32|bfloat16] [--overwrite]

FAMILY: llama, mistral, qwen2, qwen3, phi3, gemma, gemma2 or gemma3_text (`jaxalign.models.hf.FAMILIES`).

SRC/DST of the Hugging Face side: a directory with config.json and model.safetensors (or shards listed in
model.safetensors.index.json), as transformers' save_pretrained writes it. The jaxalign side: a directory with
jaxalign_config.json (the ModelConfig and the family it came from) and params.safetensors (our parameter paths,
e.g. layer_0/attn/q/kernel, float32), see `jaxalign.models.hf.save_native`. --family defaults to the family
recorded when the model was imported. --dtype is the dtype of the tensors written to a Hugging Face checkpoint.

DST must not exist or be empty, and is never SRC: a conversion refuses, before it reads or writes anything, to
write over a model. With --overwrite an existing DST is replaced file by file, and only the files an export owns
go: a Hugging Face export removes the earlier *.safetensors shards and model.safetensors.index.json (which the
importer would otherwise read back instead of the new model.safetensors) and merges its config.json into the
existing one, so fields it does not write (bos/eos token ids, ...) are kept; other files (tokenizer, README) stay.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

DIRECTIONS = ("hf-to-jaxalign", "jaxalign-to-hf")
# jaxalign.models.hf.FAMILIES, spelled out so that the CLI's parser does not import JAX (test_convert_families_match
# checks the two agree).
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("direction", choices=DIRECTIONS)
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--family", default=None, choices=FAMILIES,
                        help="jaxalign-to-hf: the Hugging Face family to write (default: the family the model was "
                        "imported from)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="jaxalign-to-hf: dtype of the written tensors")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the model in an existing non-empty DST (other files in it are kept)")


HF_INDEX = "model.safetensors.index.json"
# Fields of an earlier config.json that describe ITS weights and that an export may not write (then they would
# describe the new weights wrongly): dropped on merge. Every other field the export does not write is kept.
WEIGHT_FIELDS = ("rope_scaling", "quantization_config", "torch_dtype")


def check_destination(src: str, dst: str, overwrite: bool) -> None:
    """Refuse SRC == DST (reading and writing one model at once) and, without --overwrite, a DST that already
    holds files: both before anything is read or written."""
    if os.path.exists(src) and os.path.exists(dst) and os.path.samefile(src, dst):
        raise ValueError(f"destination {dst} is the source directory; convert into a new directory")
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise ValueError(f"destination {dst} exists and is not a directory")
    if os.path.isdir(dst) and not overwrite:
        present = sorted(os.listdir(dst))
        if present:
            shown = ", ".join(present[:4]) + (f" and {len(present) - 4} more" if len(present) > 4 else "")
            raise ValueError(f"destination {dst} is not empty ({shown}); pass --overwrite to replace the model in "
                             f"it, or choose a new directory")


def stale_hf_files(dst: Path) -> list[Path]:
    """What a previous Hugging Face export left that the new one does not rewrite: its shards and their index."""
    return sorted(p for p in dst.glob("*.safetensors") if p.name != "model.safetensors") + \
        ([dst / HF_INDEX] if (dst / HF_INDEX).exists() else [])


def read_json_object(path: Path) -> dict:
    """The JSON object in `path` ({} when there is none); a file that is not one is refused, not replaced."""
    if not path.exists():
        return {}
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); move it away or fix it before --overwrite") from e
    if not isinstance(value, dict):
        raise ValueError(f"{path}: not a JSON object; move it away or fix it before --overwrite")
    return value


def export_hf(params, cfg, dst: str, family: str, dtype) -> None:
    """save_pretrained into `dst`, then drop the previous export's stale shards and merge its config.json back
    in: the export's own fields win, the others (bos/eos ids, ...) are kept."""
    from jaxalign.models import hf

    previous = read_json_object(Path(dst) / "config.json")
    hf.save_pretrained(params, cfg, dst, family, dtype=dtype)
    for path in stale_hf_files(Path(dst)):
        path.unlink()
    if previous:
        written = Path(dst) / "config.json"
        kept = {k: v for k, v in previous.items() if k not in WEIGHT_FIELDS}
        merged = {**kept, **json.loads(written.read_text())}
        written.write_text(json.dumps(merged, indent=2, sort_keys=True) + "\n")


def command(args) -> int:
    """Run one conversion and print a one-line JSON summary; errors are ValueErrors (one line from the CLI)."""
    import jax.numpy as jnp
    import numpy as np

    from jaxalign.models import hf
    from jaxalign.models.llama import count_params

    check_destination(args.src, args.dst, args.overwrite)
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
        export_hf(params, cfg, args.dst, family, dtype)
    print(json.dumps({"direction": args.direction, "src": args.src, "dst": args.dst, "family": family,
                      "parameters": count_params(params)}))
    return 0
