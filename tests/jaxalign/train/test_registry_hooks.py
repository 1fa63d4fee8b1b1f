"""The objective registry is the only place an objective lives: a toy objective with a state and extras, registered
at test time and removed afterwards, trains through `dpo_loss_fn` + `make_train_step` (and a listwise one through
`listwise_loss_fn`) with no edit to the trainers, and matches a float64 NumPy computation; `objective_kwargs` turns
(beta, label_smoothing, "name=value,...") into keyword arguments from the registrations alone."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.data.position import DataPosition
from jaxalign.losses import (
    SPECS,
    ListwiseInputs,
    PairwiseInputs,
    StateHooks,
    get_spec,
    initial_state,
    needed_extras,
    objective_kwargs,
    parse_objective_args,
    register,
    unregister,
)
from jaxalign.models.heads import VALUE_HEAD
from jaxalign.models.llama import DecoderLM, ModelConfig, init_params
from jaxalign.testing import float64_sequence_logprobs, random_pairs, random_sequences
from jaxalign.train.listwise import listwise_loss_fn
from jaxalign.train.optim import OptimConfig, make_optimizer
from jaxalign.train.state import TrainState
from jaxalign.train.step import (
    _MODEL_EXTRAS,
    MODEL_EXTRAS,
    dpo_loss_fn,
    extra_params_needed,
    initial_objective_state,
    make_train_step,
    objective_extra_params,
)

CFG = ModelConfig(vocab_size=16, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, mlp_dim=32, max_len=8)
MODEL = DecoderLM(CFG)
PAIRS = 6
PROMPT = 2
TX = make_optimizer(OptimConfig(learning_rate=1e-2, warmup_steps=0), total_steps=10)
fast_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


@functools.lru_cache(maxsize=None)
def params(seed: int = 0):
    return nn.meta.unbox(init_params(CFG, jax.random.key(seed)))


@functools.lru_cache(maxsize=None)
def pairs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = random_pairs(rng, [1, 3, 5, 6, 2, 4], [4, 2, 6, 1, 3, 5], width=8, prompt_len=PROMPT, vocab_size=16)
    out["pair_weight"] = rng.uniform(0.5, 2.0, PAIRS).astype(np.float32)
    out["chosen_score"] = rng.uniform(1, 4, PAIRS).astype(np.float32)
    out["rejected_score"] = rng.uniform(-0.5, 2, PAIRS).astype(np.float32)
    return out


def _numpy_sequence_logprobs(p, tokens, attention, completion) -> np.ndarray:
    return float64_sequence_logprobs(CFG, p, tokens, attention, completion)


def _numpy_margins(policy, reference, beta) -> np.ndarray:
    b = pairs()
    z = {side: _numpy_sequence_logprobs(policy, b[f"{side}_tokens"], b[f"{side}_attention_mask"],
                                        b[f"{side}_completion_mask"])
            - _numpy_sequence_logprobs(reference, b[f"{side}_tokens"], b[f"{side}_attention_mask"],
                                       b[f"{side}_completion_mask"])
         for side in ("chosen", "rejected")}
    return beta * (z["chosen"] - z["rejected"])


def _log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


# ----------------------------------------------------------------------------------------------------------------
# a toy objective with a state and two extras, registered for one test


def _margins(inputs: PairwiseInputs, beta: float) -> jax.Array:
    z_w = inputs.sequence("policy_chosen") - inputs.sequence("reference_chosen")
    z_l = inputs.sequence("policy_rejected") - inputs.sequence("reference_rejected")
    return beta * (z_w - z_l)


def _running_init():
    return {"total": jnp.zeros((), jnp.float32), "count": jnp.zeros((), jnp.float32)}


def _running_update(state, inputs, beta: float = 0.1):
    """Fold this batch's mean margin in first, then use the running mean as the baseline (BCO's order)."""
    new = {"total": state["total"] + jax.lax.stop_gradient(jnp.mean(_margins(inputs, beta))),
           "count": state["count"] + 1.0}
    return new, {"margin_baseline": new["total"] / new["count"]}


def baselined_dpo(inputs: PairwiseInputs, beta: float = 0.1):
    """mean_i w_i * -log sigmoid(m_i - b): a weighted DPO whose margins are measured against a running baseline b."""
    margins = _margins(inputs, beta)
    baseline = inputs.extras["margin_baseline"]
    loss = jnp.mean(inputs.extras["pair_weight"] * -jax.nn.log_sigmoid(margins - baseline))
    return loss, {"baseline": baseline}


@pytest.fixture
def toy_objective():
    register("toy_baselined", extras=("pair_weight", "margin_baseline"),
             state=StateHooks(_running_init, _running_update, ("margin_baseline",), "a running margin"))(baselined_dpo)
    yield "toy_baselined"
    unregister("toy_baselined")
    assert "toy_baselined" not in SPECS


def test_a_registered_state_and_extras_train_through_make_train_step(toy_objective):
    """Three steps from the registration alone: the state starts from its init, folds in each batch's mean margin,
    the baseline reaches the objective, the batch extra is read from the batch; every loss and the final state
    equal a float64 NumPy computation at the parameters of that step."""
    assert initial_objective_state(toy_objective) == _running_init()
    loss = dpo_loss_fn(MODEL, toy_objective, beta=0.5)
    state = TrainState.create(params(0), TX, jax.random.key(0), objective_state=initial_objective_state(toy_objective))
    step = fast_jit(make_train_step(loss))
    batch = {k: jnp.asarray(v) for k, v in pairs().items()}
    batch_means = []
    for _ in range(3):
        margins = _numpy_margins(jax.device_get(state.params), params(1), beta=0.5)
        batch_means.append(margins.mean())
        baseline = np.mean(batch_means)
        expected = np.mean(pairs()["pair_weight"] * -_log_sigmoid(margins - baseline))
        state, metrics = step(state, params(1), batch, DataPosition.start())
        np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(metrics["baseline"], baseline, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(state.objective_state["total"], np.sum(batch_means), rtol=1e-4, atol=1e-6)
    assert float(state.objective_state["count"]) == 3.0


def test_missing_state_batch_extra_and_accumulation_are_clear_errors(toy_objective):
    batch = {k: jnp.asarray(v) for k, v in pairs().items()}
    with pytest.raises(ValueError, match="'toy_baselined' keeps a running margin"):
        dpo_loss_fn(MODEL, toy_objective)(params(0), params(1), batch)
    without = {k: v for k, v in batch.items() if k != "pair_weight"}
    with pytest.raises(ValueError, match="'toy_baselined' needs 'pair_weight' in every batch"):
        dpo_loss_fn(MODEL, toy_objective)(params(0), params(1), dict(without, objective_state=_running_init()))
    state = TrainState.create(params(0), TX, jax.random.key(0), objective_state=_running_init())
    with pytest.raises(ValueError, match="grad_accum_steps=1"):
        make_train_step(dpo_loss_fn(MODEL, toy_objective), accum_steps=2)(state, params(1), batch,
                                                                          DataPosition.start())


def test_model_side_extras_come_from_the_table_for_any_objective():
    """A toy declaring "reward" and "value" gets both from `MODEL_EXTRAS` (the judged scores, a value head whose
    parameters `objective_extra_params` creates) without being named anywhere in the trainer."""

    def reward_regression(inputs, tau: float = 1.0):
        z_w = inputs.sequence("policy_chosen") - inputs.sequence("reference_chosen")
        z_l = inputs.sequence("policy_rejected") - inputs.sequence("reference_rejected")
        residual = inputs.extras["reward"] - inputs.extras["value"] - tau * jnp.concatenate([z_w, z_l])
        return jnp.mean(0.5 * residual**2), {}

    register("toy_value", extras=("reward", "value"))(reward_regression)
    try:
        assert extra_params_needed("toy_value") == ("a value head",)
        head = nn.meta.unbox(objective_extra_params("toy_value", CFG))
        assert set(head) == {VALUE_HEAD}  # zero-initialised: V = 0 at the start
        batch = {k: jnp.asarray(v) for k, v in pairs().items()}
        total, (count, _) = dpo_loss_fn(MODEL, "toy_value", tau=0.5)({**params(0), **head}, params(1), batch)
        b = pairs()
        z = [_numpy_sequence_logprobs(params(0), b[f"{s}_tokens"], b[f"{s}_attention_mask"], b[f"{s}_completion_mask"])
             - _numpy_sequence_logprobs(params(1), b[f"{s}_tokens"], b[f"{s}_attention_mask"],
                                        b[f"{s}_completion_mask"]) for s in ("chosen", "rejected")]
        reward = np.concatenate([b["chosen_score"], b["rejected_score"]])
        np.testing.assert_allclose(total / count, np.mean(0.5 * (reward - 0.5 * np.concatenate(z)) ** 2), rtol=1e-4)
        with pytest.raises(ValueError, match="'toy_value' needs a value head"):
            dpo_loss_fn(MODEL, "toy_value")(params(0), params(1), batch)
    finally:
        unregister("toy_value")
    assert objective_extra_params("sigmoid", CFG) is None and extra_params_needed("sigmoid") == ()


def test_a_listwise_objective_with_a_state_trains_through_listwise_loss_fn():
    """The same hooks on ranked lists: the state's extra reaches the objective and comes back updated."""

    def count_steps(state, inputs):
        del inputs
        return state + 1.0, {"steps_seen": state + 1.0}

    def scaled_listwise(inputs: ListwiseInputs, beta: float = 0.1):
        z = inputs.sequence("policy") - inputs.sequence("reference")
        return jnp.mean(z * beta) * inputs.extras["steps_seen"], {}

    register("toy_listwise", family="listwise", extras=("steps_seen",),
             state=StateHooks(lambda: jnp.zeros((), jnp.float32), count_steps, ("steps_seen",)))(scaled_listwise)
    try:
        rng = np.random.default_rng(1)
        tokens, attention, completion = random_sequences(rng, [1, 3, 5, 6, 2, 4], 8, PROMPT, 16)
        lists = {"list_tokens": tokens.reshape(2, 3, 8), "list_attention_mask": attention.reshape(2, 3, 8),
                 "list_completion_mask": completion.reshape(2, 3, 8),
                 "list_scores": rng.normal(size=(2, 3)).astype(np.float32), "list_valid": np.ones((2, 3), np.int32)}
        lists = {k: jnp.asarray(v) for k, v in lists.items()}
        loss = listwise_loss_fn(MODEL, "toy_listwise", beta=1.0)
        state = TrainState.create(params(0), TX, jax.random.key(0), objective_state=initial_state("toy_listwise"))
        step = fast_jit(make_train_step(loss))
        for expected in (1.0, 2.0):
            state, _ = step(state, params(1), lists, DataPosition.start())
            assert float(state.objective_state) == expected
        with pytest.raises(ValueError, match="initial_objective_state"):
            loss(params(0), params(1), lists)
    finally:
        unregister("toy_listwise")


def test_registration_checks_and_the_model_extra_table():
    with pytest.raises(ValueError, match="must all be declared"):
        register("toy_bad_state", state=StateHooks(_running_init, _running_update, ("margin_baseline",)))
    with pytest.raises(ValueError, match=r"beta_aliases \['tau'\] are not hyper-parameters"):
        register("toy_bad_alias", beta_aliases={"tau": lambda beta: beta})(baselined_dpo)
    assert "toy_bad_alias" not in SPECS and "toy_bad_state" not in SPECS
    with pytest.raises(ValueError, match="unknown objective 'toy_never'"):
        unregister("toy_never")
    assert _MODEL_EXTRAS == frozenset(MODEL_EXTRAS)
    # BCO's state lives in its registration, and its baseline is produced by that state, never read from a batch.
    assert get_spec("bco").state is not None and "reward_baseline" in get_spec("bco").state.extras
    assert initial_state("sigmoid") is None and initial_objective_state("sigmoid") is None
    assert needed_extras("sigmoid", wpo=True) == ("wpo_log_norm_chosen", "wpo_log_norm_rejected")
    assert needed_extras("kto") == ("kl_policy", "kl_reference")


# ----------------------------------------------------------------------------------------------------------------
# objective_kwargs


def test_beta_reaches_each_objective_under_its_own_name():
    assert objective_kwargs("sigmoid", 2.0) == {"beta": 2.0}
    assert objective_kwargs("adpo", 4.0) == {"tau": 0.25}  # ADPO's temperature is 1/beta, and it takes no beta
    assert objective_kwargs("dro", 0.3) == {"tau": 0.3}
    assert objective_kwargs("flex_dpo", 0.7) == {"beta_chosen": 0.7, "beta_rejected": 0.7}
    # objective_args win over beta and its aliases
    assert objective_kwargs("adpo", 4.0, objective_args="tau=0.1") == {"tau": 0.1}
    assert objective_kwargs("sigmoid", 2.0, objective_args="beta=0.5") == {"beta": 0.5}


def test_an_unset_beta_leaves_every_objective_its_own_default():
    from jaxalign.losses import hyperparameter_defaults

    assert objective_kwargs("simpo", None) == {} and objective_kwargs("adpo", None) == {}
    assert objective_kwargs("simpo", None, objective_args="gamma_beta_ratio=0") == {"gamma_beta_ratio": 0}
    assert hyperparameter_defaults("simpo") == {"beta": 2.0, "gamma_beta_ratio": 0.5, "label_smoothing": 0.0}
    assert hyperparameter_defaults("kto") == {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0}


def test_label_smoothing_is_passed_only_when_set():
    assert "label_smoothing" not in objective_kwargs("sigmoid", 1.0)
    assert objective_kwargs("sigmoid", 1.0, 0.2) == {"beta": 1.0, "label_smoothing": 0.2}
    with pytest.raises(ValueError, match=r"dpo.objective='ipo' takes no label_smoothing"):
        objective_kwargs("ipo", 1.0, 0.2)


def test_objective_args_are_parsed_and_modifiers_accepted_where_declared():
    assert parse_objective_args(" a=1, b=2.5 ,c=TRUE,d=none,e=hard,, ") == {"a": 1, "b": 2.5, "c": True, "d": None,
                                                                            "e": "hard"}
    got = objective_kwargs("sigmoid", 1.0, objective_args="ld_alpha=0.5,wpo=true,f_divergence=js_divergence")
    assert got == {"beta": 1.0, "ld_alpha": 0.5, "wpo": True, "f_divergence": "js_divergence"}
    with pytest.raises(ValueError, match="dpo.objective='simpo' takes no wpo"):
        objective_kwargs("simpo", 1.0, objective_args="wpo=true")  # simpo declares no modifier


def test_unknown_arguments_and_malformed_items_are_one_clear_error():
    with pytest.raises(ValueError) as error:
        objective_kwargs("sigmoid", 1.0, objective_args="gamma=1,delta=2")
    assert str(error.value) == ("dpo.objective='sigmoid' takes no delta, gamma; it accepts: beta, f_alpha, "
                                "f_divergence, label_smoothing, ld_alpha, wpo")
    with pytest.raises(ValueError, match=r"^dpo.objective_args: 'gamma' is not of the form name=value$"):
        objective_kwargs("sigmoid", 1.0, objective_args="gamma")
    with pytest.raises(ValueError, match=r"^train.objective_args: "):
        objective_kwargs("sigmoid", 1.0, objective_args="gamma", setting="train")
    with pytest.raises(ValueError, match="unknown objective 'nope'"):
        objective_kwargs("nope", 1.0)


def test_every_objective_accepts_what_objective_kwargs_gives_it():
    """For every registered objective the default arguments are accepted by its function (no TypeError)."""
    for name, spec in SPECS.items():
        kwargs = objective_kwargs(name, 0.5)
        assert set(kwargs) <= spec.hyperparameters, name
