"""Every registered pairwise, reference-free and unpaired objective trains through `dpo_loss_fn` + `make_train_step`
(issue 3: "everything trains"), and what the step computes for itself matches a direct computation: the WPO
normaliser from the logits, KTO's mismatched-pair KL inputs, BCO's running baseline carried in the train state."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.data.position import DataPosition
from jaxalign.logprobs import masked_token_logprobs, pair_token_logprobs, sequence_logprobs
from jaxalign.losses import SPECS, PairwiseInputs, compute_objective, unpair
from jaxalign.losses.modifiers import wpo_token_log_norm
from jaxalign.losses.unpaired import RunningMoments, update_running_mean
from jaxalign.models.heads import VALUE_HEAD, apply_value_head, init_value_head, prompt_values
from jaxalign.models.llama import DecoderLM, ModelConfig, init_params
from jaxalign.train.optim import OptimConfig, make_optimizer
from jaxalign.train.state import TrainState
from jaxalign.train.step import dpo_loss_fn, initial_objective_state, logits_fn, make_train_step

CFG = ModelConfig(vocab_size=16, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, mlp_dim=32, max_len=8)
MODEL = DecoderLM(CFG)
APPLY = logits_fn(MODEL)
PAIRS = 6
TX = make_optimizer(OptimConfig(learning_rate=1e-2, warmup_steps=0), total_steps=10)
fast_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


@functools.lru_cache(maxsize=None)
def params(seed: int = 0):
    return nn.meta.unbox(init_params(CFG, jax.random.key(seed)))


def _side(rng, lengths):
    tokens = rng.integers(2, 16, (len(lengths), 8)).astype(np.int32)
    attention = (np.arange(8)[None] < 2 + np.asarray(lengths)[:, None]).astype(np.int32)
    completion = attention * (np.arange(8)[None] >= 2)
    return np.where(attention, tokens, 0).astype(np.int32), attention, completion.astype(np.int32)


@functools.lru_cache(maxsize=None)
def batch() -> dict:
    """Pairs with unequal completion lengths, a one-token completion, data-side extras and KTO's mismatched
    sequences (each prompt with the next pair's chosen completion)."""
    rng = np.random.default_rng(0)
    out = {}
    for side, lengths in (("chosen", [1, 3, 5, 6, 2, 4]), ("rejected", [4, 2, 6, 1, 3, 5])):
        out[f"{side}_tokens"], out[f"{side}_attention_mask"], out[f"{side}_completion_mask"] = _side(rng, lengths)
    nxt = np.roll(np.arange(PAIRS), -1)
    out["kl_tokens"] = np.concatenate([out["chosen_tokens"][:, :2], out["chosen_tokens"][nxt, 2:]], 1)
    out["kl_attention_mask"] = np.concatenate([out["chosen_attention_mask"][:, :2],
                                               out["chosen_attention_mask"][nxt, 2:]], 1)
    out["kl_completion_mask"] = out["chosen_completion_mask"][nxt]
    out["reward_margin"] = rng.normal(size=PAIRS).astype(np.float32)
    out["chosen_score"] = rng.uniform(1, 4, PAIRS).astype(np.float32)
    out["rejected_score"] = rng.uniform(-0.5, 2, PAIRS).astype(np.float32)
    out["semantic_distance"] = rng.uniform(0, 1, PAIRS).astype(np.float32)
    out["preference_probability"] = rng.uniform(0.5, 1, PAIRS).astype(np.float32)
    out["guidance_chosen"] = -rng.uniform(0, 2, (PAIRS, 8)).astype(np.float32) * out["chosen_completion_mask"]
    out["guidance_rejected"] = -rng.uniform(0, 2, (PAIRS, 8)).astype(np.float32) * out["rejected_completion_mask"]
    return {k: jnp.asarray(v) for k, v in out.items()}


TRAINABLE = sorted(name for name, spec in SPECS.items() if spec.family != "listwise")
KWARGS = {"exo_pair": {"label_smoothing": 0.1}}


@pytest.mark.parametrize("objective", TRAINABLE)
def test_every_objective_takes_a_finite_training_step(objective):
    loss = dpo_loss_fn(MODEL, objective, **KWARGS.get(objective, {}))
    policy = params(0)
    if "value" in SPECS[objective].extras:
        policy = {**policy, VALUE_HEAD: nn.meta.unbox(init_value_head(CFG))}
    state = TrainState.create(policy, TX, jax.random.key(0), objective_state=initial_objective_state(objective))
    step = fast_jit(make_train_step(loss))
    new_state, metrics = step(state, params(1), batch(), DataPosition.start())
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(new_state.params),
                                                       jax.tree_util.tree_leaves(state.params))]
    assert any(moved), f"{objective}: no parameter changed"


def _direct_inputs(policy, reference, extras=None) -> PairwiseInputs:
    chosen, rejected = pair_token_logprobs(APPLY, policy, batch())
    ref_chosen, ref_rejected = pair_token_logprobs(APPLY, reference, batch())
    return PairwiseInputs(chosen, rejected, ref_chosen, ref_rejected, batch()["chosen_completion_mask"],
                          batch()["rejected_completion_mask"], extras or {})


def _loss(objective, **kwargs):
    total, (count, metrics) = dpo_loss_fn(MODEL, objective, **kwargs)(params(0), params(1), batch())
    return total / count, metrics


def test_wpo_weights_come_from_the_policy_logits():
    b = batch()
    logits = {side: APPLY(params(0), b[f"{side}_tokens"], b[f"{side}_attention_mask"]) for side in ("chosen",
                                                                                                    "rejected")}
    extras = {f"wpo_log_norm_{side}": wpo_token_log_norm(logits[side]) for side in logits}
    expected, _ = compute_objective("sigmoid", _direct_inputs(params(0), params(1), extras), beta=0.5, wpo=True)
    got, _ = _loss("sigmoid", beta=0.5, wpo=True)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    plain, _ = _loss("sigmoid", beta=0.5)
    assert abs(float(plain) - float(got)) > 1e-6  # the weights really enter


def test_ld_alpha_and_f_divergence_reach_the_objective():
    for modifiers in ({"ld_alpha": 0.3}, {"f_divergence": "js_divergence"}):
        expected, _ = compute_objective("ipo", _direct_inputs(params(0), params(1)), beta=0.5, **modifiers)
        got, _ = _loss("ipo", beta=0.5, **modifiers)
        np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_kto_reference_point_uses_the_mismatched_sequences():
    b = batch()

    def summed(p):
        logits = APPLY(p, b["kl_tokens"], b["kl_attention_mask"])
        return sequence_logprobs(masked_token_logprobs(logits, b["kl_tokens"], b["kl_completion_mask"]),
                                 b["kl_completion_mask"])

    extras = {"kl_policy": summed(params(0)), "kl_reference": summed(params(1))}
    expected, expected_metrics = compute_objective("kto", unpair(_direct_inputs(params(0), params(1), extras)), beta=0.5)
    got, metrics = _loss("kto", beta=0.5)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    np.testing.assert_allclose(metrics["kl"], expected_metrics["kl"], rtol=1e-5, atol=1e-7)


def test_bco_baseline_is_a_running_mean_carried_in_the_train_state():
    """Two steps: after each, the state's running mean equals the mean of the batch-mean rewards seen so far."""
    loss = dpo_loss_fn(MODEL, "bco", beta=0.5)
    state = TrainState.create(params(0), TX, jax.random.key(0), objective_state=initial_objective_state("bco"))
    step = fast_jit(make_train_step(loss))
    expected = RunningMoments.init()
    for _ in range(2):
        inputs = unpair(_direct_inputs(state.params, params(1)))
        z = inputs.sequence("policy") - inputs.sequence("reference")
        expected = update_running_mean(expected, jnp.mean(0.5 * z))
        state, metrics = step(state, params(1), batch(), DataPosition.start())
        np.testing.assert_allclose(state.objective_state.mean, expected.mean, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(metrics["delta"], expected.mean, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="grad_accum_steps=1"):
        make_train_step(loss, accum_steps=2)(state, params(1), batch(), DataPosition.start())


def test_dro_value_is_a_linear_head_on_stop_gradient_policy_features_and_trains():
    """V(x) = head(h(x)) with h the policy's hidden state before the first completion token; the value loss moves
    the head and, through stop-gradient features, never the backbone on its own account."""
    b = batch()
    head = {"kernel": jnp.linspace(-1, 1, CFG.d_model)[:, None], "bias": jnp.array([0.3])}
    policy = {**params(0), VALUE_HEAD: head}
    tokens = jnp.concatenate([b["chosen_tokens"], b["rejected_tokens"]])
    attention = jnp.concatenate([b["chosen_attention_mask"], b["rejected_attention_mask"]])
    completion = jnp.concatenate([b["chosen_completion_mask"], b["rejected_completion_mask"]])
    hidden = MODEL.apply({"params": params(0)}, tokens, attention, return_hidden=True)[2]
    value = prompt_values(apply_value_head(head, hidden), completion, attention)
    reward = jnp.concatenate([b["chosen_score"], b["rejected_score"]])
    expected, _ = compute_objective("dro", unpair(_direct_inputs(params(0), params(1), {"value": value,
                                                                                        "reward": reward})), tau=0.5)
    total, (count, _) = dpo_loss_fn(MODEL, "dro", tau=0.5)(policy, params(1), b)
    np.testing.assert_allclose(total / count, expected, rtol=1e-5)
    grads = jax.grad(lambda p: dpo_loss_fn(MODEL, "dro", tau=0.5)(p, params(1), b)[0])(policy)
    assert float(jnp.abs(grads[VALUE_HEAD]["bias"]).sum()) > 0


def test_missing_data_extras_and_stateless_bco_are_clear_errors():
    without = {k: v for k, v in batch().items() if k != "reward_margin"}
    with pytest.raises(ValueError, match="'madpo' needs 'reward_margin'"):
        dpo_loss_fn(MODEL, "madpo")(params(0), params(1), without)
    with pytest.raises(ValueError, match="running baseline"):
        dpo_loss_fn(MODEL, "bco")(params(0), params(1), batch())
    with pytest.raises(ValueError, match="listwise"):
        dpo_loss_fn(MODEL, "plackett_luce")
