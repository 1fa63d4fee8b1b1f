"""Bradley-Terry reward models (Bradley & Terry, 1952; the reward-model stage of RLHF, Ouyang et al., 2022, eq. 1).

A `ScalarHeadLM` reads a reward r(x, y) = head output at the last attended token of the full sequence (prompt +
completion). On preference pairs the loss is the negative log-likelihood of the Bradley-Terry model,

    loss = -log sigmoid(r(x, y_w) - r(x, y_l))   per pair.

`bradley_terry_loss_fn(model)` follows the `jaxalign.train.step` protocol, `loss_fn(params, frozen, batch) ->
(sum of per-pair losses, (number of pairs, metrics))`, on the pair batch keys chosen_tokens /
chosen_attention_mask / chosen_completion_mask and the rejected_* twins (the completion masks are not needed:
the reward reads the last attended token). Chosen and rejected go through one concatenated forward pass. Such a
reward model supplies MADPO's "reward_margin" and SmPO's "preference_probability" (sigmoid of the margin).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxalign.models.heads import ScalarHeadLM, last_token_values

LossFn = Callable[[Any, Any, dict], tuple[jax.Array, tuple[jax.Array, dict]]]

PAIR_KEYS = ("chosen_tokens", "chosen_attention_mask", "rejected_tokens", "rejected_attention_mask")


def reward_scores(params: Any, model: ScalarHeadLM, tokens: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """r(x, y) for each row of `tokens` [batch, time]: the head output at the last attended token, shape [batch]."""
    values = model.apply({"params": params}, tokens, attention_mask)
    return last_token_values(values, attention_mask)


def pair_rewards(params: Any, model: ScalarHeadLM, batch: dict) -> tuple[jax.Array, jax.Array]:
    """(r(x, y_w), r(x, y_l)) [pairs] from one forward pass over the concatenated chosen and rejected sequences."""
    missing = [key for key in PAIR_KEYS if key not in batch]
    if missing:
        raise ValueError(f"reward model batch is missing {missing}; expected the pair keys {list(PAIR_KEYS)}")
    if batch["chosen_tokens"].shape[1] != batch["rejected_tokens"].shape[1]:
        raise ValueError(
            "reward model batch: chosen_tokens and rejected_tokens must share one padded width, got "
            f"{batch['chosen_tokens'].shape[1]} and {batch['rejected_tokens'].shape[1]}"
        )
    tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]], axis=0)
    attention = jnp.concatenate([batch["chosen_attention_mask"], batch["rejected_attention_mask"]], axis=0)
    rewards = reward_scores(params, model, tokens, attention)
    pairs = batch["chosen_tokens"].shape[0]
    return rewards[:pairs], rewards[pairs:]


def bradley_terry_metrics(chosen: jax.Array, rejected: jax.Array) -> dict[str, jax.Array]:
    """Mean rewards, mean margin and pair accuracy mean(r_w > r_l) (ties count as wrong)."""
    return {
        "rewards/chosen": jnp.mean(chosen),
        "rewards/rejected": jnp.mean(rejected),
        "rewards/margin": jnp.mean(chosen - rejected),
        "rewards/accuracy": jnp.mean((chosen > rejected).astype(jnp.float32)),
    }


def bradley_terry_loss_fn(model: ScalarHeadLM) -> LossFn:
    """loss_fn(params, frozen, batch) -> (sum_pairs -logsig(r_w - r_l), (pairs, metrics)); `frozen` is unused."""

    def loss_fn(params, frozen, batch):
        del frozen
        chosen, rejected = pair_rewards(params, model, batch)
        per_pair = -jax.nn.log_sigmoid(chosen - rejected)
        pairs = jnp.asarray(chosen.shape[0], jnp.float32)
        return jnp.sum(per_pair), (pairs, bradley_terry_metrics(chosen, rejected))

    return loss_fn


def reward_margins(params: Any, model: ScalarHeadLM, batch: dict) -> jax.Array:
    """h = r(x, y_w) - r(x, y_l) per pair, no gradient: MADPO's "reward_margin" extra."""
    chosen, rejected = pair_rewards(params, model, batch)
    return jax.lax.stop_gradient(chosen - rejected)
