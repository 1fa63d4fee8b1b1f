"""Training on unpaired rows: single completions with a desirable / undesirable label (KTO, BCO).

A batch holds B labelled completions (the `jaxalign.data.tokenize` "unpaired" layout):

    tokens, attention_mask, completion_mask   [B, T] int32  (prompt + completion, as for one side of a pair)
    label                                     [B]    int32  (1 desirable, 0 undesirable)
    reference (optional)                      [B, T] float32 precomputed per-token reference log-probs
    kl_tokens, kl_attention_mask, kl_completion_mask (KTO)  [B, T] the row's MISMATCHED sequence: its prompt with
        another row's completion (`mismatched_unpaired`), kl_reference [B] its summed reference log-probs (optional)

`unpaired_loss_fn` runs ONE forward pass of the policy over the B sequences (as `dpo_loss_fn` runs one over
chosen and rejected), builds `UnpairedInputs` and evaluates a registered "unpaired" objective; KTO's reference point
reads the mismatched sequences through `jaxalign.train.step.mismatched_kl_logprobs`, BCO's running baseline comes
from its declared state. Pairs become unpaired rows inside `dpo_loss_fn` instead (`jaxalign.losses.unpair`).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.logprobs import masked_token_logprobs, sequence_logprobs
from jaxalign.losses import UnpairedInputs, compute_objective, get_spec, needed_extras, update_state
from jaxalign.models.llama import DecoderLM
from jaxalign.train.reference import cached_arrays, content_key
from jaxalign.train.step import logits_fn, mismatched_kl_logprobs, objective_state_of

LossFn = Callable[[Any, Any, dict], tuple[jax.Array, tuple[jax.Array, dict]]]

UNPAIRED_INPUT_KEYS = ("tokens", "attention_mask", "completion_mask")
MISMATCHED_KEYS = ("kl_tokens", "kl_attention_mask", "kl_completion_mask")
KL_EXTRAS = ("kl_policy", "kl_reference")
UNPAIRED_TOKEN_KEYS = ("attention_mask",)
_UNPAIRED_CACHE_FORMAT = 1  # bump when the stored layout changes, so stale caches are never read


def is_unpaired(arrays: dict) -> bool:
    """Whether `arrays` are unpaired rows (labelled single completions) rather than pairs or lists."""
    return "label" in arrays and "tokens" in arrays


def unpaired_missing_extras(objective: str) -> list[str]:
    """The extras of `objective` that unpaired rows cannot provide (empty: it trains on them): besides KTO's
    mismatched sequences and what the objective's own state produces, nothing is built."""
    spec = get_spec(objective)
    produced = set(spec.state.extras) if spec.state is not None else set()
    return [name for name in needed_extras(objective) if name not in KL_EXTRAS and name not in produced]


# ----------------------------------------------------------------------------------------------------------------
# KTO's mismatched sequences (host side)


def mismatch_partners(n: int, chunk: int, seed: int) -> np.ndarray:
    """partner[j]: the row whose completion follows row j's prompt in j's mismatched sequence. The rows are shuffled
    (seeded) and cut into chunks of `chunk` (the batch size); within a chunk, prompt j takes the completion of the
    row before it, cyclically (Ethayarajh et al. 2024, sec. 3: the reference point from mismatched pairs of the
    same batch; TRL shuffles once and rotates within batch-sized chunks when it prepares the data). A trailing chunk
    of one row joins the previous chunk, so no row is its own partner unless n = 1."""
    order = np.random.default_rng([seed, 11]).permutation(n)
    blocks = [order[s : s + chunk] for s in range(0, n, max(chunk, 1))]
    if len(blocks) > 1 and len(blocks[-1]) == 1:
        blocks[-2:] = [np.concatenate(blocks[-2:])]
    partner = np.empty(n, np.int64)
    for block in blocks:
        partner[block] = np.roll(block, 1)
    return partner


def mismatched_unpaired(arrays: dict[str, np.ndarray], partner: np.ndarray) -> dict[str, np.ndarray]:
    """kl_tokens / kl_attention_mask / kl_completion_mask [N, T]: row j's prompt (everything before its first
    completion token) followed by row partner[j]'s completion (its tokens from its first completion token on, with
    their completion mask), cut to the arrays' width T keeping the completion's start, as tokenization cuts."""
    tokens, attention, completion = (np.asarray(arrays[k]) for k in UNPAIRED_INPUT_KEYS)
    n, width = tokens.shape
    start = np.argmax(completion > 0, axis=1)  # every row has a completion token
    end = attention.sum(axis=1)
    out = {k: np.zeros((n, width), np.int32) for k in MISMATCHED_KEYS}
    for j in range(n):
        p, q = start[j], partner[j]
        piece = slice(start[q], start[q] + min(end[q] - start[q], width - p))
        length = p + piece.stop - piece.start
        out["kl_tokens"][j, :p] = tokens[j, :p]
        out["kl_tokens"][j, p:length] = tokens[q, piece]
        out["kl_attention_mask"][j, :length] = 1
        out["kl_completion_mask"][j, p:length] = completion[q, piece]
    return out


# ----------------------------------------------------------------------------------------------------------------
# The loss


def unpaired_loss_fn(model: DecoderLM, objective: str, sft_weight: float = 0.0, logprob_chunk: int = 0,
                     packing: bool = False, **objective_kwargs) -> LossFn:
    """A registered unpaired objective on a batch of labelled completions (module docstring), the loss being the
    objective's mean over the batch (returned as sum and count, so accumulation is exact given the batch-coupled
    statistics of each microbatch). `frozen` is the reference (online) or None when the batch carries `reference`
    (and, for KTO, `kl_reference`). The pairwise-only options (the chosen-NLL term, chunked log-probs, packing) are
    refused with one clear error."""
    spec = get_spec(objective)
    if spec.family != "unpaired":
        raise ValueError(f"objective {objective!r} is {spec.family}; unpaired rows train the unpaired objectives")
    missing = unpaired_missing_extras(objective)
    if missing:
        raise ValueError(f"objective {objective!r} needs {', '.join(missing)}, which unpaired rows do not carry")
    for name, value in (("dpo.sft_weight", sft_weight), ("dpo.logprob_chunk", logprob_chunk),
                        ("dpo.packing", packing)):
        if value:
            raise ValueError(f"{name} applies to pairs; unpaired rows train without it: set {name}="
                             f"{'false' if name == 'dpo.packing' else 0}")
    apply = logits_fn(model)
    wants_kl = any(name in KL_EXTRAS for name in spec.extras)

    def token_logprobs(params, batch):
        tokens = batch["tokens"]
        return masked_token_logprobs(apply(params, tokens, batch["attention_mask"]), tokens, batch["completion_mask"])

    def loss_fn(params, frozen, batch):
        policy = token_logprobs(params, batch)
        if "reference" in batch:
            reference = batch["reference"]
        elif frozen is None:
            raise ValueError(f"objective {objective!r} needs a reference: pass frozen reference parameters or "
                             f"batches carrying precomputed `reference` log-probs")
        else:
            reference = token_logprobs(jax.lax.stop_gradient(frozen), batch)
        extras = mismatched_kl_logprobs(apply, params, frozen, batch, objective) if wants_kl else {}
        inputs = UnpairedInputs(policy=policy, reference=reference, mask=batch["completion_mask"],
                                desirable=batch["label"].astype(jnp.float32), extras=extras)
        new_state = None
        if spec.state is not None:
            new_state, inputs = update_state(objective, objective_state_of(spec, batch), inputs, objective_kwargs)
        loss, metrics = compute_objective(objective, inputs, **objective_kwargs)
        if new_state is not None:
            metrics = dict(metrics, objective_state=new_state)
        rows = jnp.asarray(policy.shape[0], jnp.float32)
        return loss * rows, (rows, metrics)

    return loss_fn


# ----------------------------------------------------------------------------------------------------------------
# The cached reference


@functools.lru_cache(maxsize=8)
def _jitted_logprobs(apply_fn: Callable) -> Callable:
    def fn(params, tokens, attention, completion):
        logps = masked_token_logprobs(apply_fn(params, tokens, attention), tokens, completion)
        return logps, sequence_logprobs(logps, completion)

    return jax.jit(fn)


def compute_unpaired_reference_logprobs(apply_fn: Callable, params: Any, data: dict[str, np.ndarray],
                                        batch_size: int) -> dict[str, np.ndarray]:
    """`reference` [N, T] per-token reference log-probs of every row and, when the rows carry mismatched sequences,
    `kl_reference` [N] their summed reference log-probs."""
    forward = _jitted_logprobs(apply_fn)
    out: dict[str, list] = {"reference": []}
    sources = [("reference", UNPAIRED_INPUT_KEYS, 0)]
    if "kl_tokens" in data:
        out["kl_reference"] = []
        sources.append(("kl_reference", MISMATCHED_KEYS, 1))
    for start in range(0, len(data["tokens"]), batch_size):
        for name, keys, which in sources:
            result = forward(params, *(data[k][start : start + batch_size] for k in keys))
            out[name].append(np.asarray(result[which], np.float32))
    return {k: np.concatenate(v) for k, v in out.items()}


def cached_unpaired_reference_logprobs(cache_dir: str, apply_fn: Callable, params: Any, data: dict[str, np.ndarray],
                                       tokenization: dict[str, Any], batch_size: int) -> tuple[dict[str, np.ndarray],
                                                                                               dict]:
    """`compute_unpaired_reference_logprobs` from the on-disk cache under a content hash of (parameters, the rows'
    token arrays, mismatched ones included, `tokenization`), computed and stored when absent
    (`jaxalign.train.reference.cached_arrays`). Returns (arrays, {"key", "path", "hit"})."""
    keys = UNPAIRED_INPUT_KEYS + (MISMATCHED_KEYS if "kl_tokens" in data else ())
    key = content_key(params, data, {"unpaired_reference_logps": tokenization, "format": _UNPAIRED_CACHE_FORMAT},
                      keys=keys)
    return cached_arrays(cache_dir, "unpaired_reference_logps", key,
                         lambda: compute_unpaired_reference_logprobs(apply_fn, params, data, batch_size),
                         len(data["tokens"]))


__all__ = ["MISMATCHED_KEYS", "UNPAIRED_INPUT_KEYS", "UNPAIRED_TOKEN_KEYS", "cached_unpaired_reference_logprobs",
           "compute_unpaired_reference_logprobs", "is_unpaired", "mismatch_partners", "mismatched_unpaired",
           "unpaired_missing_extras", "unpaired_loss_fn"]
