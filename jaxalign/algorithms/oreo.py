"""The OREO trainer and value-guided beam search: Wang et al. (2024), "Offline Reinforcement Learning for LLM
Multi-Step Reasoning" (OREO, arXiv:2412.16145); docs/algorithms.md, "OREO".

OREO learns a policy pi_theta and a critic V_phi from offline trajectories (x, y, R), R in {0, 1} a sparse terminal
reward, by enforcing the soft Bellman equation of KL-regularised RL with the SFT model as reference pi_ref. The
objectives are the tested pure functions of `jaxalign.losses.oreo` (value loss, policy loss at token / step /
response level, full-vocabulary KL); this module composes them with models, optimizers and data:

- value model (`VALUE_MODELS`): "critic", a separate `ScalarHeadLM` whose backbone starts from the SFT policy and
  whose linear head is zero-initialised (the paper's critic); or "shared", a linear value head
  (`heads.init_value_head`) on the *policy's* trunk. In "shared" mode the value loss trains the head only: the
  head reads the trunk's hidden states under stop-gradient. Letting the critic loss move the trunk would change
  the policy in the critic step, outside the actor objective and its KL regulariser, and the actor's update would
  no longer be the one the paper prescribes (its values would come from a policy the critic had already moved).
  The trunk is trained by the actor loss alone; the value head then tracks a moving feature map, which is why the
  separate critic is the default.
- trajectory batches (`trajectory_batch`): tokens, attention mask, completion mask, step starts (the first token of
  each separator-delimited reasoning step: OREO's step-level states) and the reward.
- update steps (`make_oreo_steps`): the critic is updated first (`oreo_value_loss`), and the actor
  (`oreo_policy_loss` + alpha * full-vocabulary KL to the reference) uses the values V(s_t) the critic produced
  BEFORE that update, the order the paper prescribes. Both objectives stop gradients on the
  other model's quantities, so the two updates are independent given those pre-step quantities.
- test time (`value_guided_beam_search`): B beams, each expanded with B sampled candidate next steps (sampled up to
  the step separator or EOS), the top-B partial solutions by V(state after the step) kept, at most `max_steps`
  steps; the best finished completion is returned.
- iterative OREO (`iterative_oreo`): re-collect trajectories with the new policy and train again; the caller
  supplies the sampling and grading callables.

Conventions follow `jaxalign.losses.oreo` and `jaxalign.models.heads`: arrays are [batch, time] aligned with the
tokens, V(s_t) of the state before token t is the value model's output at t - 1 (`heads.state_values`). Steps run
under plain `jax.jit` on the device(s) their inputs live on (the DPO trainer's mesh-sharded path,
`jaxalign.train.step.jit_train_step`, is not needed at the sizes OREO runs here).
"""
from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxalign.data.iterator import ArrayDataset, batch_at
from jaxalign.logprobs import masked_token_logprobs
from jaxalign.losses.oreo import LEVELS, oreo_policy_loss, oreo_value_loss, state_mask, token_kl
from jaxalign.models.heads import (
    VALUE_HEAD,
    ScalarHeadLM,
    apply_value_head,
    init_scalar_head_params,
    init_value_head,
    state_values,
    with_backbone,
)
from jaxalign.models.llama import DecoderLM, ModelConfig
from jaxalign.models.lora import LoraConfig, apply_lora
from jaxalign.sampling import SamplingConfig, generate
from jaxalign.train.loop import MetricsLog, stop_if_diverged, to_python
from jaxalign.train.optim import OptimConfig, make_optimizer
from jaxalign.train.state import TrainState

VALUE_MODELS = ("critic", "shared")
TRAJECTORY_KEYS = ("tokens", "attention_mask", "completion_mask", "step_starts", "reward")
# The authors' settings: alpha 0.01, 0.1 at step level.
DEFAULT_ALPHA = {"token": 0.01, "step": 0.1, "response": 0.01}


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_level(level: Any, name: str = "level") -> None:
    if level not in LEVELS:
        raise ValueError(f"{name} must be one of {LEVELS}, got {level!r}")


@dataclasses.dataclass(frozen=True)
class OreoConfig:
    """OREO's training hyper-parameters (Wang et al. 2024; defaults from the authors' code).

    level: "token" | "step" | "response", the MDP granularity of both losses' state mask and of the policy loss.
    beta: KL-penalty strength of the soft Bellman equation (paper: 0.03).
    alpha: weight of the full-vocabulary KL(pi_theta || pi_ref); None = the paper's default for the level (0.01;
        0.1 at step level), see `kl_weight`.
    value_model: "critic" (separate LM, the paper's) or "shared" (a head on the policy trunk; module docstring).
    steps: optimizer steps (each one critic and one actor update; per iteration of iterative OREO).
    batch_size: trajectories per step.
    actor_optim / critic_optim: AdamW settings of the two models (`jaxalign.train.optim`).
    """

    level: str = "token"
    beta: float = 0.03
    alpha: float | None = None
    value_model: str = "critic"
    steps: int = 200
    batch_size: int = 64
    actor_optim: OptimConfig = OptimConfig(learning_rate=5e-5, warmup_steps=10)
    critic_optim: OptimConfig = OptimConfig(learning_rate=5e-4, warmup_steps=10)

    def __post_init__(self):
        check_level(self.level, "oreo.level")
        if isinstance(self.beta, bool) or not isinstance(self.beta, numbers.Real) or not self.beta > 0:
            raise ValueError(f"oreo.beta must be a number > 0 (the KL-penalty strength), got {self.beta!r}")
        if self.alpha is not None and (isinstance(self.alpha, bool) or not isinstance(self.alpha, numbers.Real)
                                       or not self.alpha >= 0):
            raise ValueError(f"oreo.alpha must be a number >= 0 or None (the level's default), got {self.alpha!r}")
        if self.value_model not in VALUE_MODELS:
            raise ValueError(f"oreo.value_model must be one of {VALUE_MODELS}, got {self.value_model!r}")
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"oreo.{name} must be an integer >= 1, got {value!r}")

    @property
    def kl_weight(self) -> float:
        return DEFAULT_ALPHA[self.level] if self.alpha is None else float(self.alpha)


# ---------------------------------------------------------------------------------------------------------------
# Trajectory batches.


def step_starts(tokens: jax.Array, completion_mask: jax.Array, separator_id: int) -> jax.Array:
    """Boolean [B, T]: the first token of every reasoning step, OREO's step-level states (Wang et al. 2024).

    A step starts at the first response token of the row and at every response token right after a response token
    equal to `separator_id` (';' for ARITH: "a+b=s1;s1+c=s2" has steps starting at 'a' and 's1'). A trailing
    separator followed by EOS makes the EOS a one-token step (the decision to stop)."""
    active = jnp.asarray(completion_mask).astype(bool)
    tokens = jnp.asarray(tokens)
    shift = lambda x: jnp.pad(x[:, :-1], ((0, 0), (1, 0)))  # x[:, t-1] at t, False at t = 0
    after_separator = shift((tokens == separator_id) & active)
    first = active & (jnp.cumsum(active, axis=1) == 1)
    return active & (after_separator | first)


def _check_shape(name: str, array: Any, shape: tuple[int, ...], what: str) -> None:
    if np.shape(array) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} ({what}), got {np.shape(array)}")


def trajectory_batch(prompt_tokens: np.ndarray, completion_tokens: np.ndarray, completion_mask: np.ndarray,
                     reward: np.ndarray, *, separator_id: int, pad_id: int,
                     prompt_mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """OREO's offline data: {tokens, attention_mask, completion_mask, step_starts, reward} for N trajectories.

    prompt_tokens [N, P] (left-padded, as the sampler takes them; `prompt_mask` defaults to tokens != pad_id),
    completion_tokens / completion_mask [N, C] (as `jaxalign.sampling.generate` returns them), reward [N] (the
    terminal reward R of each trajectory). Sequences are prompt + completion, [N, P + C] int32; reward float32.
    """
    prompt_tokens, completion_tokens = np.asarray(prompt_tokens), np.asarray(completion_tokens)
    if prompt_tokens.ndim != 2:
        raise ValueError(f"prompt_tokens must be 2-D [trajectories, prompt_len], got shape {prompt_tokens.shape}")
    n = prompt_tokens.shape[0]
    if completion_tokens.ndim != 2 or completion_tokens.shape[0] != n:
        raise ValueError(f"completion_tokens must have shape ({n}, completion_len) (one row per prompt row), got "
                         f"{completion_tokens.shape}")
    _check_shape("completion_mask", completion_mask, completion_tokens.shape, "like completion_tokens")
    _check_shape("reward", reward, (n,), "one terminal reward per trajectory")
    if prompt_mask is None:
        prompt_mask = prompt_tokens != pad_id
    _check_shape("prompt_mask", prompt_mask, prompt_tokens.shape, "like prompt_tokens")
    completion_mask = np.asarray(completion_mask).astype(np.int32)
    tokens = np.concatenate([prompt_tokens, completion_tokens], axis=1).astype(np.int32)
    attention = np.concatenate([np.asarray(prompt_mask).astype(np.int32), completion_mask], axis=1)
    completion = np.concatenate([np.zeros_like(prompt_tokens, np.int32), completion_mask], axis=1)
    return {
        "tokens": tokens,
        "attention_mask": attention,
        "completion_mask": completion,
        "step_starts": np.asarray(step_starts(tokens, completion, separator_id)),
        "reward": np.asarray(reward, np.float32),
    }


def check_trajectory_batch(batch: dict) -> None:
    """One clear error for a batch that is not a `trajectory_batch`: a missing key or a mismatched shape."""
    missing = [key for key in TRAJECTORY_KEYS if key not in batch]
    if missing:
        raise ValueError(f"OREO batch is missing {missing}; expected the keys {list(TRAJECTORY_KEYS)} "
                         f"(see trajectory_batch), got {sorted(batch)}")
    shape = np.shape(batch["tokens"])
    if len(shape) != 2:
        raise ValueError(f"OREO batch: tokens must be 2-D [batch, time], got shape {shape}")
    for key in ("attention_mask", "completion_mask", "step_starts"):
        _check_shape(f"OREO batch: {key}", batch[key], shape, "like tokens, [batch, time]")
    _check_shape("OREO batch: reward", batch["reward"], shape[:1], "one terminal reward per row")


def arith_trajectory_batch(problems: np.ndarray, prompt_tokens: np.ndarray, completion_tokens: np.ndarray,
                           completion_mask: np.ndarray) -> dict[str, np.ndarray]:
    """`trajectory_batch` for the ARITH task: R = arith.grade(problem, completion text).correct, steps split at ';'.

    Row i of prompt_tokens / completion_* is a trajectory for problems[i] (repeat prompts for several samples)."""
    from jaxalign.tasks import arith
    from jaxalign.tasks.tokenizer import CharTokenizer

    tok = CharTokenizer()
    problems = np.asarray(problems)
    if len(problems) != len(completion_tokens):
        raise ValueError(f"problems has {len(problems)} rows but completion_tokens has {len(completion_tokens)}; "
                         "one problem per trajectory")
    reward = np.array([arith.grade(p, tok.decode(t)).correct for p, t in zip(problems, completion_tokens)],
                      np.float32)
    return trajectory_batch(prompt_tokens, completion_tokens, completion_mask, reward,
                            separator_id=tok.encode(";")[0], pad_id=tok.PAD_ID)


# ---------------------------------------------------------------------------------------------------------------
# The value model, both forms.


def init_critic_params(value_model: str, model_cfg: ModelConfig, policy_params: Any, rng: jax.Array) -> Any:
    """The value model's trainable parameters at the start of OREO: "critic", a ScalarHeadLM with the SFT policy's
    parameters as backbone and a zero head (V = 0 everywhere, as the paper's critic); "shared", a zero value head
    {VALUE_HEAD: ...} for the policy's trunk."""
    if value_model not in VALUE_MODELS:
        raise ValueError(f"value_model must be one of {VALUE_MODELS}, got {value_model!r}")
    if value_model == "shared":
        return {VALUE_HEAD: nn.meta.unbox(init_value_head(model_cfg))}
    fresh = nn.meta.unbox(init_scalar_head_params(model_cfg, rng))
    return with_backbone(fresh, jax.tree_util.tree_map(jnp.array, policy_params))  # a copy: never alias the policy


def value_forward(value_model: str, model_cfg: ModelConfig, critic_params: Any, policy_params: Any,
                  tokens: jax.Array, attention_mask: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """(value outputs [B, T] fp32, the policy's logits or None). Output t is the value of the state after token t.

    "shared" reads the policy trunk's hidden states under stop-gradient (the value loss trains the head only) and
    returns the policy logits of the same forward pass; "critic" runs the critic alone."""
    if value_model == "shared":
        logits, _, hidden = DecoderLM(model_cfg).apply({"params": policy_params}, tokens, attention_mask,
                                                       return_hidden=True)
        return apply_value_head(critic_params[VALUE_HEAD], jax.lax.stop_gradient(hidden)), logits
    if value_model == "critic":
        return ScalarHeadLM(model_cfg).apply({"params": critic_params}, tokens, attention_mask), None
    raise ValueError(f"value_model must be one of {VALUE_MODELS}, got {value_model!r}")


# Jitted `value_forward` (value_model and model_cfg static), for evaluation outside the update steps.
value_outputs = jax.jit(value_forward, static_argnums=(0, 1))


def init_oreo_states(cfg: OreoConfig, model_cfg: ModelConfig, policy_params: Any, rng: jax.Array,
                     critic_params: Any = None) -> tuple[TrainState, TrainState]:
    """(actor state, critic state): the actor starts from a copy of `policy_params` (the SFT policy, which is also
    the reference), the critic from `critic_params` or `init_critic_params`. Optimizers from `cfg`, decaying over
    cfg.steps."""
    actor_rng, critic_rng, init_rng = jax.random.split(rng, 3)
    if critic_params is None:
        critic_params = init_critic_params(cfg.value_model, model_cfg, policy_params, init_rng)
    copy = functools.partial(jax.tree_util.tree_map, jnp.array)
    actor = TrainState.create(copy(policy_params), make_optimizer(cfg.actor_optim, cfg.steps), actor_rng)
    critic = TrainState.create(copy(critic_params), make_optimizer(cfg.critic_optim, cfg.steps), critic_rng)
    return actor, critic


# ---------------------------------------------------------------------------------------------------------------
# The update steps.


def _states(batch: dict, level: str) -> jax.Array:
    return state_mask(batch["completion_mask"], level, batch["step_starts"] if level == "step" else None)


def _logratio(policy_logits: jax.Array, reference_logits: jax.Array, batch: dict) -> jax.Array:
    tokens, mask = batch["tokens"], batch["completion_mask"]
    return masked_token_logprobs(policy_logits, tokens, mask) - masked_token_logprobs(reference_logits, tokens, mask)


def reference_logits(model_cfg: ModelConfig, reference_params: Any, batch: dict) -> jax.Array:
    """The frozen reference's logits [B, T, V] (needed whole for the full-vocabulary KL), no gradient."""
    logits, _ = DecoderLM(model_cfg).apply({"params": reference_params}, batch["tokens"], batch["attention_mask"])
    return jax.lax.stop_gradient(logits)


def critic_update(critic_state: TrainState, policy_params: Any, ref_logits: jax.Array, batch: dict, *,
                  cfg: OreoConfig, model_cfg: ModelConfig) -> tuple[TrainState, jax.Array, dict]:
    """One optimizer step on OREO's value loss (`oreo_value_loss`, Wang et al. 2024):
    L_V = mean_b[sum_t s_t (beta A_t + V(s_t) - R)^2 / sum_t s_t] with A_t from the current policy's log-ratios.

    Returns (new critic state, V(s_t) [B, T] of the critic BEFORE this step, metrics). The pre-step values come
    from the same forward pass as the loss: they are what the actor must use."""

    def loss_fn(params):
        outputs, policy_logits = value_forward(cfg.value_model, model_cfg, params, policy_params, batch["tokens"],
                                               batch["attention_mask"])
        if policy_logits is None:
            policy_logits, _ = DecoderLM(model_cfg).apply({"params": policy_params}, batch["tokens"],
                                                          batch["attention_mask"])
        logratio = jax.lax.stop_gradient(_logratio(policy_logits, ref_logits, batch))
        values = state_values(outputs, batch["completion_mask"])
        loss, metrics = oreo_value_loss(values, logratio, batch["completion_mask"], _states(batch, cfg.level),
                                        batch["reward"], cfg.beta)
        return loss, (values, metrics)

    (_, (values, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(critic_state.params)
    metrics = dict(metrics, **{"critic/grad_norm": optax.tree.norm(grads)})
    return critic_state.apply_gradients(grads), jax.lax.stop_gradient(values), metrics


def actor_update(actor_state: TrainState, ref_logits: jax.Array, batch: dict, values: jax.Array, *,
                 cfg: OreoConfig, model_cfg: ModelConfig,
                 policy_fn: Callable = lambda params: params) -> tuple[TrainState, dict]:
    """One optimizer step on OREO's policy loss at `cfg.level` plus cfg.kl_weight * KL(pi_theta || pi_ref) over the
    full vocabulary (`oreo_policy_loss`, `token_kl`; Wang et al. 2024). `values` [B, T] are V(s_t) from the critic
    before its update of this iteration (`critic_update`'s second output); they enter under stop-gradient.
    `policy_fn` maps the state's parameters to the policy's (LoRA adapters onto their base; default: themselves)."""
    alpha = cfg.kl_weight

    def loss_fn(params):
        logits, _ = DecoderLM(model_cfg).apply({"params": policy_fn(params)}, batch["tokens"],
                                               batch["attention_mask"])
        logratio = _logratio(logits, ref_logits, batch)
        kl = token_kl(logits, ref_logits) if alpha else None
        return oreo_policy_loss(logratio, values, batch["completion_mask"], _states(batch, cfg.level),
                                batch["reward"], cfg.beta, alpha, kl, cfg.level)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(actor_state.params)
    metrics = dict(metrics, **{"oreo/policy_loss": loss, "actor/grad_norm": optax.tree.norm(grads)})
    return actor_state.apply_gradients(grads), metrics


class OreoSteps(NamedTuple):
    """Jitted OREO steps (`make_oreo_steps`).

    critic(critic_state, policy_params, reference_params, batch) -> (critic_state, values_before, metrics)
    actor(actor_state, reference_params, batch, values) -> (actor_state, metrics)
    update(actor_state, critic_state, reference_params, batch) -> (actor_state, critic_state, metrics):
        critic first, then the actor with the critic's pre-update values (one reference forward for both).
    """

    critic: Callable
    actor: Callable
    update: Callable


def make_oreo_steps(cfg: OreoConfig, model_cfg: ModelConfig, lora: LoraConfig | None = None) -> OreoSteps:
    """The jitted critic, actor and combined OREO update steps for `cfg` (Wang et al. 2024). With `lora`, the actor
    state holds LoRA adapters (Hu et al. 2021, `jaxalign.models.lora`) and the policy is apply_lora(reference,
    adapters): the frozen reference is also the adapters' base, one copy of the weights."""

    def policy_fn(reference_params):
        return (lambda params: params) if lora is None else (lambda params: apply_lora(reference_params, params, lora))

    def critic(critic_state, policy_params, reference_params, batch):
        ref = reference_logits(model_cfg, reference_params, batch)
        return critic_update(critic_state, policy_params, ref, batch, cfg=cfg, model_cfg=model_cfg)

    def actor(actor_state, reference_params, batch, values):
        ref = reference_logits(model_cfg, reference_params, batch)
        return actor_update(actor_state, ref, batch, values, cfg=cfg, model_cfg=model_cfg,
                            policy_fn=policy_fn(reference_params))

    def update(actor_state, critic_state, reference_params, batch):
        ref = reference_logits(model_cfg, reference_params, batch)
        policy = policy_fn(reference_params)
        # The paper's order: the critic steps first, and the actor is trained against V(s_t) as it was before that
        # step. The critic's log-ratios are the actor's pre-update ones, so the two updates share one snapshot.
        new_critic, values_before, critic_metrics = critic_update(critic_state, policy(actor_state.params), ref,
                                                                  batch, cfg=cfg, model_cfg=model_cfg)
        new_actor, actor_metrics = actor_update(actor_state, ref, batch, values_before, cfg=cfg, model_cfg=model_cfg,
                                                policy_fn=policy)
        return new_actor, new_critic, {**critic_metrics, **actor_metrics}

    return OreoSteps(critic=jax.jit(critic), actor=jax.jit(actor), update=jax.jit(update))


# ---------------------------------------------------------------------------------------------------------------
# Training on a fixed set of trajectories.


def _common_checkpoint_step(actor_ckpt, critic_ckpt) -> int | None:
    """The newest step both checkpointers hold (a run killed between the two saves leaves the actor one ahead)."""
    common = set(actor_ckpt.all_steps()) & set(critic_ckpt.all_steps())
    return max(common) if common else None


def train_oreo(actor_state: TrainState, critic_state: TrainState, reference_params: Any, data: ArrayDataset, *,
               cfg: OreoConfig, model_cfg: ModelConfig, seed: int, steps: OreoSteps | None = None,
               checkpointers: tuple[Any, Any] | None = None, metrics_log: MetricsLog | None = None,
               log_every: int = 10, desc: str = "oreo") -> tuple[TrainState, TrainState, list[dict]]:
    """Run `steps.update` until the actor has taken cfg.steps steps on batches of `data` (a `trajectory_batch` as
    an ArrayDataset; the deterministic iterator `batch_at`, its position kept in the actor state).

    `checkpointers` = (actor, critic) `jaxalign.train.checkpoint.Checkpointer`s: both states are restored from the
    newest step both hold and saved after every step (at their `every_steps`, and at the end), so a killed run
    resumes where it stopped. Returns (actor state, critic state, logged metric records)."""
    check_trajectory_batch(data.arrays)
    if isinstance(log_every, bool) or not _is_int(log_every) or log_every < 1:
        raise ValueError(f"log_every must be an integer >= 1, got {log_every!r}")
    steps = steps or make_oreo_steps(cfg, model_cfg)
    if checkpointers is not None:
        common = _common_checkpoint_step(*checkpointers)
        if common is not None:
            actor_state = checkpointers[0].restore(common, actor_state)
            critic_state = checkpointers[1].restore(common, critic_state)
    start = int(jax.device_get(actor_state.step))
    if metrics_log is not None:
        metrics_log.truncate(desc, start)
    position, records = jax.device_get(actor_state.data), []
    # The update's outputs are committed to the first device; fresh or restored inputs are not, and jit keys on
    # that: placed where its outputs will be, the update compiles once, not again at the second step.
    actor_state, critic_state = (state.replace(data=position)
                                 for state in jax.device_put((actor_state, critic_state), jax.devices()[0]))
    for step in range(start, cfg.steps):
        host_batch, position = batch_at(data, position, cfg.batch_size, seed)
        batch = {k: jnp.asarray(v) for k, v in host_batch.items()}
        actor_state, critic_state, metrics = steps.update(actor_state, critic_state, reference_params, batch)
        actor_state = actor_state.replace(data=position)
        critic_state = critic_state.replace(data=position)
        done = step + 1
        record = None
        if done % log_every == 0 or done == cfg.steps:
            record = dict(to_python(metrics), step=done, phase=desc)
            records.append(record)
            if metrics_log is not None:
                metrics_log.write(record)
            stop_if_diverged(record, desc, done, checkpointers[0] if checkpointers else None)
        if checkpointers is not None and any(c.due(done, force=done == cfg.steps) for c in checkpointers):
            params = {"actor": actor_state.params, "critic": critic_state.params}
            stop_if_diverged(record or to_python(metrics), desc, done, checkpointers[0], params)
            for ckpt, state in zip(checkpointers, (actor_state, critic_state)):
                ckpt.save(state, force=done == cfg.steps)
    return actor_state, critic_state, records


def iterative_oreo(policy_params: Any, reference_params: Any, *, cfg: OreoConfig, model_cfg: ModelConfig,
                   iterations: int, sample_fn: Callable, grade_fn: Callable, separator_id: int, pad_id: int,
                   seed: int = 0, critic_params: Any = None) -> tuple[Any, Any, list[dict]]:
    """Iterative OREO (Wang et al. 2024; docs/algorithms.md): each iteration collects fresh trajectories with the
    current policy, then trains critic and actor on them (`train_oreo`, cfg.steps steps, optimizers restarted).

    sample_fn(policy_params, iteration) -> (prompt_tokens [N, P], completion_tokens [N, C], completion_mask [N, C],
        context): trajectories of the current policy (context: whatever grade_fn needs, e.g. the problems);
    grade_fn(context, completion_tokens, completion_mask) -> reward [N].
    The reference stays `reference_params` (the SFT model, as in the paper); the critic carries over from one
    iteration to the next (from `critic_params`, else `init_critic_params`). Returns (policy params, critic params,
    one record per iteration: its reward mean and the last logged training metrics)."""
    if not _is_int(iterations) or iterations < 1:
        raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")
    steps, history = make_oreo_steps(cfg, model_cfg), []
    for iteration in range(iterations):
        prompt_tokens, completion_tokens, completion_mask, context = sample_fn(policy_params, iteration)
        reward = np.asarray(grade_fn(context, completion_tokens, completion_mask), np.float32)
        data = ArrayDataset(trajectory_batch(prompt_tokens, completion_tokens, completion_mask, reward,
                                             separator_id=separator_id, pad_id=pad_id))
        actor, critic = init_oreo_states(cfg, model_cfg, policy_params, jax.random.key(seed + iteration),
                                         critic_params)
        actor, critic, records = train_oreo(actor, critic, reference_params, data, cfg=cfg, model_cfg=model_cfg,
                                            seed=seed + iteration, steps=steps)
        policy_params, critic_params = actor.params, critic.params
        history.append({"iteration": iteration, "reward_mean": float(reward.mean()), "trajectories": len(reward),
                        **(records[-1] if records else {})})
    return policy_params, critic_params, history


# ---------------------------------------------------------------------------------------------------------------
# Value-guided beam search.


@dataclasses.dataclass(frozen=True)
class BeamConfig:
    """Value-guided step-level beam search (Wang et al. 2024, test-time search).

    beams: B, the partial solutions kept after every step.
    candidates: next steps sampled from every beam; None = beams (the paper's B x B expansion).
    max_steps: at most this many steps (paper: 20); beams still open then are returned as they stand.
    max_step_tokens: a step longer than this is cut there and continued at the next step.
    temperature: sampling temperature of the candidate steps.
    """

    beams: int = 4
    candidates: int | None = None
    max_steps: int = 20
    max_step_tokens: int = 16
    temperature: float = 1.0

    def __post_init__(self):
        for name in ("beams", "max_steps", "max_step_tokens"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"beam.{name} must be an integer >= 1, got {value!r}")
        if self.candidates is not None and (not _is_int(self.candidates) or self.candidates < 1):
            raise ValueError(f"beam.candidates must be an integer >= 1 or None (= beams), got {self.candidates!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, numbers.Real) or \
                self.temperature < 0:
            raise ValueError(f"beam.temperature must be a number >= 0, got {self.temperature!r}")

    @property
    def num_candidates(self) -> int:
        return self.beams if self.candidates is None else self.candidates


class BeamResult(NamedTuple):
    """tokens / mask [N, C]: each prompt's returned completion (right-padded); value [N]: its value; finished [N]:
    whether it ended (EOS or the completion length) within max_steps; steps: how many search steps ran."""

    tokens: np.ndarray
    mask: np.ndarray
    value: np.ndarray
    finished: np.ndarray
    steps: int


def left_aligned(prompt_tokens: np.ndarray, prompt_mask: np.ndarray, completion: np.ndarray, length: np.ndarray,
                 pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """prompt (left-padded [R, P]) + the first length[r] completion tokens ([R, C]) as one left-padded row [R, P + C]
    with the last real token in the last column: the layout the sampler takes, and the one where V(state after the
    last token) is output[:, -1]."""
    width = prompt_tokens.shape[1] + completion.shape[1]
    joined = np.concatenate([prompt_tokens, completion], axis=1)
    real = np.concatenate([np.asarray(prompt_mask).astype(bool),
                           np.arange(completion.shape[1])[None] < length[:, None]], axis=1)
    joined = np.where(real, joined, pad_id)
    shift = completion.shape[1] - length  # right-shift that moves the completion's end to the last column
    source = np.arange(width)[None] - shift[:, None]
    inside = source >= 0
    tokens = np.where(inside, np.take_along_axis(joined, np.clip(source, 0, None), axis=1), pad_id)
    mask = inside & np.take_along_axis(real, np.clip(source, 0, None), axis=1)
    return tokens.astype(np.int32), mask.astype(np.int32)


def value_guided_beam_search(prompt_tokens: np.ndarray, prompt_mask: np.ndarray, *, expand: Callable,
                             score: Callable, config: BeamConfig, completion_len: int, eos_id: int, pad_id: int,
                             rng: jax.Array) -> BeamResult:
    """Step-level beam search guided by a value function, for N prompts at once (Wang et al. 2024, test time).

    Every open beam (a prompt plus the steps chosen so far) is expanded with `config.num_candidates` sampled next
    steps; among all expansions and the beams that already finished, each prompt keeps the `config.beams` with the
    highest value V(state after the step); repeated until every kept beam has finished (EOS, or `completion_len`
    tokens) or `config.max_steps` steps ran. The search starts from the prompt alone (one beam). The returned
    completion is the best finished beam (highest value), or the best open one if none finished.

    expand(tokens [R, P + C], mask [R, P + C], rng) -> (step tokens [R, S], step mask [R, S]): the next step of
        every left-aligned row (`left_aligned`), its mask 1 on a prefix (`policy_step_sampler`);
    score(tokens [R, P + C], mask [R, P + C]) -> [R]: the value of each left-aligned sequence (`critic_scorer`).
    Both are called once per step on all N * beams * candidates rows (fixed shapes: one compilation); the loop over
    steps runs on the host.
    """
    prompt_tokens, prompt_mask = np.asarray(prompt_tokens), np.asarray(prompt_mask)
    if prompt_tokens.ndim != 2:
        raise ValueError(f"prompt_tokens must be 2-D [prompts, prompt_len], got shape {prompt_tokens.shape}")
    _check_shape("prompt_mask", prompt_mask, prompt_tokens.shape, "like prompt_tokens")
    if not _is_int(completion_len) or completion_len < 1:
        raise ValueError(f"completion_len must be an integer >= 1, got {completion_len!r}")
    n, beams, cands, width = prompt_tokens.shape[0], config.beams, config.num_candidates, completion_len
    completion = np.full((n, beams, width), pad_id, np.int32)
    length = np.zeros((n, beams), np.int64)
    finished = np.zeros((n, beams), bool)
    valid = np.zeros((n, beams), bool)
    valid[:, 0] = True  # one beam, the bare prompt
    value = np.zeros((n, beams), np.float32)
    rows_prompt = np.repeat(prompt_tokens, beams * cands, axis=0)
    rows_prompt_mask = np.repeat(prompt_mask, beams * cands, axis=0)
    steps_run = 0
    for _ in range(config.max_steps):
        open_beams = valid & ~finished
        if not open_beams.any():
            break
        steps_run += 1
        # Every (prompt, beam, candidate) row, closed beams included, so each call has the same shape.
        parent = np.repeat(completion.reshape(n * beams, width), cands, axis=0)
        parent_len = np.repeat(length.reshape(-1), cands)
        tokens, mask = left_aligned(rows_prompt, rows_prompt_mask, parent, parent_len, pad_id)
        rng, sub = jax.random.split(rng)
        step_tokens, step_mask = (np.asarray(a) for a in expand(tokens, mask, sub))
        step_len = np.asarray(step_mask).astype(bool).sum(axis=1)
        child, child_len = parent.copy(), np.minimum(parent_len + step_len, width)
        rows, offsets = np.nonzero(np.arange(step_tokens.shape[1])[None] < step_len[:, None])
        targets = parent_len[rows] + offsets
        keep = targets < width  # a step running past completion_len is cut there (and the beam ends)
        child[rows[keep], targets[keep]] = step_tokens[rows[keep], offsets[keep]]
        ended = ((step_tokens == eos_id) & np.asarray(step_mask).astype(bool)).any(axis=1) | (child_len >= width)
        ended |= step_len == 0  # nothing sampled: the row cannot move on
        child_value = np.asarray(score(*left_aligned(rows_prompt, rows_prompt_mask, child, child_len, pad_id)),
                                 np.float32)
        child_value = np.where(np.repeat(open_beams.reshape(-1), cands), child_value, -np.inf).reshape(n, -1)
        # The pool per prompt: all expansions of open beams, then the finished beams carried over unchanged.
        carried = np.where(valid & finished, value, -np.inf)
        pool_value = np.concatenate([child_value, carried], axis=1)
        pool_completion = np.concatenate([child.reshape(n, beams * cands, width), completion], axis=1)
        pool_len = np.concatenate([child_len.reshape(n, -1), length], axis=1)
        pool_finished = np.concatenate([ended.reshape(n, -1), finished], axis=1)
        order = np.argsort(-pool_value, axis=1, kind="stable")[:, :beams]
        value, completion, length, finished = (_take_beams(a, order) for a in (pool_value, pool_completion,
                                                                                pool_len, pool_finished))
        valid = np.isfinite(value)
    # Best finished beam first, then by value (invalid slots last).
    rank = np.where(valid, finished.astype(np.float32) * 1e9, -np.inf) + np.where(valid, value, 0.0)
    best = np.argmax(rank, axis=1)
    out_tokens, out_len = _take_beams(completion, best[:, None])[:, 0], _take_beams(length, best[:, None])[:, 0]
    out_mask = (np.arange(width)[None] < out_len[:, None]).astype(np.int32)
    return BeamResult(tokens=np.where(out_mask > 0, out_tokens, pad_id).astype(np.int32), mask=out_mask,
                      value=_take_beams(value, best[:, None])[:, 0],
                      finished=_take_beams(finished, best[:, None])[:, 0], steps=steps_run)


def _take_beams(array: np.ndarray, index: np.ndarray) -> np.ndarray:
    """array[n, index[n, j], ...] for [N, pool, ...] arrays and an [N, J] index."""
    return np.take_along_axis(array, index.reshape(index.shape + (1,) * (array.ndim - 2)), axis=1)


def policy_step_sampler(params: Any, model_cfg: ModelConfig, *, separator: tuple[int, ...], eos_id: int,
                        pad_id: int, max_step_tokens: int, temperature: float = 1.0,
                        num_tokens: int | None = None) -> Callable:
    """`expand` for `value_guided_beam_search`: one sampled next step per row from the policy, decoded with the
    KV-cached sampler (`jaxalign.sampling.generate`) until the step separator (kept in the step) or EOS."""
    sampling = SamplingConfig(max_new_tokens=max_step_tokens, temperature=temperature, stop=(tuple(separator),))

    def expand(tokens, mask, rng):
        out, out_mask = generate(params, jnp.asarray(tokens), jnp.asarray(mask), rng, cfg=model_cfg,
                                 sampling=sampling, eos_id=eos_id, pad_id=pad_id, num_tokens=num_tokens)
        return np.asarray(out), np.asarray(out_mask)

    return expand


@functools.partial(jax.jit, static_argnames=("value_model", "model_cfg", "eos_id"))
def _last_state_values(critic_params, policy_params, tokens, mask, *, value_model, model_cfg, eos_id):
    outputs, _ = value_forward(value_model, model_cfg, critic_params, policy_params, tokens, mask)
    # A finished sequence is scored at the state before its EOS: the value model is trained on states before
    # response tokens, never on the state after the last one.
    return jnp.where(tokens[:, -1] == eos_id, outputs[:, -2], outputs[:, -1])


def critic_scorer(value_model: str, model_cfg: ModelConfig, critic_params: Any, policy_params: Any,
                  eos_id: int) -> Callable:
    """`score` for `value_guided_beam_search`: V of the state after each left-aligned sequence's last token (before
    its EOS for a finished one), from the OREO value model (`value_forward`)."""
    if value_model not in VALUE_MODELS:
        raise ValueError(f"value_model must be one of {VALUE_MODELS}, got {value_model!r}")

    def score(tokens, mask):
        return np.asarray(_last_state_values(critic_params, policy_params, jnp.asarray(tokens), jnp.asarray(mask),
                                             value_model=value_model, model_cfg=model_cfg, eos_id=eos_id))

    return score


def prompt_state_values(value_model: str, model_cfg: ModelConfig, critic_params: Any, policy_params: Any,
                        prompt_tokens: np.ndarray, prompt_mask: np.ndarray) -> np.ndarray:
    """V(s_0) [N]: the value of the state right after each left-padded prompt (output at its last column)."""
    return np.asarray(_prompt_values(critic_params, policy_params, jnp.asarray(prompt_tokens),
                                     jnp.asarray(prompt_mask), value_model=value_model, model_cfg=model_cfg))


@functools.partial(jax.jit, static_argnames=("value_model", "model_cfg"))
def _prompt_values(critic_params, policy_params, tokens, mask, *, value_model, model_cfg):
    return value_forward(value_model, model_cfg, critic_params, policy_params, tokens, mask)[0][:, -1]
