"""Agent (b): PPO against PDPPO on a lot-sizing instance, a fair, paired comparison:
`jaxalign run pdppo_lot_sizing --workdir DIR [instance=20i10m] [seeds=0,1,2,3,4] [learner.total_timesteps=N]`.

For every training seed s both arms start from jax.random.key(s): the same actor, the same V(s), the same
environment keys (`learners.make_learner`), and both get the same budget and the one learner config printed in
results.json ("learner"; its `algorithm` is set per arm). They train side by side on the RL harness
(`rl.harness`): one harness update runs one update of every (arm, seed) (vmapped over seeds), the harness scans
`num_chunks` chunks of them under jit and checkpoints the whole state after each chunk, so a killed run re-run
with the same command ends in the bit-identical state. Evaluation is recomputed from the final parameters.

Evaluation: `eval_episodes` episodes on held-out demand (keys split from jax.random.key(eval_seed), never used in
training), the same keys for every policy (common random numbers: a period's demand does not depend on the
policy). For each arm, each seed's mean cost per episode (the policy samples its actions, as it was trained; the
greedy policy's costs are reported too); the arm's mean over seeds with a 95 % Student-t interval over seeds. The
base-stock rule (`heuristic.py`) on the same episodes, with a 95 % interval over episodes. Per arm, "diagnosis"
holds `critics.diagnosis` per seed (which critic PDPPO trained, the critics' errors, idle fractions; README). The
verdict "holds" (PDPPO cheaper) needs the two arms' intervals to separate; the paired per-seed difference PPO -
PDPPO and its interval are reported beside it.

`instance`: a named configuration (15i5m, 20i10m, 25i10m, 25i15m, 30i10m, 30i15m; generated with
`instance_seed`), `tiny` (`exact.tiny_instance` with a 100-period horizon; the exact optimum by backward
induction is added, and each arm's relative gap to it), or a path to an instance JSON file
(`instances.save_instance`).

Writes config.json, checkpoints/, metrics.jsonl (one record per update: each seed's training episode cost per
arm, the arms' mean losses), results.json and learning_curves.png (both arms, mean and min-max band over seeds).
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from agents.pdppo import critics, exact, heuristic
from agents.pdppo.env import episode_cost, params_from_instance
from agents.pdppo.instances import CONFIGS, Instance, generate, load_instance
from agents.pdppo.learners import ALGORITHMS, Learner, LearnerConfig, RunnerState, make_learner
from jaxalign import paths
from jaxalign.rundir import RunDir, params_sha256
from rl import harness

TINY = "tiny"
TINY_HORIZON = 100  # the paper's horizon, so the default learner config (whole episodes of 100) fits
LOGGED = ("loss", "value_loss", "entropy", "approx_kl", "clip_fraction")


@dataclasses.dataclass(frozen=True)
class PDPPOLotSizingConfig:
    instance: str = "20i10m"  # a named configuration, "tiny", or a path to an instance .json file
    instance_seed: int = 0  # seed of the instance generator for a named configuration
    seeds: str = "0,1,2,3,4"  # training seeds, comma-separated: one PPO and one PDPPO run each
    learner: LearnerConfig = LearnerConfig()
    eval_episodes: int = 100  # held-out demand episodes every policy is evaluated on (the same for all)
    eval_seed: int = 1_000_003  # key of the held-out demand (never used in training)
    num_chunks: int = 10  # checkpoints during training, evenly spaced
    show_progress: bool = True  # a progress bar with rate and ETA

    def __post_init__(self):
        if self.learner.algorithm != LearnerConfig.algorithm:
            raise ValueError(f"learner.algorithm={self.learner.algorithm!r}: both arms ({', '.join(ALGORITHMS)}) run "
                             "in this experiment with one shared config; leave learner.algorithm unset")
        self.seed_list()
        instance = load(self.instance, self.instance_seed)
        if self.learner.num_steps % instance.horizon:
            raise ValueError(f"learner.num_steps={self.learner.num_steps} must be a multiple of the instance's "
                             f"horizon ({instance.horizon}) so that rollouts are whole episodes")
        if self.eval_episodes < 2:
            raise ValueError(f"eval_episodes must be at least 2, got {self.eval_episodes!r}")
        if not 1 <= self.num_chunks <= self.learner.num_updates:
            raise ValueError(f"num_chunks must lie in [1, learner.num_updates={self.learner.num_updates}], got "
                             f"{self.num_chunks!r}")

    def seed_list(self) -> list[int]:
        try:
            seeds = [int(s) for s in self.seeds.split(",")]
        except ValueError:
            raise ValueError(f"seeds={self.seeds!r}: expected comma-separated non-negative integers, e.g. "
                             "seeds=0,1,2,3,4") from None
        if len(seeds) < 2 or len(set(seeds)) != len(seeds) or min(seeds) < 0:
            raise ValueError(f"seeds={self.seeds!r}: expected at least two distinct non-negative integers (an "
                             "interval over seeds needs two)")
        return seeds


def load(name: str, instance_seed: int) -> Instance:
    """The instance a config names (module doc); a bad name or file is one ValueError."""
    if name == TINY:
        return exact.tiny_instance(horizon=TINY_HORIZON)
    if name in CONFIGS:
        return generate(name, instance_seed)
    if name.endswith(".json"):
        return load_instance(name)
    raise ValueError(f"instance={name!r}: expected one of {', '.join(CONFIGS)}, {TINY!r} or a path to an instance "
                     ".json file")


def arm_learners(learner: LearnerConfig, instance: Instance) -> dict[str, Learner]:
    return {arm: make_learner(dataclasses.replace(learner, algorithm=arm), instance) for arm in ALGORITHMS}


def arms_trainer(learners: dict[str, Learner], seeds: Sequence[int]) -> harness.Trainer:
    """Every (arm, seed) for the harness: state {arm: RunnerState vmapped over seeds}. `init` takes one key per
    seed (`seed_keys`), the same in both arms, so a seed's run does not depend on which other seeds run beside it.
    """
    config = next(iter(learners.values())).config

    def init(keys):
        # A loop over seeds, not a vmap: vmapped (batched) orthogonal initialisations of equal shapes in one jitted
        # program hung XLA's CPU runtime on this machine (jax 0.10); unbatched ones do not.
        return {arm: jax.lax.map(learner.init, keys) for arm, learner in learners.items()}

    def update(state):
        new, metrics = {}, {}
        for arm, learner in learners.items():
            new[arm], m = jax.vmap(learner.update)(state[arm])
            metrics.update({f"{arm}_{k}": v for k, v in m.items() if k in LOGGED + ("episode_cost",)})
        return new, metrics

    def env_axes(state):
        envs = harness.env_batch(1)  # [seeds, envs, ...]
        return {arm: RunnerState(train_state=harness.REPLICATED, env_state=envs, obs=envs, key=harness.REPLICATED,
                                 update_step=harness.REPLICATED) for arm in state}

    def records(metrics: dict[str, np.ndarray], done: int) -> list[dict]:
        out = []
        for j in range(len(metrics[f"{ALGORITHMS[0]}_loss"])):
            record = {"update": done + j + 1, "env_steps_per_run": (done + j + 1) * config.batch_size}
            for arm in learners:
                record[f"{arm}_episode_cost"] = [float(x) for x in metrics[f"{arm}_episode_cost"][j]]
                record.update({f"{arm}_{k}": float(np.mean(metrics[f"{arm}_{k}"][j])) for k in LOGGED})
            out.append(record)
        return out

    def postfix(chunk: list[dict]) -> dict:
        return {arm: f"{np.mean(chunk[-1][f'{arm}_episode_cost']):.1f}" for arm in learners}

    return harness.Trainer(init=init, update=update, num_updates=config.num_updates,
                           env_steps_per_update=config.batch_size * len(seeds) * len(learners), env_axes=env_axes,
                           records=records, postfix=postfix)


def seed_keys(seeds: Sequence[int]) -> jax.Array:
    """jax.random.key(s) for every seed s, stacked: the harness's init key. (An argument of the jitted init rather
    than a constant inside it, which XLA would try to fold at compile time.)"""
    return jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))


def policy_costs(instance: Instance, policy_of, params, keys: jax.Array) -> np.ndarray:
    """float64 [seeds, episodes]: episode costs of `policy_of(seed's params)` on every key (vmapped twice)."""
    env_params = params_from_instance(instance)

    def one(p, key):
        return episode_cost(env_params, policy_of(p), key, instance.horizon)

    run = jax.jit(jax.vmap(lambda p: jax.vmap(lambda k: one(p, k))(keys)))
    return np.asarray(jax.device_get(run(params)), np.float64)


# The 0.975 quantile of Student's t for 1..30 degrees of freedom (standard tables). scipy is not imported here:
# once it is loaded, XLA's CPU linear algebra (the networks' orthogonal initialisation) can use its LAPACK, and a
# vmapped initialisation then hung on this machine.
T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788, 2.1604,
        2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555,
        2.0518, 2.0484, 2.0452, 2.0423)
Z975 = 1.959963984540054


def t975(df: int) -> float:
    """Student-t 0.975 quantile: the table, then the Cornish-Fisher expansion in 1/df (Abramowitz and Stegun
    26.7.5; error < 1e-4 beyond 30 degrees of freedom)."""
    if df < 1:
        raise ValueError(f"t975 needs at least one degree of freedom, got {df}")
    if df <= len(T975):
        return T975[df - 1]
    z = Z975
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def over_seeds(per_seed: np.ndarray) -> dict:
    """Mean over seeds with a 95 % Student-t interval (n - 1 degrees of freedom)."""
    per_seed = np.asarray(per_seed, np.float64)
    n = per_seed.size
    mean = float(per_seed.mean())
    half = float(t975(n - 1) * per_seed.std(ddof=1) / math.sqrt(n))
    return {"mean_cost": mean, "ci95_low": mean - half, "ci95_high": mean + half,
            "per_seed": [float(x) for x in per_seed]}


def verdict(ppo: dict, pdppo: dict) -> str:
    """"holds" when PDPPO's interval lies wholly below PPO's (PDPPO cheaper beyond the spread over seeds)."""
    return "holds" if pdppo["ci95_high"] < ppo["ci95_low"] else "does not hold"


def relative_gap(cost: float, optimum: float) -> float:
    return (cost - optimum) / abs(optimum)


def evaluate(cfg: PDPPOLotSizingConfig, instance: Instance, learners: dict[str, Learner], state) -> dict:
    """The evaluation part of results.json (module doc)."""
    keys = jax.random.split(jax.random.key(cfg.eval_seed), cfg.eval_episodes)
    out = {}
    for arm, learner in learners.items():
        params = state[arm].train_state.params
        sampled = policy_costs(instance, lambda p, lr=learner: lr.env_policy(p, greedy=False), params, keys)
        greedy = policy_costs(instance, lambda p, lr=learner: lr.env_policy(p, greedy=True), params, keys)
        out[arm] = {**over_seeds(sampled.mean(axis=1)), "greedy": over_seeds(greedy.mean(axis=1)),
                    "diagnosis": critics.diagnosis(learner, instance, params)}
    levels = heuristic.base_stock_levels(instance)
    base = policy_costs(instance, lambda _: heuristic.base_stock_policy(levels), jnp.zeros(1), keys)[0]
    out["heuristic"] = {**heuristic.summarise(base), "rule": "base stock", "levels": [int(x) for x in levels]}
    ppo, pdppo = out["ppo"], out["pdppo"]
    out["ratio_ppo_over_pdppo"] = ppo["mean_cost"] / pdppo["mean_cost"]
    difference = np.asarray(ppo["per_seed"]) - np.asarray(pdppo["per_seed"])
    out["paired_difference_ppo_minus_pdppo"] = {k.replace("_cost", ""): v for k, v in over_seeds(difference).items()}
    out["verdict"] = verdict(ppo, pdppo)
    if cfg.instance == TINY:
        model = exact.tabular_model(instance)
        solution = exact.value_iteration(model)
        start = exact.state_index(instance, instance.initial_inventory, instance.initial_setup)
        optimum = float(solution.values[0, start])
        dp_costs = policy_costs(instance, lambda _: exact.jax_policy(instance, solution), jnp.zeros(1), keys)[0]
        out["optimum"] = {"expected_cost": optimum, "episodes_mean_cost": float(dp_costs.mean())}
        out["gap_to_optimum"] = {arm: {"mean": relative_gap(out[arm]["mean_cost"], optimum),
                                       "per_seed": [relative_gap(c, optimum) for c in out[arm]["per_seed"]]}
                                 for arm in learners}
    return out


def plot_learning_curves(path: str, history: list[dict], evaluation: dict, title: str) -> None:
    """Training episode cost per update: each arm's mean over seeds and its min-max band; the base-stock rule's
    (and, on the tiny instance, the optimum's) evaluation cost as lines."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 3.8), layout="tight")
    ax = fig.subplots()
    x = np.array([r["env_steps_per_run"] for r in history])
    for arm, color in zip(ALGORITHMS, ("tab:blue", "tab:red")):
        costs = np.array([r[f"{arm}_episode_cost"] for r in history], dtype=np.float64)  # [updates, seeds]
        ax.plot(x, costs.mean(axis=1), color=color, label=f"{arm.upper()} (mean over {costs.shape[1]} seeds)")
        ax.fill_between(x, costs.min(axis=1), costs.max(axis=1), color=color, alpha=0.2)
    ax.axhline(evaluation["heuristic"]["mean_cost"], color="tab:gray", linestyle="--", label="base-stock rule")
    if "optimum" in evaluation:
        ax.axhline(evaluation["optimum"]["expected_cost"], color="tab:green", linestyle=":", label="exact optimum")
    ax.set(xlabel="environment steps per run", ylabel="cost per episode (training)", title=title)
    ax.legend(fontsize=8)
    paths.save_figure(fig, path, dpi=110)


def run(cfg: PDPPOLotSizingConfig, workdir: str) -> dict:
    """Train both arms for every seed (or resume), evaluate, write results.json and learning_curves.png."""
    clock = time.perf_counter()
    instance = load(cfg.instance, cfg.instance_seed)
    seeds = cfg.seed_list()
    learners = arm_learners(cfg.learner, instance)
    trained = harness.train(arms_trainer(learners, seeds), cfg, workdir, seed_keys(seeds), cfg.num_chunks,
                            show_progress=cfg.show_progress, desc=f"pdppo vs ppo on {instance.name}")
    evaluation = evaluate(cfg, instance, learners, trained.state)
    runs = len(seeds) * len(learners)
    steps_here = trained.updates_trained * cfg.learner.batch_size * runs
    shared = dataclasses.asdict(cfg.learner)
    shared.pop("algorithm")
    results = {
        "instance": instance.name, "n_items": instance.n_items, "n_machines": instance.n_machines,
        "seeds": seeds, "eval_episodes": cfg.eval_episodes,
        **evaluation,
        "env_steps": cfg.learner.num_updates * cfg.learner.batch_size * runs,
        "env_steps_per_run": cfg.learner.num_updates * cfg.learner.batch_size,
        "env_steps_per_second": steps_here / trained.train_seconds if steps_here else None,
        "train_seconds": trained.train_seconds,
        "wall_seconds": time.perf_counter() - clock,
        "params_sha256": {arm: params_sha256(trained.state[arm].train_state.params) for arm in learners},
        "device": str(jax.devices()[0]),
        "learner": shared,
        "config": dataclasses.asdict(cfg),
    }
    plot_learning_curves(RunDir(workdir).file("learning_curves.png"), trained.history, evaluation,
                         f"{instance.name}: PPO vs PDPPO, {len(seeds)} seeds")
    results["wall_seconds"] = time.perf_counter() - clock
    harness.write_results(workdir, results)
    return results
