"""The user's model: a Hugging Face checkpoint directory or a `jaxalign convert` output, and its tokenizer.

The functions take any config with a `model` section (`ModelSection`), so that every files experiment shares them.
"""
from __future__ import annotations

import dataclasses
import os

from jaxalign.models import hf
from jaxalign.models.llama import ModelConfig


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """path: a Hugging Face checkpoint directory (config.json + model.safetensors or shards) or a `jaxalign convert
        hf-to-jaxalign` output (jaxalign_config.json + params.safetensors); which one is detected from the files.
    tokenizer: a tokenizer.json or the directory holding it (and its tokenizer_config.json); default: `path`.
    dtype: the compute dtype (parameters stay float32).
    remat: recompute each block's activations in the backward pass (less memory, more compute)."""

    path: str = ""
    tokenizer: str = ""
    dtype: str = "float32"
    remat: bool = False


def model_format(path: str) -> str:
    """"jaxalign" for a `jaxalign convert` directory, "hf" for a Hugging Face one; else one clear error."""
    if not os.path.isdir(path):
        raise ValueError(f"model.path={path!r} is not a directory; expected a Hugging Face checkpoint directory "
                         f"(config.json + safetensors) or a `jaxalign convert hf-to-jaxalign` output")
    if os.path.isfile(os.path.join(path, hf.NATIVE_CONFIG)):
        return "jaxalign"
    if os.path.isfile(os.path.join(path, "config.json")):
        return "hf"
    raise ValueError(f"model.path={path!r} holds neither config.json (Hugging Face) nor {hf.NATIVE_CONFIG} "
                     f"(jaxalign convert)")


def tokenizer_path(cfg) -> str:
    """`model.tokenizer`, else the model directory."""
    return cfg.model.tokenizer or cfg.model.path


def load_tokenizer(cfg):
    """The run's tokenizer (`model.tokenizer`, else the model directory's), or one clear error."""
    from jaxalign.data.tokenize import load_hf_tokenizer

    source = tokenizer_path(cfg)
    if not os.path.exists(source):
        raise ValueError(f"model.tokenizer={source!r} does not exist")
    try:
        return load_hf_tokenizer(source)
    except FileNotFoundError as e:
        raise ValueError(f"{e}; set model.tokenizer to the model's tokenizer.json or its directory (a `jaxalign "
                         f"convert` output holds no tokenizer)") from None


def load_model(cfg, mesh=None) -> tuple[dict, ModelConfig, str | None]:
    """(params, ModelConfig, Hugging Face family or None) from `model.path`, sharded over `mesh` when one is given
    (each device reads only its shard), else on the default device."""
    overrides = {"dtype": cfg.model.dtype, "remat": cfg.model.remat}
    if model_format(cfg.model.path) == "jaxalign":
        return hf.load_native(cfg.model.path, mesh=mesh, **overrides)
    _, family = hf.read_hf_config(cfg.model.path)
    params, model_cfg = hf.from_pretrained(cfg.model.path, mesh=mesh, **overrides)
    return params, model_cfg, family


__all__ = ["ModelSection", "load_model", "load_tokenizer", "model_format", "tokenizer_path"]
