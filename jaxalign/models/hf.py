"""Hugging Face checkpoints <-> `DecoderLM`: Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma, Gemma 2 and Gemma 3 (text).

    params, cfg = from_pretrained("path/to/hf_dir", mesh=mesh)      # config.json + *.safetensors
    save_pretrained(params, cfg, "out_dir", family="llama")         # transformers' from_pretrained loads it

What each family needs from `ModelConfig` (read from transformers 5.24's modeling_<family>.py):

- llama: the default decoder; `attention_bias` -> `qkv_bias` and `out_bias`; `mlp_bias` is not supported.
- mistral: the default decoder plus `sliding_window` (masking_utils.sliding_window_overlay: kv_idx > q_idx - w).
- qwen2: biases on q/k/v only (`qkv_bias`); the sliding window (only with `use_sliding_window`) on the layers
  `layer_types` marks "sliding_attention", derived as configuration_qwen2 does (layers >= `max_window_layers`)
  when config.json lists none: one window for every layer, or mixed full/sliding layers (`layer_types`).
- gemma: RMSNorm gain (1 + w) (`norm_unit_offset`), embeddings times sqrt(hidden_size) (`embed_scale`), GeGLU with
  the tanh GELU (`activation="gelu_tanh"`), tied embeddings, `head_dim` independent of hidden_size.
- qwen3: Qwen2 without the q/k/v biases (`attention_bias` sets all four) and with per-head q/k RMSNorm (`qk_norm`);
  sliding layers as for qwen2.
- phi3: the Llama decoder with fused projections: `qkv_proj` (rows q, k, v) and `gate_up_proj` (rows gate, up) are
  split into our separate kernels on import and fused again on export (`TensorSpec.rows`); its optional sliding
  window applies to every layer. Only the default rotary embedding (Phi-3's "longrope" is refused).
- gemma2: gemma plus post-attention/post-MLP norms (`sandwich_norms`), `query_pre_attn_scalar`, attention and final
  logit soft-capping, and alternating sliding-window/full layers (`layer_types`).
- gemma3_text: gemma2's layout plus per-head q/k norms (with the (1 + w) gain), a sliding-window pattern
  (`layer_types`), and two rotary bases: `rope_parameters["sliding_attention"]` (default rotary, `rope_local_theta`)
  and `rope_parameters["full_attention"]` (any supported scaling).

Rotary scaling (`rope_parameters` / legacy `rope_scaling`): "linear", "dynamic", "yarn" and "llama3" as transformers
5.24's modeling_rope_utils defines them (see `jaxalign.models.llama.rope_inverse_frequencies`); "longrope" and any
other type, and `partial_rotary_factor` != 1, are refused naming config.json and the field.

Rotary layout: Hugging Face applies rotary embeddings with `rotate_half` (channel i pairs with i + head_dim/2) and
stores q_proj/k_proj in that layout; `jaxalign.models.llama.rotary_embedding` uses the same half-split pairing, so
the q/k weights convert by transposition and reshape alone, with no permutation (whatever the rotary scaling,
which changes only the frequencies).

Weight layout: a Hugging Face `nn.Linear` stores [out, in]; our kernels are [in, out...] (flax), with the head
dimension split out: q/k/v kernels [d_model, heads, head_dim], the output kernel [heads, head_dim, d_model]. Each
of our leaves is `transpose(reshape(hf_tensor, view), perm)` (`TensorSpec`; for a fused tensor, of a block of its
rows), which is also how a shard of a leaf is read: `make_array_from_callback` asks for an index of our array,
`_hf_slices` turns it into a contiguous slice of the Hugging Face tensor, and `safe_open(...).get_slice` reads just
that from the file, so no process ever holds more of the model than its own shards.

Parameters are stored in `param_dtype` (float32 by default, the project's convention); `dtype` is the compute
dtype of the returned `ModelConfig`. Tokenizer files and generation settings are not converted.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxalign.models.llama import ROPE_TYPES, ModelConfig, check_model_fits_mesh, init_params
from jaxalign.models.rope import yarn_attention_factor
from jaxalign.sharding import logical_shardings

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "phi3": "Phi3ForCausalLM", "gemma": "GemmaForCausalLM",
                 "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
# The defaults of the transformers config classes (configuration_<family>.py, transformers 5.24) for the fields we
# read, so that a config.json that omits a field means what it means to transformers.
HF_DEFAULTS = {
    "llama": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
              "num_attention_heads": 32, "hidden_act": "silu", "max_position_embeddings": 2048,
              "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False},
    "mistral": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_act": "silu",
                "max_position_embeddings": 4096 * 32, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                "sliding_window": 4096},
    "qwen2": {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 32, "hidden_act": "silu",
              "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
              "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28},
    "gemma": {"vocab_size": 256000, "hidden_size": 3072, "intermediate_size": 24576, "num_hidden_layers": 28,
              "num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": 256, "hidden_act": "gelu_pytorch_tanh",
              "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
              "attention_bias": False},
    "qwen3": {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128, "hidden_act": "silu",
              "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
              "attention_bias": False, "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28},
    "phi3": {"vocab_size": 32064, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
             "num_attention_heads": 32, "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
             "tie_word_embeddings": False, "sliding_window": None},
    "gemma2": {"vocab_size": 256000, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
               "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
               "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 8192, "rms_norm_eps": 1e-6,
               "tie_word_embeddings": True, "attention_bias": False, "query_pre_attn_scalar": 256,
               "sliding_window": 4096, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0},
    "gemma3_text": {"vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
                    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
                    "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 131072,
                    "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "attention_bias": False,
                    "query_pre_attn_scalar": 256, "sliding_window": 4096, "final_logit_softcapping": None,
                    "attn_logit_softcapping": None, "sliding_window_pattern": 6},
}
# Families whose MLP activation is named `hidden_activation` in config.json (transformers' Gemma 2/3 configs).
ACTIVATION_KEY = {"gemma2": "hidden_activation", "gemma3_text": "hidden_activation"}
# The rotary bases transformers' Gemma3TextConfig uses when config.json names none (default_theta).
GEMMA3_THETA = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}
HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}
# safetensors dtypes NumPy cannot name (read through the flax reader instead).
NUMPY_UNNAMED = ("BF16", "F8_E4M3", "F8_E5M2")
# Tensors some checkpoints carry that the model recomputes (rotary inverse frequencies); skipped by name.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


class CheckpointFormatError(ValueError):
    """A checkpoint directory that cannot be converted; the message names the file, the tensor and the value."""


def open_safetensors(path: str | os.PathLike, framework: str = "numpy"):
    """`safe_open(path)`, with a missing, truncated or corrupt file reported as one CheckpointFormatError naming
    the file: the library's own error names neither the file nor what to do. Every problem with a file's header
    or length shows up here, on opening, because safetensors checks that the header's offsets cover the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointFormatError(f"{path}: missing (or not a file)")
    try:
        return safe_open(path, framework=framework)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError, an Exception subclass
        detail = str(e).removeprefix("Error while deserializing header: ")
        raise CheckpointFormatError(f"{path}: not a valid safetensors file ({detail}; {path.stat().st_size} bytes): "
                                    "it is truncated or corrupt; copy or export it again") from None


# ------------------------------------------------------------------------------------------------------ configs


def _rope_fields(params: Any, hf: dict, max_len: int, source: str, key: str = "rope_parameters") -> dict:
    """ModelConfig rotary fields from one rope-parameters dict (transformers >= 5 `rope_parameters`, or the older
    `rope_scaling` with a top-level `rope_theta`), resolved the way transformers 5.24's modeling_rope_utils does
    (e.g. yarn's attention factor from factor/mscale, `original_max_position_embeddings` from the top level first).
    Unknown rope types and `partial_rotary_factor` != 1 are refused naming `source` and the field."""
    params = params or {}
    if not isinstance(params, dict):
        raise CheckpointFormatError(f"{source}: {key} must be a JSON object, got {params!r}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    fields: dict[str, Any] = {"rope_theta": float(params.get("rope_theta", hf.get("rope_theta", 10_000.0)))}
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise CheckpointFormatError(f"{source}: {key}.partial_rotary_factor={partial!r} is not supported; only "
                                    "rotary embeddings over the whole head (1.0) convert")
    if rope_type == "default":
        return fields
    if rope_type not in ROPE_TYPES:
        raise CheckpointFormatError(f"{source}: {key}.rope_type {rope_type!r} is not supported; expected one of "
                                    f"{', '.join(ROPE_TYPES)}")

    def need(name):
        if params.get(name) is None:
            raise CheckpointFormatError(f"{source}: {key}.{name} is missing (rope_type {rope_type!r} needs it)")
        return params[name]

    original = hf.get("original_max_position_embeddings") or params.get("original_max_position_embeddings") or max_len
    fields.update(rope_type=rope_type)
    if rope_type == "linear":
        fields.update(rope_factor=float(need("factor")))
    elif rope_type == "dynamic":  # transformers scales against max_position_embeddings itself
        fields.update(rope_factor=float(need("factor")), rope_original_max_len=int(max_len))
    elif rope_type == "llama3":
        fields.update(rope_factor=float(need("factor")), rope_low_freq_factor=float(need("low_freq_factor")),
                      rope_high_freq_factor=float(need("high_freq_factor")), rope_original_max_len=int(original))
    else:  # yarn
        factor = params.get("factor")
        factor = float(max_len / original if factor is None else factor)
        attention = params.get("attention_factor")
        if attention is None:
            attention = yarn_attention_factor(factor, params.get("mscale"), params.get("mscale_all_dim"))
        fields.update(rope_factor=factor, rope_original_max_len=int(original),
                      rope_beta_fast=float(params.get("beta_fast") or 32), rope_beta_slow=float(params.get("beta_slow")
                                                                                                 or 1),
                      rope_truncate=bool(params.get("truncate", True)), rope_attention_factor=float(attention))
    return fields


def _rope_config(hf: dict, family: str, max_len: int, source: str) -> dict:
    """The rotary fields of `family`'s config.json (Gemma 3: one dict per layer type; Phi-3: default only)."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling")
    if family != "gemma3_text":
        fields = _rope_fields(params, hf, max_len, source)
        if family == "phi3" and "rope_type" in fields:
            raise CheckpointFormatError(f"{source}: rope_parameters.rope_type {fields['rope_type']!r} is not "
                                        "supported for phi3 (transformers reads Phi-3's yarn/su as longrope); only "
                                        "the default rotary embedding converts")
        return fields
    if isinstance(params, dict) and ("full_attention" in params or "sliding_attention" in params):
        full, local = params.get("full_attention") or {}, params.get("sliding_attention") or {}
    else:  # legacy: rope_theta/rope_scaling for global layers, rope_local_base_freq for local ones
        full = {**(hf.get("rope_scaling") or {}), "rope_theta": hf.get("rope_theta", GEMMA3_THETA["full_attention"])}
        local = {"rope_type": "default", "rope_theta": hf.get("rope_local_base_freq",
                                                              GEMMA3_THETA["sliding_attention"])}
    full = {"rope_theta": GEMMA3_THETA["full_attention"], **full}
    local = {"rope_theta": GEMMA3_THETA["sliding_attention"], **local}
    fields = _rope_fields(full, {}, max_len, source, "rope_parameters.full_attention")
    local_fields = _rope_fields(local, {}, max_len, source, "rope_parameters.sliding_attention")
    if "rope_type" in local_fields:
        raise CheckpointFormatError(f"{source}: rope_parameters.sliding_attention.rope_type "
                                    f"{local_fields['rope_type']!r} is not supported; the sliding layers convert "
                                    "with the default rotary embedding only")
    fields["rope_local_theta"] = local_fields["rope_theta"]
    return fields


def _layer_types(hf: dict, get, family: str, n_layers: int, source: str) -> list[str]:
    """Per-layer attention types as transformers derives them when config.json has no `layer_types`."""
    types = hf.get("layer_types")
    if types is None:
        if family in ("qwen2", "qwen3"):
            start = get("max_window_layers")
            types = ["sliding_attention" if i >= start else "full_attention" for i in range(n_layers)]
        elif family == "gemma2":
            types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n_layers)]
        else:
            pattern = get("sliding_window_pattern")
            types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)]
    if not isinstance(types, list) or len(types) != n_layers or not set(types) <= {"sliding_attention",
                                                                                    "full_attention"}:
        raise CheckpointFormatError(f"{source}: layer_types must list 'sliding_attention' or 'full_attention' for "
                                    f"each of the {n_layers} layers, got {types!r}")
    return types


def _window_fields(hf: dict, get, family: str, n_layers: int, source: str) -> dict:
    """sliding_window and layer_types for the families with per-layer attention types; a uniform model keeps
    layer_types None (one window for every layer, or none)."""
    window = get("sliding_window")
    if family in ("qwen2", "qwen3") and not get("use_sliding_window"):
        window = None  # configuration_qwen2: sliding_window is dropped unless use_sliding_window
    if family in ("gemma2", "gemma3_text") and hf.get("use_bidirectional_attention"):
        raise CheckpointFormatError(f"{source}: use_bidirectional_attention=true is not supported (the decoder is "
                                    "causal)")
    types = _layer_types(hf, get, family, n_layers, source)
    if window is None or all(t == "full_attention" for t in types):
        return {"sliding_window": None}
    if all(t == "sliding_attention" for t in types):
        return {"sliding_window": window}
    return {"sliding_window": window, "layer_types": tuple(types)}


def config_from_hf(hf: dict, source: str = "config.json", **overrides) -> tuple[ModelConfig, str]:
    """(ModelConfig, family) for a Hugging Face config.json dict; `overrides` set ModelConfig fields such as dtype,
    remat or scan_layers. Unknown model types and unsupported switches raise CheckpointFormatError naming `source`."""
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise CheckpointFormatError(f"{source}: model_type {family!r} is not supported; expected one of "
                                    f"{', '.join(FAMILIES)}")
    get = lambda key: hf.get(key, HF_DEFAULTS[family].get(key))  # noqa: E731
    heads = get("num_attention_heads")
    act = get(ACTIVATION_KEY.get(family, "hidden_act"))
    if family == "gemma" and act == "gelu":  # transformers' GemmaConfig maps the legacy value to the tanh GELU
        act = "gelu_pytorch_tanh"
    if act not in HF_ACTIVATIONS:
        raise CheckpointFormatError(f"{source}: hidden_act {act!r} is not supported; expected one of "
                                    f"{', '.join(HF_ACTIVATIONS)}")
    fields = dict(
        vocab_size=get("vocab_size"), d_model=get("hidden_size"), n_layers=get("num_hidden_layers"),
        n_heads=heads, n_kv_heads=hf.get("num_key_value_heads") or HF_DEFAULTS[family].get("num_key_value_heads",
                                                                                              heads),
        head_dim=hf.get("head_dim") or HF_DEFAULTS[family].get("head_dim", get("hidden_size") // heads),
        mlp_dim=get("intermediate_size"), max_len=get("max_position_embeddings"),
        norm_eps=float(get("rms_norm_eps")), **_rope_config(hf, family, get("max_position_embeddings"), source),
        tie_embeddings=bool(get("tie_word_embeddings")), activation=HF_ACTIVATIONS[act],
    )
    if family in ("llama", "gemma", "qwen3", "gemma2", "gemma3_text"):
        bias = bool(get("attention_bias"))
        fields.update(qkv_bias=bias, out_bias=bias)
    if family == "llama" and get("mlp_bias"):
        raise CheckpointFormatError(f"{source}: mlp_bias=true is not supported (the MLP has no biases)")
    if family == "gemma":
        fields.update(norm_unit_offset=True, embed_scale=True)
    if family == "mistral":
        fields.update(sliding_window=get("sliding_window"))
    if family == "qwen2":
        fields.update(qkv_bias=True, **_window_fields(hf, get, family, fields["n_layers"], source))
    if family == "qwen3":
        fields.update(qk_norm=True, **_window_fields(hf, get, family, fields["n_layers"], source))
    if family == "phi3":
        fields.update(sliding_window=get("sliding_window"))
    if family in ("gemma2", "gemma3_text"):
        fields.update(norm_unit_offset=True, embed_scale=True, sandwich_norms=True, qk_norm=family == "gemma3_text",
                      query_pre_attn_scalar=float(get("query_pre_attn_scalar")),
                      attn_logit_softcap=_optional_float(get("attn_logit_softcapping")),
                      final_logit_softcap=_optional_float(get("final_logit_softcapping")),
                      **_window_fields(hf, get, family, fields["n_layers"], source))
    fields.update(overrides)
    try:
        return ModelConfig(**fields), family
    except (TypeError, ValueError) as e:
        raise CheckpointFormatError(f"{source}: {e}") from e


def _optional_float(value) -> float | None:
    return None if value is None else float(value)


# What each family fixes: {field: value the family requires}; fields a family cannot express at all start from
# NEUTRAL (today's Llama decoder), so e.g. q/k norms never leave silently through a llama export.
NEUTRAL = {"qk_norm": False, "sandwich_norms": False, "attn_logit_softcap": None, "final_logit_softcap": None,
           "query_pre_attn_scalar": None, "rope_local_theta": None, "layer_types": None}
# Families whose config.json has per-layer attention types.
LAYER_TYPED = ("qwen2", "qwen3", "gemma2", "gemma3_text")


def _family_requirements(cfg: ModelConfig, family: str) -> dict:
    gemma_like = {"norm_unit_offset": True, "embed_scale": True, "activation": "gelu_tanh", "out_bias": cfg.qkv_bias}
    llama_like = {"norm_unit_offset": False, "embed_scale": False, "activation": "silu"}
    want = {
        "llama": {**llama_like, "sliding_window": None, "out_bias": cfg.qkv_bias},
        "mistral": {**llama_like, "qkv_bias": False, "out_bias": False},
        "qwen2": {**llama_like, "qkv_bias": True, "out_bias": False},
        "qwen3": {**llama_like, "out_bias": cfg.qkv_bias, "qk_norm": True},
        "phi3": {**llama_like, "qkv_bias": False, "out_bias": False, "rope_type": "default"},
        "gemma": {**gemma_like, "sliding_window": None, "tie_embeddings": True},
        "gemma2": {**gemma_like, "sandwich_norms": True},
        "gemma3_text": {**gemma_like, "sandwich_norms": True, "qk_norm": True},
    }[family]
    free = {"layer_types"} if family in LAYER_TYPED else set()
    if family in ("gemma2", "gemma3_text"):
        free |= {"attn_logit_softcap", "final_logit_softcap", "query_pre_attn_scalar"}
    if family == "gemma3_text" and (cfg.rope_local_theta is not None or cfg.rope_type == "default"):
        free.add("rope_local_theta")  # without one, the sliding layers share the (unscaled) global base
    return {**want, **{k: v for k, v in NEUTRAL.items() if k not in free and k not in want}}


def _rope_to_hf(cfg: ModelConfig) -> dict:
    """The rope-parameters dict of `cfg`'s global (or only) rotary embedding, as transformers reads it."""
    params: dict[str, Any] = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
    if cfg.rope_type in ("linear", "dynamic"):
        params["factor"] = cfg.rope_factor
    elif cfg.rope_type == "llama3":
        params.update(factor=cfg.rope_factor, low_freq_factor=cfg.rope_low_freq_factor,
                      high_freq_factor=cfg.rope_high_freq_factor,
                      original_max_position_embeddings=cfg.rope_original_max_len)
    elif cfg.rope_type == "yarn":
        params.update(factor=cfg.rope_factor, original_max_position_embeddings=cfg.rope_original_max_len,
                      beta_fast=cfg.rope_beta_fast, beta_slow=cfg.rope_beta_slow, truncate=cfg.rope_truncate,
                      attention_factor=cfg.rope_attention_factor)
    return params


def config_to_hf(cfg: ModelConfig, family: str) -> dict:
    """The config.json transformers needs to build `family`'s model from `cfg`; refuses a cfg the family cannot
    express, naming the field."""
    if family not in FAMILIES:
        raise ValueError(f"family {family!r} is not supported; expected one of {', '.join(FAMILIES)}")
    for name, value in _family_requirements(cfg, family).items():
        if getattr(cfg, name) != value:
            raise ValueError(f"model.{name}={getattr(cfg, name)!r} cannot be written as a {family} checkpoint; "
                             f"the {family} family requires {name}={value!r}")
    rope = _rope_to_hf(cfg)
    # Dynamic NTK scales against max_position_embeddings itself, so that is where its original length goes.
    max_len = cfg.rope_original_max_len if cfg.rope_type == "dynamic" else cfg.max_len
    hf = {
        "architectures": [ARCHITECTURES[family]], "model_type": family, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": cfg.mlp_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        ACTIVATION_KEY.get(family, "hidden_act"): {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh"}[cfg.activation],
        "max_position_embeddings": max_len, "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": rope, "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings, "dtype": "float32",
    }
    types = ["sliding_attention" if cfg.windowed(i) else "full_attention" for i in range(cfg.n_layers)]
    if family in ("llama", "gemma", "qwen3", "gemma2", "gemma3_text"):
        hf["attention_bias"] = cfg.qkv_bias
    if family == "llama":
        hf["mlp_bias"] = False
    if family in ("mistral", "phi3"):
        hf["sliding_window"] = cfg.sliding_window
    if family in ("qwen2", "qwen3"):
        windowed = cfg.sliding_window is not None
        hf.update(use_sliding_window=windowed, sliding_window=cfg.sliding_window, max_window_layers=0,
                  layer_types=types)
    if family in ("gemma2", "gemma3_text"):
        scalar = cfg.head_dim if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar
        hf.update(query_pre_attn_scalar=int(scalar) if float(scalar).is_integer() else scalar,  # an int field there
                  attn_logit_softcapping=cfg.attn_logit_softcap, final_logit_softcapping=cfg.final_logit_softcap,
                  sliding_window=cfg.sliding_window or HF_DEFAULTS[family]["sliding_window"], layer_types=types,
                  use_bidirectional_attention=False)
    if family == "gemma3_text":
        local = cfg.rope_theta if cfg.rope_local_theta is None else cfg.rope_local_theta
        hf["rope_parameters"] = {"full_attention": rope,
                                 "sliding_attention": {"rope_type": "default", "rope_theta": local}}
        del hf["rope_theta"]
    return hf


# ------------------------------------------------------------------------------------------------------ layout


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One of our parameters as Hugging Face tensors: ours = transpose(reshape(hf, view), perm).

    `names` has one Hugging Face tensor per layer for a scanned (stacked) leaf, else one name. `rows` = (start,
    total) when the Hugging Face tensor is a fused one (Phi-3's qkv_proj, gate_up_proj): ours is its rows
    [start, start + hf_shape[0]) of `total`.
    """

    names: tuple[str, ...]
    hf_shape: tuple[int, ...]
    view: tuple[int, ...]
    perm: tuple[int, ...]
    stacked: bool = False
    rows: tuple[int, int] | None = None

    @property
    def file_shape(self) -> tuple[int, ...]:
        """The shape of the tensor in the checkpoint (the whole fused tensor for `rows`)."""
        return self.hf_shape if self.rows is None else (self.rows[1],) + self.hf_shape[1:]

    @property
    def shape(self) -> tuple[int, ...]:
        """Our array's shape."""
        own = tuple(self.view[p] for p in self.perm)
        return ((len(self.names),) + own) if self.stacked else own


def _layer_specs(cfg: ModelConfig, prefix: str, fused: bool = False) -> dict[tuple[str, ...], TensorSpec]:
    """{our path inside a block: spec} for Hugging Face layer `prefix` (e.g. "model.layers.3"); `fused`: Phi-3's
    qkv_proj and gate_up_proj."""
    d, h, kv, hd, m = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_dim
    attn = f"{prefix}.self_attn"
    norm = lambda name: TensorSpec((f"{prefix}.{name}.weight",), (d,), (d,), (0,))  # noqa: E731
    specs = {("attn_norm", "scale"): norm("input_layernorm")}
    if cfg.sandwich_norms:  # Gemma 2/3: the MLP's pre-norm is pre_feedforward_layernorm
        specs.update({("attn_post_norm", "scale"): norm("post_attention_layernorm"),
                      ("mlp_norm", "scale"): norm("pre_feedforward_layernorm"),
                      ("mlp_post_norm", "scale"): norm("post_feedforward_layernorm")})
    else:
        specs[("mlp_norm", "scale")] = norm("post_attention_layernorm")
    specs.update({
        ("attn", "o", "kernel"): TensorSpec((f"{attn}.o_proj.weight",), (d, h * hd), (d, h, hd), (1, 2, 0)),
        ("mlp", "gate", "kernel"): TensorSpec((f"{prefix}.mlp.gate_proj.weight",), (m, d), (m, d), (1, 0)),
        ("mlp", "up", "kernel"): TensorSpec((f"{prefix}.mlp.up_proj.weight",), (m, d), (m, d), (1, 0)),
        ("mlp", "down", "kernel"): TensorSpec((f"{prefix}.mlp.down_proj.weight",), (d, m), (d, m), (1, 0)),
    })
    if cfg.qk_norm:
        for name in ("q", "k"):
            specs[("attn", f"{name}_norm", "scale")] = TensorSpec((f"{attn}.{name}_norm.weight",), (hd,), (hd,), (0,))
    if fused:  # rows of the fused tensors: q, k, v (modeling_phi3: split at h*hd and h*hd + kv*hd); gate, up
        qkv_rows = (h + 2 * kv) * hd
        for name, start in (("gate", 0), ("up", m)):
            specs[("mlp", name, "kernel")] = TensorSpec((f"{prefix}.mlp.gate_up_proj.weight",), (m, d), (m, d),
                                                        (1, 0), rows=(start, 2 * m))
        for name, heads, start in (("q", h, 0), ("k", kv, h * hd), ("v", kv, (h + kv) * hd)):
            specs[("attn", name, "kernel")] = TensorSpec((f"{attn}.qkv_proj.weight",), (heads * hd, d),
                                                         (heads, hd, d), (2, 0, 1), rows=(start, qkv_rows))
        return specs
    for name, heads in (("q", h), ("k", kv), ("v", kv)):
        specs[("attn", name, "kernel")] = TensorSpec((f"{attn}.{name}_proj.weight",), (heads * hd, d),
                                                     (heads, hd, d), (2, 0, 1))
        if cfg.qkv_bias:
            specs[("attn", name, "bias")] = TensorSpec((f"{attn}.{name}_proj.bias",), (heads * hd,), (heads, hd),
                                                       (0, 1))
    if cfg.out_bias:
        specs[("attn", "o", "bias")] = TensorSpec((f"{attn}.o_proj.bias",), (d,), (d,), (0,))
    return specs


def hf_layout(cfg: ModelConfig, family: str | None = None) -> dict[tuple[str, ...], TensorSpec]:
    """{path of our parameter (as in init_params): TensorSpec} for every parameter of `cfg`'s DecoderLM, as
    `family`'s checkpoint stores it (the families differ only in Phi-3's fused projections)."""
    specs = {
        ("embed", "embedding"): TensorSpec(("model.embed_tokens.weight",), (cfg.vocab_size, cfg.d_model),
                                           (cfg.vocab_size, cfg.d_model), (0, 1)),
        ("final_norm", "scale"): TensorSpec(("model.norm.weight",), (cfg.d_model,), (cfg.d_model,), (0,)),
    }
    if not cfg.tie_embeddings:
        specs[("lm_head", "kernel")] = TensorSpec(("lm_head.weight",), (cfg.vocab_size, cfg.d_model),
                                                  (cfg.vocab_size, cfg.d_model), (1, 0))
    per_layer = [_layer_specs(cfg, f"model.layers.{i}", fused=family == "phi3") for i in range(cfg.n_layers)]
    for path, first in per_layer[0].items():
        if cfg.scan_layers:
            names = tuple(layer[path].names[0] for layer in per_layer)
            specs[("layers",) + path] = dataclasses.replace(first, names=names, stacked=True)
        else:
            for i, layer in enumerate(per_layer):
                specs[(f"layer_{i}",) + path] = layer[path]
    return specs


def _groups(hf_shape: tuple[int, ...], view: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Which view dimensions each Hugging Face dimension splits into, e.g. (12, 8) -> (3, 4, 8): [(3, 4), (8,)]."""
    groups, v = [], 0
    for size in hf_shape:
        group = []
        while math.prod(group) < size or not group:
            group.append(view[v])
            v += 1
        if math.prod(group) != size:
            raise AssertionError(f"view {view} does not split {hf_shape}")
        groups.append(tuple(group))
    return groups


def _hf_slices(spec: TensorSpec, index: tuple[slice, ...]):
    """For `index` into our (unstacked) array: the contiguous slice of the Hugging Face tensor that holds it, the
    shape to reshape the read block to, and the slices that then cut it down to exactly `index` (view order)."""
    view_index = [None] * len(spec.view)
    for i, s in enumerate(index):
        view_index[spec.perm[i]] = s
    hf_index, block, rest, v = [], [], [], 0
    for group in _groups(spec.hf_shape, spec.view):
        outer = view_index[v]
        inner = math.prod(group[1:])
        hf_index.append(slice(outer.start * inner, outer.stop * inner))
        block.append(outer.stop - outer.start)
        rest.append(slice(None))
        for k, size in enumerate(group[1:], start=1):
            block.append(size)
            rest.append(view_index[v + k])
        v += len(group)
    return tuple(hf_index), tuple(block), tuple(rest)


# ------------------------------------------------------------------------------------------------------ reading


class SafetensorsReader:
    """The tensors of a Hugging Face checkpoint directory: model.safetensors, or the shards a
    model.safetensors.index.json lists (or, with neither, every *.safetensors file). Use as a context manager."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointFormatError(f"{index}: not a safetensors index (expected a JSON object with a "
                                            f"'weight_map'): {e}") from e
            self.where = {name: self.directory / file for name, file in weight_map.items()}
            self.described = str(index)
        else:
            files = sorted(self.directory.glob("*.safetensors"))
            if not files:
                raise CheckpointFormatError(f"{self.directory}: no model.safetensors, model.safetensors.index.json "
                                            "or other *.safetensors file")
            self.where = {}
            for file in files:
                with open_safetensors(file) as f:
                    self.where.update({name: file for name in f.keys()})
            self.described = ", ".join(str(f) for f in files)
        self._stack = contextlib.ExitStack()
        self._open: dict[Path, Any] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stack.close()

    def _file(self, name: str, framework: str = "numpy"):
        path = self.where[name]
        if (path, framework) not in self._open:
            if not path.exists():
                raise CheckpointFormatError(f"{path}: listed for tensor {name!r} in {self.described} but missing")
            self._open[path, framework] = self._stack.enter_context(open_safetensors(path, framework))
        return self._open[path, framework]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._file(name).get_slice(name).get_shape())

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """The block `index` (contiguous slices) of tensor `name`, as a host NumPy array."""
        tensor = self._file(name).get_slice(name)
        if tensor.get_dtype() not in NUMPY_UNNAMED:
            return tensor[index]
        # NumPy has no name for bfloat16/float8, so safetensors' numpy reader refuses them; its flax reader returns
        # a JAX array, made on the host CPU device when there is one and pulled back to NumPy at once.
        cpus = [d for d in jax.local_devices() if d.platform == "cpu"] or _cpu_devices()
        with jax.default_device(cpus[0] if cpus else None):
            return np.asarray(self._file(name, "flax").get_slice(name)[index])

    def check(self, layout: dict[tuple[str, ...], TensorSpec], family: str) -> None:
        """Every tensor the layout needs exists with its shape, and nothing else is in the checkpoint (except
        rotary frequency buffers, and lm_head.weight of a tied model, which transformers ignores too)."""
        needed = set()
        for spec in layout.values():
            for name in spec.names:
                needed.add(name)
                if name not in self.where:
                    raise CheckpointFormatError(f"{self.described}: tensor {name!r} is missing (a {family} model "
                                                f"with this config.json needs it)")
                found = self.shape(name)
                if found != spec.file_shape:
                    raise CheckpointFormatError(f"{self.where[name]}: tensor {name!r} has shape {list(found)}, "
                                                f"expected {list(spec.file_shape)} from config.json")
        extra = sorted(n for n in self.where if n not in needed and not n.endswith(IGNORED_SUFFIXES)
                       and not (n == "lm_head.weight" and ("embed", "embedding") in layout
                                and ("lm_head", "kernel") not in layout))
        if extra:
            raise CheckpointFormatError(f"{self.where[extra[0]]}: tensor {extra[0]!r} is not part of a {family} "
                                        f"model with this config.json ({len(extra)} unexpected tensors: "
                                        f"{', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''})")


def _cpu_devices() -> list:
    try:
        return jax.local_devices(backend="cpu")
    except RuntimeError:  # JAX_PLATFORMS without cpu
        return []


def _normalise(index: tuple, shape: tuple[int, ...]) -> tuple[slice, ...]:
    out = []
    for s, n in zip(tuple(index) + (slice(None),) * (len(shape) - len(index)), shape):
        start, stop, step = s.indices(n)
        if step != 1:
            raise AssertionError(f"strided shard index {s}")
        out.append(slice(start, stop))
    return tuple(out)


def read_shard(reader: SafetensorsReader, spec: TensorSpec, index: tuple, dtype) -> np.ndarray:
    """The part `index` of our array for `spec`, read from the checkpoint slice by slice."""
    index = _normalise(index, spec.shape)
    layers = range(len(spec.names))[index[0]] if spec.stacked else [0]
    own_index = index[1:] if spec.stacked else index
    hf_index, block, rest = _hf_slices(spec, own_index)
    if spec.rows is not None:
        first = hf_index[0]
        hf_index = (slice(first.start + spec.rows[0], first.stop + spec.rows[0]),) + hf_index[1:]
    parts = [reader.read(spec.names[i], hf_index).reshape(block)[rest].transpose(spec.perm).astype(dtype)
             for i in layers]
    return np.stack(parts) if spec.stacked else parts[0]


# ------------------------------------------------------------------------------------------------------ loading


def _target_shardings(cfg: ModelConfig, mesh) -> dict:
    """{path: Sharding} of every parameter: from the logical axis rules on a mesh, else the first local device."""
    abstract = jax.eval_shape(lambda key: init_params(cfg, key), jax.random.key(0))
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        tree = jax.tree_util.tree_map(lambda _: device, _unbox(abstract))
    else:
        check_model_fits_mesh(cfg, mesh)
        tree = logical_shardings(abstract, mesh)
    return _flatten(tree)


def _unbox(tree):
    return nn.meta.unbox(tree)


def _flatten(tree: Any) -> dict[tuple[str, ...], Any]:
    """{path of keys: leaf} of a nested mapping (a parameter tree)."""
    flat = {}

    def visit(node, path):
        if isinstance(node, Mapping):
            for key, value in node.items():
                visit(value, path + (str(key),))
        else:
            flat[path] = node

    visit(tree, ())
    return flat


def _unflatten(flat: dict[tuple[str, ...], Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def read_hf_config(path: str | os.PathLike, **overrides) -> tuple[ModelConfig, str]:
    """(ModelConfig, family) from `path`/config.json."""
    file = Path(path) / "config.json"
    if not file.exists():
        raise CheckpointFormatError(f"{file}: missing (a Hugging Face checkpoint directory needs its config.json)")
    try:
        hf = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointFormatError(f"{file}: not valid JSON: {e}") from e
    return config_from_hf(hf, str(file), **overrides)


def load_params(reader: SafetensorsReader, layout: dict, cfg: ModelConfig, mesh=None, param_dtype=jnp.float32):
    """Build every parameter with `jax.make_array_from_callback`, reading only each device's shard."""
    shardings = _target_shardings(cfg, mesh)
    if set(shardings) != set(layout):
        raise AssertionError(f"layout {sorted(set(layout) ^ set(shardings))} out of step with DecoderLM")
    dtype = np.dtype(param_dtype)
    flat = {path: jax.make_array_from_callback(spec.shape, shardings[path],
                                               lambda index, spec=spec: read_shard(reader, spec, index, dtype))
            for path, spec in layout.items()}
    return _unflatten(flat)


def from_pretrained(path: str | os.PathLike, mesh=None, dtype: str = "float32", param_dtype=jnp.float32,
                    **overrides) -> tuple[dict, ModelConfig]:
    """Load a Hugging Face checkpoint directory (config.json + model.safetensors, or shards listed in
    model.safetensors.index.json) of a Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma, Gemma 2 or Gemma 3 (text) model.

    Returns (params, cfg): `params` is the unboxed parameter tree of `DecoderLM(cfg)` (use as
    `DecoderLM(cfg).apply({"params": params}, tokens, mask)`), each array placed in the sharding the logical axis
    rules give it on `mesh` (or on the first local device without one) and read shard by shard from the files.
    `dtype` is the compute dtype; `overrides` set other ModelConfig fields (remat, scan_layers, max_len, ...).
    """
    cfg, family = read_hf_config(path, dtype=dtype, **overrides)
    layout = hf_layout(cfg, family)
    with SafetensorsReader(path) as reader:
        reader.check(layout, family)
        return load_params(reader, layout, cfg, mesh, param_dtype), cfg


# ------------------------------------------------------------------------------------------------------ writing


def _host(x) -> np.ndarray:
    """A whole array on the host, gathered from every process if it is spread over several."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def to_hf_tensors(params: dict, cfg: ModelConfig, dtype=np.float32, family: str | None = None
                  ) -> dict[str, np.ndarray]:
    """{Hugging Face tensor name: array} for our parameter tree as `family` stores it (the inverse of
    `read_shard`); fused tensors are assembled from their parts."""
    flat = _flatten(_unbox(params))
    layout = hf_layout(cfg, family)
    missing = sorted(set(layout) - set(flat))
    if missing:
        raise ValueError(f"params lack {'/'.join(missing[0])} ({len(missing)} parameters missing), which the "
                         "ModelConfig given needs; are they the parameters of this config?")
    tensors = {}
    for path, spec in layout.items():
        value = _host(flat[path])
        if value.shape != spec.shape:
            raise ValueError(f"parameter {'/'.join(path)} has shape {list(value.shape)}, expected "
                             f"{list(spec.shape)} from the ModelConfig")
        layers = list(value) if spec.stacked else [value]
        inverse = tuple(np.argsort(spec.perm))
        for name, layer in zip(spec.names, layers):
            part = np.ascontiguousarray(layer.transpose(inverse).reshape(spec.hf_shape).astype(dtype))
            if spec.rows is None:
                tensors[name] = part
            else:
                whole = tensors.setdefault(name, np.zeros(spec.file_shape, part.dtype))
                whole[spec.rows[0]:spec.rows[0] + spec.hf_shape[0]] = part
    return tensors


TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def save_pretrained(params: dict, cfg: ModelConfig, path: str | os.PathLike, family: str,
                    dtype=np.float32, token_ids: dict[str, int | None] | None = None) -> Path:
    """Write `params` of `DecoderLM(cfg)` as a Hugging Face `family` checkpoint: config.json + model.safetensors
    (one file, tensors in `dtype`), loadable with transformers' AutoModelForCausalLM.from_pretrained. Only process 0
    writes. Returns the directory.

    `token_ids` (bos_token_id, eos_token_id, pad_token_id of the tokenizer the model was trained with) go into
    config.json and a generation_config.json, so transformers' `generate` stops at the same EOS as ours."""
    hf = config_to_hf(cfg, family)
    hf["dtype"] = np.dtype(dtype).name
    ids = {k: v for k, v in (token_ids or {}).items() if k in TOKEN_ID_FIELDS and v is not None}
    hf.update(ids)
    tensors = to_hf_tensors(params, cfg, dtype, family)
    path = Path(path)
    if jax.process_index() == 0:
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
        if ids:
            (path / "generation_config.json").write_text(json.dumps(ids, indent=2, sort_keys=True) + "\n")
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


# ------------------------------------------------------------------------------------------------------ our format


NATIVE_CONFIG = "jaxalign_config.json"
NATIVE_PARAMS = "params.safetensors"


def save_native(params: dict, cfg: ModelConfig, path: str | os.PathLike, family: str | None = None) -> Path:
    """jaxalign's own checkpoint of a model: `jaxalign_config.json` ({"model": ModelConfig fields, "family": the
    Hugging Face family it came from or None}) + `params.safetensors` (our parameter paths joined by "/", float32).
    Safetensors rather than orbax: one self-describing file, read shard by shard like a Hugging Face one."""
    flat = {"/".join(p): np.ascontiguousarray(_host(v).astype(np.float32)) for p, v in _flatten(_unbox(params)).items()}
    path = Path(path)
    if jax.process_index() == 0:
        path.mkdir(parents=True, exist_ok=True)
        meta = {"format": "jaxalign", "family": family, "model": dataclasses.asdict(cfg)}
        (path / NATIVE_CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        save_file(flat, str(path / NATIVE_PARAMS))
    return path


def load_native(path: str | os.PathLike, mesh=None, param_dtype=jnp.float32,
                **overrides) -> tuple[dict, ModelConfig, str | None]:
    """(params, cfg, family) from a `save_native` directory, sharded over `mesh` like `from_pretrained`."""
    path = Path(path)
    file = path / NATIVE_CONFIG
    if not file.exists():
        raise CheckpointFormatError(f"{file}: missing (a jaxalign model directory holds {NATIVE_CONFIG} and "
                                    f"{NATIVE_PARAMS})")
    try:
        meta = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointFormatError(f"{file}: not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise CheckpointFormatError(f"{file}: not a jaxalign model config (expected a JSON object)")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(meta.get("model", {})) - known)
    if meta.get("format") != "jaxalign" or unknown:
        raise CheckpointFormatError(f"{file}: not a jaxalign model config (format {meta.get('format')!r}, "
                                    f"unknown model fields {unknown})")
    try:
        cfg = ModelConfig(**{**meta["model"], **overrides})
    except (TypeError, ValueError) as e:
        raise CheckpointFormatError(f"{file}: {e}") from e
    with open_safetensors(path / NATIVE_PARAMS) as f:
        abstract = _flatten(_unbox(jax.eval_shape(lambda key: init_params(cfg, key), jax.random.key(0))))
        for p, leaf in abstract.items():
            name = "/".join(p)
            if name not in f.keys():
                raise CheckpointFormatError(f"{path / NATIVE_PARAMS}: tensor {name!r} is missing")
            found = tuple(f.get_slice(name).get_shape())
            if found != leaf.shape:
                raise CheckpointFormatError(f"{path / NATIVE_PARAMS}: tensor {name!r} has shape {list(found)}, "
                                            f"expected {list(leaf.shape)} from {file}")
        shardings = _target_shardings(cfg, mesh)
        dtype = np.dtype(param_dtype)
        flat = {p: jax.make_array_from_callback(
            leaf.shape, shardings[p],
            lambda index, name="/".join(p), shape=leaf.shape: np.asarray(
                f.get_slice(name)[_normalise(index, shape)]).astype(dtype))
            for p, leaf in abstract.items()}
    return _unflatten(flat), cfg, meta.get("family")
