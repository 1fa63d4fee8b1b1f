"""Token-level PPO with DR-PO's dataset resets (jaxalign.algorithms.lm_ppo; Chang et al. 2024, docs/algorithms.md).

1. returns: GAE over action tokens against a Python loop; the per-token KL penalty and terminal reward;
2. resets: h = 0 without resets and U{1..len-1} with them; the sampler prompt and the training row hold exactly the
   offline response's first h tokens; with beta_reset = 0 the rollouts are plain `generate` samples;
3. the objective: equal to rl.ppo.ppo_loss when every entry is an action; the clip (gradient zero exactly where the
   clipped branch is active); no gradient reaches teacher-forced, prompt or padding positions, from the loss or
   through the model;
4. the loop learns a toy reward and rejects bad configs.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.algorithms import lm_ppo
from jaxalign.data.iterator import ArrayDataset
from jaxalign.logprobs import token_logprobs
from jaxalign.models.llama import DecoderLM, ModelConfig, init_params
from jaxalign.sampling import SamplingConfig, generate
from jaxalign.tasks import arith
from jaxalign.tasks.tokenizer import CharTokenizer
from jaxalign.train.optim import OptimConfig
from rl.ppo import ppo_loss

TOK = CharTokenizer()
MODEL = ModelConfig(vocab_size=16, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, mlp_dim=64,
                    max_len=32)
PROMPT_LEN, WIDTH = 8, 24
PROBLEMS = np.array([[1, 2, 3, 4], [9, 9, 9, 9], [5, 5, 5, 5], [7, 1, 0, 1], [3, 8, 2, 6], [0, 0, 4, 9]])


def gae_loop(rewards, values, mask, gamma, lam):
    """GAE written out per row over its action tokens: the independent reference."""
    advantages = np.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        steps = np.nonzero(mask[b])[0]
        following = 0.0
        for k in reversed(range(len(steps))):
            t = steps[k]
            next_value = values[b, steps[k + 1]] if k + 1 < len(steps) else 0.0
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            following = delta + gamma * lam * following
            advantages[b, t] = following
    return advantages, np.where(mask, advantages + values, 0.0)


def spans(lengths, starts, width):
    """[B, width] masks with one contiguous run of lengths[b] ones from starts[b]."""
    position = np.arange(width)[None, :]
    return (position >= np.array(starts)[:, None]) & (position < np.array(starts)[:, None] + np.array(lengths)[:, None])


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.7), (1.0, 1.0)])
def test_token_gae_matches_a_python_loop(gamma, lam):
    rng = np.random.default_rng(0)
    mask = spans([5, 1, 0, 9, 3], [8, 12, 8, 10, 17], 20)  # a one-token row and a row without actions
    rewards = rng.normal(size=mask.shape).astype(np.float32)
    values = rng.normal(size=mask.shape).astype(np.float32)  # garbage off the mask must not matter
    advantages, returns = lm_ppo.token_advantages(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma,
                                                  lam)
    expected_adv, expected_ret = gae_loop(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(advantages, expected_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(returns, expected_ret, rtol=1e-5, atol=1e-5)
    assert not np.any(np.asarray(advantages)[~mask])


def test_token_rewards_are_the_kl_penalty_plus_the_terminal_reward_on_the_last_action():
    mask = spans([3, 2], [2, 4], 7)
    logp = jnp.asarray(np.full(mask.shape, -1.0, np.float32))
    reference = jnp.asarray(np.full(mask.shape, -1.5, np.float32))
    rewards = np.asarray(lm_ppo.token_rewards(jnp.array([1.0, 0.25]), logp, reference, jnp.asarray(mask), 0.1))
    expected = np.where(mask, -0.1 * 0.5, 0.0)
    expected[0, 4] += 1.0
    expected[1, 5] += 0.25
    np.testing.assert_allclose(rewards, expected, rtol=1e-6)


def test_reset_lengths():
    lengths = jnp.array([23, 12, 2, 1, 0] * 400)
    key = jax.random.key(3)
    assert not np.any(lm_ppo.sample_reset_lengths(key, lengths, 0.0))
    h = np.asarray(lm_ppo.sample_reset_lengths(key, lengths, 1.0)).reshape(-1, 5)
    np.testing.assert_array_equal(h[:, 2], 1)  # len 2: the only reset point
    np.testing.assert_array_equal(h[:, 3:], 0)  # no reset point exists
    assert h[:, 0].min() == 1 and h[:, 0].max() == 22 and len(np.unique(h[:, 0])) == 22  # U{1..len-1}
    assert h[:, 1].min() == 1 and h[:, 1].max() == 11
    half = np.asarray(lm_ppo.sample_reset_lengths(key, jnp.full(4000, 20), 0.3))
    assert 0.27 < np.mean(half > 0) < 0.33


@pytest.fixture(scope="module")
def rows():
    prompts, prompt_mask = arith.encode_prompts(TOK, [arith.prompt_text(p) for p in PROBLEMS], pad_to=PROMPT_LEN)
    reference = np.zeros((len(PROBLEMS), WIDTH), np.int32)
    reference_mask = np.zeros_like(reference)
    for i, p in enumerate(PROBLEMS):
        ids = TOK.encode(arith.solution_text(p)) + [TOK.EOS_ID]
        reference[i, :len(ids)], reference_mask[i, :len(ids)] = ids, 1
    prompts[3, :3], prompt_mask[3, :3] = 0, 0  # a shorter prompt: the padding is not the same on every row
    return {"problem": PROBLEMS, "prompt_tokens": prompts, "prompt_mask": prompt_mask, "reference_tokens": reference,
            "reference_mask": reference_mask}


@pytest.fixture(scope="module")
def params():
    return nn.meta.unbox(init_params(MODEL, jax.random.key(0)))


def test_the_sampler_prompt_is_the_prompt_plus_the_first_h_reference_tokens(rows):
    h = jnp.array([0, 1, 5, 17, 3, 12])
    tokens, mask = lm_ppo.reset_prompts(jnp.asarray(rows["prompt_tokens"]), jnp.asarray(rows["prompt_mask"]),
                                        jnp.asarray(rows["reference_tokens"]), h, TOK.PAD_ID)
    tokens, mask = np.asarray(tokens), np.asarray(mask).astype(bool)
    assert tokens.shape == (len(PROBLEMS), PROMPT_LEN + WIDTH)
    for b, hb in enumerate(np.asarray(h)):
        prompt = rows["prompt_tokens"][b][rows["prompt_mask"][b].astype(bool)]
        expected = np.concatenate([prompt, rows["reference_tokens"][b, :hb]])
        np.testing.assert_array_equal(tokens[b][mask[b]], expected)
        assert mask[b, -len(expected):].all() and not mask[b, :-len(expected)].any()  # left-padded
        assert np.all(tokens[b][~mask[b]] == TOK.PAD_ID)


def test_assembled_rollouts_teacher_force_exactly_the_prefix(rows):
    h = jnp.array([0, 1, 5, 17, 3, 18])  # up to len - 1 (18 and 19 tokens)
    continuation = np.arange(2, 2 + WIDTH)[None].repeat(len(PROBLEMS), 0).astype(np.int32) % 13 + 2
    continuation_mask = spans([4, 24, 7, 10, 1, 24], [0] * 6, WIDTH).astype(np.int32)
    out = {k: np.asarray(v) for k, v in lm_ppo.assemble_rollouts(
        jnp.asarray(rows["prompt_tokens"]), jnp.asarray(rows["prompt_mask"]), jnp.asarray(rows["reference_tokens"]),
        h, jnp.asarray(continuation), jnp.asarray(continuation_mask), TOK.PAD_ID).items()}
    for b, hb in enumerate(np.asarray(h)):
        completion = out["tokens"][b, PROMPT_LEN:]
        np.testing.assert_array_equal(completion[:hb], rows["reference_tokens"][b, :hb])
        np.testing.assert_array_equal(out["forced_mask"][b, PROMPT_LEN:], np.arange(WIDTH) < hb)
        kept = min(continuation_mask[b].sum(), WIDTH - hb)  # the continuation is cut at the completion budget
        np.testing.assert_array_equal(completion[hb:hb + kept], continuation[b, :kept])
        np.testing.assert_array_equal(np.nonzero(out["action_mask"][b])[0], PROMPT_LEN + hb + np.arange(kept))
        assert not np.any(out["action_mask"][b] & out["forced_mask"][b])
        np.testing.assert_array_equal(out["tokens"][b, :PROMPT_LEN], rows["prompt_tokens"][b])
        np.testing.assert_array_equal(out["completion_mask"][b], out["forced_mask"][b] | out["action_mask"][b])
        np.testing.assert_array_equal(out["attention_mask"][b, PROMPT_LEN:], out["completion_mask"][b, PROMPT_LEN:])


def test_collected_rollouts(rows, params):
    key = jax.random.key(5)
    common = dict(model_cfg=MODEL, max_new_tokens=WIDTH, eos_id=TOK.EOS_ID, pad_id=TOK.PAD_ID,
                  num_tokens=TOK.vocab_size)
    reset = lm_ppo.collect_rollouts(params, rows, key, beta_reset=1.0, **common)
    h = reset["prefix_length"]
    assert np.all((h >= 1) & (h < rows["reference_mask"].sum(-1)))
    for b in range(len(PROBLEMS)):
        np.testing.assert_array_equal(reset["completion_tokens"][b, :h[b]], rows["reference_tokens"][b, :h[b]])
        assert reset["action_mask"][b].sum() >= 1
    # beta_reset = 0: the extra left padding changes nothing; the rollouts are the sampler's on the plain prompts.
    plain = lm_ppo.collect_rollouts(params, rows, key, beta_reset=0.0, **common)
    assert not plain["prefix_length"].any() and not plain["forced_mask"].any()
    _, key_sample = jax.random.split(key)
    tokens, mask = generate(params, jnp.asarray(rows["prompt_tokens"]), jnp.asarray(rows["prompt_mask"]), key_sample,
                            cfg=MODEL, sampling=SamplingConfig(max_new_tokens=WIDTH, temperature=1.0),
                            eos_id=TOK.EOS_ID, pad_id=TOK.PAD_ID, num_tokens=TOK.vocab_size)
    np.testing.assert_array_equal(plain["completion_tokens"], tokens)
    np.testing.assert_array_equal(plain["action_mask"][:, PROMPT_LEN:], mask)


def test_masked_loss_equals_rl_ppo_loss_when_every_entry_is_an_action():
    rng = np.random.default_rng(1)
    n, vocab = 64, 7
    logits = jnp.asarray(rng.normal(size=(n, vocab)), jnp.float32)
    actions = jnp.asarray(rng.integers(0, vocab, n))
    old_logp = jnp.asarray(rng.normal(-2.0, 0.3, n), jnp.float32)
    values, old_values, targets, advantages = (jnp.asarray(rng.normal(size=n), jnp.float32) for _ in range(4))
    expected, expected_metrics = ppo_loss(logits, values, actions, old_logp, old_values, advantages, targets,
                                          clip_eps=0.2, vf_coef=0.5, ent_coef=0.01, normalize_advantages=False)
    log_pi = jax.nn.log_softmax(logits)
    logp = jnp.take_along_axis(log_pi, actions[:, None], axis=-1)[:, 0]
    entropy = -jnp.sum(jnp.exp(log_pi) * log_pi, axis=-1)
    loss, metrics = lm_ppo.ppo_token_loss(logp[None], old_logp[None], advantages[None], values[None],
                                          old_values[None], targets[None], jnp.ones((1, n)), clip_eps=0.2, vf_coef=0.5,
                                          entropy=entropy[None], ent_coef=0.01)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    for name in expected_metrics:
        np.testing.assert_allclose(metrics[name], expected_metrics[name], rtol=1e-5, atol=1e-7)
    assert 0 < float(metrics["clip_fraction"]) < 1


def test_the_clip_stops_the_gradient_exactly_where_the_clipped_branch_is_active():
    old = jnp.zeros((1, 6))
    log_ratio = jnp.log(jnp.array([[1.5, 1.5, 0.5, 0.5, 1.1, 0.9]]))
    advantages = jnp.array([[1.0, -1.0, 1.0, -1.0, 1.0, -1.0]])
    zeros = jnp.zeros((1, 6))

    def loss(logp):
        return lm_ppo.ppo_token_loss(logp, old, advantages, zeros, zeros, zeros, jnp.ones((1, 6)), clip_eps=0.2,
                                     vf_coef=0.0)[0]

    grad = np.asarray(jax.grad(loss)(log_ratio))[0]
    # r > 1 + eps with A > 0 and r < 1 - eps with A < 0 are clipped (no incentive to move further); the others are not.
    np.testing.assert_array_equal(grad[[0, 3]], 0.0)
    ratio = np.exp(np.asarray(log_ratio)[0])
    for i in (1, 2, 4, 5):
        np.testing.assert_allclose(grad[i], -ratio[i] * float(advantages[0, i]) / 6, rtol=1e-5)
    value = float(loss(log_ratio))
    np.testing.assert_allclose(value, -np.mean([1.2, -1.5, 0.5, -0.8, 1.1, -0.9]), rtol=1e-5)
    # The value clip: a value moved past eps from the rollout's toward a worse target keeps the larger error.
    values, returns = jnp.array([[0.5]]), jnp.array([[1.0]])
    clipped = lm_ppo.ppo_token_loss(zeros[:, :1], zeros[:, :1], zeros[:, :1], values, zeros[:, :1], returns,
                                    jnp.ones((1, 1)), clip_eps=0.2, vf_coef=1.0)[1]["value_loss"]
    free = lm_ppo.ppo_token_loss(zeros[:, :1], zeros[:, :1], zeros[:, :1], values, zeros[:, :1], returns,
                                 jnp.ones((1, 1)), clip_eps=0.2, vf_coef=1.0, clip_value=False)[1]["value_loss"]
    np.testing.assert_allclose([clipped, free], [0.5 * 0.8 ** 2, 0.5 * 0.5 ** 2], rtol=1e-6)


def _prepared_batch(rows, h):
    """A reset rollout batch (random continuations) with random targets, ready for `ppo_minibatch_loss`."""
    rng = np.random.default_rng(4)
    continuation = rng.integers(2, TOK.vocab_size, (len(PROBLEMS), WIDTH)).astype(np.int32)
    continuation_mask = spans([5, 9, 24, 3, 11, 2], [0] * 6, WIDTH).astype(np.int32)
    batch = lm_ppo.assemble_rollouts(jnp.asarray(rows["prompt_tokens"]), jnp.asarray(rows["prompt_mask"]),
                                     jnp.asarray(rows["reference_tokens"]), h, jnp.asarray(continuation),
                                     jnp.asarray(continuation_mask), TOK.PAD_ID)
    shape = batch["tokens"].shape
    for name in ("old_logp", "old_values", "advantages", "returns"):
        batch[name] = jnp.asarray(rng.normal(size=shape), jnp.float32)
    return batch


@pytest.mark.parametrize("value_model", ["critic", "shared"])
def test_no_gradient_flows_through_teacher_forced_tokens(rows, params, value_model):
    cfg = lm_ppo.LMPPOConfig(value_model=value_model, ent_coef=0.01)
    h = jnp.array([0, 3, 7, 12, 1, 17])
    batch = _prepared_batch(rows, h)
    state = lm_ppo.init_ppo_state(cfg, MODEL, params, jax.random.key(1))
    state = state.replace(params={**state.params, "critic": jax.tree_util.tree_map(  # a critic that is not all zero
        lambda x: x + 0.01 * jax.random.normal(jax.random.key(9), x.shape), state.params["critic"])})
    grad_fn = jax.jit(jax.grad(lambda p, b: lm_ppo.ppo_minibatch_loss(p, b, cfg=cfg, model_cfg=MODEL)[0]))
    grads = grad_fn(state.params, batch)
    # Change every target on the forced, prompt and padding positions: neither loss nor gradient may move.
    off = ~np.asarray(batch["action_mask"]).astype(bool)
    assert np.asarray(batch["forced_mask"]).sum() == int(h.sum())
    scrambled = dict(batch, **{k: jnp.where(off, 1e3 * jnp.sign(batch[k]) + 7.0, batch[k])
                               for k in ("old_logp", "old_values", "advantages", "returns")})
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grad_fn(state.params, scrambled))):
        np.testing.assert_array_equal(a, b)
    assert any(np.abs(np.asarray(g)).max() > 0 for g in jax.tree_util.tree_leaves(grads))
    # Through the model's outputs: the logits that predict a forced token get exactly zero gradient.
    tokens, mask = batch["tokens"], batch["action_mask"]

    def loss_of_logits(logits):
        logp = jnp.where(mask.astype(bool), token_logprobs(logits, tokens), 0.0)
        return lm_ppo.ppo_token_loss(logp, batch["old_logp"], batch["advantages"], jnp.zeros(mask.shape),
                                     batch["old_values"], batch["returns"], mask, clip_eps=0.2, vf_coef=0.5,
                                     entropy=lm_ppo.token_entropy(logits), ent_coef=0.01)[0]

    logits = jax.random.normal(jax.random.key(3), tokens.shape + (MODEL.vocab_size,))
    g = np.asarray(jax.grad(loss_of_logits)(logits))
    predicts = np.pad(off[:, 1:], ((0, 0), (0, 1)), constant_values=True)  # logits[t] predict token t + 1
    assert np.all(g[predicts] == 0)
    assert np.abs(g[~predicts]).sum(-1).min() > 0


def test_ppo_learns_a_toy_reward(rows, params):
    """Reward 1 when the first generated token is the target: 10 updates of 6 rollouts make it near certain (a wide
    clip, 0.5, lets each update move far; lambda = 1 gives the first token the same credit as the last)."""
    prompt, prompt_mask = jnp.asarray(rows["prompt_tokens"]), jnp.asarray(rows["prompt_mask"])

    def first_token_probs(policy):
        logits, _ = DecoderLM(MODEL).apply({"params": policy}, prompt, prompt_mask)
        return np.asarray(jax.nn.softmax(logits[:, -1, :TOK.vocab_size])).mean(0)

    start = first_token_probs(params)
    target = int(np.argsort(start)[-2])  # the runner-up: the policy has to move mass onto it
    cfg = lm_ppo.LMPPOConfig(num_updates=10, rollouts_per_update=6, update_epochs=4, num_minibatches=2, kl_coef=0.0,
                             gae_lambda=1.0, clip_eps=0.5,
                             policy_optim=OptimConfig(learning_rate=1e-2, warmup_steps=0),
                             critic_optim=OptimConfig(learning_rate=1e-2, warmup_steps=0))
    state = lm_ppo.init_ppo_state(cfg, MODEL, params, jax.random.key(0))
    state, records = lm_ppo.train_lm_ppo(
        state, params, ArrayDataset(rows), cfg=cfg, model_cfg=MODEL, seed=0, max_new_tokens=WIDTH,
        reward_fn=lambda batch_rows, completions: (completions[:, 0] == target).astype(np.float32),
        eos_id=TOK.EOS_ID, pad_id=TOK.PAD_ID, num_tokens=TOK.vocab_size)
    assert len(records) == 10 and int(state.step) == 10 * cfg.steps_per_update
    after = first_token_probs(state.params["policy"])[target]
    assert 0.05 < start[target] < 0.2 and after > 0.8, (start[target], after)
    assert np.mean([r["reward_mean"] for r in records[-3:]]) > np.mean([r["reward_mean"] for r in records[:3]])


@pytest.mark.parametrize("changes, message", [
    ({"beta_reset": 1.5}, "ppo.beta_reset must be a number in"),
    ({"rollouts_per_update": 30, "num_minibatches": 4}, "must be divisible by ppo.num_minibatches"),
    ({"gae_lambda": -0.1}, "ppo.gae_lambda must be a number in"),
    ({"clip_eps": 0.0}, "ppo.clip_eps must be a number > 0"),
    ({"kl_coef": -1.0}, "ppo.kl_coef must be a number >= 0"),
    ({"value_model": "twin"}, "ppo.value_model must be one of"),
    ({"num_updates": 0}, "ppo.num_updates must be an integer >= 1"),
])
def test_bad_configs(changes, message):
    with pytest.raises(ValueError, match=message):
        lm_ppo.LMPPOConfig(**changes)


def test_a_nan_reward_stops_the_run_before_anything_is_saved(rows, params, tmp_path):
    """A reward model that returns NaN makes the loss non-finite: the run stops at that update with one error naming
    the update and the checkpoint situation, and saves nothing non-finite."""
    from jaxalign.train.checkpoint import CheckpointConfig, Checkpointer
    from jaxalign.train.loop import DivergenceError

    cfg = lm_ppo.LMPPOConfig(num_updates=3, rollouts_per_update=6, update_epochs=1, num_minibatches=2)
    state = lm_ppo.init_ppo_state(cfg, MODEL, params, jax.random.key(0))
    with Checkpointer(str(tmp_path / "ppo"), CheckpointConfig(every_steps=1, keep_last=3), {}) as ckpt:
        with pytest.raises(DivergenceError, match=r"phase 'ppo' diverged: \w+ = nan at update 1 .*no checkpoint "
                                                  r"of this phase was saved"):
            lm_ppo.train_lm_ppo(state, params, ArrayDataset(rows), cfg=cfg, model_cfg=MODEL, seed=0,
                                max_new_tokens=WIDTH, reward_fn=lambda r, c: np.full(len(c), np.nan, np.float32),
                                eos_id=TOK.EOS_ID, pad_id=TOK.PAD_ID, num_tokens=TOK.vocab_size, checkpointer=ckpt)
        assert ckpt.latest_step() is None
