"""What some objectives read beyond log-probs, built on the host once per (policy, pairs) and cached on disk.

An objective declares the extras it reads in its registration (`jaxalign.losses.register(..., extras=...)`).
Those a training step computes from the model itself are `jaxalign.train.step.MODEL_EXTRAS`; the ones that need
work before training (another model trained, an embedding pass, precomputed log-probs) are built here, looked up in
`BUILDERS` by extra name, by ONE entry point, `build_extras`:

- kl_policy / kl_reference (KTO): mismatched (prompt, completion) sequences for the reference point KL
  (Ethayarajh et al. 2024, sec. 4.1): the prompt of pair i with the chosen completion of pair i+1 (TRL rotates
  completions within a batch; rotating over the dataset gives every batch mismatched sequences too), and their
  reference log-probs when the reference is cached.
- reward_margin / preference_probability (MADPO, SmPO): a Bradley-Terry reward model
  (`jaxalign.algorithms.reward_model`, a `ScalarHeadLM` whose backbone starts from the SFT policy) trained on the
  same pairs; MADPO reads the margin h = r(y_w) - r(y_l), SmPO the smoothed preference probability sigmoid(h). Its
  held-out pair accuracy is reported.
- semantic_distance (Sem-DPO): the cosine distance between embeddings of the prompt and the chosen response,
  e(.) = the mean final hidden state of the SFT model over those tokens (Sem-DPO uses a sentence encoder; the SFT
  model's own hidden states are the encoder a self-contained run has).
- guidance_chosen / guidance_rejected (TGDPO): per-token log-probs of a guidance policy, a policy trained first on
  the same pairs (TGDPO, Zhu et al. 2025: token-level guidance from a previously trained DPO policy); the caller
  supplies the training as a callable, so this module depends on no experiment.
- reward (DRO): the judged score of every completion, which the pairs must carry (chosen_score, rejected_score);
  nothing is built, the pairs are checked.

Every product but the mismatched sequences is cached on disk under a content hash of (SFT parameters, pairs,
producing config), so a benchmark's many runs on one task train each auxiliary model once.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxalign.algorithms.reward_model import bradley_terry_loss_fn, reward_margins
from jaxalign.data.iterator import ArrayDataset, batch_at
from jaxalign.data.position import DataPosition
from jaxalign.logprobs import masked_token_logprobs, sequence_logprobs
from jaxalign.losses import ObjectiveSpec, get_spec
from jaxalign.models.heads import ScalarHeadLM, init_scalar_head_params, with_backbone
from jaxalign.models.llama import DecoderLM, ModelConfig
from jaxalign.train.optim import OptimConfig, make_optimizer
from jaxalign.train.reference import cached_arrays, compute_reference_logprobs, content_key
from jaxalign.train.state import TrainState
from jaxalign.train.step import logits_fn, make_train_step

PAIR_SIDES = ("chosen", "rejected")


@dataclasses.dataclass(frozen=True)
class ExtrasConfig:
    """Budgets of the auxiliary models some objectives need (only built when the objective asks for them)."""

    reward_model_steps: int = 300  # training steps of the pairwise reward model (objectives reading its margins)
    reward_model_batch_size: int = 64  # pairs per reward-model step
    reward_model_optim: OptimConfig = OptimConfig(learning_rate=3e-4, warmup_steps=20)
    reward_model_holdout: float = 0.1  # fraction of the pairs held out to report the reward model's accuracy
    guidance_steps: int = 100  # DPO steps of TGDPO's guidance policy, trained first on the same pairs

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

    def glue(key):
        return np.concatenate([arrays[key][:, :prompt_len], arrays[key][following, prompt_len:]], axis=1)

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
# the table and the one entry point


@dataclasses.dataclass(frozen=True)
class ExtrasContext:
    """Everything a builder may read: the pairs as given to `build_extras` and the settings passed with them."""

    pairs: dict[str, np.ndarray]
    sft_params: Any
    model_cfg: ModelConfig
    extras_cfg: ExtrasConfig
    seed: int
    batch_size: int
    prompt_len: int | None
    reference_mode: str
    train_guidance: Callable[[], Any] | None
    guidance_description: dict[str, Any] | None
    show_progress: bool


@dataclasses.dataclass(frozen=True)
class Builder:
    """How to build some extras on the host.

    kind: the product's name (the cache file is `extras_<kind>-<key>.npz`).
    needs: what it takes, in words, for the message of a trainer that cannot build it ("a trained reward model").
    build: ExtrasContext -> the new arrays, one row per pair.
    describe: ExtrasContext -> the JSON-able description of everything else the product depends on, hashed into the
        cache key with the SFT parameters and the pair arrays; None: not cached (cheap, or nothing is built).
    """

    kind: str
    needs: str
    build: Callable[[ExtrasContext], dict[str, np.ndarray]]
    describe: Callable[[ExtrasContext], dict[str, Any]] | None = None


def _mismatched(ctx: ExtrasContext) -> dict[str, np.ndarray]:
    if ctx.prompt_len is None:
        raise ValueError("mismatched prompt/completion sequences need prompt_len, the number of prompt columns "
                         "shared by every pair")
    arrays = mismatched_sequences(ctx.pairs, ctx.prompt_len)
    if ctx.reference_mode == "cached":
        arrays["kl_reference"] = summed_logprobs(ctx.sft_params, ctx.model_cfg, arrays["kl_tokens"],
                                                 arrays["kl_attention_mask"], arrays["kl_completion_mask"],
                                                 ctx.batch_size)
    return arrays


def _reward_model(ctx: ExtrasContext) -> dict[str, np.ndarray]:
    return reward_model_extras(ctx.extras_cfg, ctx.model_cfg, ctx.sft_params, ctx.pairs, ctx.seed, ctx.batch_size,
                               ctx.show_progress)


def _semantic_distance(ctx: ExtrasContext) -> dict[str, np.ndarray]:
    return semantic_distance_extras(ctx.model_cfg, ctx.sft_params, ctx.pairs, ctx.batch_size)


def _guidance(ctx: ExtrasContext) -> dict[str, np.ndarray]:
    return guidance_extras(ctx.train_guidance(), ctx.model_cfg, ctx.pairs, ctx.batch_size)


def _check_scores(ctx: ExtrasContext) -> dict[str, np.ndarray]:
    missing = [k for k in ("chosen_score", "rejected_score") if k not in ctx.pairs]
    if missing:
        raise ValueError(f"the judged score of every completion is needed, but the pairs lack {', '.join(missing)} "
                         f"(they have {sorted(ctx.pairs)})")
    return {}


MISMATCHED = Builder("mismatched", "mismatched prompt/completion sequences (KTO's reference point)", _mismatched)
REWARD_MODEL = Builder("reward_model", "a trained reward model", _reward_model,
                       lambda ctx: {"config": dataclasses.asdict(ctx.extras_cfg), "seed": ctx.seed})
SEMANTIC_DISTANCE = Builder("semantic_distance", "semantic distances", _semantic_distance, lambda ctx: {})
GUIDANCE = Builder("guidance", "a guidance policy", _guidance, lambda ctx: dict(ctx.guidance_description))
JUDGED_SCORES = Builder("reward", "a judged score per completion", _check_scores)

# Extra name -> its builder; a builder serving several names runs once.
BUILDERS: dict[str, Builder] = {
    "kl_policy": MISMATCHED,
    "kl_reference": MISMATCHED,
    "reward_margin": REWARD_MODEL,
    "preference_probability": REWARD_MODEL,
    "semantic_distance": SEMANTIC_DISTANCE,
    "guidance_chosen": GUIDANCE,
    "guidance_rejected": GUIDANCE,
    "reward": JUDGED_SCORES,
}


def builders_for(objective: ObjectiveSpec | str) -> list[Builder]:
    """The distinct builders the objective's declared extras call for, in declaration order (empty when it reads
    only log-probs, or extras a training step computes or the data carries)."""
    spec = get_spec(objective) if isinstance(objective, str) else objective
    out: list[Builder] = []
    for name in spec.extras:
        if name in BUILDERS and BUILDERS[name] not in out:
            out.append(BUILDERS[name])
    return out


def cached_extras(kind: str, cache_dir: str, sft_params, pairs: dict[str, np.ndarray], description: dict[str, Any],
                  compute) -> tuple[dict[str, np.ndarray], dict]:
    """`compute()` cached under a content hash of (SFT parameters, the pair arrays, {"extras": kind, **description})
    in `cache_dir` (`jaxalign.train.reference.cached_arrays`). Returns (arrays, {"key", "path", "hit"})."""
    key = content_key(sft_params, pairs, {"extras": kind, **description})
    return cached_arrays(cache_dir, f"extras_{kind}", key, compute, len(pairs["chosen_tokens"]))


def build_extras(objective: ObjectiveSpec | str, arrays: dict[str, np.ndarray], *, cache_dir: str, sft_params,
                 model_cfg: ModelConfig, batch_size: int, seed: int, extras_cfg: ExtrasConfig = ExtrasConfig(),
                 prompt_len: int | None = None, reference_mode: str = "cached",
                 train_guidance: Callable[[], Any] | None = None, guidance_description: dict[str, Any] | None = None,
                 show_progress: bool = True) -> dict[str, np.ndarray]:
    """The pair `arrays` plus every extra the objective's declared extras call for (`builders_for`), each product
    cached on disk under a content hash, so that runs sharing the SFT policy and the pairs build it once.

    arrays: the pairs (chosen_/rejected_ tokens, attention_mask, completion_mask, and whatever else they carry);
        returned with the new arrays added, never modified.
    cache_dir: where the cached products live (e.g. beside the cached reference log-probs).
    sft_params / model_cfg: the policy the auxiliary models start from (and, cached, the reference).
    batch_size: rows per forward pass; seed: the reward model's initialisation and hold-out split.
    extras_cfg: the budgets of the auxiliary models (`ExtrasConfig`), hashed into the reward model's key.
    prompt_len: the number of prompt columns every pair shares (mismatched sequences only).
    reference_mode: "cached" also precomputes kl_reference with `sft_params`; any other mode leaves it to the step.
    train_guidance: () -> the guidance policy's parameters, called only when the guidance log-probs are not cached;
        guidance_description: a JSON-able dict describing that training (e.g. {"config": its config}), hashed into
        their key.
    """
    spec = get_spec(objective) if isinstance(objective, str) else objective
    ctx = ExtrasContext(dict(arrays), sft_params, model_cfg, extras_cfg, seed, batch_size, prompt_len, reference_mode,
                        train_guidance, guidance_description, show_progress)
    out = dict(arrays)
    for builder in builders_for(spec):
        if builder is GUIDANCE and (train_guidance is None or guidance_description is None):
            raise ValueError(f"objective {spec.name!r} reads a guidance policy's log-probs: pass train_guidance "
                             f"(() -> params) and guidance_description (what it trains, for the cache key)")
        if builder.describe is None:
            out.update(builder.build(ctx))
        else:
            extras, _ = cached_extras(builder.kind, cache_dir, sft_params, out, builder.describe(ctx),
                                      functools.partial(builder.build, ctx))
            out.update(extras)
    return out
