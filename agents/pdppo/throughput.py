"""Env throughput: steps per second of the jitted, vmapped JAX env against the NumPy reference step.

Both step the same instance under uniformly random actions drawn before the clock starts (the policy is not the
env), and each draws its own demand inside the step. The JAX side is one jitted `lax.scan` of `num_steps` periods
over `num_envs` environments (vmapped), timed after a warm-up call that compiles it (best of `repeats`); the NumPy
side steps one environment at a time with `reference.step` (the plain reading of the rules, demand from NumPy's
binomial), timed as the best of 3 passes too (one pass is at the mercy of the machine's load). Only throughput is
measured: episodes are not reset (the scan may run past the horizon; the dynamics do not depend on t).

`predrawn=True` times the same periods with the demand of every env and period drawn before the scan by ONE call
of the RNG (one uniform per item, inverted through the demand CDF: `env.draw_demand`'s rule, vectorised), the step
being `post_decision` + `exogenous_given_demand`, the functions the reference test checks. Per-period key splits and
small RNG calls inside the scan dominate the default path on a CPU; this isolates that cost.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from agents.pdppo import reference
from agents.pdppo.env import exogenous_given_demand, initial_state, params_from_instance, post_decision, step
from agents.pdppo.instances import Instance


def predrawn_demand(params, key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """i32 [*shape, I]: demands for a whole batch of periods from one uniform draw, by the inverse CDF."""
    u = jax.random.uniform(key, shape + params.initial_inventory.shape)
    return jnp.sum(u[..., None] >= params.demand_cdf[:-1], axis=-1).astype(jnp.int32)


def jax_steps_per_second(instance: Instance, num_envs: int = 1024, num_steps: int = 100, repeats: int = 3,
                         predrawn: bool = False) -> float:
    params = params_from_instance(instance)

    def env_steps(key, actions):
        def period(state, xs):
            k, action = xs
            next_state, reward, _ = step(params, state, action, k)
            return next_state, reward

        _, rewards = jax.lax.scan(period, initial_state(params), (jax.random.split(key, num_steps), actions))
        return jnp.sum(rewards)

    if predrawn:
        # One RNG call for all envs and periods; the scan then runs over time with the env batch inside it.
        def batch(key, actions):
            demand = predrawn_demand(params, key, (num_steps, num_envs))

            def period(states, xs):
                d, action = xs
                post, setup_cost = jax.vmap(post_decision, in_axes=(None, 0, 0))(params, states, action)
                next_states, cost = jax.vmap(exogenous_given_demand, in_axes=(None, 0, 0))(params, post, d)
                return next_states, -(setup_cost + cost)

            states = jax.vmap(lambda _: initial_state(params))(jnp.arange(num_envs))
            _, rewards = jax.lax.scan(period, states, (demand, jnp.swapaxes(actions, 0, 1)))
            return jnp.sum(rewards)

        run_batch = jax.jit(batch)
        run = lambda keys, actions: run_batch(keys[0], actions)  # noqa: E731
    else:
        run = jax.jit(jax.vmap(env_steps))
    best = np.inf
    for r in range(repeats + 1):  # the first call compiles
        k_env, k_action = jax.random.split(jax.random.key(r))
        keys = jax.random.split(k_env, num_envs)
        actions = jax.random.randint(k_action, (num_envs, num_steps, instance.n_machines), 0, instance.n_items + 1)
        actions.block_until_ready()
        start = time.perf_counter()
        run(keys, actions).block_until_ready()
        if r:
            best = min(best, time.perf_counter() - start)
    return num_envs * num_steps / best


def numpy_steps_per_second(instance: Instance, num_steps: int = 2000, seed: int = 0, repeats: int = 3) -> float:
    """Steps per second of the reference step, best of `repeats` passes (the JAX side is timed the same way)."""
    rng = np.random.default_rng(seed)
    actions = rng.integers(0, instance.n_items + 1, (num_steps, instance.n_machines))
    best = np.inf
    for _ in range(repeats):
        inventory, setup = instance.initial_inventory.copy(), instance.initial_setup.copy()
        start = time.perf_counter()
        for action in actions:
            inventory, setup, _ = reference.step(instance, inventory, setup, action,
                                                 reference.draw_demand(instance, rng))
        best = min(best, time.perf_counter() - start)
    return num_steps / best


def measure(instance: Instance, num_envs: int = 1024, num_steps: int = 100, numpy_steps: int = 2000) -> dict:
    """{"jax_steps_per_second", "jax_predrawn_steps_per_second", "numpy_steps_per_second", "ratio",
    "ratio_predrawn", "num_envs", "backend", "instance"}: both JAX paths and the reference in one run."""
    jax_sps = jax_steps_per_second(instance, num_envs, num_steps)
    predrawn_sps = jax_steps_per_second(instance, num_envs, num_steps, predrawn=True)
    numpy_sps = numpy_steps_per_second(instance, numpy_steps)
    return {"instance": instance.name, "num_envs": num_envs, "backend": jax.default_backend(),
            "jax_steps_per_second": jax_sps, "jax_predrawn_steps_per_second": predrawn_sps,
            "numpy_steps_per_second": numpy_sps, "ratio": jax_sps / numpy_sps,
            "ratio_predrawn": predrawn_sps / numpy_sps}


if __name__ == "__main__":
    import json
    import sys

    from agents.pdppo.instances import generate

    for name in sys.argv[1:] or ["20i10m"]:
        print(json.dumps(measure(generate(name, 0))))
