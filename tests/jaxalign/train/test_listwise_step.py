"""jaxalign.train.listwise: the listwise loss function on a tiny DecoderLM.

1. equals the objective evaluated on log-probs (and hidden states, step ids) computed separately for each list, with
   no flattening, for plackett_luce, adpo, rankdpo and tpo, including the top-candidate NLL term;
2. precomputed (and cached) `list_reference` log-probs give the same loss and gradients as the online reference;
3. gradient accumulation over microbatches equals the full batch (plackett_luce is not batch-coupled);
4. a few optimizer steps with plackett_luce lower the loss;
5. clear errors for a non-listwise objective, TPO without a separator, a missing reference.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.losses import ListwiseInputs, get_objective
from jaxalign.models.llama import DecoderLM, ModelConfig, init_params
from jaxalign.train.listwise import (
    cached_list_reference_logprobs,
    compute_list_reference_logprobs,
    listwise_loss_fn,
)
from jaxalign.train.optim import OptimConfig, make_optimizer
from jaxalign.train.state import TrainState
from jaxalign.train.step import accumulated_gradients, logits_fn

CFG = ModelConfig(vocab_size=16, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, mlp_dim=32, max_len=12)
MODEL = DecoderLM(CFG)
P, K, T, PROMPT = 4, 3, 12, 3
SEP = 5
fast_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


@functools.lru_cache(maxsize=None)
def params(seed: int):
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda key: nn.meta.unbox(init_params(CFG, key)), jax.random.key(0))
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.asarray((1.0 + 0.1 * rng.standard_normal(x.shape)) if "scale" in jax.tree_util.keystr(path)
                                    else 0.3 * rng.standard_normal(x.shape), jnp.float32), shapes)


def _batch(p: int = P, seed: int = 0) -> dict[str, np.ndarray]:
    """Prompt of 3 tokens, completions of 3..9 tokens with separators, right padding; candidate (1, 2) invalid;
    every prompt keeps at least one strict preference (so every prompt is used)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(6, CFG.vocab_size, size=(p, K, T)).astype(np.int32)
    lengths = rng.integers(3, T - PROMPT + 1, size=(p, K))
    attention = (np.arange(T)[None, None, :] < PROMPT + lengths[..., None]).astype(np.int32)
    completion = attention * (np.arange(T) >= PROMPT)[None, None, :].astype(np.int32)
    for i in range(p):
        for k in range(K):
            tokens[i, k, PROMPT + 1 :: 3] = SEP  # steps of 2-3 tokens
    tokens = np.where(attention > 0, tokens, 0).astype(np.int32)
    scores = rng.integers(0, 4, size=(p, K)).astype(np.float32)
    scores[:, 0] = 5.0  # a strict best in every list
    valid = np.ones((p, K), np.int32)
    if p > 1:
        valid[1, 2] = 0
        scores[1, 2] = np.nan  # never read
    return {"list_tokens": tokens, "list_attention_mask": attention, "list_completion_mask": completion,
            "list_scores": scores, "list_valid": valid}


@fast_jit
def _one_list_forward(p, tokens, attention):
    """logits and hidden states of ONE list's K sequences [K, T] (no flattening of prompts into the batch)."""
    logits, _, hidden = MODEL.apply({"params": p}, tokens, attention, return_hidden=True)
    return logits, hidden


def _separate_inputs(policy_params, reference_params, batch) -> ListwiseInputs:
    """Per-list forward passes (each [K, T] on its own) and NumPy for the log-prob gather and the step ids."""
    pol, ref, hid = [], [], []
    for i in range(batch["list_tokens"].shape[0]):
        tokens, attention = batch["list_tokens"][i], batch["list_attention_mask"][i]
        mask = batch["list_completion_mask"][i]

        def logps(p):
            logits, hidden = (np.asarray(x, np.float64) for x in _one_list_forward(p, tokens, attention))
            shifted = logits[:, :-1] - logits[:, :-1].max(-1, keepdims=True)
            lp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
            picked = np.take_along_axis(lp, tokens[:, 1:, None], axis=-1)[..., 0]
            return np.pad(picked, ((0, 0), (1, 0))) * mask, hidden

        lp, h = logps(policy_params)
        pol.append(lp)
        hid.append(h)
        ref.append(logps(reference_params)[0])
    step_ids = np.full(batch["list_tokens"].shape, -1, np.int32)
    for idx in np.ndindex(*batch["list_tokens"].shape[:2]):
        step = 0
        for t in range(T):
            if batch["list_completion_mask"][idx][t]:
                step_ids[idx][t] = step
                step += batch["list_tokens"][idx][t] == SEP
    f32 = lambda x: jnp.asarray(np.stack(x), jnp.float32)  # noqa: E731
    return ListwiseInputs(policy=f32(pol), reference=f32(ref),
                          mask=jnp.asarray(batch["list_completion_mask"]), scores=jnp.asarray(batch["list_scores"]),
                          valid=jnp.asarray(batch["list_valid"]),
                          extras={"step_ids": jnp.asarray(step_ids), "hidden": f32(hid)})


CASES = [
    ("plackett_luce", {"beta": 0.5}, 0.0),
    ("adpo", {"tau": 2.0, "target": "smoothed"}, 0.0),
    ("rankdpo", {"beta": 0.5}, 0.3),
    ("tpo", {"beta": 0.5}, 0.0),
]


@pytest.mark.parametrize("name,kwargs,sft_weight", CASES, ids=[c[0] for c in CASES])
def test_loss_equals_the_objective_on_separately_computed_logprobs(name, kwargs, sft_weight):
    batch = _batch()
    loss_fn = listwise_loss_fn(MODEL, name, sft_weight=sft_weight, separator_id=SEP, **kwargs)
    total, (count, metrics) = fast_jit(loss_fn)(params(0), params(1), batch)
    inputs = _separate_inputs(params(0), params(1), batch)
    if name != "tpo":
        inputs = inputs.replace(extras={})
    expected, expected_metrics = fast_jit(functools.partial(get_objective(name), **kwargs))(inputs)
    if sft_weight:
        top = np.nanargmax(np.where(batch["list_valid"] > 0, batch["list_scores"], -np.inf), axis=1)
        rows = np.arange(P)
        mask = batch["list_completion_mask"][rows, top]
        nll = -(np.asarray(inputs.policy)[rows, top] * mask).sum(-1) / mask.sum(-1)
        expected = expected + sft_weight * nll.mean()
        np.testing.assert_allclose(metrics["top_nll"], nll.mean(), rtol=1e-5)
    assert count == P
    np.testing.assert_allclose(total / count, expected, rtol=1e-5, atol=1e-6)
    for key, value in expected_metrics.items():
        np.testing.assert_allclose(metrics[key], value, rtol=1e-4, atol=1e-5, err_msg=key)
    assert float(metrics["prompts/used"]) == P


def test_tpo_hidden_gradient_flows_unless_stopped():
    """The step weights depend on the policy's hidden states: with their gradient stopped the loss is the same
    but the gradients differ."""
    batch = _batch()
    grads = []
    for stop in (False, True):
        loss_fn = listwise_loss_fn(MODEL, "tpo", separator_id=SEP, stop_hidden_gradient=stop, beta=0.5)
        (total, _), g = fast_jit(jax.value_and_grad(loss_fn, has_aux=True))(params(0), params(1), batch)
        grads.append((float(total), jax.tree_util.tree_leaves(g)))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6)
    assert any(not np.allclose(a, b) for a, b in zip(grads[0][1], grads[1][1]))


def test_precomputed_and_cached_reference_equal_the_online_reference(tmp_path):
    batch = _batch()
    loss_fn = listwise_loss_fn(MODEL, "plackett_luce", beta=0.5)
    grad_fn = fast_jit(jax.value_and_grad(loss_fn, has_aux=True))
    (online, _), g_online = grad_fn(params(0), params(1), batch)
    apply = logits_fn(MODEL)
    ref = compute_list_reference_logprobs(apply, params(1), batch, batch_size=3)  # 3 does not divide P = 4
    assert ref["list_reference"].shape == (P, K, T) and ref["list_reference"].dtype == np.float32
    (pre, _), g_pre = grad_fn(params(0), None, {**batch, **ref})
    np.testing.assert_allclose(pre, online, rtol=1e-5)
    # The precomputed reference ran in batches of 3 lists, the online one on all 4: fp32 summation order differs, and
    # the ~1e-6 noise in the reference log-probs reaches gradients of size up to ~2 (1.6e-6 seen on one CPU).
    for a, b in zip(jax.tree_util.tree_leaves(g_pre), jax.tree_util.tree_leaves(g_online)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)

    tokenization = {"vocab": CFG.vocab_size}
    cached, info = cached_list_reference_logprobs(str(tmp_path), apply, params(1), batch, tokenization, 3)
    assert not info["hit"]
    np.testing.assert_allclose(cached["list_reference"], ref["list_reference"], rtol=1e-5, atol=1e-6)
    again, info2 = cached_list_reference_logprobs(str(tmp_path), apply, params(1), batch, tokenization, 3)
    assert info2["hit"] and info2["path"] == info["path"]
    np.testing.assert_array_equal(again["list_reference"], cached["list_reference"])
    _, other = cached_list_reference_logprobs(str(tmp_path), apply, params(0), batch, tokenization, 3)
    assert other["key"] != info["key"]


def test_accumulated_microbatches_equal_the_full_batch():
    batch = _batch(p=4, seed=3)
    loss_fn = listwise_loss_fn(MODEL, "plackett_luce", sft_weight=0.2, beta=0.5)
    run = fast_jit(lambda p, f, b, n: accumulated_gradients(loss_fn, p, f, b, n), static_argnums=3)
    full_loss, full_grads, _ = run(params(0), params(1), batch, 1)
    acc_loss, acc_grads, _ = run(params(0), params(1), batch, 2)
    np.testing.assert_allclose(acc_loss, full_loss, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(acc_grads), jax.tree_util.tree_leaves(full_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_a_few_plackett_luce_steps_lower_the_loss():
    batch = _batch()
    loss_fn = listwise_loss_fn(MODEL, "plackett_luce", beta=0.5)
    tx = make_optimizer(OptimConfig(learning_rate=1e-2, warmup_steps=0), total_steps=10)

    @fast_jit
    def train(p, ref):
        def body(state, _):
            loss, grads, _ = accumulated_gradients(loss_fn, state.params, ref, batch, 1)
            return state.apply_gradients(grads), loss

        state, losses = jax.lax.scan(body, TrainState.create(p, tx, jax.random.key(0)), None, length=10)
        return losses, accumulated_gradients(loss_fn, state.params, ref, batch, 1)[0]

    losses, final = train(params(0), params(0))
    assert final < 0.8 * losses[0], (losses, final)


def test_clear_errors():
    with pytest.raises(ValueError, match="not listwise.*dpo_loss_fn"):
        listwise_loss_fn(MODEL, "sigmoid")
    with pytest.raises(ValueError, match="separator_id"):
        listwise_loss_fn(MODEL, "tpo")
    with pytest.raises(ValueError, match="unknown objective"):
        listwise_loss_fn(MODEL, "no_such_loss")
    batch = _batch(p=2)
    loss_fn = listwise_loss_fn(MODEL, "plackett_luce")
    with pytest.raises(ValueError, match="needs a reference model"):
        jax.eval_shape(loss_fn, params(0), None, batch)
    with pytest.raises(ValueError, match="missing list_scores"):
        jax.eval_shape(loss_fn, params(0), params(1), {k: v for k, v in batch.items() if k != "list_scores"})
