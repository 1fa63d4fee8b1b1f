"""What the trained critics and policies of a finished `pdppo_lot_sizing` run do, per arm and seed:
`python -m agents.pdppo.diagnose RUN [--episodes N] [--json OUT]`.

PDPPO's baseline min(V(s), V_post(s^x)) depends on the action through the post-decision state s^x (Felizardo et al.
2025, the advantage A = R - min(V(s), V_post(s^x))). A baseline b(s, a) that depends on the action adds
-E_a[b(s, a) grad log pi(a|s)] = -grad_theta E_{a~pi}[b(s, a)] (b held fixed) to the expected policy gradient
(Williams 1992: only an action-independent baseline leaves it unbiased), so the update also moves the policy toward
actions whose baseline is low: toward post-decision states the critic finds expensive. This module measures, on
rollouts of each seed's final sampled policy (fresh demand keys):

- `idle`: the fraction of machine-periods the policy leaves idle (sampled actions; `greedy_idle` for the argmax);
- the critics' root-mean-square error against the Monte-Carlo returns, z-normalised over the rollouts as in training
  (`rmse_v`, and for PDPPO `rmse_post`, `rmse_min`), and `post_is_min`, how often V_post(s^x) is the minimum;
- for PDPPO, the baseline over one machine's alternative choices, the others' actions kept: b_c = min(V(s),
  V_post(s^x(a with a_m = c))) for every choice c of every machine m at every visited state. `baseline_spread` is
  the standard deviation of b_c over c, relative to the standard deviation of the advantage R - b;
  `prefers_low_baseline` the mean over (state, machine) of (mean_c b_c - sum_c pi_m(c) b_c) / std_c b_c: positive
  when the policy puts its mass on the choices whose baseline is low, the direction the bias term pushes. Where
  V_post(s^x) is the minimum, b_c is the post-decision value of choice c, and a policy improved by an unbiased
  gradient would prefer the choices the critic values higher (a negative score).

The state is restored by re-entering the run (`harness.train` with the run's config.json: every update is already
done, so nothing trains and nothing in the directory changes but the log).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from agents.pdppo.env import (LotSizingState, effective_action, exogenous, initial_state, observation,
                              params_from_instance, post_decision)
from agents.pdppo.experiment import PDPPOLotSizingConfig, arm_learners, arms_trainer, load, seed_keys
from agents.pdppo.learners import ALGORITHMS, Learner
from jaxalign.overrides import apply_overrides, file_overrides
from rl import harness
from rl.returns import monte_carlo_returns

DIAGNOSIS_SEED = 2_000_003  # demand keys of the diagnostic rollouts: neither training's nor evaluation's


def rollouts(learner: Learner, env_params, params, keys: jax.Array, horizon: int) -> dict:
    """Episodes of the sampled policy from the initial state, one per key: states, actions, post-decision states and
    rewards, each with a leading [episodes, horizon] shape."""

    def episode(key):
        def period(state, k):
            k_action, k_demand = jax.random.split(k)
            logits = learner.networks.logits(params, observation(env_params, state))
            action = jax.random.categorical(k_action, logits).astype(jnp.int32)
            post, setup_cost = post_decision(env_params, state, action)
            next_state, cost = exogenous(env_params, post, k_demand)
            return next_state, {"state": state, "action": action, "post": post, "reward": -(setup_cost + cost),
                                "logits": logits}

        return jax.lax.scan(period, initial_state(env_params), jax.random.split(key, horizon))[1]

    return jax.vmap(episode)(keys)


def alternative_baselines(learner: Learner, env_params, params, state: LotSizingState, action: jax.Array,
                          value: jax.Array) -> jax.Array:
    """[M, C]: min(V(s), V_post(s^x)) with machine m's action replaced by choice c, the other machines' kept."""
    n_machines, n_choices = learner.networks.n_machines, learner.networks.n_choices

    def one(m, c):
        post, _ = post_decision(env_params, state, action.at[m].set(c))
        v_post = learner.networks.critic.apply(params["post_critic"], observation(env_params, post))[0]
        return learner.networks.combine(value, v_post)

    machines, choices = jnp.meshgrid(jnp.arange(n_machines), jnp.arange(n_choices), indexing="ij")
    return jax.vmap(jax.vmap(one))(machines, choices)


def seed_diagnostics(learner: Learner, env_params, params, keys: jax.Array, horizon: int) -> dict:
    """The module doc's quantities for one seed's final parameters (arrays of scalars)."""
    tr = rollouts(learner, env_params, params, keys, horizon)
    flat = jax.tree_util.tree_map(lambda x: x.reshape((-1,) + x.shape[2:]), tr)
    rewards = tr["reward"].T  # [horizon, episodes]: whole episodes, so no bootstrap (as in training)
    zeros = jnp.zeros_like(rewards)
    returns = monte_carlo_returns(rewards, zeros, zeros, zeros, learner.config.gamma).T.reshape(-1)
    returns = (returns - returns.mean()) / (returns.std() + 1e-8)
    obs, post_obs = (jax.vmap(lambda s: observation(env_params, s))(flat[k]) for k in ("state", "post"))
    values = learner.networks.critic_values(params, obs, post_obs)
    value, estimate = values[0], learner.networks.combined(values)
    greedy = jax.vmap(lambda a: effective_action(env_params, a))(jnp.argmax(flat["logits"], -1))
    chosen = jax.vmap(lambda a: effective_action(env_params, a))(flat["action"])
    out = {"idle": jnp.mean(chosen == 0), "greedy_idle": jnp.mean(greedy == 0),
           "rmse_v": jnp.sqrt(jnp.mean(jnp.square(value - returns))),
           "mean_episode_cost": -jnp.sum(tr["reward"], axis=1).mean()}
    if len(values) == 1:  # PPO
        return out
    v_post = values[1]
    baselines = jax.vmap(lambda s, a, v: alternative_baselines(learner, env_params, params, s, a, v))(
        flat["state"], flat["action"], value)  # [B, M, C]
    pi = jax.nn.softmax(flat["logits"], axis=-1)
    spread = jnp.std(baselines, axis=-1)
    preference = (jnp.mean(baselines, axis=-1) - jnp.sum(pi * baselines, axis=-1)) / jnp.maximum(spread, 1e-6)
    out.update({
        "rmse_post": jnp.sqrt(jnp.mean(jnp.square(v_post - returns))),
        "rmse_min": jnp.sqrt(jnp.mean(jnp.square(estimate - returns))),
        "post_is_min": jnp.mean(v_post < value),
        "baseline_spread": jnp.mean(spread) / jnp.std(returns - estimate),
        # where b_c does not depend on c (V(s) the minimum for every choice) there is no preference to measure
        "prefers_low_baseline": jnp.sum(jnp.where(spread > 1e-6, preference, 0.0)) / jnp.maximum(
            jnp.sum(spread > 1e-6), 1),
    })
    return out


def restore(run_dir: str) -> tuple[PDPPOLotSizingConfig, dict, dict]:
    """(config, learners, final state) of a finished run; ValueError if the run is not finished."""
    if not (Path(run_dir) / "results.json").is_file():
        raise ValueError(f"{run_dir}: no results.json (is the run finished?)")
    path = str(Path(run_dir) / "config.json")
    cfg = apply_overrides(PDPPOLotSizingConfig(), file_overrides(PDPPOLotSizingConfig(), path))
    learners = arm_learners(cfg.learner, load(cfg.instance, cfg.instance_seed))
    trained = harness.train(arms_trainer(learners, cfg.seed_list()), cfg, run_dir, seed_keys(cfg.seed_list()),
                            cfg.num_chunks, show_progress=False)
    if trained.updates_trained:
        raise AssertionError("the run was not finished: restoring it trained further")  # guarded by results.json
    return cfg, learners, trained.state


def diagnose(run_dir: str, episodes: int = 16) -> dict:
    """{arm: {quantity: [per seed]}} plus the run's instance and seeds."""
    cfg, learners, state = restore(run_dir)
    instance = load(cfg.instance, cfg.instance_seed)
    env_params = params_from_instance(instance)
    keys = jax.random.split(jax.random.key(DIAGNOSIS_SEED), episodes)
    report = {"run": str(run_dir), "instance": instance.name, "seeds": cfg.seed_list(), "episodes": episodes}
    for arm, learner in learners.items():
        per_seed = jax.jit(jax.vmap(lambda p, lr=learner: seed_diagnostics(lr, env_params, p, keys,
                                                                           instance.horizon)))
        values = jax.device_get(per_seed(state[arm].train_state.params))
        report[arm] = {k: [float(x) for x in np.asarray(v)] for k, v in values.items()}
    return report


def markdown(report: dict) -> str:
    lines = [f"{report['run']}: {report['instance']}, {report['episodes']} episodes per seed (sampled policy)", ""]
    for arm in ALGORITHMS:
        keys = list(report[arm])
        lines += [f"| {arm} seed | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for i, seed in enumerate(report["seeds"]):
            cells = [f"{report[arm][k][i]:.0f}" if k == "mean_episode_cost" else f"{report[arm][k][i]:.3f}"
                     for k in keys]
            lines.append(f"| {seed} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agents.pdppo.diagnose", description=__doc__.split("\n")[0])
    parser.add_argument("run", help="a finished `jaxalign run pdppo_lot_sizing` work directory")
    parser.add_argument("--episodes", type=int, default=16, help="diagnostic episodes per seed")
    parser.add_argument("--json", help="also write the report as JSON here (refused if the file exists)")
    args = parser.parse_args(argv)
    try:
        if args.episodes < 2:
            raise ValueError(f"--episodes must be at least 2, got {args.episodes}")
        if args.json and Path(args.json).exists():
            raise ValueError(f"{args.json} exists; choose another --json path")
        report = diagnose(args.run, args.episodes)
    except ValueError as e:
        print(f"diagnose: error: {e}", file=sys.stderr)
        return 2
    print(markdown(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
