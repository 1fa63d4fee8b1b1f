"""Jitted, sharded training steps with exact gradient accumulation.

A loss function here has the signature `loss_fn(params, frozen, microbatch) -> (total, (count, metrics))`: the
SUM of per-item losses and the number of items (tokens for SFT, pairs for DPO). Summing both over microbatches and
dividing once at the end makes the accumulated update equal to the large-batch update exactly, whatever the number
of tokens in each microbatch (a mean of microbatch means would not be).

Preference losses know no objective by name: what an objective needs is read from its registration
(`jaxalign.losses.register`). The extras it declares are computed here when `MODEL_EXTRAS` names them (they need the
model: its logits, hidden states, extra parameters or further forward passes) and read from the batch otherwise; a
declared state (`StateHooks`) is initialised by `initial_objective_state` and updated once per step.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jaxalign.data.packing import PACKED_PAIR_KEYS, packed_token_logprobs, unpack_token_logprobs
from jaxalign.data.position import DataPosition
from jaxalign.logprobs import (chunked_token_logprobs, concatenated_pairs, masked_token_logprobs, pair_token_logprobs,
                               sequence_logprobs)
from jaxalign.losses import ObjectiveSpec, PairwiseInputs, compute_objective, get_spec, needed_extras, unpair
from jaxalign.losses import initial_state, update_state
from jaxalign.losses.modifiers import WPO_EXTRAS, wpo_token_log_norm
from jaxalign.losses.dpo import nll_per_token
from jaxalign.models.heads import VALUE_HEAD, apply_value_head, init_value_head, prompt_values
from jaxalign.models.llama import DecoderLM, ModelConfig, output_head
from jaxalign.models.lora import LoraConfig, apply_lora
from jaxalign.sharding import LOGICAL_AXIS_RULES, batch_sharding, replicated
from jaxalign.train.reference import ReferenceSync, sync_reference
from jaxalign.train.state import TrainState

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


@dataclasses.dataclass(frozen=True)
class PairPass:
    """What a model-side extra is computed from: the policy's ONE concatenated forward pass over [chosen; rejected]
    (`concatenated_pairs`: tokens, attention and completion masks [2 * pairs, time], logits, last hidden states),
    the parameters it ran with, the frozen reference (or None) and the batch."""

    objective: str
    apply: Callable
    params: Any
    frozen: Any
    batch: dict
    pairs: int
    tokens: jax.Array
    attention: jax.Array
    completion: jax.Array
    logits: jax.Array
    hidden: jax.Array


def _policy_pass(model: DecoderLM, objective: str, params, frozen, batch: dict) -> PairPass:
    tokens, attention, completion = concatenated_pairs(batch)
    logits, _, hidden = model.apply({"params": params}, tokens, attention, return_hidden=True)
    return PairPass(objective, logits_fn(model), params, frozen, batch, batch["chosen_tokens"].shape[0], tokens,
                    attention, completion, logits, hidden)


def _chunked(model: DecoderLM, params, hidden: jax.Array, tokens: jax.Array, completion: jax.Array,
             chunk: int) -> jax.Array:
    """Masked per-token log-probs from final hidden states, `chunk` positions at a time (no full logits)."""
    logps = chunked_token_logprobs(hidden, output_head(params, model.cfg), tokens, chunk,
                                   model.cfg.final_logit_softcap)
    return jnp.where(completion.astype(bool), logps, 0.0)


def chunked_logprobs_fn(model: DecoderLM, chunk: int):
    """An `apply` for `pair_token_logprobs` that returns masked per-token log-probs directly (chunked), used for
    the online reference when the policy's log-probs are chunked: the reference's logits never exist either."""

    def apply(params, tokens, attention):
        _, _, hidden = model.apply({"params": params}, tokens, attention, return_hidden=True)
        return chunked_token_logprobs(hidden, output_head(params, model.cfg), tokens, chunk,
                                      model.cfg.final_logit_softcap)

    return apply


def _reference_logprobs(apply, frozen, batch: dict, spec: ObjectiveSpec, like: jax.Array, chunked: bool = False,
                        packed: Callable | None = None):
    """The reference's per-token log-probs for chosen and rejected, from the batch (precomputed), from a forward
    pass of the frozen parameters (online), or zeros for objectives that never read them (reference-free). With
    `chunked`, `apply` returns per-token log-probs already (`chunked_logprobs_fn`); with `packed` (params ->
    (chosen, rejected), `packed_pair_logprobs`), the online pass runs over the batch's packed rows."""
    if "reference_chosen" in batch:
        return batch["reference_chosen"], batch["reference_rejected"]
    if not spec.needs_reference:
        return jnp.zeros_like(like), jnp.zeros_like(like)
    if frozen is None:
        raise ValueError(f"objective {spec.name!r} needs a reference model: pass frozen reference parameters or "
                         f"batches carrying precomputed reference_chosen/reference_rejected log-probs")
    if packed is not None:
        return packed(jax.lax.stop_gradient(frozen))
    if chunked:
        tokens, attention, completion = concatenated_pairs(batch)
        logps = jnp.where(completion.astype(bool), apply(jax.lax.stop_gradient(frozen), tokens, attention), 0.0)
        pairs = batch["chosen_tokens"].shape[0]
        return logps[:pairs], logps[pairs:]
    return pair_token_logprobs(apply, jax.lax.stop_gradient(frozen), batch)


def packed_pair_logprobs(model: DecoderLM, params, batch: dict, chunk: int = 0) -> tuple[jax.Array, jax.Array]:
    """Masked per-token log-probs [pairs, T] of chosen and rejected, as `pair_token_logprobs` returns them, from ONE
    forward pass over the batch's packed rows (`jaxalign.data.packing.pack_pair_batch`: segment-aware attention and
    positions, Krell et al. 2021) gathered back to the unpacked layout. `chunk` > 0: from the hidden states, `chunk`
    positions at a time (`chunked_token_logprobs`)."""
    missing = [k for k in PACKED_PAIR_KEYS if k not in batch]
    if missing:
        raise ValueError(f"a packed loss needs batches packed by jaxalign.data.packing.pack_pair_batch (missing "
                         f"{', '.join(missing)}); train through PackedPairDataset or set dpo.packing=false")
    tokens, segments = batch["packed_tokens"], batch["packed_segment_ids"]
    logits, _, hidden = model.apply({"params": params}, tokens, segments > 0, return_hidden=True, segment_ids=segments)
    if chunk:  # the logits are then unused, and XLA drops them
        logps = chunked_token_logprobs(hidden, output_head(params, model.cfg), tokens, chunk,
                                       model.cfg.final_logit_softcap)
        logps = packed_token_logprobs(None, tokens, segments, jnp.ones_like(segments), token_logps=logps)
    else:
        logps = packed_token_logprobs(logits, tokens, segments, jnp.ones_like(segments))
    return tuple(unpack_token_logprobs(logps, batch[f"{side}_packed_index"], batch[f"{side}_completion_mask"])
                 for side in ("chosen", "rejected"))


def mismatched_kl_logprobs(apply, params, frozen, batch: dict, objective: str) -> dict:
    """KTO's reference point inputs (Ethayarajh et al. 2024, sec. 4.1): summed completion log-probs of MISMATCHED
    (prompt, completion) sequences `kl_tokens` / `kl_attention_mask` / `kl_completion_mask` under the policy (no
    gradient, as in TRL) and the reference (`kl_reference` precomputed in the batch, or a forward pass of `frozen`)."""
    if "kl_tokens" not in batch:
        raise ValueError(f"objective {objective!r} needs mismatched prompt/completion sequences in every batch "
                         f"(kl_tokens, kl_attention_mask, kl_completion_mask); the batch has {sorted(batch)}")

    def summed(p):
        logits = apply(p, batch["kl_tokens"], batch["kl_attention_mask"])
        logps = masked_token_logprobs(logits, batch["kl_tokens"], batch["kl_completion_mask"])
        return sequence_logprobs(logps, batch["kl_completion_mask"])

    kl_policy = jax.lax.stop_gradient(summed(params))
    if "kl_reference" in batch:
        return {"kl_policy": kl_policy, "kl_reference": batch["kl_reference"]}
    if frozen is None:
        raise ValueError(f"objective {objective!r} needs the reference's log-probs of the mismatched sequences: pass "
                         f"frozen reference parameters or batches carrying kl_reference")
    return {"kl_policy": kl_policy, "kl_reference": summed(jax.lax.stop_gradient(frozen))}


def _wpo_log_norm(forward: PairPass) -> dict:
    """WPO's per-token normaliser log sum_v p_v^2 of each side (no gradient; Zhou et al. 2024, `modifiers`)."""
    log_norm = wpo_token_log_norm(forward.logits)
    return {WPO_EXTRAS[0]: log_norm[: forward.pairs], WPO_EXTRAS[1]: log_norm[forward.pairs :]}


def _prompt_value(forward: PairPass) -> dict:
    """V(x) for both halves: a linear value head on the policy's stop-gradient hidden state before the first
    completion token (DRO's value function, Richemond et al. 2024, here a linear probe of the policy's state)."""
    if VALUE_HEAD not in forward.params:
        raise ValueError(f"objective {forward.objective!r} needs a value head: create the train state with "
                         f"extra_params=objective_extra_params({forward.objective!r}, cfg) (i.e. "
                         f"{{{VALUE_HEAD!r}: init_value_head(cfg)}})")
    # Stop-gradient features: the value loss trains the head only, and V(x) is a baseline that does not depend
    # on the policy parameters.
    values = apply_value_head(forward.params[VALUE_HEAD], jax.lax.stop_gradient(forward.hidden))
    return {"value": prompt_values(values, forward.completion, forward.attention)}


def _mismatched_kl(forward: PairPass) -> dict:
    return mismatched_kl_logprobs(forward.apply, forward.params, forward.frozen, forward.batch, forward.objective)


def _completion_reward(forward: PairPass) -> dict:
    """The judged score of every completion, [chosen; rejected] as `unpair` orders them."""
    batch = forward.batch
    if "chosen_score" not in batch or "rejected_score" not in batch:
        raise ValueError(f"objective {forward.objective!r} needs per-completion rewards chosen_score and "
                         f"rejected_score in every batch; the batch has {sorted(batch)}")
    return {"reward": jnp.concatenate([batch["chosen_score"], batch["rejected_score"]]).astype(jnp.float32)}


@dataclasses.dataclass(frozen=True)
class ModelExtra:
    """How the loss function computes one or more extras: `compute(PairPass) -> {name: array}`, and, when it needs
    parameters of its own trained beside the policy's, `init_params` (ModelConfig -> boxed parameters) and
    `params_description` (what they are, in words, for trainers that cannot add them)."""

    compute: Callable[[PairPass], dict]
    init_params: Callable[[ModelConfig], dict] | None = None
    params_description: str = ""


_WPO = ModelExtra(_wpo_log_norm)
_KL = ModelExtra(_mismatched_kl)
# THE table of extras computed here rather than read from the batch (objectives cannot import models). An entry
# shared by several names runs once and returns all of them.
MODEL_EXTRAS: dict[str, ModelExtra] = {
    WPO_EXTRAS[0]: _WPO,
    WPO_EXTRAS[1]: _WPO,
    "kl_policy": _KL,
    "kl_reference": _KL,
    "value": ModelExtra(_prompt_value, lambda cfg: {VALUE_HEAD: init_value_head(cfg)}, "a value head"),
    "reward": ModelExtra(_completion_reward),
}
_MODEL_EXTRAS = frozenset(MODEL_EXTRAS)


def _model_extras(wanted: tuple[str, ...]) -> list[ModelExtra]:
    """The distinct `MODEL_EXTRAS` entries computing the wanted extras, in declaration order."""
    entries: list[ModelExtra] = []
    for name in wanted:
        if name in MODEL_EXTRAS and all(MODEL_EXTRAS[name] is not e for e in entries):
            entries.append(MODEL_EXTRAS[name])
    return entries


def _batch_extras(spec: ObjectiveSpec, wanted: tuple[str, ...], batch: dict) -> dict:
    """The wanted extras neither computed here nor produced by the objective's state, taken from the batch, with one
    clear error when one is missing."""
    produced = set(spec.state.extras) if spec.state is not None else set()
    from_batch = [name for name in wanted if name not in _MODEL_EXTRAS and name not in produced]
    missing = [name for name in from_batch if name not in batch]
    if missing:
        raise ValueError(f"objective {spec.name!r} needs {', '.join(map(repr, missing))} in every batch (declared "
                         f"extras {spec.extras}); the batch has {sorted(batch)}")
    return {name: batch[name] for name in from_batch}


def extra_params_needed(objective: str) -> tuple[str, ...]:
    """What parameters objective `objective` trains beside the policy, in words (e.g. ("a value head",)); empty when
    it trains none."""
    return tuple(e.params_description for e in _model_extras(needed_extras(objective)) if e.init_params is not None)


def objective_extra_params(objective: str, cfg: ModelConfig) -> dict | None:
    """Parameters objective `objective` trains beside the policy (boxed, for `sharded_train_state(...,
    extra_params=...)`), e.g. a value head for an objective declaring extra "value"; None when it needs none."""
    params: dict = {}
    for entry in _model_extras(needed_extras(objective)):
        if entry.init_params is not None:
            params.update(entry.init_params(cfg))
    return params or None


def packing_refusal(objective: str, wpo: bool = False) -> str | None:
    """Why `objective` cannot train packed (`dpo_loss_fn(..., packing=True)`), in one line, or None: the extras
    `MODEL_EXTRAS` computes read the padded pass (its logits, hidden states, further sequences)."""
    computed = [n for n in needed_extras(objective, wpo=wpo) if n in MODEL_EXTRAS]
    if not computed:
        return None
    return (f"objective {objective!r} computes extras in the loss from the model's padded outputs "
            f"({', '.join(computed)}); set dpo.packing=false to train it")


def objective_state_of(spec: ObjectiveSpec, batch: dict) -> Any:
    """The state a stateful objective's loss receives as batch["objective_state"] (`make_train_step`), or one clear
    error when the train state was created without it."""
    if "objective_state" not in batch:
        raise ValueError(f"objective {spec.name!r} keeps {spec.state.description}: start the train state with "
                         f"objective_state=initial_objective_state({spec.name!r})")
    return batch["objective_state"]


def initial_objective_state(objective: str):
    """The state objective `objective` carries across steps in `TrainState.objective_state`, from its registration
    (`StateHooks.init`; e.g. BCO's running mean of batch rewards, Jung et al. 2024), or None if it keeps none."""
    return initial_state(objective)


def dpo_loss_fn(model: DecoderLM, objective: str = "sigmoid", sft_weight: float = 0.0, *,
                f_divergence: str | None = None, f_alpha: float = 0.5, ld_alpha: float | None = None,
                wpo: bool = False, logprob_chunk: int = 0, packing: bool = False, **objective_kwargs) -> LossFn:
    """A registered pairwise, reference-free or unpaired objective on chosen/rejected log-probs from one
    concatenated forward pass (unpaired objectives see the pairs as labelled single completions, `unpair`).

    `sft_weight` > 0 adds sft_weight * mean over pairs of the chosen completion's token-mean NLL, the "DPO + lambda*SFT"
    regulariser (RPO, Pang et al. 2024; SFT-DPO in the 3D-properties paper) that keeps the chosen likelihood from
    collapsing together with the rejected one. f_divergence / f_alpha / ld_alpha / wpo are TRL 1.16.0's loss
    modifiers (`jaxalign.losses.compute_objective`); WPO's per-token normaliser comes from the policy's logits.

    `logprob_chunk` > 0 computes the per-token log-probs (policy and online reference) from the final hidden states
    `logprob_chunk` positions at a time (`jaxalign.logprobs.chunked_token_logprobs`), so the [2 * pairs, time, vocab]
    fp32 logits and their gradient never exist at once; an objective whose extras are computed from the logits
    cannot use it.

    `packing` runs the policy (and an online reference) over the batch's packed rows instead of its padded ones
    (`jaxalign.data.packing.pack_pair_batch`, `packed_pair_logprobs`): the objective sees the same per-token
    log-probs [pairs, T], so loss and gradients equal the padded step's up to float rounding. Extras computed here
    from the model's outputs would need the padded pass, so objectives declaring them refuse packing.

    `frozen` is the reference: either frozen reference parameters (online reference: one extra forward pass, no
    gradient) or None when the batch carries precomputed `reference_chosen`/`reference_rejected` log-probs or the
    objective is reference-free. The extras the objective needs (`needed_extras`) are computed here when
    `MODEL_EXTRAS` names them, produced by its state when it declares one, and read from the batch under their names
    otherwise. A state arrives as batch["objective_state"] and leaves, updated, as metrics["objective_state"] (see
    `make_train_step`).
    """
    apply = logits_fn(model)
    spec = get_spec(objective)
    if spec.family == "listwise":
        raise ValueError(f"objective {objective!r} is listwise: it trains on ranked lists, not pairs")
    modifiers = dict(f_divergence=f_divergence, f_alpha=f_alpha, ld_alpha=ld_alpha, wpo=wpo)
    wanted = needed_extras(objective, wpo=wpo)
    computed = _model_extras(wanted)
    if logprob_chunk and computed:
        raise ValueError(f"objective {objective!r} computes extras in the loss from the model's full outputs "
                         f"({', '.join(n for n in wanted if n in MODEL_EXTRAS)}); set dpo.logprob_chunk=0 to train it")
    if packing and packing_refusal(objective, wpo):
        raise ValueError(packing_refusal(objective, wpo))
    if logprob_chunk:
        apply = chunked_logprobs_fn(model, logprob_chunk)

    def loss_fn(params, frozen, batch):
        packed = None
        if packing:
            policy_chosen, policy_rejected = packed_pair_logprobs(model, params, batch, logprob_chunk)
            packed = lambda p: packed_pair_logprobs(model, p, batch, logprob_chunk)  # noqa: E731
        else:
            forward = _policy_pass(model, objective, params, frozen, batch)
            if logprob_chunk:  # the pass's logits are then unused, and XLA drops them
                logps = _chunked(model, params, forward.hidden, forward.tokens, forward.completion, logprob_chunk)
            else:
                logps = masked_token_logprobs(forward.logits, forward.tokens, forward.completion)
            policy_chosen, policy_rejected = logps[: forward.pairs], logps[forward.pairs :]
        reference_chosen, reference_rejected = _reference_logprobs(apply, frozen, batch, spec, policy_chosen,
                                                                   chunked=bool(logprob_chunk), packed=packed)
        extras = _batch_extras(spec, wanted, batch)
        for entry in computed:
            extras.update(entry.compute(forward))
        inputs = PairwiseInputs(
            policy_chosen=policy_chosen, policy_rejected=policy_rejected,
            reference_chosen=reference_chosen, reference_rejected=reference_rejected,
            chosen_mask=batch["chosen_completion_mask"], rejected_mask=batch["rejected_completion_mask"],
            extras=extras,
        )
        if spec.family == "unpaired":
            inputs = unpair(inputs)
        new_objective_state = None
        if spec.state is not None:
            new_objective_state, inputs = update_state(objective, objective_state_of(spec, batch), inputs,
                                                       objective_kwargs)
        loss, metrics = compute_objective(objective, inputs, **modifiers, **objective_kwargs)
        if new_objective_state is not None:
            metrics = dict(metrics, objective_state=new_objective_state)
        if sft_weight:
            # Per-pair (each chosen response's token-mean NLL, averaged over pairs), not a batch token mean: a
            # per-pair term sums exactly over microbatches, so accumulation stays equal to the large batch.
            chosen_nll = -sequence_logprobs(policy_chosen, batch["chosen_completion_mask"], average=True)
            metrics = dict(metrics, chosen_nll=jnp.mean(chosen_nll))
            loss = loss + sft_weight * jnp.mean(chosen_nll)
        pairs = jnp.asarray(policy_chosen.shape[0], jnp.float32)
        return loss * pairs, (pairs, metrics)

    return loss_fn


def lora_loss_fn(loss_fn: LossFn, lora: LoraConfig) -> LossFn:
    """`loss_fn` trained through low-rank adapters (LoRA, Hu et al. 2021): the trainable parameters are the adapters
    (`jaxalign.models.lora.init_lora`) and `frozen` is the frozen base model.

    The policy is apply_lora(base, adapters) and `loss_fn` receives the base itself as its frozen parameters, so for
    DPO the reference IS the base: policy and reference share one copy of the weights, and the gradient reaches the
    adapters only (the base enters under stop_gradient). A batch carrying precomputed reference log-probs uses
    those, as without LoRA. Use with `make_train_step` unchanged, passing the base as `frozen`, on a state whose
    params are the adapters and which tracks no reference of its own (`jaxalign.train.setup.sharded_lora_train_state`;
    a tracked TR-DPO reference would take the base's place).
    """

    def wrapped(adapters, frozen, batch):
        if frozen is None:
            raise ValueError("a LoRA loss needs the frozen base parameters as `frozen` (they are the policy's base "
                             "and the reference); got None")
        base = jax.lax.stop_gradient(frozen)
        return loss_fn(apply_lora(base, adapters, lora), base, batch)

    return wrapped


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


def make_train_step(loss_fn: LossFn, accum_steps: int = 1, reference_sync: ReferenceSync | None = None):
    """The pure step: (state, frozen, batch, next_data_position) -> (state, metrics).

    When the state tracks its own reference (`state.reference` is not None) that reference is used instead of
    `frozen`, and after the update `reference_sync` (TR-DPO) may move it towards the new parameters. A state with an
    `objective_state` (`initial_objective_state`) passes it to the loss as batch["objective_state"] and stores the
    updated one the loss returns as metrics["objective_state"].
    """

    def step(state: TrainState, frozen, batch: dict, next_position: DataPosition):
        reference = frozen if state.reference is None else state.reference
        if state.objective_state is not None:
            if accum_steps != 1:
                raise ValueError("an objective with a state across steps (`initial_objective_state`) folds in one "
                                 f"batch per step; use grad_accum_steps=1, got {accum_steps}")
            batch = dict(batch, objective_state=state.objective_state)
        loss, grads, metrics = accumulated_gradients(loss_fn, state.params, reference, batch, accum_steps)
        new_state = state.apply_gradients(grads, data=next_position)
        if state.objective_state is not None:
            metrics = dict(metrics)
            new_state = new_state.replace(objective_state=metrics.pop("objective_state"))
        if state.reference is not None and reference_sync is not None:
            new_state = new_state.replace(
                reference=sync_reference(state.reference, new_state.params, new_state.step, reference_sync))
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
        with jax.set_mesh(mesh):
            return jitted(state, frozen, batch, next_position)

    # For lowering and inspecting the compiled step (`jaxalign.bench.step_profile`): lower it under `jax.set_mesh(
    # call.mesh)`, as the call runs it, or the model's activation constraints are left out.
    call.jitted, call.mesh = jitted, mesh
    return call
