"""Env throughput: steps per second of the jitted, vmapped JAX env against the NumPy reference step:
`python -m agents.pdppo.throughput [INSTANCE ...] [--cpu-devices N]`.

Both step the same instance under uniformly random actions drawn before the clock starts (the policy is not the
env), and each draws its own demand inside the step. The JAX side is one jitted `lax.scan` of `num_steps` periods
over `num_envs` environments (vmapped), timed after a warm-up call that compiles it (best of `repeats`); the NumPy
side steps one environment at a time with `reference.step` (the plain reading of the rules, demand from NumPy's
binomial), timed as the best of 3 passes too (one pass is at the mercy of the machine's load). Only throughput is
measured: episodes are not reset (the scan may run past the horizon; the dynamics do not depend on t).

The env draws its demand with `rl.threefry` (the numbers of `jax.random.uniform`, fused): JAX's own Threefry lowers
on CPU as a rolled loop that cost as much as the rest of the step.

`devices`: the JAX side shards its environments over these devices (a one-axis mesh, each device stepping its own
slice). XLA:CPU runs this workload's small fused kernels on one core per device, so one CPU device leaves most of a
second core idle; `--cpu-devices 2` splits the host into two devices and `measure` then reports the env on one
device and on all of them, beside the NumPy reference (one core: a Python loop over one environment).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from agents.pdppo import reference
from agents.pdppo.env import initial_state, params_from_instance, step
from agents.pdppo.instances import Instance


def jax_steps_per_second(instance: Instance, num_envs: int = 1024, num_steps: int = 100, repeats: int = 3,
                         devices: Sequence[jax.Device] | None = None) -> float:
    params = params_from_instance(instance)
    devices = list(devices or jax.devices()[:1])
    if num_envs % len(devices):
        raise ValueError(f"num_envs={num_envs} must be divisible by the {len(devices)} devices")
    by_env = NamedSharding(Mesh(np.array(devices), ("env",)), PartitionSpec("env"))

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
        keys = jax.device_put(jax.random.split(k_env, num_envs), by_env)
        actions = jax.device_put(
            jax.random.randint(k_action, (num_envs, num_steps, instance.n_machines), 0, instance.n_items + 1), by_env)
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
    """{"jax_steps_per_second", "numpy_steps_per_second", "ratio", "num_envs", "backend", "instance",
    "jax_devices"} on one device, plus "jax_all_devices_steps_per_second" and "ratio_all_devices" when the process
    has several devices: all in one run."""
    jax_sps = jax_steps_per_second(instance, num_envs, num_steps)
    numpy_sps = numpy_steps_per_second(instance, numpy_steps)
    out = {"instance": instance.name, "num_envs": num_envs, "backend": jax.default_backend(),
           "jax_steps_per_second": jax_sps, "numpy_steps_per_second": numpy_sps, "ratio": jax_sps / numpy_sps,
           "jax_devices": jax.device_count()}
    if jax.device_count() > 1:
        all_sps = jax_steps_per_second(instance, num_envs, num_steps, devices=jax.devices())
        out.update({"jax_all_devices_steps_per_second": all_sps, "ratio_all_devices": all_sps / numpy_sps})
    return out


def main(argv: Sequence[str] | None = None) -> int:
    from agents.pdppo.instances import generate
    from jaxalign.distributed import with_device_count

    parser = argparse.ArgumentParser(prog="python -m agents.pdppo.throughput", description=__doc__.split("\n")[0])
    parser.add_argument("instances", nargs="*", default=["20i10m"], help="named configurations (default 20i10m)")
    parser.add_argument("--cpu-devices", type=int, default=1,
                        help="split the host CPU into this many XLA devices (module doc); 1 = JAX's default")
    args = parser.parse_args(argv)
    if args.cpu_devices < 1:
        parser.error(f"--cpu-devices must be at least 1, got {args.cpu_devices}")
    # Before the first JAX computation creates the CPU client, which reads the flag once.
    os.environ["XLA_FLAGS"] = with_device_count(os.environ.get("XLA_FLAGS", ""), args.cpu_devices)
    for name in args.instances:
        try:
            instance = generate(name, 0)
        except ValueError as e:
            parser.error(str(e))
        print(json.dumps(measure(instance)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
