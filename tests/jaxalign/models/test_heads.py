"""ScalarHeadLM (jaxalign.models.heads): zero-initialised head, the backbone is a DecoderLM, logical axis names,
padding invariance, and the index helpers (last attended token, V(s_t) alignment, V(x))."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.models.heads import (
    ScalarHeadLM,
    init_scalar_head_params,
    last_token_index,
    last_token_values,
    prompt_values,
    state_values,
    with_backbone,
)
from jaxalign.models.llama import DecoderLM, ModelConfig, init_params
from jaxalign.sharding import LOGICAL_AXIS_RULES, MeshConfig, logical_shardings, make_mesh

CFG = ModelConfig(vocab_size=16, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, mlp_dim=32, max_len=16)
RULE_NAMES = {name for name, _ in LOGICAL_AXIS_RULES}
# LLVM at -O0 for these tiny graphs: they compile much faster on a small CPU (as in test_llama.py).
fast_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


@functools.lru_cache(maxsize=None)
def _params():
    """Boxed parameters, initialised once under jit (eager flax init costs seconds of op-by-op compiles)."""
    return fast_jit(lambda key: init_scalar_head_params(CFG, key))(jax.random.key(0))


def test_zero_initialised_head_predicts_zero_everywhere():
    params = nn.meta.unbox(_params())
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 16, (3, 7)), jnp.int32)
    values = fast_jit(lambda p, t: ScalarHeadLM(CFG).apply({"params": p}, t))(params, tokens)
    assert values.shape == (3, 7) and values.dtype == jnp.float32
    assert np.all(np.asarray(values) == 0.0)
    assert np.all(np.asarray(params["head"]["kernel"]) == 0) and np.all(np.asarray(params["head"]["bias"]) == 0)


def test_backbone_is_a_decoder_lm_and_can_be_replaced():
    boxed = _params()
    lm = fast_jit(lambda key: init_params(CFG, key))(jax.random.key(1))
    assert jax.tree_util.tree_structure(boxed["backbone"]) == jax.tree_util.tree_structure(lm)
    params = nn.meta.unbox(with_backbone(boxed, lm))
    tokens = jnp.asarray(np.random.default_rng(1).integers(1, 16, (2, 6)), jnp.int32)
    _, logits = fast_jit(lambda p, t: ScalarHeadLM(CFG).apply({"params": p}, t, return_logits=True))(params, tokens)
    expected, _ = fast_jit(lambda p, t: DecoderLM(CFG).apply({"params": p}, t))(nn.meta.unbox(lm), tokens)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), rtol=1e-6, atol=1e-6)


def test_logical_axis_names_and_shardings():
    boxed = _params()
    head = boxed["head"]
    assert head["kernel"].names == ("embed", None) and head["bias"].names == (None,)
    for leaf in jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)):
        assert all(name is None or name in RULE_NAMES for name in leaf.names), leaf.names
    shardings = logical_shardings(boxed, make_mesh(MeshConfig(), jax.devices()[:1]))
    assert set(shardings) == {"backbone", "head"}


def test_values_do_not_depend_on_padding_side():
    """Same real tokens, left- vs right-padded: equal values at the real tokens (positions count real tokens)."""
    rng = np.random.default_rng(2)
    params = jax.tree_util.tree_map(lambda x: x + 0.3 * rng.standard_normal(x.shape).astype(np.float32),
                                    nn.meta.unbox(_params()))
    real = rng.integers(1, 16, 5)
    right = np.zeros((1, 8), np.int32)
    right[0, :5] = real
    left = np.zeros((1, 8), np.int32)
    left[0, 3:] = real
    apply = fast_jit(lambda t, m: ScalarHeadLM(CFG).apply({"params": params}, t, m))
    v_right = np.asarray(apply(jnp.asarray(right), jnp.asarray(right > 0)))
    v_left = np.asarray(apply(jnp.asarray(left), jnp.asarray(left > 0)))
    np.testing.assert_allclose(v_right[0, :5], v_left[0, 3:], rtol=1e-5, atol=1e-5)
    assert np.std(v_right[0, :5]) > 1e-3  # the head is live, so the comparison is not vacuous
    r_right = last_token_values(jnp.asarray(v_right), jnp.asarray(right > 0))
    r_left = last_token_values(jnp.asarray(v_left), jnp.asarray(left > 0))
    np.testing.assert_allclose(np.asarray(r_right), np.asarray(r_left), rtol=1e-5, atol=1e-5)


def test_index_helpers_by_hand():
    values = jnp.arange(12.0).reshape(2, 6)  # values[b, t] = 6b + t
    attention = jnp.array([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]])
    completion = jnp.array([[0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(np.asarray(last_token_index(attention)), [3, 5])
    np.testing.assert_array_equal(np.asarray(last_token_values(values, attention)), [3.0, 11.0])
    # V(s_t) for completion token t is the output after token t-1
    np.testing.assert_array_equal(np.asarray(state_values(values, completion)),
                                  [[0, 0, 1, 2, 0, 0], [0, 0, 0, 0, 0, 0]])
    # V(x): output at the last prompt token (row 1 has no completion: the last position, or the last attended one)
    np.testing.assert_array_equal(np.asarray(prompt_values(values, completion)), [1.0, 11.0])
    right_padded = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(np.asarray(prompt_values(values, completion, right_padded)), [1.0, 8.0])
