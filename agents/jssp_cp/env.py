"""A functional, jittable job-shop environment with event-driven, non-delay semantics.

The environment is the dispatching view of the job shop's CP model (Tassel, Gebser and Schekotihin, ICAPS 2023,
Section 3): each job's next operation has a start lower bound

    lb_j = max(end of job j's previous operation, end of the last operation on that operation's machine),

the current time is t = max(floor, min over unfinished jobs of lb_j), and the legal actions are

- a job j whose next operation can start now (lb_j <= t): it is fixed to start at t;
- No-Op (action index `jobs`), legal while some unfinished job has lb_j > t: it raises the floor to the next
  distinct start time, min{max(lb_j, t) > t}, so that the jobs legal now may wait for a later one.

Without No-Ops this is Giffler and Thompson's non-delay dispatching (no machine idles while an operation could run
on it); with No-Ops every semi-active schedule is reachable, so the optimum is too (tests/agents/jssp_cp check both
claims by enumeration on tiny instances).

Reward: minus the increase of the partial makespan (the latest end among the fixed operations, a lower bound on the
final makespan). It telescopes to minus the final makespan, so the undiscounted return is exactly -makespan, while
each decision is charged the delay it causes at once rather than only at the end of a long episode.

Instances of different sizes batch together after `pad`: a dummy job has no operations (it is finished from the
start and never legal); padded operation slots of a real job are never reached; padded machines are never used.
An illegal action leaves the state unchanged (reward 0): policies must sample from `legal_actions`.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from agents.jssp_cp.instances import Instance
from rl.env import Discrete, Environment

WINDOW = 5
FEATURES = 4  # is_fixed, start lower bound, duration, is_legal
JOB_FEATURES = 2  # remaining work and remaining operations, each relative to the largest among unfinished jobs


@struct.dataclass
class JobShop:
    """Instance arrays, padded: machines, durations [J, O] int32; num_ops [J] int32 (0 for a dummy job);
    machine_valid [M] bool (False for a padded machine). J, O, M are the padded sizes."""

    machines: jax.Array
    durations: jax.Array
    num_ops: jax.Array
    machine_valid: jax.Array


@struct.dataclass
class State:
    """instance: the JobShop; next_op [J]: index of each job's next operation; job_ready [J]: end of each job's
    previous operation; machine_ready [M]: end of each machine's last operation; start [J, O]: start times (-1 while
    unfixed); time: the current time; floor: the time No-Ops have advanced to; makespan: latest end so far."""

    instance: JobShop
    next_op: jax.Array
    job_ready: jax.Array
    machine_ready: jax.Array
    start: jax.Array
    time: jax.Array
    floor: jax.Array
    makespan: jax.Array


@struct.dataclass
class Observation:
    """window [J, 5, 4]: per job its next 5 operations as [is_fixed, start lower bound, duration, is_legal];
    is_fixed = 1 marks slots past the job's last operation (nothing left to decide there), start lower bounds are
    relative to the current time, and both times are divided by the instance's longest duration (size-agnostic);
    competition [J, J]: unfinished jobs i and k whose next operations need the same machine (diagonal included);
    legal [J + 1]: the action mask (index J = No-Op); job_mask [J]: unfinished jobs; job [J, 2]: each job's
    remaining work and remaining operations divided by the largest among the unfinished jobs (in [0, 1], 0 for a
    finished job). The window sees five operations, a third of a Taillard 15-machine job's route and a quarter of a
    20-machine one's; the two job features let the policy see the whole rest of the route at any size (they make
    MWKR's and MOR's priorities expressible)."""

    window: jax.Array
    competition: jax.Array
    legal: jax.Array
    job_mask: jax.Array
    job: jax.Array


def pad(instance: Instance, jobs: int | None = None, machines: int | None = None) -> JobShop:
    """The JobShop of `instance`, padded to `jobs` jobs and `machines` machines (operation slots = machines)."""
    j, o = instance.machines.shape
    m = instance.num_machines
    jobs = j if jobs is None else jobs
    machines = max(m, o) if machines is None else machines
    if jobs < j or machines < max(m, o):
        raise ValueError(f"cannot pad instance {instance.name!r} ({j} jobs, {o} operations per job, {m} machines) "
                         f"to {jobs} jobs and {machines} machines")
    ops = machines
    mach = np.zeros((jobs, ops), np.int32)
    dur = np.zeros((jobs, ops), np.int32)
    mach[:j, :o] = instance.machines
    dur[:j, :o] = instance.durations
    num_ops = np.zeros(jobs, np.int32)
    num_ops[:j] = o
    return JobShop(jnp.asarray(mach), jnp.asarray(dur), jnp.asarray(num_ops), jnp.arange(machines) < m)


def stack(instances: Sequence[Instance], jobs: int | None = None, machines: int | None = None) -> JobShop:
    """A batch (leading axis) of instances padded to one shape: by default the largest jobs and machines."""
    jobs = max(i.jobs for i in instances) if jobs is None else jobs
    machines = max(max(i.num_machines, i.operations) for i in instances) if machines is None else machines
    padded = [pad(i, jobs, machines) for i in instances]
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *padded)


def arrays(machines: jax.Array, durations: jax.Array) -> JobShop:
    """An unpadded JobShop from raw [J, M] arrays (e.g. `instances.random_instance_arrays`); jittable."""
    j, m = machines.shape
    return JobShop(machines.astype(jnp.int32), durations.astype(jnp.int32), jnp.full((j,), m, jnp.int32),
                   jnp.ones((m,), bool))


# --- derived quantities ----------------------------------------------------------------------------------------


def _gather_op(values: jax.Array, op: jax.Array) -> jax.Array:
    """values[j, op[j]] with op clipped into range (finished jobs read their last slot)."""
    op = jnp.clip(op, 0, values.shape[1] - 1)
    return jnp.take_along_axis(values, op[:, None], axis=1)[:, 0]


def active(state: State) -> jax.Array:
    """[J] jobs with an operation left."""
    return state.next_op < state.instance.num_ops


def next_machine(state: State) -> jax.Array:
    return _gather_op(state.instance.machines, state.next_op)


def next_duration(state: State) -> jax.Array:
    return _gather_op(state.instance.durations, state.next_op)


def start_lower_bound(state: State) -> jax.Array:
    """[J] the earliest start of each job's next operation by precedence and machine availability."""
    return jnp.maximum(state.job_ready, state.machine_ready[next_machine(state)])


def _current_time(state: State) -> jax.Array:
    lb = jnp.where(active(state), start_lower_bound(state), jnp.iinfo(jnp.int32).max)
    return jnp.where(active(state).any(), jnp.maximum(state.floor, lb.min()), state.floor)


def _next_time(state: State) -> jax.Array:
    """The smallest start lower bound above the current time (int32 max when there is none)."""
    lb = start_lower_bound(state)
    later = active(state) & (lb > state.time)
    return jnp.where(later, lb, jnp.iinfo(jnp.int32).max).min()


def legal_jobs(state: State) -> jax.Array:
    return active(state) & (start_lower_bound(state) <= state.time)


def legal_actions(state: State) -> jax.Array:
    """[J + 1] bool: the legal jobs, then No-Op."""
    noop = (active(state) & (start_lower_bound(state) > state.time)).any()
    return jnp.concatenate([legal_jobs(state), noop[None]])


def done(state: State) -> jax.Array:
    return ~active(state).any()


def remaining_work(state: State) -> jax.Array:
    """[J] total duration of each job's unfixed operations."""
    inst = state.instance
    slot = jnp.arange(inst.durations.shape[1])
    left = (slot[None, :] >= state.next_op[:, None]) & (slot[None, :] < inst.num_ops[:, None])
    return jnp.where(left, inst.durations, 0).sum(axis=1)


def remaining_operations(state: State) -> jax.Array:
    return jnp.maximum(state.instance.num_ops - state.next_op, 0)


# --- the transition --------------------------------------------------------------------------------------------


def reset(instance: JobShop) -> State:
    jobs, ops = instance.machines.shape
    zero = jnp.zeros((), jnp.int32)
    state = State(instance=instance, next_op=jnp.zeros(jobs, jnp.int32), job_ready=jnp.zeros(jobs, jnp.int32),
                  machine_ready=jnp.zeros(instance.machine_valid.shape[0], jnp.int32),
                  start=jnp.full((jobs, ops), -1, jnp.int32), time=zero, floor=zero, makespan=zero)
    return state.replace(time=_current_time(state))


def transition(state: State, action: jax.Array) -> State:
    """The next state only (what rollouts need; `step` adds the observation and reward)."""
    jobs = state.next_op.shape[0]
    legal = legal_actions(state)[action]
    is_noop = action == jobs
    job = jnp.clip(action, 0, jobs - 1)
    op = state.next_op[job]
    end = state.time + state.instance.durations[job, jnp.clip(op, 0, state.start.shape[1] - 1)]
    machine = next_machine(state)[job]
    fixed = state.replace(
        next_op=state.next_op.at[job].add(1), job_ready=state.job_ready.at[job].set(end),
        machine_ready=state.machine_ready.at[machine].set(end),
        start=state.start.at[job, op].set(state.time), makespan=jnp.maximum(state.makespan, end))
    waited = state.replace(floor=_next_time(state))
    new = jax.tree_util.tree_map(lambda a, b: jnp.where(is_noop, a, b), waited, fixed)
    new = new.replace(time=_current_time(new))
    return jax.tree_util.tree_map(lambda a, b: jnp.where(legal, a, b), new, state)


def observe(state: State) -> Observation:
    inst = state.instance
    jobs, ops = inst.machines.shape
    valid_ops = jnp.arange(ops)[None, :] < inst.num_ops[:, None]
    scale = jnp.maximum(jnp.where(valid_ops, inst.durations, 0).max(), 1).astype(jnp.float32)
    legal = legal_jobs(state)
    lb = jnp.maximum(start_lower_bound(state), state.time)
    slots = []
    for k in range(WINDOW):
        op = state.next_op + k
        real = op < inst.num_ops
        duration = _gather_op(inst.durations, op)
        if k > 0:
            lb = jnp.maximum(lb, state.machine_ready[_gather_op(inst.machines, op)])
        slots.append(jnp.stack([
            (~real).astype(jnp.float32),
            jnp.where(real, (lb - state.time) / scale, 0.0),
            jnp.where(real, duration / scale, 0.0),
            (legal & (k == 0)).astype(jnp.float32)], axis=-1))
        lb = lb + duration
    window = jnp.stack(slots, axis=1)
    act = active(state)
    machine = next_machine(state)
    competition = act[:, None] & act[None, :] & (machine[:, None] == machine[None, :])
    return Observation(window=window, competition=competition, legal=legal_actions(state), job_mask=act,
                       job=job_features(state))


def job_features(state: State) -> jax.Array:
    """[J, JOB_FEATURES]: remaining work and remaining operations, each over its maximum among unfinished jobs."""
    left = jnp.stack([remaining_work(state), remaining_operations(state)], axis=-1).astype(jnp.float32)
    return left / jnp.maximum(left.max(axis=0, keepdims=True), 1.0)


def step(state: State, action: jax.Array) -> tuple[State, Observation, jax.Array, jax.Array]:
    """(next state, its observation, reward = -(increase of the partial makespan), done)."""
    new = transition(state, action)
    reward = (state.makespan - new.makespan).astype(jnp.float32)
    return new, observe(new), reward, done(new)


class JobShopEnv(Environment):
    """The same dynamics behind rl/env.py's protocol: params = a JobShop (the instance), the key is unused."""

    def __init__(self, jobs: int, machines: int):
        self.jobs, self.machines = jobs, machines

    @property
    def default_params(self) -> JobShop:
        raise ValueError("JobShopEnv has no default instance; pass a JobShop (see `pad`, `arrays`) as params")

    def reset(self, key, params: JobShop):
        state = reset(params)
        return observe(state), state

    def step(self, key, state: State, action, params: JobShop):
        new, obs, reward, finished = step(state, action)
        return obs, new, reward, finished, {"terminated": finished, "truncated": jnp.zeros((), bool)}

    def action_space(self, params) -> Discrete:
        return Discrete(self.jobs + 1)
