"""A trained policy written back as a Hugging Face checkpoint (`export.*`), beside the tokenizer it was trained with.

The functions take any config with `model` and `export` sections (`ModelSection`, `ExportSection`).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile

import numpy as np

from jaxalign import paths
from jaxalign.distributed import is_primary
from jaxalign.experiments.files_kit.model import tokenizer_path
from jaxalign.models import hf
from jaxalign.models.llama import ModelConfig

EXPORT_DTYPES = ("float32", "bfloat16")
# Files of a Hugging Face tokenizer copied beside an export, so the exported directory is complete.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


@dataclasses.dataclass(frozen=True)
class ExportSection:
    """enabled: write the trained policy (LoRA adapters merged) to WORKDIR/export as a Hugging Face checkpoint.
    With the work directory on an object store (gs://...) the checkpoint is written to a local temporary directory
    first (the safetensors writer takes local files only) and then copied up file by file through `jaxalign.paths`;
    the temporary directory is removed afterwards.
    family: llama|mistral|qwen2|gemma, default the source model's.
    dtype: float32|bfloat16: the dtype of the exported tensors."""

    enabled: bool = False
    family: str = ""
    dtype: str = "float32"

    def __post_init__(self):
        if self.family and self.family not in hf.FAMILIES:
            raise ValueError(f"export.family must be one of {hf.FAMILIES} (or empty: the source's), got "
                             f"{self.family!r}")
        if self.dtype not in EXPORT_DTYPES:
            raise ValueError(f"export.dtype must be one of {EXPORT_DTYPES}, got {self.dtype!r}")


def check_context(cfg, max_len: int | None) -> None:
    """`data.max_length` must fit the model's positions (None: unknown, checked when the model loads)."""
    if max_len is not None and cfg.data.max_length > max_len:
        raise ValueError(f"data.max_length={cfg.data.max_length} exceeds the model's context of {max_len} "
                         f"positions (max_position_embeddings); set data.max_length <= {max_len}")


def export_family(cfg, family: str | None) -> str | None:
    """The family an export is written as (`export.family`, else the source's), None when not exporting; one clear
    error, before the work directory exists, when neither names one."""
    if not cfg.export.enabled:
        return None
    chosen = cfg.export.family or family
    if chosen is None:
        raise ValueError(f"{cfg.model.path} records no Hugging Face family; set export.family "
                         f"({', '.join(hf.FAMILIES)})")
    return chosen


def export_policy(params, model_cfg: ModelConfig, family: str, cfg, workdir: str, tok) -> dict:
    """Write `params` to WORKDIR/export as a Hugging Face `family` checkpoint with the tokenizer's special-token ids
    (config.json and generation_config.json: transformers' `generate` stops where ours does), plus the tokenizer
    files. On an object store the files are staged locally first (ExportSection)."""
    path = paths.join(workdir, "export")
    staging = path if paths.is_local(path) else tempfile.mkdtemp(prefix="jaxalign-export-")
    try:
        copied = write_export(params, model_cfg, family, cfg, staging, tok)
        if staging != path and is_primary():
            upload_directory(staging, path)
    finally:
        if staging != path:
            shutil.rmtree(staging, ignore_errors=True)
    return {"path": path, "family": family, "dtype": cfg.export.dtype, "tokenizer_files": copied}


def write_export(params, model_cfg: ModelConfig, family: str, cfg, directory: str, tok) -> list[str]:
    """The Hugging Face checkpoint and the tokenizer files (copied from the source, which is local) in the local
    `directory`; returns the tokenizer files' names."""
    import jax.numpy as jnp

    dtype = np.float32 if cfg.export.dtype == "float32" else jnp.bfloat16
    hf.save_pretrained(params, model_cfg, directory, family, dtype=dtype,
                       token_ids={"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id})
    source = tokenizer_path(cfg)
    tokenizer_dir = source if os.path.isdir(source) else os.path.dirname(source)
    copied = []
    if is_primary():
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(tokenizer_dir, name)):
                shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(directory, name))
                copied.append(name)
    return copied


def upload_directory(local_dir: str, target: str) -> None:
    """Copy the files of the flat local directory `local_dir` to `target` (any path `jaxalign.paths` takes), one
    object write each."""
    paths.makedirs(target)
    for name in sorted(os.listdir(local_dir)):
        paths.write_atomic(paths.join(target, name), paths.read_bytes(os.path.join(local_dir, name)))


__all__ = ["EXPORT_DTYPES", "TOKENIZER_FILES", "ExportSection", "check_context", "export_family", "export_policy",
           "upload_directory", "write_export"]
