"""Priority dispatching rules on the job-shop environment, as pure JAX functions of its state.

A rule maps a State to a priority per job (higher goes first); `dispatch` repeatedly fixes the legal job of highest
priority (ties: the lowest job index) and never waits, so every rule yields a non-delay schedule (Giffler and
Thompson 1960; rules as in Haupt 1989, "A survey of priority rule-based scheduling"):

  SPT   shortest processing time of the next operation
  LPT   longest processing time of the next operation
  MWKR  most work remaining (the job's unfixed durations, the next operation included)
  MOR   most operations remaining
  FIFO  first in, first out: the job whose previous operation ended earliest
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from agents.jssp_cp import env

Rule = Callable[[env.State], jax.Array]


def spt(state: env.State) -> jax.Array:
    return -env.next_duration(state).astype(jnp.float32)


def lpt(state: env.State) -> jax.Array:
    return env.next_duration(state).astype(jnp.float32)


def mwkr(state: env.State) -> jax.Array:
    return env.remaining_work(state).astype(jnp.float32)


def mor(state: env.State) -> jax.Array:
    return env.remaining_operations(state).astype(jnp.float32)


def fifo(state: env.State) -> jax.Array:
    return -state.job_ready.astype(jnp.float32)


RULES: dict[str, Rule] = {"spt": spt, "lpt": lpt, "mwkr": mwkr, "mor": mor, "fifo": fifo}


def choose(state: env.State, rule: Rule) -> jax.Array:
    """The legal job of highest priority (the lowest index among ties)."""
    priority = jnp.where(env.legal_jobs(state), rule(state), -jnp.inf)
    return jnp.argmax(priority).astype(jnp.int32)


def rollout(instance: env.JobShop, rule: Rule) -> env.State:
    """The final state after dispatching every operation by `rule` (at most jobs x operations steps)."""
    def body(state):
        return env.transition(state, choose(state, rule))

    return jax.lax.while_loop(lambda s: ~env.done(s), body, env.reset(instance))


def rule_of(name_or_rule) -> Rule:
    if callable(name_or_rule):
        return name_or_rule
    if name_or_rule not in RULES:
        raise ValueError(f"unknown dispatching rule {name_or_rule!r}; expected one of {sorted(RULES)}")
    return RULES[name_or_rule]


@functools.partial(jax.jit, static_argnums=1)
def _dispatch(instance: env.JobShop, rule: Rule):
    final = rollout(instance, rule)
    return final.start, final.makespan


@functools.partial(jax.jit, static_argnums=1)
def _dispatch_batch(instances: env.JobShop, rule: Rule):
    final = jax.vmap(lambda inst: rollout(inst, rule))(instances)
    return final.start, final.makespan


def dispatch(instance: env.JobShop, rule) -> tuple[jax.Array, jax.Array]:
    """(start times [J, O], makespan) of one (padded) instance; padded slots keep start -1."""
    return _dispatch(instance, rule_of(rule))


def dispatch_batch(instances: env.JobShop, rule) -> tuple[jax.Array, jax.Array]:
    """`dispatch` vmapped over a batch (leading axis) of instances of one padded shape; one jitted call."""
    return _dispatch_batch(instances, rule_of(rule))
