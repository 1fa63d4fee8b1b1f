"""LoRA as a function of the parameter tree (jaxalign.models.lora): config and target errors, adapter shapes and
logical axes (sharding consistent with the base, rank replicated), zero-B adapters reproduce the base exactly, and
apply/merge against a float64 NumPy computation, with and without scanned (stacked) layers."""
from __future__ import annotations

import functools
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.models.llama import DecoderLM, ModelConfig, init_params
from jaxalign.models.lora import (
    LoraConfig,
    adapter_paths,
    apply_lora,
    count_adapter_params,
    init_lora,
    merge_lora,
    param_paths,
    target_paths,
)
from jaxalign.sharding import LOGICAL_AXIS_RULES

CFG = ModelConfig(vocab_size=16, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=8, mlp_dim=32, max_len=16)
SCAN_CFG = ModelConfig(**{**CFG.__dict__, "scan_layers": True})
LORA = LoraConfig(rank=3, alpha=6.0, targets=("attn/(q|o)", "mlp/down", "embed"))
fast_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


@functools.lru_cache(maxsize=None)
def abstract(cfg: ModelConfig):
    """Boxed abstract parameters: shapes and logical axis names, no compute."""
    return jax.eval_shape(lambda key: init_params(cfg, key), jax.random.key(0))


@functools.lru_cache(maxsize=None)
def base(cfg: ModelConfig):
    """Plain fp32 parameters of cfg's shapes drawn with NumPy (jitting flax's init costs seconds of compile)."""
    rng = np.random.default_rng(0)
    return jax.tree_util.tree_map(lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape), jnp.float32),
                                  nn.meta.unbox(abstract(cfg)))


@functools.lru_cache(maxsize=None)
def boxed_adapters(cfg: ModelConfig, lora: LoraConfig = LORA, seed: int = 0):
    """init_lora's boxed adapters, under jit (op-by-op random draws compile one program per shape)."""
    return fast_jit(lambda key: init_lora(abstract(cfg), lora, key))(jax.random.key(seed))


def random_adapters(cfg: ModelConfig, lora: LoraConfig, seed: int = 1):
    """init_lora's adapters with B drawn at random too, so A B is a generic rank-r matrix."""
    adapters = nn.meta.unbox(boxed_adapters(cfg, lora, seed))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), adapters)


@fast_jit
def logits(params, tokens):
    return DecoderLM(CFG).apply({"params": params}, tokens)[0]


# ---------------------------------------------------------------------------------------------------------------
# Configuration and targets.


@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=0), "lora.rank must be a positive integer, got 0"),
    (dict(rank=-2), "lora.rank must be a positive integer, got -2"),
    (dict(rank=2.0), "lora.rank must be a positive integer, got 2.0"),
    (dict(rank=True), "lora.rank must be a positive integer, got True"),
    (dict(alpha=0.0), "lora.alpha must be a positive finite number, got 0.0"),
    (dict(alpha=float("nan")), "lora.alpha must be a positive finite number, got nan"),
    (dict(targets=()), "lora.targets must be a non-empty tuple"),
    (dict(targets="attn/q"), "lora.targets must be a non-empty tuple"),
    (dict(targets=("attn/q", "")), "lora.targets must hold non-empty strings"),
    (dict(targets=("attn/(q",)), "lora.targets pattern 'attn/(q' is not a valid regular expression"),
])
def test_bad_config_is_one_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        LoraConfig(**kwargs)


def test_scale_is_alpha_over_rank_and_targets_become_a_tuple():
    cfg = LoraConfig(rank=4, alpha=2, targets=["attn/q"])
    assert cfg.scale == 0.5 and cfg.targets == ("attn/q",)


def test_patterns_match_whole_path_segments():
    lora = LoraConfig(targets=("attn/(q|v)", "layer_1/mlp/down"))
    assert target_paths(abstract(CFG), lora) == [
        "layer_0/attn/q/kernel", "layer_0/attn/v/kernel",
        "layer_1/attn/q/kernel", "layer_1/attn/v/kernel", "layer_1/mlp/down/kernel",
    ]
    # "attn" alone is a segment; "att" is not, and norms (1-D) never carry adapters.
    assert len(target_paths(abstract(CFG), LoraConfig(targets=("attn",)))) == 8


@pytest.mark.parametrize("pattern", ["att", "attn/x", "attn_norm", "final_norm/scale"])
def test_pattern_matching_nothing_lists_the_available_paths(pattern):
    with pytest.raises(ValueError) as info:
        init_lora(abstract(CFG), LoraConfig(targets=("attn/q", pattern)), jax.random.key(0))
    text = str(info.value)
    assert f"pattern {pattern!r} matches no parameter" in text
    assert "available: embed/embedding, layer_0/attn/k/kernel, layer_0/attn/o/kernel" in text
    assert "norm" not in text.split("available:")[1]


def test_plain_parameters_work_for_matrices_and_ask_for_axis_names_otherwise():
    plain = base(CFG)
    adapters = fast_jit(lambda key: init_lora(plain, LoraConfig(rank=2, targets=("mlp/up",)), key))(jax.random.key(0))
    assert adapters["layer_0"]["mlp"]["up"]["kernel"]["a"].shape == (16, 2)
    with pytest.raises(ValueError, match="layer_0/attn/q/kernel has shape \\(16, 2, 8\\) but no logical axis names"):
        init_lora(plain, LoraConfig(targets=("attn/q",)), jax.random.key(0))


# ---------------------------------------------------------------------------------------------------------------
# Shapes, initialisation, axes.


def test_adapter_shapes_axes_and_initialisation():
    adapters = boxed_adapters(CFG)
    q, o = adapters["layer_0"]["attn"]["q"]["kernel"], adapters["layer_1"]["attn"]["o"]["kernel"]
    # q: [embed, heads, head_dim] -> A [embed, r], B [r, heads, head_dim]; o: [heads, head_dim, embed] -> A
    # [heads, head_dim, r], B [r, embed]; the embedding table [vocab, embed] -> A [vocab, r], B [r, embed].
    assert (q["a"].value.shape, q["a"].names) == ((16, 3), ("embed", None))
    assert (q["b"].value.shape, q["b"].names) == ((3, 2, 8), (None, "heads", "head_dim"))
    assert (o["a"].value.shape, o["a"].names) == ((2, 8, 3), ("heads", "head_dim", None))
    assert (o["b"].value.shape, o["b"].names) == ((3, 16), (None, "embed"))
    embed = adapters["embed"]["embedding"]
    assert (embed["a"].names, embed["b"].names) == (("vocab", None), (None, "embed"))
    plain = nn.meta.unbox(adapters)
    for path in adapter_paths(plain):
        pair = param_paths(plain)
        a, b = pair[path + "/a"], pair[path + "/b"]
        assert not np.any(np.asarray(b)), path  # B = 0 (Hu et al. 2021, sec. 4.1)
        fan_in = math.prod(a.shape[:-1])
        assert 0.4 < float(np.std(np.asarray(a))) * math.sqrt(fan_in) < 1.6, path
    # r (in + out) per matrix: q 3*(16+16), o 3*(16+16), down 3*(32+16), embedding 3*(16+16), two layers each.
    assert count_adapter_params(adapters) == 2 * (96 + 96 + 144) + 96
    # Independent A per target (one key each).
    assert not np.allclose(plain["layer_0"]["attn"]["q"]["kernel"]["a"], plain["layer_1"]["attn"]["q"]["kernel"]["a"])


def test_adapters_shard_like_their_kernels_with_the_rank_axis_replicated():
    specs = nn.get_partition_spec(boxed_adapters(CFG))
    with nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        mesh_axes = jax.tree_util.tree_map(nn.logical_to_mesh_axes, specs,
                                           is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    q, o = mesh_axes["layer_0"]["attn"]["q"]["kernel"], mesh_axes["layer_0"]["attn"]["o"]["kernel"]
    assert tuple(q["a"]) == ("fsdp", None) and tuple(q["b"]) == (None, "tensor", None)
    assert tuple(o["a"]) == ("tensor", None, None) and tuple(o["b"]) == (None, "fsdp")


def test_stacked_layers_get_one_pair_per_layer():
    q = boxed_adapters(SCAN_CFG)["layers"]["attn"]["q"]["kernel"]
    assert (q["a"].value.shape, q["a"].names) == ((2, 16, 3), ("layers", "embed", None))
    assert (q["b"].value.shape, q["b"].names) == ((2, 3, 2, 8), ("layers", None, "heads", "head_dim"))
    assert not np.allclose(q["a"].value[0], q["a"].value[1])


# ---------------------------------------------------------------------------------------------------------------
# Apply and merge.


def test_zero_b_adapters_give_the_base_logits_exactly():
    params = base(CFG)
    adapters = nn.meta.unbox(boxed_adapters(CFG))
    merged = apply_lora(params, adapters, LORA)
    for path, leaf in param_paths(params).items():
        np.testing.assert_array_equal(param_paths(merged)[path], leaf, err_msg=path)
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 16, (2, 9)), jnp.int32)
    np.testing.assert_array_equal(logits(merged, tokens), logits(params, tokens))


def numpy_merge(params, adapters, lora: LoraConfig, stacked: bool) -> dict[str, np.ndarray]:
    """Float64 W + alpha/r * A B per path, flattening input and output axes explicitly, one layer at a time under
    `stacked` (scanned layers; the embedding table is not stacked)."""
    out = {path: np.asarray(leaf, np.float64) for path, leaf in param_paths(params).items()}
    flat = param_paths(adapters)
    for path in adapter_paths(adapters):
        a, b = np.asarray(flat[path + "/a"], np.float64), np.asarray(flat[path + "/b"], np.float64)
        w = out[path]
        layers = [(i,) for i in range(w.shape[0])] if stacked and path.startswith("layers/") else [()]
        for index in layers:
            wi, ai, bi = w[index], a[index], b[index]
            delta = ai.reshape(-1, lora.rank) @ bi.reshape(lora.rank, -1)
            assert np.linalg.matrix_rank(delta) == lora.rank  # a generic rank-r update
            w[index] = wi + lora.alpha / lora.rank * delta.reshape(wi.shape)
    return out


@pytest.mark.parametrize("cfg", [CFG, SCAN_CFG], ids=["layers", "scanned"])
def test_apply_and_merge_match_numpy(cfg):
    params, adapters = base(cfg), random_adapters(cfg, LORA)
    merged = merge_lora(params, adapters, LORA)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(params)  # a plain parameter tree
    expected = numpy_merge(params, adapters, LORA, stacked=cfg.scan_layers)
    merged_paths = param_paths(merged)
    adapted = set(adapter_paths(adapters))
    assert len(adapted) == (4 if cfg.scan_layers else 7)
    for path, leaf in param_paths(params).items():
        got = merged_paths[path]
        assert got.dtype == leaf.dtype and got.shape == leaf.shape
        if path in adapted:
            assert not np.allclose(got, leaf)
            np.testing.assert_allclose(got, expected[path], rtol=1e-5, atol=1e-5, err_msg=path)
        else:
            assert got is leaf, path  # untouched leaves are the base's own arrays (no copy)


def test_apply_is_differentiable_in_the_adapters_only_through_a_b():
    params, adapters = base(CFG), random_adapters(CFG, LoraConfig(rank=2, targets=("layer_0/mlp/up",)))
    lora = LoraConfig(rank=2, alpha=4.0, targets=("layer_0/mlp/up",))
    probe = np.random.default_rng(3).standard_normal((16, 32))

    def f(ad):
        return jnp.sum(apply_lora(params, ad, lora)["layer_0"]["mlp"]["up"]["kernel"] * probe)

    grads = jax.grad(f)(adapters)["layer_0"]["mlp"]["up"]["kernel"]
    a, b = (np.asarray(adapters["layer_0"]["mlp"]["up"]["kernel"][k], np.float64) for k in ("a", "b"))
    # d/dA sum(G * s A B) = s G B^T, d/dB = s A^T G.
    np.testing.assert_allclose(grads["a"], 2.0 * probe @ b.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grads["b"], 2.0 * a.T @ probe, rtol=1e-5, atol=1e-5)


def test_adapters_that_do_not_fit_the_base_are_one_clear_error():
    adapters = random_adapters(CFG, LORA)
    with pytest.raises(ValueError, match="adapter at layer_0/attn/o/kernel .* does not fit the base parameter of "
                                         "shape \\(4, 8, 16\\)"):
        wider = ModelConfig(**{**CFG.__dict__, "n_heads": 4, "n_kv_heads": 2})
        apply_lora(base(wider), adapters, LORA)
    with pytest.raises(ValueError, match="adapter for layer_0/attn/qq has no base parameter"):
        apply_lora(base(CFG), {"layer_0": {"attn": {"qq": {"kernel": {"a": 0, "b": 0}}}}}, LORA)
    with pytest.raises(ValueError, match="adapter at layer_0/attn/q sits on a parameter subtree \\(\\['kernel'\\]\\)"):
        apply_lora(base(CFG), {"layer_0": {"attn": {"q": {"a": 0, "b": 0}}}}, LORA)
    with pytest.raises(ValueError, match="adapter tree does not match the base parameters at layers"):
        apply_lora(base(SCAN_CFG), {"layers": {"attn": 0}}, LORA)
