"""Imitation of CP-SAT schedules (Tassel, Gebser and Schekotihin, ICAPS 2023, Section 4.3): expert decisions in
the dispatching environment, and behaviour cloning of the policy network on them.

From a schedule to decisions. A CP-SAT schedule found within a time limit may leave idle time that no constraint
needs (only the makespan is minimised), so it is first left-shifted: `semi_active` rebuilds the earliest schedule
with the same job order on every machine, which is never later anywhere, so its makespan is <= CP-SAT's (equal when
CP-SAT's schedule is optimal). The expert then replays it in the environment: at each decision point it takes the
legal job whose next operation the target schedule starts earliest (ties: the lowest job index) when that start
is now, and No-Op otherwise. With positive durations this reproduces the left-shifted schedule exactly: the
environment's time never passes an unfixed operation's target start (a No-Op jumps to the smallest start lower
bound above now, and a semi-active start equals its operation's lower bound once everything starting before it is
fixed), so every operation is fixed at its target start. So the replayed makespan equals the left-shifted one,
<= CP-SAT's, and equals CP-SAT's whenever CP-SAT's schedule was already semi-active (e.g. optimal). Schedules
that need idle time are reachable only through No-Ops; without No-Ops (pure non-delay dispatching) the expert
would not exist for them. With a zero-length operation the argument can fail (two operations may share a start on
one machine); `expert_dataset` checks every replay against the target and raises if one differs.

Improvement rounds (the paper's imitation of the solver's improvements on the agent's own schedules): in each
round, fresh generated instances are scheduled by the current policy (best of N sampled rollouts), CP-SAT starts
from that schedule as its hint and improves it within the time limit (its result is never longer: the hint is its
first incumbent), and the improved schedules' expert decisions are added to the data the policy is cloned on again
(`improvement_round`). The policy so learns from states its own schedules reach, in the manner of DAgger (Ross,
Gordon and Bagnell, AISTATS 2011), with the solver as the expert.

Training instances are generated (`instances.random_instance`); a Taillard benchmark instance is refused
(`instances.is_benchmark`), so no benchmark result is ever trained on.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from agents.jssp_cp import cpsat, env, inference
from agents.jssp_cp.instances import Instance, is_benchmark, random_instance
from agents.jssp_cp.schedule import NOOP, semi_active, simulate, validate

INT_MAX = jnp.iinfo(jnp.int32).max


def refuse_benchmarks(instances: Sequence[Instance]) -> None:
    """Training never sees a Taillard benchmark instance."""
    for inst in instances:
        if is_benchmark(inst):
            raise ValueError(f"instance {inst.name!r} is a Taillard benchmark instance; training uses generated "
                             f"instances only")


def training_instances(seed: int | Sequence[int], sizes: Sequence[tuple[int, int]],
                       per_size: int) -> list[Instance]:
    """`per_size` random Taillard-style instances of every (jobs, machines) in `sizes`, from one NumPy seed (or
    seed sequence: improvement round r uses [seed, r], a stream apart from the first round's)."""
    rng = np.random.default_rng(seed)
    out = [random_instance(rng, j, m) for j, m in sizes for _ in range(per_size)]
    refuse_benchmarks(out)
    return out


def machine_orders(instance: Instance, start) -> list[list[int]]:
    """Per machine, its jobs in the order `start` runs them (ties: job index, then operation)."""
    start = np.asarray(start)
    orders = []
    for m in range(instance.num_machines):
        ops = sorted((int(start[j, k]), int(j), int(k)) for j, k in zip(*np.nonzero(instance.machines == m)))
        orders.append([j for _, j, _ in ops])
    return orders


def left_shift(instance: Instance, start) -> np.ndarray:
    """The semi-active schedule with the machine orders of the valid schedule `start` (module docstring)."""
    shifted = semi_active(instance, machine_orders(instance, start))
    if shifted is None:
        raise ValueError(f"instance {instance.name!r}: the schedule's machine orders contradict the job routes; "
                         f"is it valid? {validate(instance, start)[:3]}")
    return shifted


def expert_action(state: env.State, target: jax.Array) -> jax.Array:
    """The expert's decision (module docstring): target [J, O] start times of the schedule to reproduce."""
    jobs = state.next_op.shape[0]
    wanted = env._gather_op(target, state.next_op)
    wanted = jnp.where(env.legal_jobs(state), wanted, INT_MAX)
    job = jnp.argmin(wanted).astype(jnp.int32)
    noop_legal = env.legal_actions(state)[jobs]
    return jnp.where((wanted[job] > state.time) & noop_legal, jobs, job)


def max_decisions(jobs: int, operations: int) -> int:
    """An upper bound on an episode's length: one decision per operation, plus the No-Ops, each of which moves the
    time up to a later start lower bound (an operation's end), so at most one per operation."""
    return 2 * jobs * operations


def expert_rollout(instance: env.JobShop, target: jax.Array, num_steps: int):
    """The expert's episode as a fixed-length scan: (observations [T, ...], actions [T], valid [T] = the episode
    was not over before the step, final state). Jittable and vmappable over instances."""
    def one(state, _):
        obs = env.observe(state)
        action = expert_action(state, target)
        valid = ~env.done(state)
        return env.transition(state, action), (obs, action, valid)

    final, (obs, actions, valid) = jax.lax.scan(one, env.reset(instance), None, length=num_steps)
    return obs, actions, valid, final


_expert_rollouts = jax.jit(jax.vmap(expert_rollout, in_axes=(0, 0, None)), static_argnums=2)


@dataclasses.dataclass(frozen=True)
class ExpertData:
    """Behaviour-cloning data: observations with leaves [N, ...] and expert actions [N] (valid steps only);
    per instance the CP-SAT makespan, the left-shifted one and the replayed one."""

    obs: env.Observation
    actions: np.ndarray
    cpsat_makespans: np.ndarray
    shifted_makespans: np.ndarray
    replayed_makespans: np.ndarray


def decisions_of(actions: np.ndarray, valid: np.ndarray, jobs: int) -> list[int | None]:
    return [None if a == jobs else int(a) for a, v in zip(actions, valid) if v]


def expert_dataset(instances: Sequence[Instance], starts: Sequence[np.ndarray], cpsat_makespans: Sequence[int],
                   jobs: int, machines: int) -> ExpertData:
    """Replays every CP-SAT schedule (module docstring) in the environment padded to `jobs` x `machines`, checks
    each replay against the plain-Python simulation (schedule.simulate) and the validator, and keeps the valid
    steps."""
    refuse_benchmarks(instances)
    shifted = [left_shift(inst, s) for inst, s in zip(instances, starts)]
    targets = np.full((len(instances), jobs, machines), 0, np.int32)
    for i, s in enumerate(shifted):
        targets[i, :s.shape[0], :s.shape[1]] = s
    padded = env.stack(instances, jobs, machines)
    obs, actions, valid, final = _expert_rollouts(padded, jnp.asarray(targets), max_decisions(jobs, machines))
    actions, valid = np.asarray(actions), np.asarray(valid)
    replayed = np.asarray(final.makespan)
    for i, inst in enumerate(instances):
        if not bool(np.asarray(env.done(jax.tree_util.tree_map(lambda x: x[i], final)))):
            raise RuntimeError(f"instance {i} ({inst.name}): the expert's episode did not finish in "
                               f"{max_decisions(jobs, machines)} decisions")
        start, _ = simulate(inst, decisions_of(actions[i], valid[i], jobs))
        if not np.array_equal(start, shifted[i]) or validate(inst, start):
            raise RuntimeError(f"instance {i} ({inst.name}): replaying the CP-SAT schedule did not reproduce its "
                               f"left-shifted schedule (a zero-length operation?): {validate(inst, start)[:3]}")
        if replayed[i] != int((shifted[i] + inst.durations).max()) or replayed[i] > cpsat_makespans[i]:
            raise RuntimeError(f"instance {i} ({inst.name}): replayed makespan {replayed[i]}, CP-SAT's "
                               f"{cpsat_makespans[i]}")
    keep = valid.reshape(-1)
    flat = jax.tree_util.tree_map(lambda x: np.asarray(x).reshape((-1,) + x.shape[2:])[keep], obs)
    return ExpertData(obs=flat, actions=actions.reshape(-1)[keep].astype(np.int32),
                      cpsat_makespans=np.asarray(cpsat_makespans, np.int64),
                      shifted_makespans=np.array([int((s + i.durations).max()) for s, i in zip(shifted, instances)]),
                      replayed_makespans=replayed.astype(np.int64))


def solve_all(instances: Sequence[Instance], time_limit: float, seed: int = 0, hints: Sequence | None = None,
              progress: str | None = None) -> list[cpsat.CPResult]:
    """CP-SAT on every training instance, one worker (so that a re-run finds the same schedules whenever CP-SAT
    proves optimality within the limit, as it does on small instances), optionally from a hint schedule per
    instance; `progress`: a bar's label (rate and ETA), or None for none."""
    refuse_benchmarks(instances)
    hints = [None] * len(instances) if hints is None else hints
    return [cpsat.solve(inst, time_limit=time_limit, workers=1, hint=hint, seed=seed)
            for inst, hint in tqdm(list(zip(instances, hints)), desc=progress, disable=progress is None,
                                   unit="instance", dynamic_ncols=True)]


def concatenate(parts: Sequence[ExpertData]) -> ExpertData:
    """The decisions of several expert datasets (observations padded alike) as one."""
    return ExpertData(**{field.name: jax.tree_util.tree_map(lambda *xs: np.concatenate(xs),
                                                            *[getattr(p, field.name) for p in parts])
                         for field in dataclasses.fields(ExpertData)})


def improvement_round(apply, params, instances: Sequence[Instance], time_limit: float, num_samples: int,
                      key: jax.Array, jobs: int, machines: int, seed: int = 0,
                      progress: str | None = None) -> tuple[ExpertData, dict]:
    """One round of imitating the solver's improvements of the policy's schedules (module docstring).

    The policy's best of `num_samples` sampled rollouts per instance (validated) is CP-SAT's hint (one worker,
    `time_limit` seconds); the better of CP-SAT's schedule and the hint (CP-SAT's unless it came back longer, which
    a hint taken as first incumbent rules out) is replayed into expert decisions padded to `jobs` x `machines`.
    Returns the data and {"instances", "agent_makespan", "target_makespan" (means), "improved" (instances CP-SAT
    shortened), "cpsat_optimal"}."""
    refuse_benchmarks(instances)
    batch = env.stack(instances, jobs, machines)
    starts, makespans = jax.device_get(inference.sampled_batch(apply, params, batch, key, num_samples))
    agent = [inference.checked(inst, s, m, "the policy") for inst, s, m in zip(instances, starts, makespans)]
    agent_makespans = np.asarray(makespans, np.int64)
    solved = solve_all(instances, time_limit, seed=seed, hints=agent, progress=progress)
    targets, target_makespans = [], []
    for inst, result, hint, m in zip(instances, solved, agent, agent_makespans):
        better = result.makespan <= m
        targets.append(inference.checked(inst, result.start, result.makespan, "CP-SAT") if better else hint)
        target_makespans.append(result.makespan if better else int(m))
    data = expert_dataset(instances, targets, target_makespans, jobs, machines)
    stats = {"instances": len(instances), "agent_makespan": float(agent_makespans.mean()),
             "target_makespan": float(np.mean(target_makespans)),
             "improved": int((np.asarray(target_makespans) < agent_makespans).sum()),
             "cpsat_optimal": sum(r.status == "OPTIMAL" for r in solved)}
    return data, stats


# --- behaviour cloning -----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BCConfig:
    steps: int = 500  # Adam steps of behaviour cloning on the CP-SAT expert's decisions
    batch_size: int = 256  # expert decisions per step, drawn uniformly with replacement
    learning_rate: float = 1e-3  # Adam's step size (constant) of behaviour cloning

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.learning_rate <= 0:
            raise ValueError(f"imitation needs steps, batch_size >= 1 and learning_rate > 0; got {self}")


def cross_entropy(logits: jax.Array, actions: jax.Array) -> jax.Array:
    """Mean of -log softmax(logits)[action] over the batch."""
    log_p = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(log_p, actions[:, None], axis=-1)[:, 0].mean()


def make_cloning(apply, cfg: BCConfig):
    """A `clone(params, obs, actions, key, progress=None) -> (params, metrics per step)`: `cfg.steps` Adam steps of
    the cross-entropy on minibatches drawn uniformly (with replacement) from the data, as jitted lax.scan segments
    of about a twentieth of the steps each, so that a bar labelled `progress` can show the rate and ETA."""
    tx = optax.adam(cfg.learning_rate)

    def loss_fn(params, obs, actions):
        logits, _ = apply(params, obs)
        return cross_entropy(logits, actions), (logits.argmax(-1) == actions).mean()

    @jax.jit
    def segment(params, opt_state, obs, actions, keys):
        def step(carry, key):
            params, opt_state = carry
            index = jax.random.randint(key, (cfg.batch_size,), 0, actions.shape[0])
            batch = jax.tree_util.tree_map(lambda x: x[index], obs)
            (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, actions[index])
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), {"bc_loss": loss, "bc_accuracy": accuracy}

        return jax.lax.scan(step, (params, opt_state), keys)

    def clone(params, obs, actions, key, progress: str | None = None):
        obs, actions = jax.tree_util.tree_map(jnp.asarray, (obs, actions))
        keys, opt_state, metrics = jax.random.split(key, cfg.steps), tx.init(params), []
        size = -(-cfg.steps // 20)
        with tqdm(total=cfg.steps, desc=progress, disable=progress is None, unit="step", dynamic_ncols=True) as bar:
            for begin in range(0, cfg.steps, size):
                (params, opt_state), found = segment(params, opt_state, obs, actions, keys[begin:begin + size])
                metrics.append(found)
                bar.update(min(size, cfg.steps - begin))
        return params, jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs), *metrics)

    return clone


def agreement(apply, params, data: ExpertData) -> float:
    """The fraction of expert decisions the policy's argmax takes."""
    logits, _ = jax.jit(apply)(params, data.obs)
    return float((np.asarray(logits).argmax(-1) == data.actions).mean())


__all__ = ["BCConfig", "ExpertData", "NOOP", "agreement", "concatenate", "cross_entropy", "decisions_of",
           "expert_action", "expert_dataset", "expert_rollout", "improvement_round", "left_shift", "machine_orders",
           "make_cloning", "max_decisions", "refuse_benchmarks", "solve_all", "training_instances"]
