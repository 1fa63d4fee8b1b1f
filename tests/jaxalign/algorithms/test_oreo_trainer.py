"""The OREO trainer and value-guided beam search (jaxalign.algorithms.oreo; Wang et al. 2024, docs/algorithms.md).

1. data: step starts against a hand-built ARITH trajectory; rewards from the oracle;
2. the update order: the actor is trained against V(s_t) from BEFORE the critic's step (a test that fails if it
   read the post-update values); one critic step lowers the value loss; the actor's gradient sign with
   reference == policy; the KL term is zero when policy == reference; both value-model forms;
3. beam search: a value function that prefers X gets X; under an oracle value function never worse than greedy;
   a real policy + critic run in batch;
4. bad inputs: one clear ValueError naming the argument and its value.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.algorithms import oreo
from jaxalign.logprobs import masked_token_logprobs
from jaxalign.models.heads import VALUE_HEAD, state_values
from jaxalign.models.llama import DecoderLM, ModelConfig, init_params
from jaxalign.tasks import arith
from jaxalign.tasks.tokenizer import CharTokenizer
from jaxalign.train.optim import OptimConfig

TOK = CharTokenizer()
SEP = TOK.encode(";")[0]
MODEL = ModelConfig(vocab_size=16, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, mlp_dim=64,
                    max_len=32)
# No warmup, so the very first step moves the parameters.
FAST = dict(actor_optim=OptimConfig(learning_rate=1e-3, warmup_steps=0),
            critic_optim=OptimConfig(learning_rate=1e-2, warmup_steps=0))
PROBLEMS = np.array([[1, 2, 3, 4], [9, 9, 9, 9], [5, 5, 5, 5], [7, 1, 0, 1]])
COMPLETIONS = [arith.solution_text(PROBLEMS[0]), arith.solution_text(PROBLEMS[1]), "5+5=0;0+5=5;5+5=0",
               "7+1=8;8+0=9"]
COMPLETION_LEN = 24


def _encode(texts):
    tokens = np.zeros((len(texts), COMPLETION_LEN), np.int32)
    mask = np.zeros_like(tokens)
    for i, text in enumerate(texts):
        ids = TOK.encode(text) + [TOK.EOS_ID]
        tokens[i, :len(ids)], mask[i, :len(ids)] = ids, 1
    return tokens, mask


@pytest.fixture(scope="module")
def setup():
    params = nn.meta.unbox(init_params(MODEL, jax.random.key(0)))
    prompts, _ = arith.encode_prompts(TOK, [arith.prompt_text(p) for p in PROBLEMS], pad_to=8)
    tokens, mask = _encode(COMPLETIONS)
    batch = oreo.arith_trajectory_batch(PROBLEMS, prompts, tokens, mask)
    return params, {k: jnp.asarray(v) for k, v in batch.items()}


@pytest.fixture(scope="module")
def token_steps():
    cfg = oreo.OreoConfig(level="token", steps=10, batch_size=4, **FAST)
    return cfg, oreo.make_oreo_steps(cfg, MODEL)


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def _max_diff(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(_leaves(a), _leaves(b)))


# ---------------------------------------------------------------------------------------------------------------
# Data.


def test_step_starts_mark_the_first_token_of_every_step_of_a_hand_built_trajectory():
    # prompt "1+2+3+4=" left-padded to 8 (no padding), completion "1+2=3;3+3=6;6+4=10" + EOS, right-padded.
    text = "1+2=3;3+3=6;6+4=10"
    prompt, _ = arith.encode_prompts(TOK, ["1+2+3+4="], pad_to=8)
    tokens, mask = _encode([text])
    batch = oreo.trajectory_batch(prompt, tokens, mask, np.ones(1), separator_id=SEP, pad_id=TOK.PAD_ID)
    expected = [8 + 0, 8 + text.index(";") + 1, 8 + text.rindex(";") + 1]  # '1', the '3' and the '6' after ';'
    assert list(np.nonzero(batch["step_starts"][0])[0]) == expected
    assert batch["completion_mask"][0].sum() == len(text) + 1 and batch["attention_mask"][0].sum() == 8 + len(text) + 1
    # Left-padded prompt: the first response token still starts the first step; a trailing ';' makes EOS a step.
    prompt, _ = arith.encode_prompts(TOK, ["1+2="], pad_to=8)
    tokens, mask = _encode(["3;"])
    batch = oreo.trajectory_batch(prompt, tokens, mask, np.zeros(1), separator_id=SEP, pad_id=TOK.PAD_ID)
    assert list(np.nonzero(batch["step_starts"][0])[0]) == [8, 10]


def test_arith_rewards_are_the_oracle_verdicts(setup):
    _, batch = setup
    expected = [arith.grade(p, c).correct for p, c in zip(PROBLEMS, COMPLETIONS)]
    np.testing.assert_array_equal(np.asarray(batch["reward"]), np.array(expected, np.float32))
    assert expected == [True, True, False, False]


# ---------------------------------------------------------------------------------------------------------------
# The update steps.


def test_actor_uses_the_values_from_before_the_critic_step(setup, token_steps):
    params, batch = setup
    cfg, steps = token_steps
    actor, critic = oreo.init_oreo_states(cfg, MODEL, params, jax.random.key(1))
    # Move the critic off its zero head first, so "before" and "after" values differ on every state.
    critic, _, _ = steps.critic(critic, actor.params, params, batch)
    before = state_values(oreo.value_outputs("critic", MODEL, critic.params, actor.params, batch["tokens"],
                                             batch["attention_mask"])[0], batch["completion_mask"])
    new_actor, new_critic, _ = steps.update(actor, critic, params, batch)
    after = state_values(oreo.value_outputs("critic", MODEL, new_critic.params, actor.params, batch["tokens"],
                                            batch["attention_mask"])[0], batch["completion_mask"])
    assert float(jnp.max(jnp.abs(after - before))) > 1e-3  # the critic step moved the values
    with_before, _ = steps.actor(actor, params, batch, before)
    with_after, _ = steps.actor(actor, params, batch, after)
    gap = _max_diff(with_before.params, with_after.params)
    assert gap > 1e-6
    assert _max_diff(new_actor.params, with_before.params) < gap / 100
    # ... and the critic step inside `update` is exactly the standalone one.
    alone, _, _ = steps.critic(critic, actor.params, params, batch)
    assert _max_diff(new_critic.params, alone.params) < 1e-6


def test_one_critic_step_lowers_the_value_loss(setup, token_steps):
    params, batch = setup
    cfg, steps = token_steps
    _, critic = oreo.init_oreo_states(cfg, MODEL, params, jax.random.key(1))
    losses = []
    for _ in range(2):  # the reported loss is the one before each step
        critic, _, metrics = steps.critic(critic, params, params, batch)
        losses.append(float(metrics["oreo/value_loss"]))
    assert losses[1] < losses[0]
    assert losses[0] == pytest.approx(0.5)  # zero head: V = 0, half the rows have R = 1, log-ratios are 0


def _completion_logprob(params, batch):
    logits, _ = DecoderLM(MODEL).apply({"params": params}, batch["tokens"], batch["attention_mask"])
    return np.asarray(jnp.sum(masked_token_logprobs(logits, batch["tokens"], batch["completion_mask"]), axis=1))


def test_actor_step_with_reference_equal_to_policy_moves_likelihood_towards_the_reward(setup, token_steps):
    params, batch = setup
    cfg, steps = token_steps
    actor, _ = oreo.init_oreo_states(cfg, MODEL, params, jax.random.key(1))
    for reward, value, sign in ((1.0, 0.0, 1), (0.0, 1.0, -1)):
        # R above V: the residual beta * lr + V - R < 0 at lr = 0, so the step must raise the trajectory's
        # likelihood; R below V must lower it.
        data = dict(batch, reward=jnp.full_like(batch["reward"], reward))
        values = jnp.full(batch["tokens"].shape, value)
        new, metrics = steps.actor(actor, params, data, values)
        change = _completion_logprob(new.params, data) - _completion_logprob(params, data)
        assert np.all(sign * change > 0), (reward, change)
        assert float(metrics["oreo/kl"]) == 0.0  # policy == reference before the step: the KL term is exactly 0
        assert float(metrics["oreo/logratio_mean"]) == 0.0


@pytest.mark.parametrize("level", ["step", "response"])
def test_other_levels_and_the_shared_value_head_run(setup, level):
    params, batch = setup
    cfg = oreo.OreoConfig(level=level, value_model="shared", steps=10, batch_size=4, **FAST)
    assert cfg.kl_weight == (0.1 if level == "step" else 0.01)
    actor, critic = oreo.init_oreo_states(cfg, MODEL, params, jax.random.key(1))
    assert set(critic.params) == {VALUE_HEAD}  # the shared form trains a head only
    new_actor, new_critic, metrics = oreo.make_oreo_steps(cfg, MODEL).update(actor, critic, params, batch)
    assert all(np.isfinite(float(v)) for v in metrics.values())
    assert _max_diff(new_critic.params, critic.params) > 0 and _max_diff(new_actor.params, actor.params) > 0


def test_the_separate_critic_starts_from_the_policy_with_a_zero_head(setup):
    params, batch = setup
    critic = oreo.init_critic_params("critic", MODEL, params, jax.random.key(2))
    assert _max_diff(critic["backbone"], params) == 0
    assert all(np.all(x == 0) for x in _leaves(critic["head"]))
    outputs, _ = oreo.value_outputs("critic", MODEL, critic, params, batch["tokens"], batch["attention_mask"])
    assert float(jnp.max(jnp.abs(outputs))) == 0.0


# ---------------------------------------------------------------------------------------------------------------
# Beam search with hand-built proposals: ids of digits and separators from the char tokenizer.

D = {str(d): TOK.encode(str(d))[0] for d in range(10)}


def test_iterative_oreo_samples_each_iteration_from_the_policy_the_previous_one_trained(setup):
    """Iterative OREO: iteration 0 collects with the initial policy, iteration 1 with the policy iteration 0 trained;
    the reference stays the initial (SFT) model; each iteration reports its trajectories' reward."""
    params, batch = setup
    host = {k: np.asarray(v) for k, v in batch.items()}
    prompt_tokens = host["tokens"][:, :8]
    completion, mask = host["tokens"][:, 8:], host["completion_mask"][:, 8:]
    seen = []

    def sample_fn(policy, iteration):
        seen.append(_leaves(policy))
        return prompt_tokens, completion, mask, iteration

    def grade_fn(iteration, tokens, completion_mask):
        return host["reward"] if iteration == 0 else 1.0 - host["reward"]

    cfg = oreo.OreoConfig(level="token", steps=3, batch_size=4, **FAST)
    policy, critic, history = oreo.iterative_oreo(params, params, cfg=cfg, model_cfg=MODEL, iterations=2,
                                                  sample_fn=sample_fn, grade_fn=grade_fn, separator_id=SEP,
                                                  pad_id=TOK.PAD_ID)
    assert len(seen) == 2 and _max_diff(seen[0], params) == 0.0
    assert _max_diff(seen[1], params) > 0  # iteration 1 sampled the trained policy, not the initial one
    assert _max_diff(policy, seen[1]) > 0  # and trained it again
    assert [h["iteration"] for h in history] == [0, 1]
    assert history[0]["reward_mean"] == pytest.approx(float(host["reward"].mean()))
    assert history[1]["reward_mean"] == pytest.approx(1.0 - float(host["reward"].mean()))
    assert VALUE_HEAD not in critic and "head" in critic  # the separate critic LM carried through


def _hand_built_expand(num_candidates, depth=2):
    """Candidate k of every beam is the step "<k+1>;" while the completion has fewer than `depth` steps, then EOS.
    Candidate 0 is the "greedy" (most likely) step."""

    def expand(tokens, mask, rng):
        rows = tokens.shape[0]
        out, out_mask = np.zeros((rows, 2), np.int32), np.zeros((rows, 2), np.int32)
        for r in range(rows):
            steps_so_far = int(np.sum((tokens[r] == SEP) & (mask[r] > 0)))
            if steps_so_far < depth:
                out[r], out_mask[r] = [D[str(r % num_candidates + 1)], SEP], 1
            else:
                out[r, 0], out_mask[r, 0] = TOK.EOS_ID, 1
        return out, out_mask

    return expand


def _texts(result):
    return [TOK.decode(t) for t in result.tokens]


def _prompts(n):
    return arith.encode_prompts(TOK, ["1+2="] * n, pad_to=6)


def test_beam_search_with_one_beam_returns_what_the_value_function_prefers():
    prompts, mask = _prompts(3)

    def score(tokens, mask):  # prefers "2;2;"
        return np.sum(tokens == D["2"], axis=1).astype(np.float32)

    config = oreo.BeamConfig(beams=1, candidates=3, max_steps=20)
    result = oreo.value_guided_beam_search(prompts, mask, expand=_hand_built_expand(3), score=score, config=config,
                                           completion_len=10, eos_id=TOK.EOS_ID, pad_id=TOK.PAD_ID,
                                           rng=jax.random.key(0))
    assert _texts(result) == ["2;2;"] * 3
    assert result.finished.all() and result.steps == 3  # two steps, then the EOS step
    np.testing.assert_array_equal(result.mask.sum(axis=1), [5, 5, 5])  # "2;2;" + EOS


def test_beam_search_is_never_worse_than_greedy_under_an_oracle_value_function():
    # Every answer in {1,2,3}^2: greedy (candidate 0 at every step) always writes "1;1;"; the oracle value of a
    # sequence is 1 when its completion is a prefix of the target (including EOS when finished), else 0.
    targets = [f"{a};{b};" for a in "123" for b in "123"]
    prompts, mask = _prompts(len(targets))
    target_ids = [TOK.encode(t) + [TOK.EOS_ID] for t in targets]

    def oracle(tokens, mask):
        values, per_prompt = [], len(tokens) // len(targets)  # rows are (prompt, beam, candidate), prompt-major
        for r, row in enumerate(tokens):
            ids = target_ids[r // per_prompt]
            completion = [int(t) for t in row if t != TOK.PAD_ID][4:]  # after the 4 tokens of "1+2="
            values.append(float(completion == ids[:len(completion)]))
        return np.array(values, np.float32)

    config = oreo.BeamConfig(beams=2, candidates=3)
    result = oreo.value_guided_beam_search(prompts, mask, expand=_hand_built_expand(3), score=oracle, config=config,
                                           completion_len=10, eos_id=TOK.EOS_ID, pad_id=TOK.PAD_ID,
                                           rng=jax.random.key(0))
    beam_reward = np.array([text == target for text, target in zip(_texts(result), targets)], float)
    greedy_reward = np.array([target == "1;1;" for target in targets], float)
    assert np.all(beam_reward >= greedy_reward)
    assert beam_reward.all() and greedy_reward.sum() == 1


def test_beam_search_with_a_real_policy_and_critic_runs_in_batch(setup):
    params, _ = setup
    critic = oreo.init_critic_params("critic", MODEL, params, jax.random.key(2))
    expand = oreo.policy_step_sampler(params, MODEL, separator=(SEP,), eos_id=TOK.EOS_ID, pad_id=TOK.PAD_ID,
                                      max_step_tokens=6, num_tokens=TOK.vocab_size)
    score = oreo.critic_scorer("critic", MODEL, critic, params, eos_id=TOK.EOS_ID)
    prompts, mask = arith.encode_prompts(TOK, [arith.prompt_text(p) for p in PROBLEMS], pad_to=8)
    result = oreo.value_guided_beam_search(prompts, mask, expand=expand, score=score,
                                           config=oreo.BeamConfig(beams=2, max_steps=3, max_step_tokens=6),
                                           completion_len=COMPLETION_LEN, eos_id=TOK.EOS_ID, pad_id=TOK.PAD_ID,
                                           rng=jax.random.key(3))
    assert result.tokens.shape == (len(PROBLEMS), COMPLETION_LEN) and result.steps <= 3
    lengths = result.mask.sum(axis=1)
    assert np.all((lengths >= 1) & (lengths <= 3 * 6))  # at most max_steps steps of max_step_tokens
    assert np.all(result.tokens[result.mask == 0] == TOK.PAD_ID)


def test_left_aligned_puts_the_last_real_token_in_the_last_column():
    prompt = np.array([[0, 5, 6]])
    tokens, mask = oreo.left_aligned(prompt, prompt != 0, np.array([[7, 8, 0, 0]]), np.array([2]), pad_id=0)
    np.testing.assert_array_equal(tokens, [[0, 0, 0, 5, 6, 7, 8]])
    np.testing.assert_array_equal(mask, [[0, 0, 0, 1, 1, 1, 1]])


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs.


@pytest.mark.parametrize("make, match", [
    (lambda: oreo.OreoConfig(level="sentence"), r"oreo\.level must be one of .*'sentence'"),
    (lambda: oreo.OreoConfig(value_model="twin"), r"oreo\.value_model must be one of .*'twin'"),
    (lambda: oreo.OreoConfig(beta=0.0), r"oreo\.beta must be .* got 0\.0"),
    (lambda: oreo.BeamConfig(beams=0), r"beam\.beams must be an integer >= 1, got 0"),
    (lambda: oreo.BeamConfig(candidates=0), r"beam\.candidates must be .* got 0"),
    (lambda: oreo.trajectory_batch(np.zeros((2, 4)), np.zeros((2, 5)), np.zeros((2, 6)), np.zeros(2),
                                   separator_id=SEP, pad_id=0), r"completion_mask must have shape \(2, 5\).*\(2, 6\)"),
    (lambda: oreo.trajectory_batch(np.zeros((2, 4)), np.zeros((2, 5)), np.zeros((2, 5)), np.zeros(3),
                                   separator_id=SEP, pad_id=0), r"reward must have shape \(2,\).*\(3,\)"),
    (lambda: oreo.trajectory_batch(np.zeros((2, 4)), np.zeros((3, 5)), np.zeros((3, 5)), np.zeros(3),
                                   separator_id=SEP, pad_id=0), r"completion_tokens must have shape \(2, "),
    (lambda: oreo.check_trajectory_batch({"tokens": np.zeros((2, 4))}), r"missing \['attention_mask'"),
    (lambda: oreo.init_critic_params("twin", MODEL, None, jax.random.key(0)), r"value_model must be one of .*'twin'"),
])
def test_bad_inputs_give_one_clear_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_a_nan_reward_stops_training_before_a_nonfinite_state_is_saved(setup, tmp_path):
    """Two steps on finite rewards are saved; continuing on NaN rewards makes the losses non-finite: OREO stops at
    step 3 naming it and the last good checkpoint, step 2, which stays the newest saved step of both states."""
    from jaxalign.data.iterator import ArrayDataset
    from jaxalign.train.checkpoint import CheckpointConfig, Checkpointer
    from jaxalign.train.loop import DivergenceError

    params, batch = setup
    good = {k: np.asarray(v) for k, v in batch.items()}
    bad = dict(good, reward=np.full_like(good["reward"], np.nan))
    cfg = oreo.OreoConfig(level="token", steps=2, batch_size=2, **FAST)
    actor, critic = oreo.init_oreo_states(cfg, MODEL, params, jax.random.key(0))
    config = CheckpointConfig(every_steps=1, keep_last=3)
    with Checkpointer(str(tmp_path / "actor"), config, {}) as a, Checkpointer(str(tmp_path / "critic"), config, {}) as c:
        oreo.train_oreo(actor, critic, params, ArrayDataset(good), cfg=cfg, model_cfg=MODEL, seed=0,
                        checkpointers=(a, c), log_every=1)
        longer = dataclasses.replace(cfg, steps=4)
        with pytest.raises(DivergenceError, match=r"phase 'oreo' diverged: \S+ = nan at step 3 .*last good checkpoint "
                                                  r"is step 2 in"):
            oreo.train_oreo(actor, critic, params, ArrayDataset(bad), cfg=longer, model_cfg=MODEL, seed=0,
                            checkpointers=(a, c), log_every=1)
        assert a.latest_step() == c.latest_step() == 2


def test_the_update_compiles_once_over_fresh_steps_and_a_restore(setup, tmp_path):
    """Fresh states and restored ones are placed where the update's outputs live, so neither the second step nor
    the first step after a restore compiles the update again."""
    from jaxalign.data.iterator import ArrayDataset
    from jaxalign.train.checkpoint import CheckpointConfig, Checkpointer

    params, batch = setup
    data = ArrayDataset({k: np.asarray(v) for k, v in batch.items()})
    cfg = oreo.OreoConfig(level="token", steps=2, batch_size=2, **FAST)
    steps = oreo.make_oreo_steps(cfg, MODEL)
    actor, critic = oreo.init_oreo_states(cfg, MODEL, params, jax.random.key(0))
    config = CheckpointConfig(every_steps=1, keep_last=3)
    with Checkpointer(str(tmp_path / "actor"), config, {}) as a, Checkpointer(str(tmp_path / "critic"), config, {}) as c:
        oreo.train_oreo(actor, critic, params, data, cfg=cfg, model_cfg=MODEL, seed=0, steps=steps, checkpointers=(a, c))
        longer = dataclasses.replace(cfg, steps=4)
        actor, _, _ = oreo.train_oreo(actor, critic, params, data, cfg=longer, model_cfg=MODEL, seed=0, steps=steps,
                                      checkpointers=(a, c))  # restores step 2, then steps 3 and 4
    assert int(actor.step) == 4
    assert steps.update._cache_size() == 1
