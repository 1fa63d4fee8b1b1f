"""Token-level PPO for a decoder LM, with DR-PO's dataset resets: Chang et al. (2024), "Dataset Reset Policy
Optimization for RLHF" (DR-PO, arXiv:2404.08495); docs/algorithms.md. `beta_reset = 0` is plain PPO (Schulman et
al. 2017, arXiv:1707.06347) as used for RLHF (Ouyang et al. 2022; Ziegler et al. 2019: a per-token KL penalty to
the SFT policy and a terminal reward).

The MDP: a state is the prompt plus the tokens written so far, an action is one token, the reward is
-kl_coef * (log pi_old(y_t|s_t) - log pi_ref(y_t|s_t)) on every generated token plus the oracle's terminal reward R
on the last one (gamma = 1, GAE lambda = 0.95, clip 0.2).

Dataset reset (DR-PO's one change to PPO): with probability `beta_reset` per rollout, the rollout does not start at
the prompt but at a state of the offline data: the first h ~ U{1, ..., len - 1} tokens of the prompt's offline
reference response (len counts its EOS, so the policy always writes at least the final token) are teacher-forced,
and the policy continues from prompt + y_ref[:h]. The forced tokens are part of the initial state, not actions:
the policy-gradient, value and KL terms are all masked on them (`action_mask`), GAE runs over the policy's own
tokens only, and the terminal reward grades the whole completion y_ref[:h] + continuation.

Pipeline of one update (`train_lm_ppo`):
1. `collect_rollouts`: draw the reset lengths (`sample_reset_lengths`), build left-padded sampler prompts of
   variable length, prompt + y_ref[:h] (`reset_prompts`), sample continuations at temperature 1 with the KV-cached
   `jaxalign.sampling.generate`, and lay every rollout out as [left-padded prompt | completion] with masks for the
   forced and the generated tokens (`assemble_rollouts`).
2. The caller's `reward_fn` grades the completions (host side: the oracle).
3. `rollout_targets` (jitted): log-probs of the rollout policy and the reference, values V(s_t), per-token rewards
   (`token_rewards`), GAE advantages and returns (`token_advantages`), advantages whitened over the batch's action
   tokens.
4. `make_ppo_update` (jitted): `update_epochs` passes over the rollouts in `num_minibatches` shuffled minibatches of
   sequences, one optimizer step each on `ppo_token_loss`.

Reuse of `rl/`: GAE is `rl.returns.generalized_advantage_estimation` itself. A token-level LM rollout is B episodes of
T steps; transposed to time-major [T, B] with `terminated` set at each row's last generated token, rewards and values
zero outside the generated tokens, it is exactly that function's input (the trace stops at the terminal token, padding
after it contributes nothing, and the prompt / forced positions before it are masked out of every loss).
The clipped surrogate `rl.ppo.ppo_loss` does not fit, which is why `ppo_token_loss` exists: it averages every term
(surrogate, value error, entropy, approx-KL, clip fraction) over all entries of its batch, and its advantage
normalisation runs over all of them, while an LM minibatch is a padded [B, T] grid in which prompt, teacher-forced
and padding positions must not count and cannot be dropped under jit (the number of action tokens varies); weighting
them out through its arguments would need a per-entry rescaling that breaks its clipped value term. `ppo_token_loss`
is the same formula (Schulman et al. 2017, eqs. 7 and 9) with masked means, and equals `ppo_loss` when every entry is
an action (tested).

Value function (`value_model`, the two forms of `jaxalign.algorithms.oreo`, reused: `init_critic_params`,
`value_forward`): "critic" (default), a separate `ScalarHeadLM` whose backbone starts from the SFT policy and whose
linear head starts at zero, the usual RLHF-PPO critic (a separate value model, as in TRL's PPO trainer): the value
loss cannot move the policy and the critic has a whole network of its own; or "shared", a zero-initialised linear
head (`heads.init_value_head`) on the policy's trunk that reads its hidden states under stop-gradient, so the value
loss never moves the policy either (half the forward passes, a weaker critic). Policy and value parameters live in
one `TrainState` as {"policy": ..., "critic": ...}, each with its own optimizer (`optax.multi_transform`).

Steps run under plain `jax.jit` on the device(s) their inputs live on, as OREO's (`jaxalign.algorithms.oreo`).
"""
from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxalign.algorithms.oreo import VALUE_MODELS, init_critic_params, value_forward
from jaxalign.data.iterator import ArrayDataset, batch_at
from jaxalign.logprobs import masked_token_logprobs
from jaxalign.models.heads import state_values
from jaxalign.models.llama import DecoderLM, ModelConfig
from jaxalign.sampling import SamplingConfig, generate
from jaxalign.train.loop import MetricsLog, stop_if_diverged, to_python
from jaxalign.train.optim import OptimConfig, make_optimizer
from jaxalign.train.state import TrainState
from rl.returns import generalized_advantage_estimation, shifted_next_values

ROLLOUT_KEYS = ("prompt_tokens", "prompt_mask", "reference_tokens", "reference_mask")


def _is_int(value: Any, lowest: int) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= lowest


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class LMPPOConfig:
    """PPO / DR-PO hyper-parameters (Chang et al. 2024; docs/algorithms.md). One update = `rollouts_per_update`
    rollouts (one per prompt), then `update_epochs` x `num_minibatches` optimizer steps.

    num_updates: rollout-then-optimize cycles of the whole run
    rollouts_per_update: prompts rolled out per update, one rollout each (a multiple of num_minibatches)
    update_epochs: passes over an update's rollouts, each in a fresh shuffled order
    num_minibatches: optimizer steps per epoch, each on rollouts_per_update / num_minibatches rollouts
    beta_reset: probability that a rollout starts from a teacher-forced prefix of the offline reference response
        (DR-PO); 0 is plain PPO.
    gamma: GAE's discount per token (Schulman et al. 2016; DR-PO: 1)
    gae_lambda: GAE's lambda, the bias-variance trade-off of the advantages (DR-PO: 0.95)
    clip_eps: the surrogate's ratio clip (0.2).
    value_clip_eps: how far a new value may move from the rollout's before the clipped value loss takes over
        (PPO's baselines code and TRL clip the value too)
    clip_value: clip the value loss around the rollout's values (Schulman et al. 2017, eq. 9); False: plain MSE
    kl_coef: per-token penalty -kl_coef * (log pi_old - log pi_ref) against the SFT reference; 0 turns it off.
    vf_coef: weight of the value loss in the total loss
    ent_coef: weight of the entropy bonus subtracted from the loss (0: none, and no entropy is computed)
    normalize_advantages: whiten the advantages over the rollout batch's action tokens before the epochs.
    value_model: "critic" (separate value LM) or "shared" (head on the policy trunk, stop-gradient); module docstring.
    policy_optim / critic_optim: AdamW settings (`jaxalign.train.optim`), schedules over all optimizer steps.
    """

    num_updates: int = 60
    rollouts_per_update: int = 64
    update_epochs: int = 2
    num_minibatches: int = 2
    beta_reset: float = 0.0
    gamma: float = 1.0
    gae_lambda: float = 0.95
    clip_eps: float = 0.2
    value_clip_eps: float = 0.2
    clip_value: bool = True
    kl_coef: float = 0.05
    vf_coef: float = 0.5
    ent_coef: float = 0.0
    normalize_advantages: bool = True
    value_model: str = "critic"
    policy_optim: OptimConfig = OptimConfig(learning_rate=2e-4, warmup_steps=5)
    critic_optim: OptimConfig = OptimConfig(learning_rate=1e-3, warmup_steps=5)

    def __post_init__(self):
        for name in ("num_updates", "rollouts_per_update", "update_epochs", "num_minibatches"):
            if not _is_int(getattr(self, name), 1):
                raise ValueError(f"ppo.{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.rollouts_per_update % self.num_minibatches:
            raise ValueError(f"ppo.rollouts_per_update={self.rollouts_per_update} must be divisible by "
                             f"ppo.num_minibatches={self.num_minibatches}")
        for name in ("beta_reset", "gamma", "gae_lambda"):
            value = getattr(self, name)
            if not _is_number(value) or not 0.0 <= value <= 1.0:
                raise ValueError(f"ppo.{name} must be a number in [0, 1], got {value!r}")
        for name in ("clip_eps", "value_clip_eps"):
            value = getattr(self, name)
            if not _is_number(value) or not value > 0:
                raise ValueError(f"ppo.{name} must be a number > 0, got {value!r}")
        for name in ("kl_coef", "vf_coef", "ent_coef"):
            value = getattr(self, name)
            if not _is_number(value) or not value >= 0:
                raise ValueError(f"ppo.{name} must be a number >= 0, got {value!r}")
        for name in ("clip_value", "normalize_advantages"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ppo.{name} must be true or false, got {getattr(self, name)!r}")
        if self.value_model not in VALUE_MODELS:
            raise ValueError(f"ppo.value_model must be one of {VALUE_MODELS}, got {self.value_model!r}")

    @property
    def steps_per_update(self) -> int:
        return self.update_epochs * self.num_minibatches

    @property
    def total_steps(self) -> int:
        return self.num_updates * self.steps_per_update


# ---------------------------------------------------------------------------------------------------------------
# Rollouts with dataset resets.


def sample_reset_lengths(key: jax.Array, reference_lengths: jax.Array, beta_reset) -> jax.Array:
    """int32 [B]: DR-PO's reset point h per rollout (Chang et al. 2024): with probability
    `beta_reset`, h ~ U{1, ..., len - 1} (len = reference_lengths, EOS included); otherwise 0 (start at the prompt).
    A reference shorter than 2 tokens has no such h: its rollouts always start at the prompt."""
    lengths = jnp.asarray(reference_lengths, jnp.int32)
    key_reset, key_h = jax.random.split(key)
    reset = jax.random.bernoulli(key_reset, beta_reset, lengths.shape) & (lengths >= 2)
    h = jax.random.randint(key_h, lengths.shape, 1, jnp.maximum(lengths, 2))  # maxval exclusive: 1 .. len - 1
    return jnp.where(reset, h, 0).astype(jnp.int32)


def reset_prompts(prompt_tokens: jax.Array, prompt_mask: jax.Array, reference_tokens: jax.Array,
                  prefix_lengths: jax.Array, pad_id: int) -> tuple[jax.Array, jax.Array]:
    """Sampler prompts prompt + y_ref[:h], left-padded to width P + H ([B, P] left-padded prompts, [B, H] references
    right-padded): each row is shifted right by H - h so that its last real token sits in the last column, the layout
    `jaxalign.sampling.generate` needs (rotary positions count real tokens only, so the padding changes nothing)."""
    width_ref = reference_tokens.shape[1]
    prefix = jnp.arange(width_ref)[None, :] < prefix_lengths[:, None]
    tokens = jnp.concatenate([prompt_tokens, jnp.where(prefix, reference_tokens, pad_id)], axis=1)
    mask = jnp.concatenate([prompt_mask.astype(bool), prefix], axis=1)
    source = jnp.arange(tokens.shape[1])[None, :] - (width_ref - prefix_lengths)[:, None]
    inside = source >= 0
    source = jnp.maximum(source, 0)
    tokens = jnp.where(inside, jnp.take_along_axis(tokens, source, axis=1), pad_id)
    mask = inside & jnp.take_along_axis(mask, source, axis=1)
    return tokens.astype(jnp.int32), mask.astype(jnp.int32)


def assemble_rollouts(prompt_tokens: jax.Array, prompt_mask: jax.Array, reference_tokens: jax.Array,
                      prefix_lengths: jax.Array, continuation: jax.Array, continuation_mask: jax.Array,
                      pad_id: int) -> dict[str, jax.Array]:
    """Rollouts laid out for training, [B, P + C] with C = continuation width (the completion budget):
    tokens = left-padded prompt | y_ref[:h] + continuation (cut at C), right-padded; attention_mask (real tokens),
    completion_mask (forced + generated), forced_mask (y_ref[:h]) and action_mask (the generated tokens: the only
    positions any loss reads).

    `continuation` [B, C] and its mask are the sampler's output for the prompt + y_ref[:h] of `reset_prompts`; a row
    reset at h keeps its first C - h generated tokens. References [B, H] may be narrower than C, not wider."""
    width = continuation.shape[1]
    if reference_tokens.shape[1] > width:
        raise ValueError(f"assemble_rollouts: reference responses are {reference_tokens.shape[1]} tokens wide, more "
                         f"than the {width} completion slots")
    reference = jnp.pad(reference_tokens, ((0, 0), (0, width - reference_tokens.shape[1])),
                        constant_values=pad_id)
    position = jnp.arange(width)[None, :]
    forced = position < prefix_lengths[:, None]
    source = jnp.clip(position - prefix_lengths[:, None], 0, width - 1)
    generated = ~forced & jnp.take_along_axis(continuation_mask.astype(bool), source, axis=1)
    completion = jnp.where(forced, reference, jnp.where(generated, jnp.take_along_axis(continuation, source, axis=1),
                                                        pad_id))
    no_prompt = jnp.zeros(prompt_tokens.shape, bool)
    completion_mask = forced | generated
    return {
        "tokens": jnp.concatenate([prompt_tokens, completion], axis=1).astype(jnp.int32),
        "attention_mask": jnp.concatenate([prompt_mask.astype(bool), completion_mask], axis=1).astype(jnp.int32),
        "completion_mask": jnp.concatenate([no_prompt, completion_mask], axis=1).astype(jnp.int32),
        "forced_mask": jnp.concatenate([no_prompt, forced], axis=1).astype(jnp.int32),
        "action_mask": jnp.concatenate([no_prompt, generated], axis=1).astype(jnp.int32),
    }


_reset_prompts = jax.jit(reset_prompts, static_argnames="pad_id")
_assemble_rollouts = jax.jit(assemble_rollouts, static_argnames="pad_id")


def collect_rollouts(policy_params, rows: dict, key: jax.Array, *, model_cfg: ModelConfig, beta_reset: float,
                     max_new_tokens: int, eos_id: int, pad_id: int, num_tokens: int | None = None) -> dict:
    """One rollout per row of `rows` (ROLLOUT_KEYS: left-padded prompt_tokens / prompt_mask [B, P], right-padded
    reference_tokens / reference_mask [B, H], the offline responses with their EOS), with DR-PO's dataset resets
    (`sample_reset_lengths`, `reset_prompts`), continuations drawn at temperature 1 from `policy_params`
    (`jaxalign.sampling.generate`, `max_new_tokens` slots = the completion width C) and `assemble_rollouts`'s layout.

    Temperature 1 and no truncation: the rollouts are drawn from exactly the policy whose log-probs PPO's ratio
    uses. Returns host arrays: assemble_rollouts's keys plus "prefix_length" [B] (h, 0 = no reset) and
    "completion_tokens" [B, C] (y_ref[:h] + continuation, for the grader)."""
    missing = [k for k in ROLLOUT_KEYS if k not in rows]
    if missing:
        raise ValueError(f"collect_rollouts: rows lack {missing}; expected {list(ROLLOUT_KEYS)}")
    key_reset, key_sample = jax.random.split(key)
    prompt_tokens, prompt_mask = jnp.asarray(rows["prompt_tokens"]), jnp.asarray(rows["prompt_mask"])
    reference = jnp.asarray(rows["reference_tokens"])
    h = sample_reset_lengths(key_reset, jnp.asarray(rows["reference_mask"]).sum(axis=-1), beta_reset)
    sampler_tokens, sampler_mask = _reset_prompts(prompt_tokens, prompt_mask, reference, h, pad_id=pad_id)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=1.0)
    continuation, continuation_mask = generate(policy_params, sampler_tokens, sampler_mask, key_sample, cfg=model_cfg,
                                               sampling=sampling, eos_id=eos_id, pad_id=pad_id, num_tokens=num_tokens)
    batch = _assemble_rollouts(prompt_tokens, prompt_mask, reference, h, continuation, continuation_mask,
                               pad_id=pad_id)
    batch = {k: np.asarray(v) for k, v in batch.items()}
    batch["prefix_length"] = np.asarray(h)
    batch["completion_tokens"] = batch["tokens"][:, prompt_tokens.shape[1]:]
    return batch


# ---------------------------------------------------------------------------------------------------------------
# Token-level rewards, advantages and the clipped objective (pure).


def last_action(action_mask: jax.Array) -> jax.Array:
    """bool [B, T]: the last action token of each row (none in a row without actions)."""
    mask = action_mask.astype(bool)
    position = jnp.arange(mask.shape[-1])
    last = jnp.max(jnp.where(mask, position, -1), axis=-1)
    return mask & (position[None, :] == last[:, None])


def token_rewards(terminal_rewards: jax.Array, logp: jax.Array, reference_logp: jax.Array, action_mask: jax.Array,
                  kl_coef: float) -> jax.Array:
    """float32 [B, T]: r_t = -kl_coef (log pi_old(y_t|s_t) - log pi_ref(y_t|s_t)) on every action token, plus the
    terminal reward R on the last one (Ziegler et al. 2019; Ouyang et al. 2022, eq. 2); 0 elsewhere. A row without
    action tokens gets no reward at all (it has no step to credit)."""
    mask = action_mask.astype(bool)
    kl = jnp.where(mask, logp - reference_logp, 0.0)
    terminal = jnp.where(last_action(mask), terminal_rewards.astype(jnp.float32)[:, None], 0.0)
    return (-kl_coef * kl + terminal).astype(jnp.float32)


def token_advantages(rewards: jax.Array, values: jax.Array, action_mask: jax.Array, gamma: float,
                     lam: float) -> tuple[jax.Array, jax.Array]:
    """GAE(gamma, lambda) over each row's action tokens (Schulman et al. 2016, eq. 16) with
    `rl.returns.generalized_advantage_estimation` (module docstring):

        delta_t = r_t + gamma V(s_{t+1}) [t not the row's last action] - V(s_t),  A_t = delta_t + gamma lambda A_{t+1}

    rewards and values [B, T] are read on `action_mask` only (V(s_t) of the state before action token t, e.g.
    `heads.state_values`). Returns (advantages, returns = advantages + values), [B, T], zero off the action tokens.
    The action tokens of a row must be contiguous (a rollout's generated tokens are)."""
    mask = action_mask.astype(bool)
    rewards = jnp.where(mask, rewards, 0.0).astype(jnp.float32)
    values = jnp.where(mask, values, 0.0).astype(jnp.float32)
    terminated = last_action(mask)
    values_tm = values.T
    advantages, returns = generalized_advantage_estimation(
        rewards.T, values_tm, shifted_next_values(values_tm, jnp.zeros(values.shape[0], jnp.float32)), terminated.T,
        jnp.zeros_like(terminated.T), gamma, lam)
    return jnp.where(mask, advantages.T, 0.0), jnp.where(mask, returns.T, 0.0)


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of x over mask (0 for an empty mask); entries off the mask never reach the result or its gradient."""
    mask = mask.astype(bool)
    return jnp.sum(jnp.where(mask, x, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def masked_whiten(x: jax.Array, mask: jax.Array, eps: float = 1e-8) -> jax.Array:
    """(x - mean) / (std + eps) over the masked entries, 0 elsewhere (advantage normalisation over action tokens)."""
    mean = masked_mean(x, mask)
    std = jnp.sqrt(masked_mean(jnp.square(x - mean), mask))
    return jnp.where(mask.astype(bool), (x - mean) / (std + eps), 0.0)


def ppo_token_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, values: jax.Array,
                   old_values: jax.Array, returns: jax.Array, action_mask: jax.Array, *, clip_eps: float,
                   vf_coef: float, clip_value: bool = True, value_clip_eps: float | None = None,
                   entropy: jax.Array | None = None, ent_coef: float = 0.0) -> tuple[jax.Array, dict]:
    """PPO's objective on token-level LM rollouts, every term a mean over the action tokens (masked, module
    docstring), all arrays [B, T]; with r_t = pi(y_t|s_t) / pi_old(y_t|s_t):

        L_clip = -mean_t min(r_t A_t, clip(r_t, 1 - eps, 1 + eps) A_t)                 (Schulman et al. 2017, eq. 7)
        L_V    = 0.5 mean_t max((V_t - R_t)^2, (V_old,t + clip(V_t - V_old,t, -eps_v, eps_v) - R_t)^2)   (eq. 9)
        loss   = L_clip + vf_coef L_V - ent_coef mean_t H(pi(.|s_t))

    (L_V without the max when not `clip_value`; eps_v = value_clip_eps, default clip_eps.) Positions off
    `action_mask` (prompt, DR-PO's teacher-forced prefix, padding) contribute nothing and receive zero gradient.
    Returns (loss, metrics) with the terms, approx_kl (mean of (r - 1) - log r) and the fraction of clipped ratios.
    """
    mask = action_mask.astype(bool)
    value_clip_eps = clip_eps if value_clip_eps is None else value_clip_eps
    log_ratio = jnp.where(mask, logp - old_logp, 0.0)  # exactly 0 off the mask: exp stays finite there
    ratio = jnp.exp(log_ratio)
    clipped_ratio = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    policy_loss = -masked_mean(jnp.minimum(ratio * advantages, clipped_ratio * advantages), mask)
    value_error = jnp.square(values - returns)
    if clip_value:
        clipped_values = old_values + jnp.clip(values - old_values, -value_clip_eps, value_clip_eps)
        value_error = jnp.maximum(value_error, jnp.square(clipped_values - returns))
    value_loss = 0.5 * masked_mean(value_error, mask)
    mean_entropy = masked_mean(entropy, mask) if entropy is not None else jnp.zeros(())
    loss = policy_loss + vf_coef * value_loss - ent_coef * mean_entropy
    metrics = {
        "loss": loss,
        "policy_loss": policy_loss,
        "value_loss": value_loss,
        "entropy": mean_entropy,
        "approx_kl": masked_mean((ratio - 1.0) - log_ratio, mask),
        "clip_fraction": masked_mean((jnp.abs(ratio - 1.0) > clip_eps).astype(jnp.float32), mask),
    }
    return loss, metrics


def token_entropy(logits: jax.Array) -> jax.Array:
    """[B, T]: entropy of the next-token distribution that chose token t (logits at t - 1), 0 at t = 0."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return jnp.pad(-jnp.sum(jnp.exp(logp) * logp, axis=-1), ((0, 0), (1, 0)))


# ---------------------------------------------------------------------------------------------------------------
# Models, optimizer, jitted steps.


def policy_and_values(params: dict, tokens: jax.Array, attention_mask: jax.Array, *, model_cfg: ModelConfig,
                      value_model: str) -> tuple[jax.Array, jax.Array]:
    """(policy logits [B, T, V], value outputs [B, T]) of params = {"policy", "critic"} (`oreo.value_forward`; output
    t is the value of the state after token t)."""
    outputs, logits = value_forward(value_model, model_cfg, params["critic"], params["policy"], tokens,
                                    attention_mask)
    if logits is None:
        logits, _ = DecoderLM(model_cfg).apply({"params": params["policy"]}, tokens, attention_mask)
    return logits, outputs


@functools.lru_cache(maxsize=8)
def ppo_optimizer(policy_optim: OptimConfig, critic_optim: OptimConfig, total_steps: int):
    """AdamW per parameter group ({"policy", "critic"}), each with its own schedule over `total_steps`. Cached: runs
    with the same settings share one optimizer object, so they share the jitted update's compilation."""
    return optax.multi_transform(
        {"policy": make_optimizer(policy_optim, total_steps), "critic": make_optimizer(critic_optim, total_steps)},
        lambda params: {group: jax.tree_util.tree_map(lambda _, g=group: g, params[group]) for group in params})


def init_ppo_state(cfg: LMPPOConfig, model_cfg: ModelConfig, policy_params: Any, rng: jax.Array,
                   critic_params: Any = None) -> TrainState:
    """The PPO train state: params {"policy": a copy of `policy_params` (the SFT policy), "critic": `critic_params`
    or `oreo.init_critic_params` (the SFT backbone with a zero head, or a zero head for the shared trunk)}."""
    if critic_params is None:
        critic_params = init_critic_params(cfg.value_model, model_cfg, policy_params, rng)
    copy = functools.partial(jax.tree_util.tree_map, jnp.array)
    params = {"policy": copy(policy_params), "critic": copy(critic_params)}
    return TrainState.create(params, ppo_optimizer(cfg.policy_optim, cfg.critic_optim, cfg.total_steps), rng)


def _update_settings(cfg: LMPPOConfig) -> LMPPOConfig:
    """`cfg` without the fields the jitted steps do not read (DR-PO and PPO then share their compilations)."""
    return dataclasses.replace(cfg, beta_reset=0.0, num_updates=1, policy_optim=OptimConfig(),
                               critic_optim=OptimConfig())


def ppo_minibatch_loss(params: dict, batch: dict, *, cfg: LMPPOConfig, model_cfg: ModelConfig):
    """`ppo_token_loss` of the current params on a minibatch of prepared rollouts (tokens, attention_mask,
    action_mask, old_logp, old_values, advantages, returns)."""
    logits, outputs = policy_and_values(params, batch["tokens"], batch["attention_mask"], model_cfg=model_cfg,
                                        value_model=cfg.value_model)
    mask = batch["action_mask"]
    logp = masked_token_logprobs(logits, batch["tokens"], mask)
    values = state_values(outputs, mask)
    entropy = token_entropy(logits) if cfg.ent_coef else None
    return ppo_token_loss(logp, batch["old_logp"], batch["advantages"], values, batch["old_values"],
                          batch["returns"], mask, clip_eps=cfg.clip_eps, vf_coef=cfg.vf_coef,
                          clip_value=cfg.clip_value, value_clip_eps=cfg.value_clip_eps, entropy=entropy,
                          ent_coef=cfg.ent_coef)


@functools.lru_cache(maxsize=8)
def _jitted_targets(cfg: LMPPOConfig, model_cfg: ModelConfig):
    def targets(params, reference_params, batch, terminal_rewards):
        tokens, attention, mask = batch["tokens"], batch["attention_mask"], batch["action_mask"]
        logits, outputs = policy_and_values(params, tokens, attention, model_cfg=model_cfg,
                                            value_model=cfg.value_model)
        reference_logits, _ = DecoderLM(model_cfg).apply({"params": reference_params}, tokens, attention)
        logp = masked_token_logprobs(logits, tokens, mask)
        reference_logp = masked_token_logprobs(reference_logits, tokens, mask)
        values = state_values(outputs, mask)
        rewards = token_rewards(terminal_rewards, logp, reference_logp, mask, cfg.kl_coef)
        advantages, returns = token_advantages(rewards, values, mask, cfg.gamma, cfg.gae_lambda)
        raw = advantages
        if cfg.normalize_advantages:
            advantages = masked_whiten(advantages, mask)
        per_row = jnp.sum(jnp.where(mask.astype(bool), logp - reference_logp, 0.0), axis=-1)
        stats = {"kl_to_reference": jnp.mean(per_row), "value_mean": masked_mean(values, mask),
                 "advantage_mean": masked_mean(raw, mask), "return_mean": masked_mean(returns, mask)}
        prepared = {"old_logp": logp, "old_values": values, "advantages": advantages, "returns": returns}
        return jax.lax.stop_gradient(prepared), stats

    return jax.jit(targets)


def rollout_targets(params: dict, reference_params: Any, batch: dict, terminal_rewards, *, cfg: LMPPOConfig,
                    model_cfg: ModelConfig) -> tuple[dict, dict]:
    """(old_logp, old_values, advantages, returns) [B, T] of the rollouts under the rollout-time params, and batch
    statistics (jitted): log-probs of the policy and the SFT reference, V(s_t), `token_rewards`,
    `token_advantages`, and (cfg.normalize_advantages) `masked_whiten` over all action tokens of the batch."""
    keys = ("tokens", "attention_mask", "action_mask")
    return _jitted_targets(_update_settings(cfg), model_cfg)(
        params, reference_params, {k: jnp.asarray(batch[k]) for k in keys},
        jnp.asarray(terminal_rewards, jnp.float32))


@functools.lru_cache(maxsize=8)
def _jitted_update(cfg: LMPPOConfig, model_cfg: ModelConfig):
    def update(state: TrainState, batch: dict, key: jax.Array):
        rows = batch["tokens"].shape[0]
        size = rows // cfg.num_minibatches
        loss = functools.partial(ppo_minibatch_loss, cfg=cfg, model_cfg=model_cfg)

        def minibatch_step(state, minibatch):
            (_, metrics), grads = jax.value_and_grad(loss, has_aux=True)(state.params, minibatch)
            metrics = dict(metrics, policy_grad_norm=optax.tree.norm(grads["policy"]),
                           critic_grad_norm=optax.tree.norm(grads["critic"]))
            return state.apply_gradients(grads), metrics

        def epoch(state, epoch_key):
            order = jax.random.permutation(epoch_key, rows)
            minibatches = jax.tree_util.tree_map(
                lambda x: x[order].reshape((cfg.num_minibatches, size) + x.shape[1:]), batch)
            return jax.lax.scan(minibatch_step, state, minibatches)

        state, metrics = jax.lax.scan(epoch, state, jax.random.split(key, cfg.update_epochs))
        return state, jax.tree_util.tree_map(jnp.mean, metrics)

    return jax.jit(update)


def make_ppo_update(cfg: LMPPOConfig, model_cfg: ModelConfig) -> Callable:
    """The jitted PPO update: update(state, batch, key) -> (state, mean metrics). `batch` holds the prepared
    rollouts (tokens, attention_mask, action_mask + `rollout_targets`' arrays), B rows; every epoch shuffles the
    rows with its own key and takes one optimizer step per minibatch of B / num_minibatches sequences on
    `ppo_minibatch_loss` (rl/ppo.py's epoch structure; Schulman et al. 2017, Algorithm 1)."""
    return _jitted_update(_update_settings(cfg), model_cfg)


UPDATE_KEYS = ("tokens", "attention_mask", "action_mask", "old_logp", "old_values", "advantages", "returns")


# ---------------------------------------------------------------------------------------------------------------
# The loop.


def train_lm_ppo(state: TrainState, reference_params: Any, prompts: ArrayDataset, *, cfg: LMPPOConfig,
                 model_cfg: ModelConfig, reward_fn: Callable[[dict, np.ndarray], np.ndarray], seed: int,
                 max_new_tokens: int, eos_id: int, pad_id: int, num_tokens: int | None = None,
                 checkpointer: Any = None, checkpoint_every: int = 1, metrics_log: MetricsLog | None = None,
                 hooks: Sequence[Callable[[int, Any], dict | None]] = (), desc: str = "ppo") -> tuple[TrainState, list]:
    """PPO / DR-PO from `state` until cfg.num_updates updates are done (module docstring), against the frozen
    `reference_params` (the SFT policy) for the KL penalty.

    prompts: an ArrayDataset with ROLLOUT_KEYS (+ whatever `reward_fn` reads); update u takes the next
        cfg.rollouts_per_update rows of its seeded epoch order (`batch_at`, position kept in the state).
    reward_fn(rows, completion_tokens [B, C]) -> terminal rewards [B] (y_ref[:h] + continuation graded as one).
    Update u's randomness is fold_in(key(seed), u), so runs with the same seed see the same prompts, and a resumed run
    redoes exactly what the uninterrupted run did.
    checkpointer: a `jaxalign.train.checkpoint.Checkpointer`; the state is restored from its newest step and saved
        after every `checkpoint_every`-th update and the last (a step counts optimizer steps: update u ends at step
        (u + 1) * cfg.steps_per_update).
    hooks: hook(updates done, policy params) -> extra metrics for that update's record, or None.
    metrics_log records carry step = updates done. Returns (state, the records of this call)."""
    if not _is_int(checkpoint_every, 1):
        raise ValueError(f"checkpoint_every must be an integer >= 1, got {checkpoint_every!r}")
    missing = [k for k in ROLLOUT_KEYS if k not in prompts.arrays]
    if missing:
        raise ValueError(f"train_lm_ppo: the prompt dataset lacks {missing}; expected {list(ROLLOUT_KEYS)}")
    if checkpointer is not None:
        state = checkpointer.restore_latest(state) or state
    done_steps = int(jax.device_get(state.step))
    if done_steps % cfg.steps_per_update:
        raise ValueError(f"the restored state is at optimizer step {done_steps}, not at an update boundary of "
                         f"{cfg.steps_per_update} steps per update (ppo.update_epochs x ppo.num_minibatches changed?)")
    start = done_steps // cfg.steps_per_update
    if metrics_log is not None:
        metrics_log.truncate(desc, start)
    update = make_ppo_update(cfg, model_cfg)
    base_key, records = jax.random.key(seed), []
    for u in range(start, cfg.num_updates):
        rows, position = batch_at(prompts, state.data, cfg.rollouts_per_update, seed)
        key_rollout, key_update = jax.random.split(jax.random.fold_in(base_key, u))
        rollouts = collect_rollouts(state.params["policy"], rows, key_rollout, model_cfg=model_cfg,
                                    beta_reset=cfg.beta_reset, max_new_tokens=max_new_tokens, eos_id=eos_id,
                                    pad_id=pad_id, num_tokens=num_tokens)
        rewards = np.asarray(reward_fn(rows, rollouts["completion_tokens"]), np.float32)
        if rewards.shape != (cfg.rollouts_per_update,):
            raise ValueError(f"reward_fn returned shape {rewards.shape}, expected ({cfg.rollouts_per_update},)")
        prepared, stats = rollout_targets(state.params, reference_params, rollouts, rewards, cfg=cfg,
                                          model_cfg=model_cfg)
        batch = {**{k: jnp.asarray(rollouts[k]) for k in ("tokens", "attention_mask", "action_mask")}, **prepared}
        state, metrics = update(state, batch, key_update)
        state = state.replace(data=position)
        reset = rollouts["prefix_length"] > 0
        record = {**to_python({**metrics, **stats}), "step": u + 1, "phase": desc,
                  "reward_mean": float(rewards.mean()),
                  "reward_mean_from_prompt": float(rewards[~reset].mean()) if (~reset).any() else float("nan"),
                  "reset_rate": float(reset.mean()),
                  "mean_prefix_length": float(rollouts["prefix_length"][reset].mean()) if reset.any() else 0.0,
                  "generated_tokens": float(rollouts["action_mask"].sum(-1).mean())}
        for hook in hooks:
            record.update(hook(u + 1, state.params["policy"]) or {})
        records.append(record)
        if metrics_log is not None:
            metrics_log.write(record)
        saving = checkpointer is not None and ((u + 1) % checkpoint_every == 0 or u + 1 == cfg.num_updates)
        stop_if_diverged(record, desc, u + 1, checkpointer, state.params if saving else None, unit="update",
                         checked="checked every update and before each save")
        if saving:
            checkpointer.save(state, force=True)
    return state, records
