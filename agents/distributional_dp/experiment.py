"""Agent (a), deep, on the stochastic gridworld: `jaxalign run ddp_gridworld --workdir DIR`.

Three agents train side by side under one jax.vmap (one jitted scan per progress chunk), on the same stock-augmented
gridworld (`rl.envs.gridworld`, initial stocks c_0 drawn uniformly from [c0_low, c0_high] at every reset):

  cvar     the deep DDP agent: stock as input, greedy w.r.t. E min(c_H, 0) (Bauerle-Ott's inner CVaR problem);
  band     the same agent greedy w.r.t. the homeostatic probability P(|c_H| <= w);
  qrdqn    the baseline: the same network and training with the stock masked, greedy w.r.t. the mean (QR-DQN).

Evaluation (CVaR convention: the mean of the lower alpha tail of the return G, alpha = 0.1, `objectives.cvar`):
  - b* is chosen by the LEARNED value at the start: b* = argmax_b b + E min(-b + G, 0) / alpha, the expectation the
    mean over the network's quantiles at (s_0, c_0 = -b), for every integer b with -b in [c0_low, c0_high];
  - `eval_episodes` greedy episodes from c_0 = -b* give the agent's empirical CVaR (`cvar_agent`); the same for
    QR-DQN's mean-greedy policy (`cvar_qrdqn`);
  - `cvar_optimal` is the exact tabular optimum over history-dependent policies on the same gridworld
    (`dp.optimise_cvar` on `mdp.gridworld_mdp`); `cvar_risk_neutral_tabular` the exact CVaR of the tabular
    mean-optimal policy; the `*_exact` fields evaluate the learned greedy policies exactly (tabulated over
    (cell, t, c) and run through `dp.evaluate_policy`), free of sampling noise;
  - each homeostatic target m is served by the one band network started from c_0 = -m: the empirical
    P(|G - m| <= w) over eval_episodes episodes, next to the tabular optimum.

Writes config.json, metrics.jsonl (one line per chunk), checkpoints/ (after every chunk), results.json,
return_distributions.png and learning_curve.png (the three agents' training returns).

Training runs on the RL harness (`rl.harness`, PureJaxRL-style: Lu et al. 2022, "Discovered Policy Optimisation"):
one update steps the three agents (vmapped) once, the harness scans `num_chunks` chunks of updates under jit with
each agent's environment batch split over the devices' data axis.

Resume: re-running the same command continues a killed run. After every chunk the three agents' whole `DeepState`
(online params, optimizer state, target params, replay buffer with its write position and size, environment states,
observations, PRNG keys, iteration counters, agent specs) and the chunk records so far are checkpointed atomically
(`jaxalign.train.checkpoint.PytreeCheckpointer`); a re-run restores the newest chunk, rewrites metrics.jsonl from the
restored records and runs the remaining chunks with the same chunk sizes, so training ends in the bit-identical
state. Everything after training (the tabular DP solutions, b*, the evaluation episodes with their fixed keys) is
recomputed deterministically from the final parameters and the config, not checkpointed. A work directory whose
config.json records a different config (`show_progress` aside) is refused (`jaxalign.rundir.claim`).
"""
from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from agents.distributional_dp import dp
from agents.distributional_dp import objectives as obj
from agents.distributional_dp.deep import (AgentSpec, DeepAgent, DeepDDPConfig, DeepState, StockAugmented,
                                           learned_cvar_sweep, make_agent)
from agents.distributional_dp.distributions import StockGrid
from agents.distributional_dp.mdp import FiniteMDP, gridworld_mdp
from jaxalign import paths
from jaxalign.rundir import RunDir, params_sha256
from rl import harness
from rl.envs.gridworld import DEFAULT_LAYOUT, Gridworld, GridworldParams
from rl.rollout import evaluate_episodes

AGENTS = ("cvar", "band", "qrdqn")


@dataclasses.dataclass(frozen=True)
class DDPGridworldConfig:
    seed: int = 0  # the PRNG key of the run: the three agents' initialisation, exploration, replay, evaluation
    deep: DeepDDPConfig = DeepDDPConfig()
    slip_prob: float = 0.05  # probability that a move from a slippery cell becomes a move down (into the pit)
    pit_cost: int = 1  # reward -pit_cost per step spent in the pit (other non-goal steps: -1)
    horizon: int = 12  # H, steps per episode (time-to-go is observed: part of the MDP)
    alpha: float = 0.1  # the CVaR level in (0, 1]: the mean of the lowest alpha fraction of returns
    c0_low: int = 0  # training range of the initial stock; CVaR levels b = -c_0 are searched over the same range
    c0_high: int = 14  # upper end of that range, inclusive (c_0 drawn uniformly from the integers)
    homeostatic_targets: str = "-5,-7,-10"  # comma-separated integer targets m of the return
    band_width: int = 0  # w: the band agent maximises P(|G - m| <= w) (0: hit m exactly)
    eval_episodes: int = 10_000  # greedy evaluation episodes per agent (the band agent: per homeostatic target)
    num_chunks: int = 10  # jitted scans training is split into; checkpoint, log and ETA after each
    show_progress: bool = True  # progress bar with rate and ETA on the terminal (never part of the result)

    def __post_init__(self):
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"alpha must lie in (0, 1], got {self.alpha!r}")
        if self.c0_high < self.c0_low:
            raise ValueError(f"c0_low={self.c0_low} must not exceed c0_high={self.c0_high}")
        if self.eval_episodes <= 0:
            raise ValueError(f"eval_episodes must be positive, got {self.eval_episodes!r}")
        if self.horizon < 1 or self.band_width < 0:
            raise ValueError(f"horizon must be >= 1 and band_width >= 0; got {self.horizon}, {self.band_width}")
        if not 1 <= self.num_chunks <= self.deep.num_iterations:
            raise ValueError(f"num_chunks must lie in [1, deep.num_iterations={self.deep.num_iterations}], got "
                             f"{self.num_chunks!r}")
        self.targets()

    def targets(self) -> list[int]:
        try:
            targets = [int(t) for t in self.homeostatic_targets.split(",") if t.strip()]
        except ValueError:
            raise ValueError(f"homeostatic_targets must be comma-separated integers, got "
                             f"{self.homeostatic_targets!r}") from None
        if not targets:
            raise ValueError("homeostatic_targets must name at least one target")
        return targets


def empirical_cvar(returns: np.ndarray, alpha: float) -> float:
    """CVaR_alpha of the empirical law of integer returns (the mean of the lowest alpha fraction)."""
    returns = np.rint(np.asarray(returns)).astype(np.int64)
    support = np.arange(returns.min(), returns.max() + 1)
    pmf = np.bincount(returns - returns.min(), minlength=len(support)) / len(returns)
    return float(obj.cvar(alpha)(pmf, support))


def tabulate_policy(act, env: Gridworld, mdp: FiniteMDP, initial_stock: int) -> tuple:
    """A greedy policy at every (cell, t, stock) of the tabular StockGrid from c_0 = initial_stock.

    act: observations [..., D] -> actions [...] (e.g. a jitted agent.greedy_policy with its parameters bound);
    it is called once, on every (t, cell, stock) in the union of the grid's stock ranges."""
    grid = StockGrid.for_mdp(mdp, initial_stock)
    h, s = mdp.horizon, env.num_cells
    lo, hi = min(grid.lo(0), grid.lo(h - 1)), max(grid.hi(0), grid.hi(h - 1))  # the union over t < H
    stocks = np.arange(lo, hi + 1, dtype=np.float32)
    obs = np.concatenate([
        np.broadcast_to(np.eye(s, dtype=np.float32)[None, :, None, :], (h, s, len(stocks), s)),
        np.broadcast_to(((h - np.arange(h)) / h).astype(np.float32)[:, None, None, None], (h, s, len(stocks), 1)),
        np.broadcast_to(stocks[None, None, :, None], (h, s, len(stocks), 1))], axis=-1)
    actions = np.asarray(act(jnp.asarray(obs)), np.int64)  # [H, S, W]
    return tuple(actions[t][:, grid.lo(t) - lo:grid.hi(t) - lo + 1] for t in range(h))


def exact_return_law(act, env, mdp, initial_stock: int):
    """(support of G, pmf of G) of a greedy policy from c_0 = initial_stock, by exact DP evaluation."""
    sol = dp.evaluate_policy(mdp, tabulate_policy(act, env, mdp, initial_stock), initial_stock)
    return sol.grid.final_support - initial_stock, sol.final_stock_pmf(mdp, initial_stock)


def chunk_record(metrics: dict[str, np.ndarray], done_iterations: int, num_envs: int) -> dict:
    """The metrics.jsonl line of one chunk: metrics [agents, iterations of the chunk] -> per-agent means."""
    record = {"env_steps_per_agent": done_iterations * num_envs, "epsilon": float(metrics["epsilon"][0, -1])}
    for i, name in enumerate(AGENTS):
        record[f"loss_{name}"] = float(metrics["loss"][i].mean())
        ret = metrics["episode_return"][i]
        record[f"train_return_{name}"] = float(np.nanmean(ret)) if np.isfinite(ret).any() else None
    return record


def agent_specs(band_width: float) -> AgentSpec:
    """The three agents' specs (AGENTS order), stacked for jax.vmap."""
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), AgentSpec.make("cvar"),
                                  AgentSpec.make("band", band_width=band_width),
                                  AgentSpec.make("mean", use_stock=False))


def ddp_trainer(agent: DeepAgent, specs: AgentSpec) -> harness.Trainer:
    """The agents side by side for the harness: `init` splits the key into one per agent, one update steps every
    agent once (vmapped), one metrics record per chunk. Each agent's environment states and observations are
    [agents, num_envs, ...]: the environment batch is axis 1."""
    config = agent.config
    num_agents = len(jax.tree_util.tree_leaves(specs)[0])

    def init(key):
        return jax.vmap(agent.init)(jax.random.split(key, num_agents), specs)

    def env_axes(state: DeepState) -> DeepState:
        replicated, envs = harness.REPLICATED, harness.env_batch(1)
        return DeepState(train_state=replicated, target_params=replicated, buffer=replicated, env_state=envs,
                         obs=envs, key=replicated, iteration=replicated, spec=replicated)

    def records(metrics: dict[str, np.ndarray], done: int) -> list[dict]:
        # [iterations, agents] -> [agents, iterations], contiguous: the layout chunk_record reduces over.
        per_agent = {k: np.ascontiguousarray(np.swapaxes(v, 0, 1)) for k, v in metrics.items()}
        return [chunk_record(per_agent, done + len(metrics["loss"]), config.num_envs)]

    def postfix(chunk: list[dict]) -> dict:
        return {"loss": f"{chunk[-1]['loss_cvar']:.3f}", "eps": f"{chunk[-1]['epsilon']:.2f}"}

    return harness.Trainer(init=init, update=jax.vmap(agent.update), num_updates=config.num_iterations,
                           env_steps_per_update=config.num_envs * num_agents, env_axes=env_axes, records=records,
                           postfix=postfix)


def run(cfg: DDPGridworldConfig, workdir: str) -> dict:
    """Train (or resume; module docstring), evaluate against the tabular optimum, and write results.json."""
    clock = time.perf_counter()
    grid_env = Gridworld(DEFAULT_LAYOUT)
    gparams = GridworldParams(slip_prob=cfg.slip_prob, pit_cost=cfg.pit_cost, horizon=cfg.horizon)
    env = StockAugmented(grid_env)
    train_params = env.params_for(gparams, cfg.c0_low, cfg.c0_high)
    agent = make_agent(cfg.deep, env, train_params)
    specs = agent_specs(cfg.band_width)
    trained = harness.train(ddp_trainer(agent, specs), cfg, workdir, jax.random.key(cfg.seed), cfg.num_chunks,
                            show_progress=cfg.show_progress, desc=f"ddp gridworld ({len(AGENTS)} agents)")
    state, train_seconds = trained.state, trained.train_seconds
    params = [jax.tree_util.tree_map(lambda x, i=i: x[i], state.train_state.params) for i in range(len(AGENTS))]
    spec = [jax.tree_util.tree_map(lambda x, i=i: x[i], specs) for i in range(len(AGENTS))]

    # The exact tabular side.
    mdp = gridworld_mdp(DEFAULT_LAYOUT, cfg.slip_prob, cfg.pit_cost, cfg.horizon)
    optimum = dp.optimise_cvar(mdp, cfg.alpha)
    neutral = dp.value_iteration(mdp, obj.mean())
    neutral_support = neutral.grid.final_support
    cvar_risk_neutral = float(obj.cvar(cfg.alpha)(neutral.final_stock_pmf(mdp), neutral_support))

    # b* from the learned values at the start.
    start_obs = env.reset(jax.random.key(0), env.params_for(gparams, 0))[0]
    levels = np.arange(-cfg.c0_high, -cfg.c0_low + 1)
    sweep = np.asarray(learned_cvar_sweep(agent, params[0], spec[0], start_obs, jnp.asarray(levels), cfg.alpha))
    b_star = int(levels[int(np.argmax(sweep))])

    eval_key = jax.random.key(cfg.seed + 1_000_003)

    run_eval = jax.jit(lambda p, s, env_params, k: evaluate_episodes(
        env, env_params, agent.greedy_policy, (p, s), k, cfg.eval_episodes, cfg.horizon)["return"])

    def episodes(i, c0, key):
        return np.asarray(jax.device_get(run_eval(params[i], spec[i], env.params_for(gparams, c0), key)))

    k_cvar, k_qr, k_band = jax.random.split(eval_key, 3)
    returns_cvar = episodes(0, -b_star, k_cvar)
    returns_qr = episodes(2, 0, k_qr)
    cvar_agent = empirical_cvar(returns_cvar, cfg.alpha)
    cvar_qrdqn = empirical_cvar(returns_qr, cfg.alpha)
    act_jit = jax.jit(lambda p, s, o: agent.greedy_policy((p, s), o, None)[0])
    acts = [lambda o, i=i: act_jit(params[i], spec[i], o) for i in range(len(AGENTS))]
    law_cvar = exact_return_law(acts[0], grid_env, mdp, -b_star)
    law_qr = exact_return_law(acts[2], grid_env, mdp, 0)

    homeostatic = {}
    band_returns = {}
    for m, key in zip(cfg.targets(), jax.random.split(k_band, len(cfg.targets()))):
        returns = episodes(1, -m, key)
        band_returns[m] = returns
        objective = obj.homeostatic_probability(m, cfg.band_width)
        support, pmf = exact_return_law(acts[1], grid_env, mdp, -m)
        homeostatic[str(m)] = {
            "initial_stock": -m,
            "probability_agent": float(np.mean(np.abs(returns - m) <= cfg.band_width)),
            "probability_agent_exact": float(objective(pmf, support)),
            "probability_optimal": dp.value_iteration(mdp, objective).value(mdp, objective),
            "mean_return": float(returns.mean()),
        }

    gap = (optimum.value - cvar_agent) / abs(optimum.value) if optimum.value != 0 else float("nan")
    env_steps = cfg.deep.num_iterations * cfg.deep.num_envs
    results = {
        "cvar_agent": cvar_agent,
        "cvar_optimal": float(optimum.value),
        "cvar_qrdqn": cvar_qrdqn,
        "cvar_alpha": cfg.alpha,
        "cvar_convention": "CVaR_alpha(G) = mean of the lower alpha tail of the return G (alpha = 0.1)",
        "relative_gap_to_optimal": gap,
        "within_5_percent": bool(gap <= 0.05),
        "above_qrdqn": bool(cvar_agent > cvar_qrdqn),
        "cvar_agent_exact": float(obj.cvar(cfg.alpha)(law_cvar[1], law_cvar[0])),
        "cvar_qrdqn_exact": float(obj.cvar(cfg.alpha)(law_qr[1], law_qr[0])),
        "cvar_risk_neutral_tabular": cvar_risk_neutral,
        "mean_return_agent": float(returns_cvar.mean()),
        "mean_return_qrdqn": float(returns_qr.mean()),
        "b_star": b_star,
        "b_star_choice": "learned: argmax over b of the network's b + E min(-b + G, 0) / alpha at the start",
        "b_star_tabular": int(optimum.b_star),
        "learned_sweep": {str(int(b)): float(v) for b, v in zip(levels, sweep)},
        "homeostatic": homeostatic,
        "homeostatic_band_width": cfg.band_width,
        "eval_episodes": cfg.eval_episodes,
        "env_steps": env_steps * len(AGENTS),
        "env_steps_per_agent": env_steps,
        "train_seconds": train_seconds,
        "wall_seconds": time.perf_counter() - clock,
        "seed": cfg.seed,
        "params_sha256": params_sha256(state.train_state.params),
        "target_params_sha256": params_sha256(state.target_params),
        "device": str(jax.devices()[0]),
        "config": dataclasses.asdict(cfg),
    }
    harness.write_results(workdir, results)
    harness.plot_learning_curve(workdir, trained.history, "env_steps_per_agent",
                                {name: f"train_return_{name}" for name in AGENTS},
                                title="training returns per chunk (epsilon-greedy)",
                                xlabel="environment steps per agent", ylabel="mean episode return")
    panels = {f"deep DDP, CVaR (b*={b_star})": (returns_cvar, cvar_agent),
              "QR-DQN (mean-greedy)": (returns_qr, cvar_qrdqn)}
    _plot(panels, (optimum.return_support, optimum.return_pmf, optimum.value), band_returns, homeostatic, cfg,
          RunDir(workdir).file("return_distributions.png"))
    results["wall_seconds"] = time.perf_counter() - clock
    harness.write_results(workdir, results)
    return results


def _plot(panels, optimum, band_returns, homeostatic, cfg, path):
    """Row 1: return distributions of the CVaR agent, QR-DQN and the tabular CVaR optimum; row 2: the one band
    network's return distribution per homeostatic target (initial stock -m)."""
    from matplotlib.figure import Figure

    targets = list(band_returns)
    cols = max(3, len(targets))
    fig = Figure(figsize=(3.6 * cols, 6.0), layout="constrained")
    axes = fig.subplots(2, cols, squeeze=False)

    def hist(ax, returns):
        values, counts = np.unique(np.rint(returns).astype(int), return_counts=True)
        ax.bar(values, counts / len(returns), width=0.8)

    for ax, (label, (returns, cvar)) in zip(axes[0], panels.items()):
        hist(ax, returns)
        ax.set_title(f"{label}\nempirical CVaR_{cfg.alpha} = {cvar:.2f}", fontsize=9)
    support, pmf, value = optimum
    keep = pmf > 0
    axes[0][2].bar(support[keep], pmf[keep], width=0.8, color="tab:green")
    axes[0][2].set_title(f"tabular CVaR_{cfg.alpha} optimum (exact)\nCVaR = {value:.2f}", fontsize=9)
    for ax, m in zip(axes[1], targets):
        hist(ax, band_returns[m])
        ax.axvspan(m - cfg.band_width - 0.5, m + cfg.band_width + 0.5, color="tab:orange", alpha=0.25)
        h = homeostatic[str(m)]
        event = f"G = {m}" if cfg.band_width == 0 else f"|G - ({m})| <= {cfg.band_width}"
        ax.set_title(f"one band network, target {m} (c_0 = {-m})\nP({event}) = "
                     f"{h['probability_agent']:.3f} (optimum {h['probability_optimal']:.3f})", fontsize=9)
    every = np.concatenate([np.ravel(r) for r, _ in panels.values()] + [np.ravel(r) for r in band_returns.values()]
                           + [support[keep]] + [np.asarray(targets, float)])
    for row in axes:
        for ax in row:
            ax.set_xlabel("return G")
            ax.set_ylabel("probability")
            ax.set_xlim(every.min() - 1, every.max() + 1)
            ax.set_ylim(0, 1.05)
    for ax in list(axes[0][3:]) + list(axes[1][len(targets):]):
        ax.set_visible(False)
    fig.suptitle(f"stochastic gridworld (slip {cfg.slip_prob}, H = {cfg.horizon}): {cfg.eval_episodes} episodes each")
    paths.save_figure(fig, path, dpi=100)
