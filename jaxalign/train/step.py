"""Jitted, sharded training steps with exact gradient accumulation.

A loss function here has the signature `loss_fn(params, frozen, microbatch) -> (total, (count, metrics))`: the
SUM of per-item losses and the number of items (tokens for SFT, pairs for DPO). Summing both over microbatches and
dividing once at the end makes the accumulated update equal to the large-batch update exactly, whatever the number
of tokens in each microbatch (a mean of microbatch means would not be).
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jaxalign.logprobs import masked_token_logprobs, pair_token_logprobs, sequence_logprobs
from jaxalign.losses import PairwiseInputs, get_objective
from jaxalign.losses.dpo import nll_per_token
from jaxalign.models.llama import DecoderLM
from jaxalign.sharding import LOGICAL_AXIS_RULES, batch_sharding, replicated
from jaxalign.train.state import DataPosition, TrainState

LossFn = Callable[[Any, Any, dict], tuple[jax.Array, tuple[jax.Array, dict]]]


def logits_fn(model: DecoderLM) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
    """(params, tokens, attention_mask) -> fp32 logits; the only way losses see the model."""
    return lambda params, tokens, attention: model.apply({"params": params}, tokens, attention)[0]


def sft_loss_fn(model: DecoderLM) -> LossFn:
    """Token-level negative log-likelihood of the completion tokens (prompt and padding excluded)."""
    apply = logits_fn(model)

    def loss_fn(params, frozen, batch):
        del frozen
        logps = masked_token_logprobs(apply(params, batch["tokens"], batch["attention_mask"]), batch["tokens"],
                                      batch["completion_mask"])
        total, count = nll_per_token(logps, batch["completion_mask"])
        return total, (count, {})

    return loss_fn


def dpo_loss_fn(model: DecoderLM, objective: str = "sigmoid", sft_weight: float = 0.0, **objective_kwargs) -> LossFn:
    """A pairwise objective on chosen/rejected log-probs from one concatenated forward pass.

    `sft_weight` > 0 adds sft_weight * mean over pairs of the chosen completion's token-mean NLL, the "DPO + lambda*SFT"
    regulariser (RPO, Pang et al. 2024; SFT-DPO in the 3D-properties paper) that keeps the chosen likelihood from
    collapsing together with the rejected one.

    `frozen` is the reference: either frozen reference parameters (online reference: one extra forward pass, no
    gradient) or None when the batch carries precomputed `reference_chosen`/`reference_rejected` log-probs.
    """
    apply = logits_fn(model)
    objective_fn = get_objective(objective)

    def loss_fn(params, frozen, batch):
        policy_chosen, policy_rejected = pair_token_logprobs(apply, params, batch)
        if "reference_chosen" in batch:
            reference_chosen, reference_rejected = batch["reference_chosen"], batch["reference_rejected"]
        else:
            reference_chosen, reference_rejected = pair_token_logprobs(apply, jax.lax.stop_gradient(frozen), batch)
        inputs = PairwiseInputs(
            policy_chosen=policy_chosen, policy_rejected=policy_rejected,
            reference_chosen=reference_chosen, reference_rejected=reference_rejected,
            chosen_mask=batch["chosen_completion_mask"], rejected_mask=batch["rejected_completion_mask"],
        )
        loss, metrics = objective_fn(inputs, **objective_kwargs)
        if sft_weight:
            # Per-pair (each chosen response's token-mean NLL, averaged over pairs), not a batch token mean: a
            # per-pair term sums exactly over microbatches, so accumulation stays equal to the large batch.
            chosen_nll = -sequence_logprobs(policy_chosen, batch["chosen_completion_mask"], average=True)
            metrics = dict(metrics, chosen_nll=jnp.mean(chosen_nll))
            loss = loss + sft_weight * jnp.mean(chosen_nll)
        pairs = jnp.asarray(policy_chosen.shape[0], jnp.float32)
        return loss * pairs, (pairs, metrics)

    return loss_fn


def _split_microbatches(batch: dict, accum_steps: int) -> dict:
    """[B, ...] -> [accum, B/accum, ...] taking every accum-th row, so each device keeps only its own rows."""

    def split(x):
        if x.shape[0] % accum_steps:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by grad_accum_steps={accum_steps}")
        x = jnp.swapaxes(x.reshape((x.shape[0] // accum_steps, accum_steps) + x.shape[1:]), 0, 1)
        # A no-op without a mesh; under one, keeps the rows on the devices that already hold them.
        return nn.with_logical_constraint(x, (None, "batch") + (None,) * (x.ndim - 2))

    return jax.tree_util.tree_map(split, batch)


def accumulated_gradients(loss_fn: LossFn, params, frozen, batch: dict, accum_steps: int):
    """(mean loss, mean gradient, metrics) over `accum_steps` microbatches: sum of sums / sum of counts."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum_steps == 1:
        (total, (count, metrics)), grads = grad_fn(params, frozen, batch)
        return total / count, jax.tree_util.tree_map(lambda g: g / count, grads), metrics

    def body(carry, microbatch):
        grads_sum, total_sum, count_sum = carry
        (total, (count, metrics)), grads = grad_fn(params, frozen, microbatch)
        grads_sum = jax.tree_util.tree_map(jnp.add, grads_sum, grads)
        return (grads_sum, total_sum + total, count_sum + count), metrics

    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    (grads, total, count), metrics = jax.lax.scan(body, init, _split_microbatches(batch, accum_steps))
    metrics = jax.tree_util.tree_map(lambda m: jnp.mean(m, axis=0), metrics)
    return total / count, jax.tree_util.tree_map(lambda g: g / count, grads), metrics


def make_train_step(loss_fn: LossFn, accum_steps: int = 1):
    """The pure step: (state, frozen, batch, next_data_position) -> (state, metrics)."""

    def step(state: TrainState, frozen, batch: dict, next_position: DataPosition):
        loss, grads, metrics = accumulated_gradients(loss_fn, state.params, frozen, batch, accum_steps)
        new_state = state.apply_gradients(grads, data=next_position)
        metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
        return new_state, metrics

    return step


def jit_train_step(step, mesh: Mesh, state_shardings, frozen_shardings):
    """jit with explicit in/out shardings and the state's buffers donated (updated in place on device)."""
    data_sharding = batch_sharding(mesh)
    position_sharding = jax.tree_util.tree_map(lambda _: replicated(mesh), DataPosition.start())

    def run(state, frozen, batch, next_position):
        with nn.logical_axis_rules(LOGICAL_AXIS_RULES):
            return step(state, frozen, batch, next_position)

    jitted = jax.jit(
        run,
        in_shardings=(state_shardings, frozen_shardings, data_sharding, position_sharding),
        out_shardings=(state_shardings, replicated(mesh)),
        donate_argnums=(0,),
    )

    def call(state, frozen, batch, next_position):
        with mesh:
            return jitted(state, frozen, batch, next_position)

    return call
