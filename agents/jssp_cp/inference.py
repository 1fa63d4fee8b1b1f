"""Schedules from the trained policy: greedy, or the best of N rollouts (Tassel, Gebser and Schekotihin, ICAPS 2023,
Section 5: several rollouts sampled at temperatures spread over [0.5, 2.0], the shortest schedule kept). One of the
N rollouts is the greedy one, so the best of N is never longer than greedy: on Taillard's 50x20 and 100x20
instances, 16 samples alone came out worse than the greedy rollout (README).

Both run as one jitted call per padded instance shape: the greedy rollout and N - 1 sampled ones (temperature
i = 0.5 + 1.5 i / (N - 2)) are vmapped, each a lax.while_loop over decisions in which the network is asked only
when the policy has a choice (`play_forced`). `best_within` starts from the greedy rollout and adds rounds of
sampled ones while they fit in a time limit, so that the agent, like CP-SAT, turns more time into shorter
schedules (most of all on small instances, where a rollout is cheap). `schedule_with_agent` validates every
schedule it returns (agents/jssp_cp/schedule.py) and raises on any violation.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from agents.jssp_cp import env
from agents.jssp_cp.instances import Instance
from agents.jssp_cp.network import ILLEGAL
from agents.jssp_cp.schedule import validate

LOW_TEMPERATURE, HIGH_TEMPERATURE = 0.5, 2.0


@dataclasses.dataclass(frozen=True)
class NonDelay:
    """A policy restricted to non-delay dispatching (Giffler and Thompson 1960): No-Op is masked whenever some job
    can start now, so no machine idles while an operation could run on it. The cloned policy learns the CP-SAT
    expert's waits (13-26 % of its decisions were No-Ops in the measured runs), and on instances larger than it was
    trained on those waits cost more than they gain; masking them is a choice `jaxalign run jssp_cp` makes on
    validation instances, recorded in policy.json. Hashable like the `apply` it wraps, so jitted rollouts compile
    once."""

    apply: Callable

    @staticmethod
    def allowed(legal: jax.Array) -> jax.Array:
        """The legal actions [..., J + 1] this policy may choose: No-Op only when no job can start now."""
        return legal.at[..., -1].set(legal[..., -1] & ~legal[..., :-1].any(-1))

    def __call__(self, params, obs: env.Observation):
        logits, value = self.apply(params, obs)
        return jnp.where(obs.legal & ~self.allowed(obs.legal), ILLEGAL, logits), value


def temperatures(n: int) -> jax.Array:
    """n temperatures evenly spread over [0.5, 2.0] (1.0 alone when n == 1)."""
    return jnp.linspace(LOW_TEMPERATURE, HIGH_TEMPERATURE, n) if n > 1 else jnp.ones(1)


def allowed_actions(apply, state: env.State) -> jax.Array:
    """[J + 1] the actions `apply` may choose in `state`: the legal ones, less No-Op for a `NonDelay` policy."""
    legal = env.legal_actions(state)
    return apply.allowed(legal) if isinstance(apply, NonDelay) else legal


def play_forced(apply, state: env.State, key: jax.Array) -> tuple[env.State, jax.Array]:
    """Take every forced decision (a single allowed action) from `state` on, until the episode ends or the policy
    has a choice. The network is not evaluated: with one allowed action every other logit is ILLEGAL, so the argmax
    and any sample at any temperature take that action. Each forced decision splits the key as a sampled one
    does, so the rollout draws the same numbers, and returns the same schedule, as one that asks the network at
    every decision (tested); only faster (the README's job-shop section has the times)."""
    def forced(carry):
        state, _ = carry
        return ~env.done(state) & (allowed_actions(apply, state).sum() == 1)

    def take(carry):
        state, key = carry
        return env.transition(state, jnp.argmax(allowed_actions(apply, state))), jax.random.split(key)[0]

    return jax.lax.while_loop(forced, take, (state, key))


def rollout(apply, params, instance: env.JobShop, key: jax.Array, temperature: jax.Array,
            greedy: jax.Array | bool) -> env.State:
    """One episode: the argmax action (`greedy`, a bool or a traced one) or a sample from
    softmax(logits / temperature); the network is asked only when there is a choice (`play_forced`)."""
    def body(carry):
        state, key = carry
        key, k_act = jax.random.split(key)
        logits, _ = apply(params, env.observe(state))
        action = jnp.where(greedy, jnp.argmax(logits), jax.random.categorical(k_act, logits / temperature))
        return play_forced(apply, env.transition(state, action), key)

    final, _ = jax.lax.while_loop(lambda c: ~env.done(c[0]), body, play_forced(apply, env.reset(instance), key))
    return final


@functools.partial(jax.jit, static_argnums=(0,))
def _greedy(apply, params, instances: env.JobShop):
    final = jax.vmap(lambda inst: rollout(apply, params, inst, jax.random.key(0), jnp.ones(()), True))(instances)
    return final.start, final.makespan


@functools.partial(jax.jit, static_argnums=(0, 4))
def _sampled(apply, params, instances: env.JobShop, key: jax.Array, num_samples: int, with_greedy: jax.Array):
    # Rollout 0 is the greedy one when `with_greedy` (its temperature is unused); traced, so that `sampled_batch`
    # and the all-sampled rounds of `best_within` share one compilation.
    greedy = (jnp.arange(num_samples) == 0) & with_greedy
    temps = jnp.where(with_greedy, jnp.concatenate([jnp.ones(1), temperatures(num_samples - 1)]),
                      temperatures(num_samples)) if num_samples > 1 else jnp.ones(1)

    def best_of(inst, key):
        keys = jax.random.split(key, num_samples)
        final = jax.vmap(lambda k, t, g: rollout(apply, params, inst, k, t, g))(keys, temps, greedy)
        best = jnp.argmin(final.makespan)
        return final.start[best], final.makespan[best]

    return jax.vmap(best_of)(instances, jax.random.split(key, instances.num_ops.shape[0]))


_COMPILED: set = set()  # (apply, shape, rollouts per instance; 0 = greedy) of the calls compiled in this process


def _compiled(apply, instances: env.JobShop, rollouts: int, found):
    _COMPILED.add((apply, instances.machines.shape, rollouts))
    return found


def greedy_batch(apply, params, instances: env.JobShop):
    """(start [B, J, O], makespan [B]) of the greedy policy on a batch of padded instances; one jitted call."""
    return _compiled(apply, instances, 0, _greedy(apply, params, instances))


def sampled_batch(apply, params, instances: env.JobShop, key: jax.Array, num_samples: int):
    """(start, makespan) of the best of `num_samples` rollouts per instance, the greedy one and `num_samples` - 1
    sampled (module docstring); one jitted call."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    return _compiled(apply, instances, num_samples, _sampled(apply, params, instances, key, num_samples,
                                                            jnp.bool_(True)))


def _timed(run, apply, instances: env.JobShop, rollouts: int) -> tuple[np.ndarray, np.ndarray, float | None]:
    """(start, makespan) of `run()` on the host and its wall time, None when the call compiled (its shape is new to
    this process: no earlier `greedy_batch`, `sampled_batch` or round ran it), since such a time says little about
    the next call's."""
    warm = (apply, instances.machines.shape, rollouts) in _COMPILED
    began = time.perf_counter()
    start, makespan = jax.device_get(_compiled(apply, instances, rollouts, run()))
    return np.asarray(start), np.asarray(makespan), time.perf_counter() - began if warm else None


class Anytime(NamedTuple):
    start: np.ndarray  # [B, J, O] of the best schedule found per instance
    makespan: np.ndarray  # [B]
    rollouts: int  # per instance, over all rounds (the greedy one included)
    seconds: float


def best_within(apply, params, instances: env.JobShop, key: jax.Array, seconds: float, round_size: int = 16,
                max_rounds: int | None = None) -> Anytime:
    """The best of as many rollouts as fit in `seconds`, an anytime search like CP-SAT's time limit. Round 0 is the
    greedy rollout; each further round samples `round_size` rollouts at temperatures spread over [0.5, 2.0] (keys
    folded with the round's index), and the best schedule per instance is kept. A round starts only if it is
    expected to end within `seconds`: the first sampled round is expected to cost `round_size` greedy rollouts (a
    vmapped round costs less: 9-12 greedy rollouts' time for 16 in the README's Taillard table), a later one what
    the last one cost. So an instance too large for one round in the limit gets its greedy schedule in time instead
    of a round that overruns (Taillard's 100x20: greedy 1.6 s, 16 rollouts 18 s). A round that compiled (a shape
    new to this process) says nothing about the next one's time, which then runs if any time is left. Round 0
    always runs; `max_rounds` caps the rounds (a deterministic result whatever the machine's speed)."""
    if round_size < 1 or seconds <= 0 or (max_rounds is not None and max_rounds < 1):
        raise ValueError(f"best_within needs round_size >= 1, seconds > 0 and max_rounds >= 1 (or None); got "
                         f"{round_size}, {seconds}, {max_rounds}")
    clock = time.perf_counter()
    best_start, best_makespan, greedy = _timed(lambda: greedy_batch(apply, params, instances), apply, instances, 0)
    expected = None if greedy is None else round_size * greedy
    rounds = 1
    while ((max_rounds is None or rounds < max_rounds)
           and time.perf_counter() - clock + (expected or 0.0) <= seconds):
        start, makespan, expected = _timed(
            lambda: _sampled(apply, params, instances, jax.random.fold_in(key, rounds), round_size, jnp.bool_(False)),
            apply, instances, round_size)
        better = makespan < best_makespan
        best_start = np.where(better[:, None, None], start, best_start)
        best_makespan = np.where(better, makespan, best_makespan)
        rounds += 1
    return Anytime(best_start, best_makespan, 1 + (rounds - 1) * round_size, time.perf_counter() - clock)


class AgentSchedule(NamedTuple):
    start: np.ndarray
    makespan: int
    seconds: float
    rollouts: int


def checked(instance: Instance, start, makespan, method: str) -> np.ndarray:
    """The unpadded start times, after the validator found no violation (else a RuntimeError listing them)."""
    start = np.asarray(start)[:instance.jobs, :instance.operations]
    violations = validate(instance, start, makespan=int(makespan))
    if violations:
        raise RuntimeError(f"{method} returned an invalid schedule for {instance.name!r}: {violations[:5]}")
    return start


def agent_schedules(apply, params, instances: env.JobShop, key: jax.Array, num_samples: int = 0,
                    seconds: float | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """(start [B, J, O], makespan [B], rollouts per instance), on the host, not validated: greedy
    (num_samples == 0), the best of `num_samples` rollouts (greedy + sampled), or, given `seconds`, the best of
    rounds of `num_samples` rollouts within that time (`best_within`). `seconds` is ignored for greedy."""
    if num_samples == 0:
        start, makespan = jax.device_get(greedy_batch(apply, params, instances))
        return np.asarray(start), np.asarray(makespan), 1
    if seconds is None:
        start, makespan = jax.device_get(sampled_batch(apply, params, instances, key, num_samples))
        return np.asarray(start), np.asarray(makespan), num_samples
    start, makespan, rollouts, _ = best_within(apply, params, instances, key, seconds, round_size=num_samples)
    return start, makespan, rollouts


def schedule_with_agent(apply, params, instance: Instance, num_samples: int = 0, seed: int = 0,
                        seconds: float | None = None) -> AgentSchedule:
    """`agent_schedules` on one instance, validated; seconds include compilation the first time a shape is seen."""
    batch = env.stack([instance])
    clock = time.perf_counter()
    start, makespan, rollouts = agent_schedules(apply, params, batch, jax.random.key(seed), num_samples, seconds)
    elapsed = time.perf_counter() - clock
    method = ("the agent (greedy)" if num_samples == 0 else f"the agent (best of {num_samples})" if seconds is None
              else f"the agent (best of {rollouts} in {seconds:g} s)")
    return AgentSchedule(checked(instance, start[0], makespan[0], method), int(makespan[0]), elapsed, rollouts)


# --- the trained policy on disk --------------------------------------------------------------------------------

POLICY_PARAMS, POLICY_CONFIG = "policy.msgpack", "policy.json"


def pretrained_dir() -> str:
    """The policy shipped with the package (agents/jssp_cp/data/pretrained/): trained by `jaxalign run jssp_cp` on
    generated instances only; its training.json holds the command, the commit and its evaluation. What `jaxalign
    jssp solve --method agent` uses without --checkpoint."""
    import os

    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "pretrained")


def save_policy(directory, params, network_config, noop: bool = True) -> None:
    """DIRECTORY/policy.msgpack (Flax serialization) and policy.json (the network config and whether the policy may
    choose No-Op: `noop=False` loads it as `NonDelay`), each written atomically, the parameters first, so that a
    policy.json always has its parameters."""
    from flax import serialization

    from jaxalign import paths
    from jaxalign.rundir import write_json_atomic

    directory = str(directory)
    paths.write_atomic(paths.join(directory, POLICY_PARAMS), serialization.to_bytes(jax.device_get(params)))
    write_json_atomic(paths.join(directory, POLICY_CONFIG), {"network": dataclasses.asdict(network_config),
                                                            "noop": bool(noop)})


def load_policy(directory):
    """(apply, params) of a policy saved by `save_policy` (e.g. a `jaxalign run jssp_cp` work directory), `apply`
    wrapped in `NonDelay` when it was saved with noop=False; a ValueError naming what is missing otherwise."""
    import json

    from agents.jssp_cp.network import JobShopPolicy, NetworkConfig, init_params
    from jaxalign import paths

    directory = str(directory)
    missing = [name for name in (POLICY_PARAMS, POLICY_CONFIG) if not paths.exists(paths.join(directory, name))]
    if missing:
        raise ValueError(f"{directory} holds no trained policy ({' and '.join(missing)} missing); train one with "
                         f"`jaxalign run jssp_cp --workdir {directory}`")
    record = json.loads(paths.read_text(paths.join(directory, POLICY_CONFIG)))
    network = _network(JobShopPolicy, NetworkConfig(**record["network"]))
    template = init_params(jax.random.key(0), network)
    params = restore_params(template, paths.read_bytes(paths.join(directory, POLICY_PARAMS)),
                            paths.join(directory, POLICY_PARAMS))
    return (network.apply if record.get("noop", True) else NonDelay(network.apply)), params


@functools.lru_cache(maxsize=None)
def _network(cls, config):
    # One module per config, so that every policy loaded with it shares `apply` and with it the jitted rollouts'
    # compilations (Flax modules compare by identity).
    return cls(config)


def restore_params(template, data: bytes, where: str):
    """Parameters from Flax-serialised bytes, checked leaf by leaf against the template's shapes: a policy saved
    by another version of the network or observation (e.g. before the job features) is one clear error naming
    the file and the first parameter that differs, not a shape error deep inside the first forward pass."""
    from flax import serialization

    try:
        params = serialization.from_bytes(template, data)
    except (ValueError, KeyError) as error:
        raise ValueError(f"{where}: not parameters of this policy network ({error}); retrain with "
                         f"`jaxalign run jssp_cp`") from None
    want = jax.tree_util.tree_leaves_with_path(template)
    got = jax.tree_util.tree_leaves_with_path(params)
    for (path, a), (_, b) in zip(want, got):
        if np.shape(a) != np.shape(b):
            raise ValueError(f"{where}: parameter {jax.tree_util.keystr(path)} has shape {np.shape(b)}, this "
                             f"network expects {np.shape(a)} (saved by another version of the network or "
                             f"observation); retrain with `jaxalign run jssp_cp`")
    return params
