"""Logit parity with transformers for the families and switches added after the first four (test_hf.py): Llama with
each rotary scaling (linear, dynamic, yarn, llama3), Qwen3, Phi-3 (fused projections), Gemma 2, Gemma 3 (text) and
Qwen2 with mixed full/sliding layers.

Each case is a tiny random model built by transformers (fp32, eager attention), saved with save_pretrained, imported
with `from_pretrained` and compared on a padded batch; then exported with `save_pretrained` and loaded back by
transformers, which must give the same logits again. Rows are 12 tokens long, so a window of 4 and the scaled rotary
frequencies change the logits (each case also checks that dropping its feature does)."""
from __future__ import annotations

import dataclasses
import json

import flax.linen as nn
import jax
import numpy as np
import pytest

# torch and transformers come from the bench extra, which `make test` installs: missing, these tests fail.
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from jaxalign.models import DecoderLM, from_pretrained, save_pretrained
from jaxalign.models.hf import CheckpointFormatError, config_from_hf
from jaxalign.models.llama import rope_inverse_frequencies
from test_hf import hf_logits, our_logits  # the same comparison as the original four families

VOCAB, WIDTH = 64, 12
ATOL = 1e-4
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=32, rms_norm_eps=1e-5, initializer_range=0.1)
ROPE = {
    "linear": {"rope_type": "linear", "rope_theta": 10_000.0, "factor": 4.0},
    # max_position_embeddings 8 < the rows' 12 positions, so the base grows
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10_000.0, "factor": 2.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 10_000.0, "factor": 4.0, "original_max_position_embeddings": 8},
    "llama3": {"rope_type": "llama3", "rope_theta": 10_000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8},
}
GEMMA = dict(head_dim=16, query_pre_attn_scalar=12, sliding_window=4, hidden_activation="gelu_pytorch_tanh",
             pad_token_id=0, bos_token_id=1, eos_token_id=2)
# case: (config class, config kwargs, family, changes of our config that must each change the logits)
CASES = {
    **{f"llama_{kind}": ("LlamaConfig", dict(head_dim=16, rope_parameters=rope,
                                             **({"max_position_embeddings": 8} if kind == "dynamic" else {})),
                         "llama", [dict(rope_type="default")])
       for kind, rope in ROPE.items()},
    "qwen3": ("Qwen3Config", dict(head_dim=16, tie_word_embeddings=False), "qwen3", [dict(qk_norm=False)]),
    "phi3": ("Phi3Config", dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, sliding_window=4), "phi3",
             [dict(sliding_window=None)]),
    "gemma2": ("Gemma2Config", dict(**GEMMA, num_hidden_layers=3, attn_logit_softcapping=0.5,
                                    final_logit_softcapping=0.6), "gemma2",
               [dict(layer_types=None), dict(attn_logit_softcap=None), dict(final_logit_softcap=None),
                dict(query_pre_attn_scalar=None)]),
    "gemma3": ("Gemma3TextConfig", dict(**GEMMA, num_hidden_layers=3, layer_types=[
        "sliding_attention", "full_attention", "sliding_attention"], rope_parameters={
        "full_attention": {"rope_type": "linear", "rope_theta": 1_000_000.0, "factor": 8.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}), "gemma3_text",
        [dict(rope_local_theta=None), dict(qk_norm=False), dict(layer_types=None)]),
    "qwen2_mixed": ("Qwen2Config", dict(num_hidden_layers=3, use_sliding_window=True, sliding_window=4,
                                        max_window_layers=1), "qwen2",
                    [dict(layer_types=None), dict(layer_types=None, sliding_window=None)]),
}


def tokens_and_mask():
    """Three rows of WIDTH: full, left-padded (3 pads) and right-padded (4 pads)."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, VOCAB, (3, WIDTH))
    mask = np.ones((3, WIDTH), bool)
    mask[1, :3] = False
    mask[2, -4:] = False
    return tokens, mask


def build(case: str, directory):
    """A tiny random transformers model of `case`, norms and biases moved off their identity values, saved."""
    config_class, kwargs, _, _ = CASES[case]
    config = getattr(transformers, config_class)(**{**COMMON, **kwargs})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(directory)
    return model


def _keep_token_ids(source, written):
    """Token ids are not part of a model export (`jaxalign convert` merges them back from an existing config.json);
    Phi-3's default pad id 32000 would not fit the tiny vocabulary, so copy them over as the CLI would."""
    ids = {k: v for k, v in json.loads((source / "config.json").read_text()).items() if k.endswith("token_id")}
    path = written / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **ids}))


@pytest.mark.parametrize("case", list(CASES))
def test_import_and_export_match_transformers(case, tmp_path):
    _, _, family, ablations = CASES[case]
    model = build(case, tmp_path / "hf")
    tokens, mask = tokens_and_mask()
    expected = hf_logits(model, tokens, mask)

    params, cfg = from_pretrained(tmp_path / "hf")
    ours = our_logits(params, cfg, tokens, mask)
    np.testing.assert_allclose(ours[mask], expected[mask], atol=ATOL, rtol=0)
    for ablation in ablations:  # each feature under test matters at these lengths: without it the logits move
        changed = our_logits(params, dataclasses.replace(cfg, **ablation), tokens, mask)
        assert np.abs(changed - expected)[mask].max() > 1e-3, f"{ablation} does not change the logits"

    save_pretrained(params, cfg, tmp_path / "out", family)
    _keep_token_ids(tmp_path / "hf", tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert type(back).__name__ == type(model).__name__
    np.testing.assert_allclose(hf_logits(back, tokens, mask)[mask], expected[mask], atol=ATOL, rtol=0)
    if family == "phi3":  # fused on export, exactly the tensors transformers saved
        from safetensors.numpy import load_file

        saved, written = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "out" /
                                                                                      "model.safetensors")
        assert "model.layers.0.self_attn.qkv_proj.weight" in written
        for name in ("model.layers.0.self_attn.qkv_proj.weight", "model.layers.1.mlp.gate_up_proj.weight"):
            np.testing.assert_array_equal(written[name], saved[name])


@pytest.mark.parametrize("kind", ["linear", "yarn", "llama3"])
def test_scaled_inverse_frequencies_match_transformers(kind):
    """Our frequencies and attention factor equal transformers' rope init functions, and differ from unscaled."""
    config = transformers.LlamaConfig(**{**COMMON, "head_dim": 16, "rope_parameters": ROPE[kind]})
    inv_freq, attention = ROPE_INIT_FUNCTIONS[kind](config, "cpu")
    cfg, _ = config_from_hf(config.to_dict())
    positions = np.arange(WIDTH)[None]
    ours, factor = rope_inverse_frequencies(cfg, positions)
    np.testing.assert_allclose(np.asarray(ours), inv_freq.numpy(), rtol=1e-6)
    assert factor == pytest.approx(attention, rel=1e-6)
    default, _ = rope_inverse_frequencies(dataclasses.replace(cfg, rope_type="default", rope_theta=1e4), positions)
    assert default is None
    unscaled = 1.0 / (1e4 ** (np.arange(0, 16, 2) / 16))
    assert np.abs(np.asarray(ours) - unscaled).max() > 1e-3


def test_dynamic_frequencies_follow_the_longest_position():
    """Dynamic NTK: unchanged up to max_position_embeddings, transformers' grown base beyond it."""
    config = transformers.LlamaConfig(**{**COMMON, "head_dim": 16, "max_position_embeddings": 8,
                                         "rope_parameters": ROPE["dynamic"]})
    cfg, _ = config_from_hf(config.to_dict())
    short, _ = rope_inverse_frequencies(cfg, np.arange(8)[None])
    long, _ = rope_inverse_frequencies(cfg, np.arange(WIDTH)[None])
    base, _ = ROPE_INIT_FUNCTIONS["dynamic"](config, "cpu")
    grown, _ = ROPE_INIT_FUNCTIONS["dynamic"](config, "cpu", seq_len=WIDTH)
    np.testing.assert_allclose(np.asarray(short), base.numpy(), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(long), grown.numpy(), rtol=1e-6)
    assert np.abs(np.asarray(long) - np.asarray(short)).max() > 1e-3


def _config(tmp_path, hf: dict):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(hf))
    return path


@pytest.mark.parametrize("change, message", [
    ({"model_type": "llama", "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}},
     r"rope_parameters.rope_type 'longrope' is not supported"),
    ({"model_type": "llama", "rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}},
     r"rope_parameters.factor is missing"),
    ({"model_type": "llama", "rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                                 "partial_rotary_factor": 0.5}},
     r"rope_parameters.partial_rotary_factor=0.5 is not supported"),
    ({"model_type": "phi3", "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}},
     r"rope_parameters.rope_type 'longrope' is not supported"),
    ({"model_type": "gemma3_text", "rope_parameters": {"sliding_attention": {"rope_type": "linear", "factor": 2.0}}},
     r"rope_parameters.sliding_attention.rope_type 'linear' is not supported"),
    ({"model_type": "gemma2", "use_bidirectional_attention": True}, r"use_bidirectional_attention=true"),
    ({"model_type": "qwen3", "layer_types": ["full_attention"]}, r"layer_types must list"),
    ({"model_type": "gemma2", "layer_types": ["sliding_attention", "full_attention"]},
     r"model.scan_layers must be false when model.layer_types mixes"),
])
def test_unsupported_configs_are_refused_by_file_and_field(tmp_path, change, message):
    from jaxalign.models.hf import read_hf_config

    hf = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, **change}
    _config(tmp_path, hf)
    with pytest.raises(CheckpointFormatError, match=rf"config.json: .*{message}"):
        read_hf_config(tmp_path, scan_layers=True)


def test_mixed_layers_refuse_export_to_a_uniform_family(tmp_path):
    """A model with mixed sliding/full layers cannot be written as Llama or Mistral: one error naming the field."""
    build("qwen2_mixed", tmp_path / "hf")
    params, cfg = from_pretrained(tmp_path / "hf")
    assert cfg.layer_types == ("full_attention", "sliding_attention", "sliding_attention")
    with pytest.raises(ValueError, match=r"model.layer_types=.* cannot be written as a mistral checkpoint"):
        save_pretrained(params, dataclasses.replace(cfg, qkv_bias=False), tmp_path / "m", "mistral")
    # jaxalign's own format keeps the per-layer types (a JSON list read back as the config's tuple).
    from jaxalign.models.hf import load_native, save_native

    save_native(params, cfg, tmp_path / "native", family="qwen2")
    _, again, family = load_native(tmp_path / "native")
    assert (again, family) == (cfg, "qwen2")


def test_fused_tensors_are_read_shard_by_shard(tmp_path):
    """A shard of q, k, v or gate, up (as a mesh asks for it) is read from its rows of Phi-3's fused tensor."""
    from safetensors.numpy import load_file

    from jaxalign.models.hf import SafetensorsReader, hf_layout, read_hf_config, read_shard

    build("phi3", tmp_path / "hf")
    cfg, family = read_hf_config(tmp_path / "hf")
    layout = hf_layout(cfg, family)
    saved = load_file(tmp_path / "hf" / "model.safetensors")
    h, kv, hd, d, m = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model, cfg.mlp_dim
    qkv, gate_up = saved["model.layers.1.self_attn.qkv_proj.weight"], saved["model.layers.1.mlp.gate_up_proj.weight"]
    whole = {"k": qkv[h * hd:(h + kv) * hd].reshape(kv, hd, d).transpose(2, 0, 1), "up": gate_up[m:].T}
    with SafetensorsReader(tmp_path / "hf") as reader:
        reader.check(layout, family)
        k = read_shard(reader, layout[("layer_1", "attn", "k", "kernel")], (slice(0, d), slice(1, 2)), np.float32)
        up = read_shard(reader, layout[("layer_1", "mlp", "up", "kernel")], (slice(8, 24), slice(m // 2, m)),
                        np.float32)
    np.testing.assert_array_equal(k, whole["k"][:, 1:2])
    np.testing.assert_array_equal(up, whole["up"][8:24, m // 2:])


def test_convert_families_match():
    """`jaxalign convert --family` offers exactly the families the converter writes."""
    from jaxalign.models import hf
    from launch import convert

    assert convert.FAMILIES == hf.FAMILIES


def test_kv_cache_decoding_equals_the_full_forward_with_the_new_switches():
    """Mixed sliding/full layers, q/k norms, soft-capping, sandwich norms and scaled rotary embeddings decode token
    by token (left-padded rows, key/value cache) to the logits of one full forward."""
    from jaxalign.models.llama import ModelConfig, init_cache, init_params

    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=48,
                      max_len=WIDTH, sliding_window=4, layer_types=("sliding_attention", "full_attention"),
                      qk_norm=True, sandwich_norms=True, norm_unit_offset=True, attn_logit_softcap=0.5,
                      final_logit_softcap=0.6, query_pre_attn_scalar=12.0, rope_local_theta=500.0, rope_type="yarn",
                      rope_factor=4.0, rope_original_max_len=8, rope_attention_factor=1.2)
    # Norm gains start at 0 with the (1 + w) offset: move every parameter so that each one matters.
    params = jax.jit(lambda key: jax.tree_util.tree_map(lambda x: x + 0.3 * jax.random.normal(key, x.shape),
                                                        nn.meta.unbox(init_params(cfg, key))))(jax.random.key(0))
    tokens, mask = tokens_and_mask()
    mask = np.sort(mask, axis=1)  # left padding only: decoding writes every row at the same cache slot
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    # LLVM at -O0, as in test_llama.py: these graphs compile much faster and the JAX program is what is checked.
    apply = jax.jit(lambda p, t, m, pos, c: DecoderLM(cfg).apply({"params": p}, t, m, pos, c),
                    compiler_options={"xla_backend_optimization_level": 0})
    full, _ = apply(params, tokens, mask, positions, None)
    cache = init_cache(cfg, tokens.shape[0], WIDTH)
    chunks = []
    for start, stop in [(0, 8), (8, 10), (10, 12)]:  # a prompt, then chunks of two (one compiled shape)
        logits, cache = apply(params, tokens[:, start:stop], mask[:, start:stop], positions[:, start:stop], cache)
        chunks.append(logits)
    np.testing.assert_allclose(np.concatenate(chunks, axis=1)[mask], np.asarray(full)[mask], atol=1e-5, rtol=0)
