"""Tests for jaxalign.models.llama: logical axis annotations, KV-cache decoding, scan/remat equivalence, bf16
numerics, tied/untied heads, grouped-query attention against an independent float64 NumPy implementation, config
validation, and the model/mesh fit check."""
from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh

from jaxalign.models.llama import (
    Attention,
    DecoderLM,
    HeadProjection,
    ModelConfig,
    check_model_fits_mesh,
    grouped_attention,
    head_major_attention,
    init_cache,
    init_params,
)
from jaxalign.sharding import LOGICAL_AXIS_RULES

# Tiny grouped-query config: 4 query heads share 2 key/value heads.
CFG = ModelConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=64, max_len=16)
RULE_NAMES = {name for name, _ in LOGICAL_AXIS_RULES}

# A left-padded batch: three rows with 10, 7 and 3 real tokens in a width of 10.
WIDTH = 10
LENGTHS = (10, 7, 3)


# LLVM codegen at -O0 (xla_backend_optimization_level=0) for the functions jitted here: these tiny graphs compile
# ~40% faster on a small CPU, and what the tests check is the JAX program, not LLVM's optimisations.
fast_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


@functools.lru_cache(maxsize=None)
def params_for(cfg: ModelConfig, seed: int = 0):
    """fp32 parameters with init_params' tree and shapes, drawn with NumPy (flax's random init costs seconds of
    compile per config on a small CPU). Norm scales are perturbed away from 1 so that they matter."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda key: nn.meta.unbox(init_params(cfg, key)), jax.random.key(0))
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.asarray((1.0 + 0.1 * rng.standard_normal(x.shape)) if "scale" in jax.tree_util.keystr(path)
                                    else 0.2 * rng.standard_normal(x.shape), jnp.float32), shapes)


@functools.lru_cache(maxsize=None)
def apply_for(cfg: ModelConfig):
    """Jitted (params, tokens, mask, positions, cache) -> (logits, cache) for `cfg`."""
    model = DecoderLM(cfg)
    return fast_jit(lambda params, tokens, mask=None, positions=None, cache=None: model.apply(
        {"params": params}, tokens, mask, positions, cache))


def left_padded_batch(vocab: int = CFG.vocab_size, seed: int = 0):
    rng = np.random.default_rng(seed)
    mask = np.zeros((len(LENGTHS), WIDTH), bool)
    for i, n in enumerate(LENGTHS):
        mask[i, WIDTH - n:] = True
    tokens = np.where(mask, rng.integers(1, vocab, mask.shape), 0).astype(np.int32)
    return tokens, mask


def stack_layers(params, n_layers: int):
    """Unrolled params {layer_0, layer_1, ...} -> the scanned layout {layers: leaves stacked on axis 0}."""
    layers = [params[f"layer_{i}"] for i in range(n_layers)]
    rest = {k: v for k, v in params.items() if not k.startswith("layer_")}
    return dict(rest, layers=jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layers))


def lm_loss(apply_fn, params, tokens):
    logits, _ = apply_fn(params, tokens)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


# ---------------------------------------------------------------------------------------------------------------
# Logical axis annotations.


@pytest.mark.parametrize("overrides", [{}, {"scan_layers": True, "tie_embeddings": False}], ids=["unrolled", "scan"])
def test_every_parameter_carries_logical_axis_names_from_the_rules(overrides):
    """Every parameter array is LogicallyPartitioned with one rule-table name per dimension (so it can be sharded)."""
    cfg = dataclasses.replace(CFG, **overrides)
    boxed = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
    leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves
    for path, leaf in leaves:
        where = jax.tree_util.keystr(path)
        assert isinstance(leaf, nn.LogicallyPartitioned), f"{where} has no logical axis names"
        assert len(leaf.names) == leaf.value.ndim, f"{where}: names {leaf.names} vs shape {leaf.value.shape}"
    specs = nn.get_partition_spec(boxed)
    shapes = jax.tree_util.tree_leaves(nn.meta.unbox(boxed))
    flat_specs = jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert len(flat_specs) == len(shapes)
    for spec, shape in zip(flat_specs, shapes):
        assert len(spec) == shape.ndim >= 1
        for name in spec:
            assert name is not None and name in RULE_NAMES, f"axis name {name!r} of {spec} is not in LOGICAL_AXIS_RULES"
    if cfg.scan_layers:
        expected = jax.sharding.PartitionSpec("layers", "embed", "heads", "head_dim")
        assert specs["layers"]["attn"]["q"]["kernel"] == expected


# ---------------------------------------------------------------------------------------------------------------
# Padding and the key/value cache.


@pytest.mark.parametrize("contracted, bias, dtype", [(1, False, jnp.float32), (1, True, jnp.bfloat16),
                                                      (2, True, jnp.float32)])
def test_head_projection_equals_flax_dense_general_bit_for_bit(contracted, bias, dtype):
    """The attention projections' own module draws the same kernel and bias and computes the same product as
    flax's DenseGeneral (which it replaces because DenseGeneral's initialiser fails under `jax.set_mesh`): q/k/v
    style [embed] -> [heads, head_dim] and o style [heads, head_dim] -> [embed], with bias and bf16 compute."""
    features, axes = ((4, 8), ("embed", "heads", "head_dim")) if contracted == 1 else ((32,), ("heads", "head_dim",
                                                                                                 "embed"))
    x = jax.random.normal(jax.random.key(1), (6, 32) if contracted == 1 else (6, 4, 8))
    fan_in = 32
    ours = HeadProjection(features, contracted, axes, fan_in, bias, dtype)
    flax_dense = nn.DenseGeneral(features, axis=tuple(range(-contracted, 0)), use_bias=bias, dtype=dtype,
                                 kernel_init=nn.with_logical_partitioning(nn.initializers.normal(fan_in**-0.5), axes),
                                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[contracted:]))
    params = nn.meta.unbox(ours.init(jax.random.key(0), x))
    reference = nn.meta.unbox(flax_dense.init(jax.random.key(0), x))
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(reference)
    for got, want in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(reference)):
        np.testing.assert_array_equal(got, want)
    assert nn.get_partition_spec(ours.init(jax.random.key(0), x)) == nn.get_partition_spec(
        flax_dense.init(jax.random.key(0), x))
    out = ours.apply(params, x)
    assert out.dtype == dtype and out.shape == (6,) + features
    np.testing.assert_array_equal(out, flax_dense.apply(reference, x))


def test_left_padded_rows_equal_the_unpadded_sequence_run_alone():
    """Left padding changes nothing at real positions: rotary positions count real tokens, pads are masked out."""
    params, apply_fn = params_for(CFG), apply_for(CFG)
    tokens, mask = left_padded_batch()
    full, _ = apply_fn(params, tokens, mask)
    for i, n in enumerate(LENGTHS):
        alone, _ = apply_fn(params, tokens[i:i + 1, WIDTH - n:])
        np.testing.assert_allclose(full[i, WIDTH - n:], alone[0], rtol=1e-5, atol=1e-5, err_msg=f"row {i}")


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scan"])
def test_kv_cache_incremental_decode_equals_full_forward(scan_layers):
    """A 4-token prompt chunk then one token at a time through the cache gives the full forward's logits at every
    real position of every left-padded row (and hence those of each sequence run alone)."""
    cfg = dataclasses.replace(CFG, scan_layers=scan_layers)
    params = params_for(CFG)
    if scan_layers:
        params = stack_layers(params, cfg.n_layers)
    apply_fn = apply_for(cfg)
    tokens, mask = left_padded_batch()
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    full, _ = apply_for(CFG)(params_for(CFG), tokens, mask)

    cache = init_cache(cfg, tokens.shape[0], WIDTH)
    prompt = 4
    logits, cache = apply_fn(params, tokens[:, :prompt], mask[:, :prompt], positions[:, :prompt], cache)
    chunks = [logits]
    for t in range(prompt, WIDTH):
        logits, cache = apply_fn(params, tokens[:, t:t + 1], mask[:, t:t + 1], positions[:, t:t + 1], cache)
        chunks.append(logits)
    incremental = np.concatenate(chunks, axis=1)
    indices = cache["index"] if scan_layers else [layer["index"] for layer in cache]
    assert [int(i) for i in np.asarray(indices)] == [WIDTH] * cfg.n_layers
    for i, n in enumerate(LENGTHS):
        alone, _ = apply_for(CFG)(params_for(CFG), tokens[i:i + 1, WIDTH - n:])
        np.testing.assert_allclose(incremental[i, WIDTH - n:], full[i, WIDTH - n:], rtol=1e-5, atol=1e-5,
                                   err_msg=f"row {i} (length {n}) vs the padded full forward")
        np.testing.assert_allclose(incremental[i, WIDTH - n:], alone[0], rtol=1e-5, atol=1e-5,
                                   err_msg=f"row {i} (length {n}) vs the sequence run alone")


def test_kv_cache_decode_with_default_positions_continues_the_sequence():
    """With a cache and positions=None, the next token's rotary position continues from the cached tokens."""
    params, apply_fn = params_for(CFG), apply_for(CFG)
    tokens = left_padded_batch()[0][:1]  # row 0 has no padding
    full, _ = apply_fn(params, tokens)
    cache = init_cache(CFG, 1, WIDTH)
    _, cache = apply_fn(params, tokens[:, :WIDTH - 1], None, None, cache)
    last, _ = apply_fn(params, tokens[:, WIDTH - 1:], None, None, cache)
    diff = float(np.max(np.abs(np.asarray(last[0, 0]) - np.asarray(full[0, -1]))))
    assert diff < 1e-5, (
        f"cached decode with positions=None differs from the full forward by {diff:.3g}")


# ---------------------------------------------------------------------------------------------------------------
# scan, remat, dtype, tied embeddings.


def test_scan_layers_equals_unrolled_model_with_the_same_weights():
    """nn.scan over layers is only a layout change: stacking the unrolled weights gives the same logits."""
    scan_cfg = dataclasses.replace(CFG, scan_layers=True)
    params = params_for(CFG)
    stacked = stack_layers(params, CFG.n_layers)
    expected_shapes = jax.eval_shape(lambda k: nn.meta.unbox(init_params(scan_cfg, k)), jax.random.key(0))
    assert jax.tree_util.tree_map(lambda x: x.shape, stacked) == jax.tree_util.tree_map(lambda x: x.shape,
                                                                                        expected_shapes)
    tokens, mask = left_padded_batch()
    unrolled, _ = apply_for(CFG)(params, tokens, mask)
    scanned, _ = apply_for(scan_cfg)(stacked, tokens, mask)
    np.testing.assert_allclose(scanned, unrolled, rtol=1e-5, atol=1e-6)


def test_remat_gives_identical_loss_and_gradients():
    """Rematerialisation trades compute for memory and must not change the loss or a single gradient entry
    (unrolled and scanned)."""
    tokens = jnp.asarray(left_padded_batch()[0])
    params = params_for(CFG)
    stacked = stack_layers(params, CFG.n_layers)

    def value_and_grad(cfg, p):
        model = DecoderLM(cfg)
        apply_fn = lambda params, tokens: model.apply({"params": params}, tokens)  # noqa: E731
        return fast_jit(jax.value_and_grad(functools.partial(lm_loss, apply_fn)))(p, tokens)

    loss, grads = value_and_grad(CFG, params)
    remat_loss, remat_grads = value_and_grad(dataclasses.replace(CFG, remat=True), params)
    scan_loss, scan_grads = value_and_grad(dataclasses.replace(CFG, remat=True, scan_layers=True), stacked)
    np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
    np.testing.assert_allclose(scan_loss, loss, rtol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), remat_grads, grads)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), scan_grads,
                           stack_layers(grads, CFG.n_layers))


def test_bfloat16_compute_keeps_fp32_params_and_returns_fp32_logits_close_to_fp32_model():
    """dtype='bfloat16' changes only the matmul precision: parameters are still created in float32 and logits come
    back in float32, within bf16 rounding of the fp32 model with the same weights."""
    bf16 = dataclasses.replace(CFG, dtype="bfloat16")
    init32 = jax.eval_shape(lambda k: nn.meta.unbox(init_params(CFG, k)), jax.random.key(0))
    init16 = jax.eval_shape(lambda k: nn.meta.unbox(init_params(bf16, k)), jax.random.key(0))
    assert jax.tree_util.tree_structure(init16) == jax.tree_util.tree_structure(init32)
    for a, b in zip(jax.tree_util.tree_leaves(init32), jax.tree_util.tree_leaves(init16)):
        assert (b.shape, b.dtype) == (a.shape, jnp.float32)
    params = params_for(CFG)
    tokens, mask = left_padded_batch()
    logits32, _ = apply_for(CFG)(params, tokens, mask)
    logits16, _ = apply_for(bf16)(params, tokens, mask)
    assert logits16.dtype == jnp.float32
    real = mask[..., None]
    err = np.max(np.abs(np.where(real, logits16 - logits32, 0.0)))
    scale = np.max(np.abs(np.where(real, logits32, 0.0)))
    assert 0 < err < 0.05 * scale, f"bf16 logits differ by {err} (fp32 logit scale {scale})"


def test_tied_and_untied_embeddings_have_the_expected_parameter_sets():
    """Tied embeddings reuse the input table as the output projection; untied adds an lm_head [embed, vocab]."""
    tied = jax.eval_shape(lambda k: init_params(CFG, k), jax.random.key(0))
    untied_cfg = dataclasses.replace(CFG, tie_embeddings=False)
    untied = jax.eval_shape(lambda k: init_params(untied_cfg, k), jax.random.key(0))
    layers = {f"layer_{i}" for i in range(CFG.n_layers)}
    assert set(tied) == {"embed", "final_norm"} | layers
    assert set(untied) == {"embed", "final_norm", "lm_head"} | layers
    head = untied["lm_head"]["kernel"]
    assert head.value.shape == (CFG.d_model, CFG.vocab_size) and head.names == ("embed", "vocab")
    assert tied["embed"]["embedding"].value.shape == (CFG.vocab_size, CFG.d_model)


# ---------------------------------------------------------------------------------------------------------------
# Grouped-query attention against an independent float64 NumPy implementation.


def np_rms_norm(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def np_rotary(x, theta):
    """Hugging Face Llama formulation: x * cos + rotate_half(x) * sin, channel i paired with i + head_dim/2."""
    time, _, dim = x.shape
    inv_freq = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    freqs = np.arange(time, dtype=np.float64)[:, None] * inv_freq[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)[:, None, :]  # [time, 1, dim]
    rotate_half = np.concatenate([-x[..., dim // 2:], x[..., :dim // 2]], axis=-1)
    return x * np.cos(emb) + rotate_half * np.sin(emb)


def np_attention(p, h, cfg):
    """One causal GQA attention layer on ONE unpadded sequence h [time, d_model], float64, head by head."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), p)
    time = h.shape[0]
    q = np_rotary(np.einsum("td,dhk->thk", h, p["q"]["kernel"]), cfg.rope_theta)
    k = np_rotary(np.einsum("td,dhk->thk", h, p["k"]["kernel"]), cfg.rope_theta)
    v = np.einsum("td,dhk->thk", h, p["v"]["kernel"])
    group = cfg.n_heads // cfg.n_kv_heads
    causal = np.tril(np.ones((time, time), bool))
    heads = []
    for head in range(cfg.n_heads):
        kv = head // group  # query heads [kv*group, (kv+1)*group) share key/value head kv
        scores = q[:, head] @ k[:, kv].T / np.sqrt(cfg.head_dim)
        scores = np.where(causal, scores, -np.inf)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        heads.append(weights @ v[:, kv])
    return np.einsum("thk,hkd->td", np.stack(heads, axis=1), p["o"]["kernel"])


def np_decoder(params, tokens, cfg):
    """The whole decoder in float64 NumPy for one unpadded sequence: logits [time, vocab]."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    x = p["embed"]["embedding"][tokens]
    for i in range(cfg.n_layers):
        layer = p[f"layer_{i}"]
        x = x + np_attention(layer["attn"], np_rms_norm(x, layer["attn_norm"]["scale"], cfg.norm_eps), cfg)
        h = np_rms_norm(x, layer["mlp_norm"]["scale"], cfg.norm_eps)
        gate, up = h @ layer["mlp"]["gate"]["kernel"], h @ layer["mlp"]["up"]["kernel"]
        x = x + (gate / (1.0 + np.exp(-gate)) * up) @ layer["mlp"]["down"]["kernel"]
    x = np_rms_norm(x, p["final_norm"]["scale"], cfg.norm_eps)
    head = p["embed"]["embedding"].T if cfg.tie_embeddings else p["lm_head"]["kernel"]
    return x @ head


@pytest.mark.parametrize("n_kv_heads, tie", [(4, True), (2, False)], ids=["mha-tied", "gqa-untied"])
def test_attention_and_decoder_match_independent_float64_numpy(n_kv_heads, tie):
    """RMSNorm, half-split rotary, causal softmax and GQA head sharing (query head h uses kv head h // group) as
    written independently in float64 NumPy agree with the flax model, both for one attention layer and for the
    logits of the whole decoder on every row of a left-padded batch."""
    cfg = dataclasses.replace(CFG, n_kv_heads=n_kv_heads, tie_embeddings=tie)
    params = params_for(cfg)
    attn = params["layer_0"]["attn"]
    assert attn["q"]["kernel"].shape == (cfg.d_model, cfg.n_heads, cfg.head_dim)
    assert attn["k"]["kernel"].shape == attn["v"]["kernel"].shape == (cfg.d_model, n_kv_heads, cfg.head_dim)
    assert attn["o"]["kernel"].shape == (cfg.n_heads, cfg.head_dim, cfg.d_model)

    # One attention layer on a random input, unpadded.
    h = np.random.default_rng(1).normal(size=(1, 7, cfg.d_model)).astype(np.float32)
    positions = np.arange(7)[None]
    out, _ = fast_jit(lambda p, x: Attention(cfg).apply({"params": p}, x, positions, jnp.ones((1, 7), bool), None))(
        attn, h)
    np.testing.assert_allclose(out[0], np_attention(attn, h[0].astype(np.float64), cfg), rtol=1e-4, atol=1e-5)

    # The whole decoder on a left-padded batch, compared at the real positions of each row.
    tokens, mask = left_padded_batch()
    logits, _ = apply_for(cfg)(params, tokens, mask)
    for i, n in enumerate(LENGTHS):
        expected = np_decoder(params, tokens[i, WIDTH - n:], cfg)
        np.testing.assert_allclose(logits[i, WIDTH - n:], expected, rtol=1e-4, atol=1e-5, err_msg=f"row {i}")


# ---------------------------------------------------------------------------------------------------------------
# Config validation.


@pytest.mark.parametrize("overrides, field", [
    ({"n_heads": 6, "n_kv_heads": 4}, "model.n_heads"),
    ({"head_dim": 7}, "model.head_dim"),
    ({"dtype": "float16"}, "model.dtype"),
    ({"n_layers": 0}, "model.n_layers"),
])
def test_invalid_config_raises_value_error_naming_the_field(overrides, field):
    """A bad config fails at construction with a ValueError that names the offending field."""
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        dataclasses.replace(CFG, **overrides)


# ---------------------------------------------------------------------------------------------------------------
# Does a model fit a mesh.


def abstract_mesh(data: int, fsdp: int, tensor: int) -> AbstractMesh:
    return AbstractMesh((data, fsdp, tensor), ("data", "fsdp", "tensor"))


def test_model_that_does_not_fit_the_mesh_names_the_field_and_size():
    """Heads (or kv heads, MLP units, vocabulary) not divisible by the tensor axis, or d_model by fsdp, fail with
    the model field, its value and the axis size."""
    cfg = ModelConfig(vocab_size=64, d_model=32, n_heads=4, n_kv_heads=4, head_dim=8, mlp_dim=64)
    with pytest.raises(ValueError, match=r"model\.n_heads=4 is not divisible by the mesh's tensor axis of size 8"):
        check_model_fits_mesh(cfg, abstract_mesh(1, 1, 8))
    with pytest.raises(ValueError, match=r"model\.d_model=32 .* fsdp axis of size 3"):
        check_model_fits_mesh(cfg, abstract_mesh(1, 3, 1))


def divisible_under_rules(cfg: ModelConfig, mesh: AbstractMesh) -> bool:
    """Whether every dimension of every parameter divides by the mesh axes the rules give its logical name: what
    the fit check promises, read off the parameters themselves rather than off the config fields."""
    rules = dict(LOGICAL_AXIS_RULES)
    boxed = jax.eval_shape(lambda key: init_params(cfg, key), jax.random.key(0))
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    for leaf in leaves:
        for size, name in zip(leaf.value.shape, leaf.names):
            axes = rules[name]
            axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
            if size % int(np.prod([mesh.shape[a] for a in axes])):
                return False
    return True


@pytest.mark.parametrize("cfg", [
    ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=64),
    ModelConfig(vocab_size=30, d_model=24, n_layers=1, n_heads=6, n_kv_heads=6, head_dim=4, mlp_dim=36,
                tie_embeddings=False),
])
def test_fit_check_accepts_exactly_the_meshes_that_split_every_parameter_evenly(cfg):
    """Over a grid of fsdp x tensor sizes, the config-level check passes iff every sharded parameter dimension
    divides by its mesh axes (so its field-to-axis table agrees with the parameters the model creates)."""
    for fsdp in (1, 2, 3, 4):
        for tensor in (1, 2, 3, 4, 5, 6, 8):
            mesh = abstract_mesh(1, fsdp, tensor)
            try:
                check_model_fits_mesh(cfg, mesh)
                fits = True
            except ValueError:
                fits = False
            assert fits == divisible_under_rules(cfg, mesh), f"fsdp={fsdp} tensor={tensor}"


@pytest.mark.parametrize("overrides", [{}, {"attn_logit_softcap": 5.0, "query_pre_attn_scalar": 12.0}])
def test_one_decoding_step_attends_like_the_last_row_of_the_whole_sequence(overrides):
    """A single new token (the decoding step, an elementwise product and reduction over the head-major cache) sees
    what the last query of the full causal attention sees."""
    cfg = dataclasses.replace(CFG, **overrides)
    keys = jax.random.split(jax.random.key(2), 4)
    q = jax.random.normal(keys[0], (3, 9, cfg.n_heads, cfg.head_dim))
    k, v = (jax.random.normal(key, (3, 9, cfg.n_kv_heads, cfg.head_dim)) for key in keys[1:3])
    valid = (jax.random.uniform(keys[3], (3, 1, 9)) > 0.3) | (jnp.arange(9) == 8)  # padded slots, the token itself
    allowed = jnp.tril(jnp.ones((9, 9), bool))[None] & valid
    full = head_major_attention(q, k, v, allowed, cfg)[:, -1:]
    step = grouped_attention(q[:, -1:], k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), allowed[:, -1:], cfg)
    np.testing.assert_allclose(step, full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("overrides", [{}, {"attn_logit_softcap": 5.0, "query_pre_attn_scalar": 12.0}])
@pytest.mark.parametrize("time, max_blocks", [(7, 4), (100, 1), (100, 4)])
def test_head_major_attention_equals_grouped_attention_with_its_gradients(overrides, time, max_blocks):
    """The training path (keys and values repeated per query head, [b, h, t, d], queries in causal blocks: 100
    positions make three blocks) and the decoding path (query heads grouped by their key/value head) compute the
    same function, masks and soft-capping included."""
    cfg = dataclasses.replace(CFG, **overrides)
    keys = jax.random.split(jax.random.key(1), 4)
    q = jax.random.normal(keys[0], (3, time, cfg.n_heads, cfg.head_dim))
    k, v = (jax.random.normal(key, (3, time, cfg.n_kv_heads, cfg.head_dim)) for key in keys[1:3])
    allowed = jnp.tril(jnp.ones((time, time), bool))[None] & (jax.random.uniform(keys[3], (3, 1, time)) > 0.3)
    allowed = allowed | jnp.eye(time, dtype=bool)[None]  # every query sees at least itself
    head_major = functools.partial(head_major_attention, max_blocks=max_blocks)
    def grouped(q, k, v, allowed, cfg):  # the decoding path reads keys and values head-major, as the cache holds them
        return grouped_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), allowed, cfg)

    outputs = [jax.vjp(lambda *x: attend(*x, allowed, cfg), q, k, v) for attend in (head_major, grouped)]
    np.testing.assert_allclose(outputs[0][0], outputs[1][0], rtol=1e-5, atol=1e-6)
    cotangent = jax.random.normal(keys[3], q.shape)
    for a, b in zip(outputs[0][1](cotangent), outputs[1][1](cotangent)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
