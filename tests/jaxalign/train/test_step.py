"""Tests for jaxalign.train.step and jaxalign.train.optim: exact gradient accumulation (SFT with unequal token counts
per microbatch, DPO), online vs precomputed reference, the DPO loss at init, the learning-rate schedule, decoupled
weight decay and gradient clipping."""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxalign.data.position import DataPosition
from jaxalign.logprobs import pair_token_logprobs
from jaxalign.models.llama import DecoderLM, ModelConfig, init_params
from jaxalign.train.optim import OptimConfig, learning_rate_schedule, make_optimizer
from jaxalign.train.state import TrainState
from jaxalign.train.step import accumulated_gradients, dpo_loss_fn, logits_fn, make_train_step, sft_loss_fn

# One layer: the step logic is independent of depth (model numerics are pinned in models/test_llama.py), and a
# shallower graph compiles faster on a small CPU.
CFG = ModelConfig(vocab_size=32, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=64, max_len=16)
MODEL = DecoderLM(CFG)
SFT_LOSS = sft_loss_fn(MODEL)
DPO_LOSS = dpo_loss_fn(MODEL, beta=0.5)
WIDTH = 8
BATCH = 8
ACCUM = 4
# No warmup (lr > 0 at once) and a clip far above the gradient norm, so the update sees the raw gradient scale.
OPTIM = OptimConfig(learning_rate=1e-2, warmup_steps=0, weight_decay=0.01, clip_norm=1e6)
TX = make_optimizer(OPTIM, total_steps=10)
RTOL, ATOL = 1e-5, 1e-7


# LLVM codegen at -O0 (xla_backend_optimization_level=0) for the functions jitted here: these tiny graphs compile
# ~40% faster on a small CPU, and what the tests check is the JAX program, not LLVM's optimisations.
fast_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


@functools.lru_cache(maxsize=None)
def params(seed: int = 0):
    """fp32 parameters of CFG's shapes drawn with NumPy (jitting flax's random init costs seconds of compile)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda key: nn.meta.unbox(init_params(CFG, key)), jax.random.key(0))
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.asarray((1.0 + 0.1 * rng.standard_normal(x.shape)) if "scale" in jax.tree_util.keystr(path)
                                    else 0.2 * rng.standard_normal(x.shape), jnp.float32), shapes)


# Jitted once and shared: eager optax/TrainState code compiles every primitive separately and is slow on a CPU.
apply_gradients = fast_jit(lambda state, grads: state.apply_gradients(grads))


@fast_jit
def _fresh_state_and_fake_gradient(p):
    fake = jax.tree_util.tree_map(lambda x: 0.01 * jnp.cos(37.0 * x + 1.0), p)  # fixed, not aligned with p
    return TrainState.create(p, TX, jax.random.key(0)), fake


@functools.lru_cache(maxsize=None)
def warm_state():
    """A state one AdamW step in (with a fixed pseudo-gradient), so the next update depends on the gradient's scale
    (Adam's very first step is ~lr * sign(g) and would hide a wrongly normalised gradient)."""
    return apply_gradients(*_fresh_state_and_fake_gradient(params()))


# The accumulating train steps under test.
sft_accum_step = fast_jit(make_train_step(SFT_LOSS, ACCUM))
dpo_accum_step = fast_jit(make_train_step(DPO_LOSS, ACCUM))
# (loss, mean gradient, metrics) on the whole batch in one go: the reference update is apply_gradients on these.
sft_value_and_grad = fast_jit(lambda p, batch: accumulated_gradients(SFT_LOSS, p, None, batch, 1))
dpo_value_and_grad = fast_jit(lambda p, frozen, batch: accumulated_gradients(DPO_LOSS, p, frozen, batch, 1))


def right_padded(lengths, prompt, seed):
    """Tokens [B, WIDTH] with `prompt` prompt tokens and lengths[i] completion tokens per row, right padded."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, CFG.vocab_size, (len(lengths), WIDTH)).astype(np.int32)
    attention = np.zeros_like(tokens)
    completion = np.zeros_like(tokens)
    for i, n in enumerate(lengths):
        attention[i, :prompt + n] = 1
        completion[i, prompt:prompt + n] = 1
    return np.where(attention == 1, tokens, 0), attention, completion


# Completion lengths per row. Microbatch k holds rows k and k + ACCUM, so the microbatches hold 2, 3, 5 and 12
# completion tokens: a mean of per-microbatch token means weights them very differently from the token mean.
SFT_LENGTHS = (1, 2, 3, 6, 1, 1, 2, 6)


def sft_batch():
    tokens, attention, completion = right_padded(SFT_LENGTHS, prompt=2, seed=0)
    return {"tokens": tokens, "attention_mask": attention, "completion_mask": completion}


def dpo_batch():
    c_tok, c_att, c_comp = right_padded((1, 5, 2, 3, 4, 1, 6, 2), prompt=2, seed=1)
    r_tok, r_att, r_comp = right_padded((3, 1, 4, 6, 2, 2, 1, 5), prompt=2, seed=2)
    r_tok[:, :2] = c_tok[:, :2]  # same prompts
    return {"chosen_tokens": c_tok, "chosen_attention_mask": c_att, "chosen_completion_mask": c_comp,
            "rejected_tokens": r_tok, "rejected_attention_mask": r_att, "rejected_completion_mask": r_comp}


def assert_trees_close(a, b, rtol=RTOL, atol=ATOL):
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


def max_tree_diff(a, b) -> float:
    pairs = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in pairs)


# ---------------------------------------------------------------------------------------------------------------
# Gradient accumulation.


def test_sft_gradient_accumulation_equals_full_batch_with_unequal_token_counts():
    """One train step with grad_accum_steps=4 gives the same AdamW update (and loss, gradient norm) as the gradient
    of the 4x batch in one go, although the microbatches hold 2, 3, 5 and 12 completion tokens (sum of NLL sums /
    sum of token counts); a mean of microbatch means would move the parameters measurably differently, and this
    test checks that it would notice."""
    state, batch = warm_state(), sft_batch()
    accum_state, accum_metrics = sft_accum_step(state, None, batch, DataPosition.start())
    loss, grads, _ = sft_value_and_grad(state.params, batch)
    full_state = apply_gradients(state, grads)
    np.testing.assert_allclose(accum_metrics["loss"], loss, rtol=RTOL)
    np.testing.assert_allclose(accum_metrics["grad_norm"], optax.tree.norm(grads), rtol=RTOL)
    # atol 1e-6 as in the DPO test below: Adam divides each gradient element by its own running scale, so the fp32
    # summation-order noise of an element whose gradient is ~0 reaches its update at up to ~lr scale (2.3e-7 seen on
    # one of 512 elements on one CPU); the mean-of-means update below is > 1e-4 away.
    assert_trees_close(accum_state.params, full_state.params, atol=1e-6)
    assert int(accum_state.step) == int(state.step) + 1

    # Per microbatch (rows k, k+4, as the library splits them): the token-mean loss and gradient, computed on the
    # full-shape batch with every other row's completion mask zeroed (such rows contribute exactly nothing).
    rows = np.arange(BATCH)
    micro = [dict(batch, completion_mask=batch["completion_mask"] * (rows % ACCUM == k)[:, None])
             for k in range(ACCUM)]
    counts = [int(m["completion_mask"].sum()) for m in micro]
    assert counts == [2, 3, 5, 12]
    losses, micro_grads, _ = zip(*[sft_value_and_grad(state.params, m) for m in micro])
    # The full-batch loss is the token mean over the whole batch: microbatch means weighted by their token counts.
    np.testing.assert_allclose(loss, sum(l * c for l, c in zip(losses, counts)) / sum(counts), rtol=RTOL)
    # Sensitivity: the mean-of-means update is far outside the tolerance used above.
    mean_of_means = jax.tree_util.tree_map(lambda *g: sum(g) / ACCUM, *micro_grads)
    wrong = apply_gradients(state, mean_of_means)
    assert max_tree_diff(wrong.params, full_state.params) > 1000 * ATOL


def test_dpo_gradient_accumulation_equals_full_batch():
    """For DPO (online frozen reference, pairs of unequal lengths) one step with grad_accum_steps=4 equals the
    update from the full batch's gradient.

    atol is 1e-6 rather than 1e-7: the DPO logit is a difference of summed log-probs, whose fp32 cancellation noise
    (summation order differs between the two paths) Adam passes on to the occasional parameter."""
    state, batch, reference = warm_state(), dpo_batch(), params(1)
    accum_state, accum_metrics = dpo_accum_step(state, reference, batch, DataPosition.start())
    loss, grads, metrics = dpo_value_and_grad(state.params, reference, batch)
    full_state = apply_gradients(state, grads)
    np.testing.assert_allclose(accum_metrics["loss"], loss, rtol=RTOL)
    np.testing.assert_allclose(accum_metrics["grad_norm"], optax.tree.norm(grads), rtol=RTOL)
    np.testing.assert_allclose(accum_metrics["rewards/accuracy"], metrics["rewards/accuracy"], rtol=RTOL)
    np.testing.assert_allclose(accum_metrics["rewards/margin"], metrics["rewards/margin"], rtol=1e-4, atol=1e-6)
    assert_trees_close(accum_state.params, full_state.params, atol=1e-6)
    assert max_tree_diff(full_state.params, state.params) > 1e-4  # the step did move the parameters


def test_dpo_with_sft_term_accumulates_exactly():
    """The accumulation contract (step.py): summing the loss_fn totals and counts over microbatches and dividing once
    equals total / count on the full batch; here for DPO + sft_weight * (per-pair token-mean NLL of the chosen
    completions), whose chosen completions have different lengths in different microbatches.
    """
    loss_fn = fast_jit(dpo_loss_fn(MODEL, beta=0.5, sft_weight=1.0))
    state, batch, reference = warm_state(), dpo_batch(), params(1)
    total, (count, _) = loss_fn(state.params, reference, batch)
    micro = [loss_fn(state.params, reference, jax.tree_util.tree_map(lambda x: x[k::ACCUM], batch))
             for k in range(ACCUM)]
    accumulated = float(sum(t for t, _ in micro) / sum(c for _, (c, _) in micro))
    full = float(total / count)
    assert math.isclose(accumulated, full, rel_tol=RTOL), (
        f"DPO+SFT loss accumulated over {ACCUM} microbatches is {accumulated:.6f} but {full:.6f} on the full batch")


# ---------------------------------------------------------------------------------------------------------------
# The DPO loss.


def test_dpo_online_reference_equals_precomputed_reference_logprobs():
    """Passing frozen reference params (one extra forward) or the reference's per-token log-probs in the batch
    (reference_chosen / reference_rejected, frozen=None) gives the same loss, gradients and metrics."""
    policy, reference, batch = params(), params(1), dpo_batch()
    ref_chosen, ref_rejected = pair_token_logprobs(fast_jit(logits_fn(MODEL)), reference, batch)
    precomputed = dict(batch, reference_chosen=ref_chosen, reference_rejected=ref_rejected)
    online_loss, online_grads, online_metrics = dpo_value_and_grad(policy, reference, batch)
    pre_loss, pre_grads, pre_metrics = dpo_value_and_grad(policy, None, precomputed)
    np.testing.assert_allclose(pre_loss, online_loss, rtol=1e-6)
    # Reference log-probs computed outside vs inside the jitted step differ by fp32 fusion noise (~1e-7).
    assert_trees_close(pre_grads, online_grads, rtol=1e-4, atol=1e-6)
    assert_trees_close(pre_metrics, online_metrics, rtol=1e-5, atol=1e-7)
    assert abs(float(online_loss) - math.log(2)) > 1e-3  # a different reference: not the trivial value


def test_dpo_loss_at_init_is_log_two():
    """With policy == reference every implicit reward is 0, so -log sigmoid(0) = log 2 and the margin is 0."""
    value, _, metrics = dpo_value_and_grad(params(), params(), dpo_batch())
    np.testing.assert_allclose(value, math.log(2.0), rtol=1e-6)
    np.testing.assert_allclose(metrics["rewards/margin"], 0.0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# The optimizer.


def expected_lr(cfg: OptimConfig, total: int, step: int) -> float:
    peak, end, warmup = cfg.learning_rate, cfg.learning_rate * cfg.end_learning_rate_fraction, cfg.warmup_steps
    if step < warmup:
        return peak * step / warmup
    progress = min(step - warmup, total - warmup) / (total - warmup)
    return end + (peak - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def test_learning_rate_schedule_warms_up_linearly_then_cosine_decays_to_end_fraction():
    """lr(t) = peak*t/W during warmup, then end + (peak-end)(1+cos(pi (t-W)/(T-W)))/2, and end after T; the
    optimizer really applies it (with b1=b2=0 and |g|=1 each Adam step moves a parameter by exactly lr(t))."""
    cfg = OptimConfig(learning_rate=1e-2, warmup_steps=4, end_learning_rate_fraction=0.1, weight_decay=0.0,
                      b1=0.0, b2=0.0, clip_norm=1e6)
    total = 20
    schedule = learning_rate_schedule(cfg, total)
    for step, value in ((0, 0.0), (2, 5e-3), (4, 1e-2), (12, 5.5e-3), (20, 1e-3), (30, 1e-3)):
        np.testing.assert_allclose(float(schedule(step)), value, rtol=1e-5, atol=1e-9, err_msg=f"step {step}")
    for step in (1, 3, 5, 8, 15, 19):
        np.testing.assert_allclose(float(schedule(step)), expected_lr(cfg, total, step), rtol=1e-5, atol=1e-9)

    tx = make_optimizer(cfg, total)
    update = fast_jit(tx.update)
    p = {"w": jnp.zeros(3)}
    opt_state = tx.init(p)
    for step in range(7):
        updates, opt_state = update({"w": jnp.ones(3)}, opt_state, p)
        np.testing.assert_allclose(updates["w"], -expected_lr(cfg, total, step), rtol=1e-5, atol=1e-9)


def test_weight_decay_is_decoupled_and_scaled_by_the_learning_rate():
    """AdamW (Loshchilov & Hutter): with a zero gradient the update is -lr * weight_decay * param."""
    cfg = OptimConfig(learning_rate=1e-2, warmup_steps=0, weight_decay=0.1)
    tx = make_optimizer(cfg, 10)
    p = {"w": jnp.array([1.0, -2.0, 3.0])}
    updates, _ = tx.update({"w": jnp.zeros(3)}, tx.init(p), p)
    np.testing.assert_allclose(updates["w"], -1e-2 * 0.1 * p["w"], rtol=1e-5)


def test_clipping_bounds_the_gradient_adamw_sees():
    """Global-norm clipping runs before AdamW: a gradient of norm 50 reaches Adam rescaled to norm clip_norm (same
    direction), one below the threshold is untouched, and the updates equal AdamW on the hand-clipped gradients."""
    cfg = OptimConfig(learning_rate=1e-2, warmup_steps=0, weight_decay=0.0, clip_norm=1.0)
    tx = make_optimizer(cfg, 10)
    reference = optax.adamw(learning_rate_schedule(cfg, 10), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay)
    p = {"a": jnp.zeros(2), "b": jnp.zeros(1)}
    big = {"a": jnp.array([30.0, 0.0]), "b": jnp.array([40.0])}  # global norm 50
    small = {"a": jnp.array([0.1, -0.2]), "b": jnp.array([0.2])}  # global norm 0.3

    state, ref_state = tx.init(p), reference.init(p)
    updates, state = tx.update(big, state, p)
    mu = optax.tree_utils.tree_get(state, "mu")
    np.testing.assert_allclose(optax.tree.norm(mu), (1 - cfg.b1) * cfg.clip_norm, rtol=1e-6)
    assert_trees_close(mu, jax.tree_util.tree_map(lambda g: (1 - cfg.b1) * g / 50.0, big), rtol=1e-6, atol=1e-9)
    ref_updates, ref_state = reference.update(jax.tree_util.tree_map(lambda g: g / 50.0, big), ref_state, p)
    assert_trees_close(updates, ref_updates, rtol=1e-6, atol=1e-9)

    updates, state = tx.update(small, state, p)
    ref_updates, ref_state = reference.update(small, ref_state, p)
    assert_trees_close(updates, ref_updates, rtol=1e-6, atol=1e-9)
    # Without clipping the second update would be different: the first gradient would have dominated Adam's state.
    unclipped = optax.adamw(learning_rate_schedule(cfg, 10), b1=cfg.b1, b2=cfg.b2, weight_decay=0.0)
    un_state = unclipped.init(p)
    _, un_state = unclipped.update(big, un_state, p)
    un_updates, _ = unclipped.update(small, un_state, p)
    assert max_tree_diff(un_updates, updates) > 1e-4


@pytest.mark.parametrize("bad, field", [({"learning_rate": 0.0}, "learning_rate"), ({"clip_norm": -1.0}, "clip_norm"),
                                        ({"end_learning_rate_fraction": 1.5}, "end_learning_rate_fraction")])
def test_invalid_optim_config_names_the_field(bad, field):
    """A bad optimizer config fails at construction with a ValueError naming optim.<field>."""
    with pytest.raises(ValueError, match=rf"optim\.{field}"):
        OptimConfig(**bad)


# ---------------------------------------------------------------------------------------------------------------
# Log-probs without the full logits.


@pytest.mark.parametrize("chunk", [1, 5, 16])
def test_chunked_logprobs_give_the_same_loss_and_gradients_with_an_online_reference(chunk):
    """dpo.logprob_chunk: log-probs computed from the hidden states `chunk` positions at a time (policy and online
    reference) give the materialised step's loss, metrics and gradients (chunk 5 does not divide the 15 predicted
    positions; 16 is one chunk)."""
    chunked = fast_jit(lambda p, frozen, batch: accumulated_gradients(
        dpo_loss_fn(MODEL, "sigmoid", sft_weight=0.5, beta=0.3, logprob_chunk=chunk), p, frozen, batch, 1))
    plain = fast_jit(lambda p, frozen, batch: accumulated_gradients(
        dpo_loss_fn(MODEL, "sigmoid", sft_weight=0.5, beta=0.3), p, frozen, batch, 1))
    policy, reference, batch = params(), params(1), dpo_batch()
    loss, grads, metrics = chunked(policy, reference, batch)
    want_loss, want_grads, want_metrics = plain(policy, reference, batch)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    assert_trees_close(grads, want_grads, rtol=1e-4, atol=1e-6)
    assert_trees_close(metrics, want_metrics, rtol=1e-5, atol=1e-6)


def test_chunked_logprobs_with_an_untied_soft_capped_head():
    """The output head is the lm_head kernel when embeddings are untied, and Gemma 2's final soft-cap is applied
    to each chunk's logits exactly as the model applies it to the full ones."""
    cfg = ModelConfig(**{**CFG.__dict__, "tie_embeddings": False, "final_logit_softcap": 3.0})
    model = DecoderLM(cfg)
    rng = np.random.default_rng(3)
    shapes = jax.eval_shape(lambda key: nn.meta.unbox(init_params(cfg, key)), jax.random.key(0))
    p = jax.tree_util.tree_map(lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape), jnp.float32), shapes)
    batch = dpo_batch()
    losses = [fast_jit(lambda q, b, c=c: accumulated_gradients(dpo_loss_fn(model, "ipo", logprob_chunk=c),
                                                               q, q, b, 1))(p, batch) for c in (0, 4)]
    np.testing.assert_allclose(losses[1][0], losses[0][0], rtol=1e-5)
    assert_trees_close(losses[1][1], losses[0][1], rtol=1e-4, atol=1e-6)


def test_objectives_whose_extras_need_the_logits_refuse_chunking():
    with pytest.raises(ValueError, match="computes extras in the loss .*set dpo.logprob_chunk=0"):
        dpo_loss_fn(MODEL, "sigmoid", wpo=True, logprob_chunk=4)
