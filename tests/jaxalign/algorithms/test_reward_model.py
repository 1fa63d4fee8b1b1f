"""Bradley-Terry reward model (jaxalign.algorithms.reward_model): the loss against its closed form on the model's own
scores, reward 0 at init, totals that add over microbatches (step.py protocol), and learning: a tiny ScalarHeadLM
trained with optax on a synthetic separable pair set reaches held-out pair accuracy > 0.9."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxalign.algorithms.reward_model import bradley_terry_loss_fn, reward_margins, reward_scores
from jaxalign.models.heads import ScalarHeadLM, init_scalar_head_params
from jaxalign.models.llama import ModelConfig

CFG = ModelConfig(vocab_size=16, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, mlp_dim=64, max_len=16)
MODEL = ScalarHeadLM(CFG)
WIDTH = 12
GOOD, BAD = 2, 3  # the chosen completion contains GOOD once, the rejected one BAD once, anywhere in it
fast_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
PAIRS = 16  # one batch shape for every jitted call below, so each function compiles once
LOSS_FN = bradley_terry_loss_fn(MODEL)
loss_of = fast_jit(lambda params, batch: LOSS_FN(params, None, batch))
scores_of = fast_jit(lambda params, tokens, mask: reward_scores(params, MODEL, tokens, mask))
margins_of = fast_jit(lambda params, batch: reward_margins(params, MODEL, batch))


def make_pairs(n: int, seed: int) -> dict:
    """Right-padded pairs sharing a prompt (3-5 tokens); completions of 2-5 tokens from {4..15} plus the marker."""
    rng = np.random.default_rng(seed)
    batch = {f"{side}_{key}": np.zeros((n, WIDTH), np.int32) for side in ("chosen", "rejected")
             for key in ("tokens", "attention_mask", "completion_mask")}  # fmt: skip
    for i in range(n):
        prompt = rng.integers(4, 16, rng.integers(3, 6))
        for side, marker in (("chosen", GOOD), ("rejected", BAD)):
            completion = rng.integers(4, 16, rng.integers(2, 6))
            completion[rng.integers(len(completion))] = marker
            sequence = np.concatenate([prompt, completion])
            batch[f"{side}_tokens"][i, : len(sequence)] = sequence
            batch[f"{side}_attention_mask"][i, : len(sequence)] = 1
            batch[f"{side}_completion_mask"][i, len(prompt) : len(sequence)] = 1
    return {k: jnp.asarray(v) for k, v in batch.items()}


@functools.lru_cache(maxsize=None)
def initial_params():
    return nn.meta.unbox(fast_jit(lambda key: init_scalar_head_params(CFG, key))(jax.random.key(0)))


def perturbed_params(seed=1, scale=0.2):
    rng = np.random.default_rng(seed)
    noise = lambda x: x + scale * rng.standard_normal(x.shape).astype(np.float32)  # noqa: E731
    return jax.tree_util.tree_map(noise, initial_params())


def test_reward_is_zero_at_init():
    batch = make_pairs(PAIRS, 0)
    rewards = scores_of(initial_params(), batch["chosen_tokens"], batch["chosen_attention_mask"])
    assert rewards.shape == (PAIRS,) and np.all(np.asarray(rewards) == 0.0)
    total, (count, metrics) = loss_of(initial_params(), batch)
    np.testing.assert_allclose(float(total), PAIRS * np.log(2.0), rtol=1e-6)
    assert float(count) == PAIRS and float(metrics["rewards/accuracy"]) == 0.0  # ties count as wrong


def test_loss_is_minus_logsigmoid_of_the_score_difference():
    params, batch = perturbed_params(), make_pairs(PAIRS, 1)
    total, (count, metrics) = loss_of(params, batch)
    r_w = np.asarray(scores_of(params, batch["chosen_tokens"], batch["chosen_attention_mask"]), np.float64)
    r_l = np.asarray(scores_of(params, batch["rejected_tokens"], batch["rejected_attention_mask"]), np.float64)
    assert np.std(r_w - r_l) > 1e-3
    np.testing.assert_allclose(float(total), np.sum(np.logaddexp(0.0, -(r_w - r_l))), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["rewards/margin"]), np.mean(r_w - r_l), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(metrics["rewards/accuracy"]), np.mean(r_w > r_l))
    np.testing.assert_allclose(np.asarray(margins_of(params, batch)), r_w - r_l, rtol=1e-4, atol=1e-5)
    assert float(count) == PAIRS


def test_totals_add_over_microbatches():
    """The step.py protocol: (sum of per-pair losses, pair count) add up over any split of the batch, which is what
    makes gradient accumulation exact (gradients are linear in the totals)."""
    params, batch = perturbed_params(2), make_pairs(2 * PAIRS, 2)
    halves = [jax.tree_util.tree_map(lambda x, k=k: x[k * PAIRS : (k + 1) * PAIRS], batch) for k in (0, 1)]
    parts = [loss_of(params, half) for half in halves]
    whole = fast_jit(lambda p, b: LOSS_FN(p, None, b))(params, batch)
    np.testing.assert_allclose(float(whole[0]), sum(float(t) for t, _ in parts), rtol=1e-5)
    assert float(whole[1][0]) == sum(float(c) for _, (c, _) in parts) == 2 * PAIRS


def test_missing_pair_keys_raise_a_clear_error():
    batch = dict(make_pairs(2, 3))
    del batch["rejected_attention_mask"]
    with pytest.raises(ValueError, match="rejected_attention_mask"):
        LOSS_FN(initial_params(), None, batch)


def test_a_tiny_reward_model_learns_a_separable_preference():
    train, held_out = make_pairs(4 * PAIRS, 10), make_pairs(PAIRS, 11)
    tx = optax.adam(3e-3)

    @fast_jit
    def step(params, opt_state, batch):
        (total, (count, metrics)), grads = jax.value_and_grad(LOSS_FN, has_aux=True)(params, None, batch)
        updates, opt_state = tx.update(jax.tree_util.tree_map(lambda g: g / count, grads), opt_state, params)
        return optax.apply_updates(params, updates), opt_state, total / count

    params = initial_params()
    opt_state = tx.init(params)
    losses = []
    for _ in range(40):
        params, opt_state, loss = step(params, opt_state, train)
        losses.append(float(loss))
    _, (_, metrics) = loss_of(params, held_out)
    assert losses[-1] < 0.5 * losses[0], losses
    print(f"losses {losses[0]:.3f} -> {losses[-1]:.3f}; held-out accuracy {float(metrics['rewards/accuracy']):.3f}")
    assert float(metrics["rewards/accuracy"]) > 0.9, float(metrics["rewards/accuracy"])
