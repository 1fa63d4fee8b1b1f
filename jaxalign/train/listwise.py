"""Training on ranked lists: the model side of the listwise objectives.

A batch holds P prompts with K scored candidate completions each, every array with a [P, K] prefix:

    list_tokens, list_attention_mask, list_completion_mask  [P, K, T] int32  (prompt + completion, as for pairs)
    list_scores                                              [P, K]    float32 (higher is better, e.g. the judge's)
    list_valid                                               [P, K]    int32  (1 where a candidate exists)
    list_reference (optional)                                [P, K, T] float32 precomputed reference log-probs

`listwise_loss_fn` runs ONE forward pass of the policy over the P*K flattened sequences (as `dpo_loss_fn` runs one
over chosen and rejected), turns the logits into masked per-token log-probs (`jaxalign.logprobs`), reshapes them
back to [P, K, T] and evaluates a registered "listwise" objective on `ListwiseInputs`. The objective never sees the
model; the extras it declares are computed here (TPO's step ids and hidden states) or read from the batch under
their names.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.logprobs import masked_token_logprobs, sequence_logprobs
from jaxalign.losses import ListwiseInputs, get_spec, update_state
from jaxalign.losses.listwise import step_ids_from_separators
from jaxalign.models.llama import DecoderLM
from jaxalign.train.reference import cached_arrays, content_key
from jaxalign.train.step import objective_state_of

LossFn = Callable[[Any, Any, dict], tuple[jax.Array, tuple[jax.Array, dict]]]

LIST_INPUT_KEYS = ("list_tokens", "list_attention_mask", "list_completion_mask")
LIST_KEYS = LIST_INPUT_KEYS + ("list_scores", "list_valid")
LIST_REFERENCE_KEY = "list_reference"
_LIST_CACHE_FORMAT = 1  # bump when the stored layout changes, so stale caches are never read

# Extras this module computes from the model / the tokens instead of reading them from the batch.
_COMPUTED_EXTRAS = ("step_ids", "hidden")


def _flat(x: jax.Array) -> jax.Array:
    """[P, K, ...] -> [P*K, ...]."""
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def list_token_logprobs(apply_fn: Callable[..., Any], params: Any, batch: dict) -> jax.Array:
    """Masked per-token log-probs [P, K, T] of every candidate from ONE forward pass over the flattened P*K
    sequences; `apply_fn(params, tokens, attention) -> logits` (`jaxalign.train.step.logits_fn`)."""
    tokens = batch["list_tokens"]
    flat_tokens = _flat(tokens)
    logits = apply_fn(params, flat_tokens, _flat(batch["list_attention_mask"]))
    return masked_token_logprobs(logits, flat_tokens, _flat(batch["list_completion_mask"])).reshape(tokens.shape)


def _policy_forward(model: DecoderLM, params: Any, batch: dict, with_hidden: bool):
    """(per-token log-probs [P, K, T], last-layer hidden states [P, K, T, D] fp32 or None), one forward pass."""
    tokens = batch["list_tokens"]
    flat_tokens = _flat(tokens)
    out = model.apply({"params": params}, flat_tokens, _flat(batch["list_attention_mask"]),
                      return_hidden=with_hidden)
    logps = masked_token_logprobs(out[0], flat_tokens, _flat(batch["list_completion_mask"])).reshape(tokens.shape)
    hidden = None
    if with_hidden:
        hidden = out[2].astype(jnp.float32).reshape(tokens.shape + (out[2].shape[-1],))
    return logps, hidden


def _check_batch(batch: dict) -> None:
    missing = [k for k in LIST_KEYS if k not in batch]
    if missing:
        raise ValueError(f"a listwise batch needs {', '.join(LIST_KEYS)}; missing {', '.join(missing)} (the batch "
                         f"has {sorted(batch)}); build one with jaxalign.experiments.ranked_lists.build_ranked_lists")
    shape = tuple(batch["list_tokens"].shape)
    if len(shape) != 3:
        raise ValueError(f"list_tokens must be [prompts, K, time], got shape {shape}")
    for key in LIST_INPUT_KEYS + ((LIST_REFERENCE_KEY,) if LIST_REFERENCE_KEY in batch else ()):
        if tuple(batch[key].shape) != shape:
            raise ValueError(f"{key} must have the shape of list_tokens {shape}, got {tuple(batch[key].shape)}")
    for key in ("list_scores", "list_valid"):
        if tuple(batch[key].shape) != shape[:2]:
            raise ValueError(f"{key} must be [prompts, K] = {shape[:2]}, got {tuple(batch[key].shape)}")


def listwise_loss_fn(model: DecoderLM, objective: str, sft_weight: float = 0.0, separator_id: int | None = None,
                     *, stop_hidden_gradient: bool = False, **objective_kwargs) -> LossFn:
    """A registered listwise objective (plackett_luce, rankdpo, tpo, adpo, ...) as a `jaxalign.train.step` loss
    function: loss_fn(params, frozen, batch) -> (loss * P, (P, metrics)), P the number of prompts (lists) in the
    batch, so `accumulated_gradients` sums totals and counts over microbatches.

    Accumulation is exact when every prompt of the batch contributes to the objective (the objectives average over
    the prompts with at least one strict preference, "prompts/used"); `build_ranked_lists` with min_score_gap > 0
    keeps only such lists. A batch mixing tied and untied lists accumulates as a P-weighted mean of microbatch means.

    frozen: the reference. Frozen reference parameters (one extra forward pass, no gradient), or None when the
        batch carries precomputed `list_reference` log-probs (`compute_list_reference_logprobs`) or the objective
        does not read a reference.
    sft_weight > 0 adds sft_weight * (mean over the batch's prompts of the token-mean NLL of the top-scored valid
        candidate; ties: the lowest index, as the objectives' "best"; a prompt without a valid candidate adds 0),
        the listwise analogue of `dpo_loss_fn`'s chosen-NLL regulariser. A per-prompt term, so it accumulates
        exactly; logged as "top_nll".
    separator_id: for TPO (extras "step_ids", "hidden"): the token id that closes a reasoning step (ARITH: ';',
        `CharTokenizer().encode(';')[0]`); step ids come from `step_ids_from_separators(list_tokens,
        list_completion_mask, separator_id)`, aligned with the per-token log-probs. TPO's "hidden" are the policy's
        last-layer (post final-norm) hidden states of the same forward pass, hidden[p, k, t] = the state at token t
        of candidate k, i.e. the representation of token t itself (the step's own tokens are averaged). Gradients
        flow through them into the adaptive step weights, as in the objective's default and the authors' released
        code; stop_hidden_gradient=True treats the step weights as constants (`jax.lax.stop_gradient`).
    objective_kwargs: the objective's hyper-parameters (beta, tau, target, ...).
    An objective declaring a state (`jaxalign.losses.StateHooks`) gets it as in `dpo_loss_fn`: from
    batch["objective_state"], updated once per step and returned as metrics["objective_state"].

    A non-listwise objective, or TPO without separator_id, is one ValueError at construction.
    """
    spec = get_spec(objective)
    if spec.family != "listwise":
        raise ValueError(f"objective {objective!r} is {spec.family}, not listwise: listwise_loss_fn trains on ranked "
                         f"lists; train pairwise/unpaired/reference-free objectives with "
                         f"jaxalign.train.step.dpo_loss_fn")
    if not sft_weight >= 0:
        raise ValueError(f"listwise_loss_fn: sft_weight must be >= 0, got {sft_weight!r}")
    if "step_ids" in spec.extras and separator_id is None:
        raise ValueError(f"objective {objective!r} needs step ids: pass separator_id, the token that closes a step "
                         f"(ARITH: CharTokenizer().encode(';')[0])")
    wants_hidden = "hidden" in spec.extras and objective_kwargs.get("adaptive_weights", True)
    produced = spec.state.extras if spec.state is not None else ()
    batch_extras = [name for name in spec.extras if name not in _COMPUTED_EXTRAS and name not in produced]
    apply = lambda p, tokens, attention: model.apply({"params": p}, tokens, attention)[0]  # noqa: E731

    def loss_fn(params, frozen, batch):
        _check_batch(batch)
        policy, hidden = _policy_forward(model, params, batch, wants_hidden)
        if LIST_REFERENCE_KEY in batch:
            reference = batch[LIST_REFERENCE_KEY]
        elif not spec.needs_reference:
            reference = jnp.zeros_like(policy)
        elif frozen is None:
            raise ValueError(f"objective {objective!r} needs a reference model: pass frozen reference parameters or "
                             f"batches carrying precomputed {LIST_REFERENCE_KEY!r} log-probs")
        else:
            reference = list_token_logprobs(apply, jax.lax.stop_gradient(frozen), batch)
        missing = [name for name in batch_extras if name not in batch]
        if missing:
            raise ValueError(f"objective {objective!r} needs {', '.join(map(repr, missing))} in every batch "
                             f"(declared extras {spec.extras}); the batch has {sorted(batch)}")
        extras = {name: batch[name] for name in batch_extras}
        if "step_ids" in spec.extras:
            extras["step_ids"] = step_ids_from_separators(batch["list_tokens"], batch["list_completion_mask"],
                                                          separator_id)
        if hidden is not None:
            extras["hidden"] = jax.lax.stop_gradient(hidden) if stop_hidden_gradient else hidden
        inputs = ListwiseInputs(policy=policy, reference=reference, mask=batch["list_completion_mask"],
                                scores=batch["list_scores"], valid=batch["list_valid"], extras=extras)
        if spec.state is not None:  # a declared state, as in `dpo_loss_fn`
            new_state, inputs = update_state(objective, objective_state_of(spec, batch), inputs, objective_kwargs)
        loss, metrics = spec.fn(inputs, **objective_kwargs)
        if spec.state is not None:
            metrics = dict(metrics, objective_state=new_state)
        prompts = jnp.asarray(policy.shape[0], jnp.float32)
        if sft_weight:
            valid = batch["list_valid"] > 0
            top = jnp.argmax(jnp.where(valid, batch["list_scores"], -jnp.inf), axis=1)
            rows = jnp.arange(policy.shape[0])
            nll = -sequence_logprobs(policy[rows, top], batch["list_completion_mask"][rows, top], average=True)
            nll = jnp.where(jnp.any(valid, axis=1), nll, 0.0)
            top_nll = jnp.sum(nll) / prompts
            metrics = dict(metrics, top_nll=top_nll)
            loss = loss + sft_weight * top_nll
        return loss * prompts, (prompts, metrics)

    return loss_fn


# ----------------------------------------------------------------------------------------------------------------
# precomputed (and cached) reference log-probs of ranked lists


@functools.lru_cache(maxsize=8)
def _jitted_list_logprobs(apply_fn: Callable) -> Callable:
    return jax.jit(lambda p, batch: list_token_logprobs(apply_fn, p, batch))


def compute_list_reference_logprobs(apply_fn: Callable, params: Any, data: dict[str, np.ndarray],
                                    batch_size: int) -> dict[str, np.ndarray]:
    """{"list_reference": [N, K, T] float32}: the reference's masked per-token log-probs of every candidate of
    every list, computed `batch_size` lists at a time with the same flattened forward pass the online reference
    uses (`list_token_logprobs`)."""
    if batch_size < 1:
        raise ValueError(f"compute_list_reference_logprobs: batch_size must be >= 1, got {batch_size!r}")
    forward = _jitted_list_logprobs(apply_fn)
    n = len(data["list_tokens"])
    out = [np.asarray(forward(params, {k: data[k][start : start + batch_size] for k in LIST_INPUT_KEYS}), np.float32)
           for start in range(0, n, batch_size)]
    return {LIST_REFERENCE_KEY: np.concatenate(out) if out else np.zeros(data["list_tokens"].shape, np.float32)}


def list_reference_cache_key(params: Any, data: dict[str, np.ndarray], tokenization: dict[str, Any]) -> str:
    """Content hash of (reference parameters, the lists' token/attention/completion arrays, tokenisation)."""
    return content_key(params, data, {"list_reference_logps": tokenization, "format": _LIST_CACHE_FORMAT},
                       keys=LIST_INPUT_KEYS)


def cached_list_reference_logprobs(cache_dir: str, apply_fn: Callable, params: Any, data: dict[str, np.ndarray],
                                   tokenization: dict[str, Any], batch_size: int) -> tuple[dict[str, np.ndarray], dict]:
    """`compute_list_reference_logprobs` read from the on-disk cache under `list_reference_cache_key` when present,
    else computed and stored there (`jaxalign.train.reference.cached_arrays`: an unreadable or mismatched file is one
    clear error naming it). Returns (arrays, {"key", "path", "hit"})."""
    key = list_reference_cache_key(params, data, tokenization)
    return cached_arrays(cache_dir, "list_reference_logps", key,
                         lambda: compute_list_reference_logprobs(apply_fn, params, data, batch_size),
                         len(data["list_tokens"]))
