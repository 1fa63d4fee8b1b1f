"""Joining a multi-process JAX run from environment variables: the one entry point every launcher shares.

Why environment variables: `jaxalign local`, the TPU and the SSH launchers all start the same `jaxalign run`
command and differ only in how they start it, so the process topology travels in the environment and the
experiment code never knows which launcher started it. `initialize_from_env` must run before anything touches
JAX devices: the CPU device count (XLA_FLAGS) and the collectives implementation are read once, when JAX creates
its backend.

    JAXALIGN_COORDINATOR_ADDRESS   host:port of process 0's coordination service
    JAXALIGN_NUM_PROCESSES         number of processes (>= 1)
    JAXALIGN_PROCESS_ID            this process's id, 0 <= id < JAXALIGN_NUM_PROCESSES
    JAXALIGN_LOCAL_DEVICE_COUNT    optional: CPU devices per process (XLA's forced host platform device count)
    JAXALIGN_INITIALIZATION_TIMEOUT optional: seconds to wait for every process to join (default 300)
    JAXALIGN_DISTRIBUTED=auto      call jax.distributed.initialize() with no arguments (TPU pods detect themselves)

None of them set: a single process, nothing happens.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping

import numpy as np

COORDINATOR_ADDRESS = "JAXALIGN_COORDINATOR_ADDRESS"
NUM_PROCESSES = "JAXALIGN_NUM_PROCESSES"
PROCESS_ID = "JAXALIGN_PROCESS_ID"
LOCAL_DEVICE_COUNT = "JAXALIGN_LOCAL_DEVICE_COUNT"
INITIALIZATION_TIMEOUT = "JAXALIGN_INITIALIZATION_TIMEOUT"
DISTRIBUTED = "JAXALIGN_DISTRIBUTED"

# A peer that stops answering is declared dead after this long and every other process is told to stop (JAX's
# default, 100 s, leaves a run whose process died hanging for minutes). Also bounds how long a process may block
# without heartbeating, which the coordination service does from a background thread, so slow steps are fine.
HEARTBEAT_TIMEOUT_SECONDS = 15
DEFAULT_INITIALIZATION_TIMEOUT = 300

_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


class DistributedConfigError(ValueError):
    """A JAXALIGN_* distributed variable is missing or malformed."""


@dataclasses.dataclass(frozen=True)
class DistributedEnv:
    """What the environment asks for. `auto`: let JAX detect the cluster; otherwise explicit coordinates, or
    none of them (`num_processes is None`) for a single process that may still ask for `local_device_count`."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_count: int | None = None
    initialization_timeout: int = DEFAULT_INITIALIZATION_TIMEOUT
    auto: bool = False

    @property
    def multi_process(self) -> bool:
        return self.auto or self.num_processes is not None


def _int_var(environ: Mapping[str, str], name: str, minimum: int) -> int | None:
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        raise DistributedConfigError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise DistributedConfigError(f"{name}={raw!r} must be >= {minimum}")
    return value


def check_address(name: str, address: str) -> str:
    """`host:port` with a non-empty host (IPv6 in brackets) and a port in 1..65535; one clear error otherwise."""
    match = re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[^:\s\[\]]+):(\d+)", address.strip())
    if not match or not 0 < int(match.group(2)) < 65536:
        raise DistributedConfigError(f"{name}={address!r} is not of the form host:port (port 1-65535)")
    return address.strip()


def parse_env(environ: Mapping[str, str]) -> DistributedEnv:
    """The distributed settings in `environ`, validated; pure, so every error is testable without starting JAX."""
    local = _int_var(environ, LOCAL_DEVICE_COUNT, 1)
    timeout = _int_var(environ, INITIALIZATION_TIMEOUT, 1) or DEFAULT_INITIALIZATION_TIMEOUT
    mode = environ.get(DISTRIBUTED, "").strip()
    explicit = {name: environ.get(name, "").strip() for name in (COORDINATOR_ADDRESS, NUM_PROCESSES, PROCESS_ID)}
    if mode:
        if mode != "auto":
            raise DistributedConfigError(f"{DISTRIBUTED}={mode!r} is not supported; the only value is 'auto'")
        given = [name for name, value in explicit.items() if value]
        if given:
            raise DistributedConfigError(f"{DISTRIBUTED}=auto detects the cluster itself; unset {', '.join(given)}")
        return DistributedEnv(local_device_count=local, initialization_timeout=timeout, auto=True)
    if not any(explicit.values()):
        return DistributedEnv(local_device_count=local, initialization_timeout=timeout)
    missing = [name for name, value in explicit.items() if not value]
    if missing:
        given = ", ".join(f"{name}={value!r}" for name, value in explicit.items() if value)
        raise DistributedConfigError(f"{given} set but {', '.join(missing)} missing; a multi-process run needs all "
                                     f"of {COORDINATOR_ADDRESS}, {NUM_PROCESSES}, {PROCESS_ID}")
    count = _int_var(environ, NUM_PROCESSES, 1)
    process_id = _int_var(environ, PROCESS_ID, 0)
    if process_id >= count:
        raise DistributedConfigError(
            f"{PROCESS_ID}={explicit[PROCESS_ID]!r} must be below {NUM_PROCESSES}={explicit[NUM_PROCESSES]!r}")
    return DistributedEnv(coordinator_address=check_address(COORDINATOR_ADDRESS, explicit[COORDINATOR_ADDRESS]),
                          num_processes=count, process_id=process_id, local_device_count=local,
                          initialization_timeout=timeout)


def with_device_count(xla_flags: str, count: int) -> str:
    """`xla_flags` with the forced host device count set to `count` (an existing setting is replaced)."""
    kept = [f for f in xla_flags.split() if not f.startswith(_DEVICE_COUNT_FLAG)]
    return " ".join(kept + [f"{_DEVICE_COUNT_FLAG}={count}"])


def _backend_started() -> bool:
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()


def initialize_from_env(environ: Mapping[str, str] | None = None) -> DistributedEnv:
    """Apply the environment's settings (see the module docstring); returns them. Call before any JAX device use.

    Multi-process runs on CPU use gloo collectives over TCP, so `jaxalign local` exercises the same code path as
    a pod: global arrays spanning processes, per-process data, orbax's multi-process checkpoints.
    """
    environ = os.environ if environ is None else environ
    env = parse_env(environ)
    if env.local_device_count is None and not env.multi_process:
        return env
    import jax

    if _backend_started():
        raise RuntimeError("jaxalign.distributed.initialize_from_env() must run before JAX creates its devices "
                           f"({LOCAL_DEVICE_COUNT} and the multi-process settings would be ignored)")
    if env.local_device_count is not None:
        os.environ["XLA_FLAGS"] = with_device_count(os.environ.get("XLA_FLAGS", ""), env.local_device_count)
    if not env.multi_process:
        return env
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if env.auto:
        jax.distributed.initialize(initialization_timeout=env.initialization_timeout)
    else:
        jax.distributed.initialize(coordinator_address=env.coordinator_address, num_processes=env.num_processes,
                                   process_id=env.process_id, initialization_timeout=env.initialization_timeout,
                                   heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_SECONDS)
    return env


def is_primary() -> bool:
    """Whether this process writes the run's shared outputs (results, metrics, plots, caches): process 0 only,
    so several processes sharing one work directory never race on a file."""
    import jax

    return jax.process_index() == 0


def host_local(tree: Any) -> Any:
    """`tree` with every array that spans other processes' devices replaced by a NumPy copy of its global value.

    Sampling, evaluation and precomputed log-probs run redundantly and identically in every process on its own
    devices (no collectives in a data-dependent decode loop); they need the whole parameters locally. Arrays a
    process can already read whole (every single-process run) are returned unchanged. All processes must call this
    at the same point (it is a collective); one compiled all-gather serves the whole tree.
    """
    import jax
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec

    leaves, treedef = jax.tree_util.tree_flatten(tree)
    spanning = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array) and not x.is_fully_addressable]
    if not spanning:
        return tree
    leaves = list(leaves)
    named = [i for i in spanning if isinstance(leaves[i].sharding, NamedSharding)]
    if named:
        replicated = tuple(NamedSharding(leaves[i].sharding.mesh, PartitionSpec()) for i in named)
        gathered = jax.jit(_identity, out_shardings=replicated)(tuple(leaves[i] for i in named))
        for i, x in zip(named, gathered):
            leaves[i] = np.asarray(x)  # fully replicated: every process holds the whole value
    for i in set(spanning) - set(named):
        leaves[i] = multihost_utils.process_allgather(leaves[i], tiled=True)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _identity(x):
    return x
