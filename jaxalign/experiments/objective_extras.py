"""What some objectives need beyond log-probs, built for the ARITH pairs (issue 3: "everything trains").

- kto: mismatched (prompt, completion) sequences for its reference point KL (Ethayarajh et al. 2024, sec. 4.1):
  the prompt of pair i with the chosen completion of pair i+1 (TRL rotates completions within a batch; rotating
  over the dataset gives every batch mismatched sequences too), and their reference log-probs when the reference
  is cached.
- madpo, smpo: a Bradley-Terry reward model (`jaxalign.algorithms.reward_model`, a `ScalarHeadLM` whose backbone
  starts from the SFT policy) trained on the same pairs; MADPO reads the margin h = r(y_w) - r(y_l), SmPO the
  smoothed preference probability sigmoid(h). Its held-out pair accuracy is reported.
- sem_dpo: the cosine distance between embeddings of the prompt and the chosen response, e(.) = the mean final
  hidden state of the SFT model over those tokens (Sem-DPO uses a sentence encoder; the SFT model's own hidden
  states are the encoder a self-contained run has).
- tgdpo: per-token log-probs of a guidance policy, a sigmoid-DPO policy trained first on the same pairs
  (TGDPO, Zhu et al. 2025: token-level guidance from a previously trained DPO policy).

Every computed array is cached on disk under a content hash of (SFT parameters, pairs, producing config), so the
benchmark's many runs on one task train each auxiliary model once.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxalign.algorithms.reward_model import bradley_terry_loss_fn, reward_margins
from jaxalign.data.iterator import ArrayDataset, batch_at
from jaxalign.logprobs import masked_token_logprobs, sequence_logprobs
from jaxalign.models.heads import ScalarHeadLM, init_scalar_head_params, with_backbone
from jaxalign.models.llama import DecoderLM, ModelConfig
from jaxalign.train.optim import OptimConfig, make_optimizer
from jaxalign.train.reference import cached_arrays, compute_reference_logprobs, content_key
from jaxalign.train.state import DataPosition, TrainState
from jaxalign.train.step import logits_fn, make_train_step

PAIR_SIDES = ("chosen", "rejected")


@dataclasses.dataclass(frozen=True)
class ExtrasConfig:
    """Budgets of the auxiliary models some objectives need (only built when the objective asks for them)."""

    reward_model_steps: int = 300
    reward_model_batch_size: int = 64
    reward_model_optim: OptimConfig = OptimConfig(learning_rate=3e-4, warmup_steps=20)
    reward_model_holdout: float = 0.1
    guidance_steps: int = 100

    def __post_init__(self):
        if not 0.0 < self.reward_model_holdout < 1.0:
            raise ValueError(f"extras.reward_model_holdout must lie in (0, 1), got {self.reward_model_holdout!r}")
        if self.reward_model_steps < 1 or self.guidance_steps < 1:
            raise ValueError("extras.reward_model_steps and extras.guidance_steps must be >= 1, got "
                             f"{self.reward_model_steps!r} and {self.guidance_steps!r}")


# ----------------------------------------------------------------------------------------------------------------
# kto


def mismatched_sequences(arrays: dict[str, np.ndarray], prompt_len: int) -> dict[str, np.ndarray]:
    """kl_tokens / kl_attention_mask / kl_completion_mask: prompt i (the first `prompt_len` columns of pair i) with
    the chosen completion of pair (i+1) mod N. With N = 1 the 'mismatch' is the pair itself (nothing to rotate)."""
    following = np.roll(np.arange(len(arrays["chosen_tokens"])), -1)
    glue = lambda key: np.concatenate([arrays[key][:, :prompt_len], arrays[key][following, prompt_len:]], axis=1)  # noqa: E731
    completion = arrays["chosen_completion_mask"][following].copy()
    completion[:, :prompt_len] = 0
    return {"kl_tokens": glue("chosen_tokens"), "kl_attention_mask": glue("chosen_attention_mask"),
            "kl_completion_mask": completion}


@functools.lru_cache(maxsize=4)
def _summed_logprobs_fn(model_cfg: ModelConfig):
    apply = logits_fn(DecoderLM(model_cfg))

    def fn(params, tokens, attention, completion):
        logits = apply(params, tokens, attention)
        return sequence_logprobs(masked_token_logprobs(logits, tokens, completion), completion)

    return jax.jit(fn)


def summed_logprobs(params, model_cfg: ModelConfig, tokens, attention, completion, batch_size: int) -> np.ndarray:
    """L(y) = summed completion log-probs of every row, computed in batches with one compiled function per model
    config; [N] float32."""
    fn = _summed_logprobs_fn(model_cfg)
    return np.concatenate([np.asarray(fn(params, tokens[i : i + batch_size], attention[i : i + batch_size],
                                         completion[i : i + batch_size]), np.float32)
                           for i in range(0, len(tokens), batch_size)])


# ----------------------------------------------------------------------------------------------------------------
# madpo, smpo: a Bradley-Terry reward model


def train_reward_model(cfg: ExtrasConfig, model_cfg: ModelConfig, sft_params, pairs: dict[str, np.ndarray],
                       seed: int, show_progress: bool = True):
    """(reward model params, held-out pair accuracy): a ScalarHeadLM with the SFT backbone, trained with the
    Bradley-Terry loss on all but a held-out fraction of the pairs."""
    model = ScalarHeadLM(model_cfg)
    params = with_backbone(nn.meta.unbox(init_scalar_head_params(model_cfg, jax.random.key(seed))), sft_params)
    order = np.random.default_rng([seed, 5]).permutation(len(pairs["chosen_tokens"]))
    holdout = max(1, int(round(cfg.reward_model_holdout * len(order))))
    train = ArrayDataset({k: v[order[holdout:]] for k, v in pairs.items()})
    held_out = {k: jnp.asarray(v[order[:holdout]]) for k, v in pairs.items()}
    tx = make_optimizer(cfg.reward_model_optim, cfg.reward_model_steps)
    state = TrainState.create(params, tx, jax.random.key(seed))
    step = jax.jit(make_train_step(bradley_terry_loss_fn(model)))
    position = jax.device_get(DataPosition.start())
    batch_size = min(cfg.reward_model_batch_size, len(train))
    for _ in tqdm(range(cfg.reward_model_steps), desc="reward model", disable=not show_progress):
        batch, position = batch_at(train, position, batch_size, seed)
        state, _ = step(state, None, batch, position)
    margins = np.asarray(reward_margins(state.params, model, held_out))
    return state.params, float(np.mean(margins > 0))


def reward_model_extras(cfg: ExtrasConfig, model_cfg: ModelConfig, sft_params, pairs: dict[str, np.ndarray],
                        seed: int, batch_size: int, show_progress: bool = True) -> dict[str, np.ndarray]:
    """reward_margin (MADPO) and preference_probability = sigmoid(margin) (SmPO) for every pair, plus the reward
    model's held-out pair accuracy (a [N] column repeating one number, so it caches with the rest)."""
    params, accuracy = train_reward_model(cfg, model_cfg, sft_params, pairs, seed, show_progress)
    model = ScalarHeadLM(model_cfg)
    margin_fn = jax.jit(lambda p, b: reward_margins(p, model, b))
    keys = [f"{side}_{k}" for side in PAIR_SIDES for k in ("tokens", "attention_mask")]
    margins = np.concatenate([np.asarray(margin_fn(params, {k: pairs[k][i : i + batch_size] for k in keys}))
                              for i in range(0, len(pairs["chosen_tokens"]), batch_size)]).astype(np.float32)
    return {"reward_margin": margins, "preference_probability": (1.0 / (1.0 + np.exp(-margins))).astype(np.float32),
            "reward_model_heldout_accuracy": np.full(len(margins), accuracy, np.float32)}


# ----------------------------------------------------------------------------------------------------------------
# sem_dpo


def mean_hidden(params, model_cfg: ModelConfig, tokens, attention, select, batch_size: int) -> np.ndarray:
    """Mean final hidden state over the positions where `select` is 1, per row: [N, d_model]."""
    model = DecoderLM(model_cfg)

    @jax.jit
    def embed(p, t, a, s):
        hidden = model.apply({"params": p}, t, a, return_hidden=True)[2].astype(jnp.float32)
        s = s.astype(jnp.float32)[..., None]
        return jnp.sum(hidden * s, axis=1) / jnp.maximum(jnp.sum(s, axis=1), 1.0)

    return np.concatenate([np.asarray(embed(params, tokens[i : i + batch_size], attention[i : i + batch_size],
                                            select[i : i + batch_size])) for i in range(0, len(tokens), batch_size)])


def semantic_distance_extras(model_cfg: ModelConfig, sft_params, pairs: dict[str, np.ndarray],
                             batch_size: int) -> dict[str, np.ndarray]:
    """semantic_distance = 1 - cos(e(x), e(y_w)) in [0, 2], e = mean SFT hidden state over the tokens."""
    tokens, attention, completion = (pairs[f"chosen_{k}"] for k in ("tokens", "attention_mask", "completion_mask"))
    prompt = attention * (1 - completion)
    e_x = mean_hidden(sft_params, model_cfg, tokens, attention, prompt, batch_size)
    e_y = mean_hidden(sft_params, model_cfg, tokens, attention, completion, batch_size)
    cos = np.sum(e_x * e_y, axis=1) / np.maximum(np.linalg.norm(e_x, axis=1) * np.linalg.norm(e_y, axis=1), 1e-12)
    return {"semantic_distance": np.clip(1.0 - cos, 0.0, 2.0).astype(np.float32)}


# ----------------------------------------------------------------------------------------------------------------
# tgdpo


def guidance_extras(guidance_params, model_cfg: ModelConfig, pairs: dict[str, np.ndarray],
                    batch_size: int) -> dict[str, np.ndarray]:
    """guidance_chosen / guidance_rejected: per-token log-probs of the guidance (DPO-trained) policy."""
    logps = compute_reference_logprobs(logits_fn(DecoderLM(model_cfg)), guidance_params, pairs, batch_size)
    return {"guidance_chosen": logps["reference_chosen"], "guidance_rejected": logps["reference_rejected"]}


# ----------------------------------------------------------------------------------------------------------------
# one entry point


def needed(spec) -> set[str]:
    """Which of the auxiliary products an objective's declared extras call for."""
    wanted = set()
    if "kl_policy" in spec.extras:
        wanted.add("mismatched")
    if {"reward_margin", "preference_probability"} & set(spec.extras):
        wanted.add("reward_model")
    if "semantic_distance" in spec.extras:
        wanted.add("semantic_distance")
    if "guidance_chosen" in spec.extras:
        wanted.add("guidance")
    return wanted


def cached_extras(kind: str, cache_dir: str, sft_params, pairs: dict[str, np.ndarray], description: dict[str, Any],
                  compute) -> tuple[dict[str, np.ndarray], dict]:
    key = content_key(sft_params, pairs, {"extras": kind, **description})
    return cached_arrays(cache_dir, f"extras_{kind}", key, compute, len(pairs["chosen_tokens"]))


