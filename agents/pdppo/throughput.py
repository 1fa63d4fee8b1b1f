"""Env throughput: steps per second of the jitted, vmapped JAX env against the NumPy reference step.

Both step the same instance under uniformly random actions drawn before the clock starts (the policy is not the
env), and each draws its own demand inside the step. The JAX side is one jitted `lax.scan` of `num_steps` periods
over `num_envs` environments (vmapped), timed after a warm-up call that compiles it (best of `repeats`); the NumPy
side steps one environment at a time with `reference.step` (the plain reading of the rules, demand from NumPy's
binomial). Only throughput is measured: episodes are not reset (the scan may run past the horizon; the dynamics do
not depend on t).
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from agents.pdppo import reference
from agents.pdppo.env import initial_state, params_from_instance, step
from agents.pdppo.instances import Instance


def jax_steps_per_second(instance: Instance, num_envs: int = 1024, num_steps: int = 100, repeats: int = 3) -> float:
    params = params_from_instance(instance)

    def env_steps(key, actions):
        def period(state, xs):
            k, action = xs
            next_state, reward, _ = step(params, state, action, k)
            return next_state, reward

        _, rewards = jax.lax.scan(period, initial_state(params), (jax.random.split(key, num_steps), actions))
        return jnp.sum(rewards)

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


def numpy_steps_per_second(instance: Instance, num_steps: int = 2000, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    inventory, setup = instance.initial_inventory.copy(), instance.initial_setup.copy()
    actions = rng.integers(0, instance.n_items + 1, (num_steps, instance.n_machines))
    start = time.perf_counter()
    for action in actions:
        inventory, setup, _ = reference.step(instance, inventory, setup, action,
                                             reference.draw_demand(instance, rng))
    return num_steps / (time.perf_counter() - start)


def measure(instance: Instance, num_envs: int = 1024, num_steps: int = 100, numpy_steps: int = 2000) -> dict:
    """{"jax_steps_per_second", "numpy_steps_per_second", "ratio", "num_envs", "backend", "instance"}."""
    jax_sps = jax_steps_per_second(instance, num_envs, num_steps)
    numpy_sps = numpy_steps_per_second(instance, numpy_steps)
    return {"instance": instance.name, "num_envs": num_envs, "backend": jax.default_backend(),
            "jax_steps_per_second": jax_sps, "numpy_steps_per_second": numpy_sps,
            "ratio": jax_sps / numpy_sps}


if __name__ == "__main__":
    import json
    import sys

    from agents.pdppo.instances import generate

    for name in sys.argv[1:] or ["20i10m"]:
        print(json.dumps(measure(generate(name, 0))))
