"""A decoder LM with a scalar head: value functions V(s_t) and Bradley-Terry reward models.

`ScalarHeadLM(cfg)` is `DecoderLM` (submodule "backbone", the same parameter tree as a plain `DecoderLM`, so an
SFT checkpoint can be dropped in with `with_backbone`) plus a linear head "head" on the final (normed) hidden state
that gives one scalar per position. The head is zero-initialised (kernel and bias), so a fresh model predicts 0
everywhere: a neutral value / reward at the start of training, as in OREO's critic (Wang et al. 2024) and the
usual reward-model recipe.

Uses:
- value head: V(s_t) for the state before each completion token (`state_values`), V(x) at the end of the prompt
  (`prompt_values`), for DRO (`jaxalign.losses.unpaired.dro`) and OREO;
- reward model: r(x, y) = head output at the last attended token (`last_token_values`), trained with
  `jaxalign.algorithms.reward_model`.

Position t of the output reads tokens[:, :t+1] (causal), i.e. it is the value of the state after token t. A
completion token at position t is chosen in the state after token t-1, so its V(s_t) is output[:, t-1].
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxalign.models.llama import DecoderLM, ModelConfig


class ScalarHeadLM(nn.Module):
    """__call__(tokens, attention_mask=None, positions=None, return_logits=False) -> values [batch, time] fp32
    (and the LM logits too when `return_logits`)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens, attention_mask=None, positions=None, return_logits=False):
        logits, _, hidden = DecoderLM(self.cfg, name="backbone")(tokens, attention_mask, positions, return_hidden=True)
        # Logical names as in llama.py: the kernel's input dimension is the model dimension ("embed", sharded over
        # fsdp); the single output unit and the bias are replicated.
        head = nn.Dense(
            1,
            dtype=jnp.float32,
            kernel_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed", None)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)),
            name="head",
        )
        values = head(hidden.astype(jnp.float32))[..., 0]
        values = nn.with_logical_constraint(values, ("batch", "length"))
        if return_logits:
            return values, logits
        return values


def init_scalar_head_params(cfg: ModelConfig, rng: jax.Array):
    """Boxed (logically annotated) parameters {"backbone": ..., "head": ...}; unbox with `nn.meta.unbox`."""
    tokens = jnp.zeros((1, min(8, cfg.max_len)), jnp.int32)
    return ScalarHeadLM(cfg).init(rng, tokens)["params"]


VALUE_HEAD = "value_head"


def init_value_head(cfg: ModelConfig) -> dict:
    """Boxed zero parameters of a linear value head V(x) = h(x) . kernel + bias on a DecoderLM's final hidden state,
    stored beside the LM's own parameters under VALUE_HEAD (DecoderLM.apply ignores the extra entry, so sampling and
    evaluation are unchanged). Used by DRO in `jaxalign.train.step` on stop-gradient features."""
    return {
        "kernel": nn.LogicallyPartitioned(jnp.zeros((cfg.d_model, 1), jnp.float32), ("embed", None)),
        "bias": nn.LogicallyPartitioned(jnp.zeros((1,), jnp.float32), (None,)),
    }


def apply_value_head(head: dict, hidden: jax.Array) -> jax.Array:
    """[..., d_model] hidden states -> [...] values."""
    return (hidden.astype(jnp.float32) @ head["kernel"])[..., 0] + head["bias"][0]


def with_backbone(params: Any, lm_params: Any) -> Any:
    """`params` of a ScalarHeadLM with the backbone replaced by a DecoderLM's parameters (e.g. the SFT model)."""
    return {**params, "backbone": lm_params}


def last_token_index(attention_mask: jax.Array) -> jax.Array:
    """Position of the last attended token of each row (works for left and right padding); 0 for an empty row."""
    mask = attention_mask.astype(bool)
    positions = jnp.arange(mask.shape[-1])
    return jnp.max(jnp.where(mask, positions, 0), axis=-1)


def last_token_values(values: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """values[b, last attended position]: the Bradley-Terry reward r(x, y) of each row, shape [batch]."""
    return jnp.take_along_axis(values, last_token_index(attention_mask)[:, None], axis=-1)[:, 0]


def state_values(values: jax.Array, completion_mask: jax.Array) -> jax.Array:
    """V(s_t) aligned with the completion tokens: output[:, t-1] where completion_mask[:, t] = 1, 0 elsewhere."""
    shifted = jnp.pad(values[:, :-1], ((0, 0), (1, 0)))
    return jnp.where(completion_mask.astype(bool), shifted, 0.0)


def prompt_values(values: jax.Array, completion_mask: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """V(x): the output at the position just before each row's first completion token, shape [batch].

    A row without completion tokens is all prompt: it reads its last attended token when `attention_mask` is given,
    else the last position.
    """
    mask = completion_mask.astype(bool)
    first = jnp.argmax(mask, axis=-1)
    if attention_mask is None:
        fallback = jnp.full(first.shape, mask.shape[-1] - 1)
    else:
        fallback = last_token_index(attention_mask)
    index = jnp.where(jnp.any(mask, axis=-1), jnp.maximum(first - 1, 0), fallback)
    return jnp.take_along_axis(values, index[:, None], axis=-1)[:, 0]
