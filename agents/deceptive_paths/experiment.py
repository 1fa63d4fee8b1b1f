"""Agent (c): `jaxalign run deceptive_paths --workdir DIR [bonus=exaggeration|ambiguity] [key=value ...]`.

Fatemi, Suttle and Sadler, AAMAS 2024. Trains the GraphSAGE policy with PPO (`learner`) on the 8x8 and 16x16 train
maps only (padded together to 16x16; every reset draws a map and T_max ~ U[d(s,g), d(s,D) + d(D,g)]), on the RL
harness (`rl.harness`: `num_chunks` jitted chunks, each checkpointed; re-running the same command resumes from the
newest chunk and ends in the bit-identical state). Then, from the final parameters (recomputed deterministically,
not checkpointed), with the same observer and metrics for the greedy policy, the honest path and Masters and
Sardina's pi_d4 (`evaluation.compare_methods`):

  tables        every map set at `eval_budget_fraction`: the train maps (seen), test_8x8 / test_16x16 (unseen maps of
                the train sizes) and unseen_24x24 / unseen_32x32 (unseen and larger: zero-shot);
  tunability    the test maps at each of `budget_fractions` (T_max from d(s,g) at 0 to d(s,D) + d(D,g) at 1);
  adaptation    the test and unseen maps with the decoy moved after `decoy_move_step` moves, every path measured
                against the NEW decoy: the policy that sees the move, the same policy run without the move (it
                cannot adapt), pi_d4 planned for the old decoy, honest; over the whole path and after the move;
  throughput    environment steps per second of `throughput_envs` vmapped environments acting with the policy,
                one number per map size (each set at its own padded size; timings, noisy on a shared machine).

Writes config.json, metrics.jsonl (one record per update), checkpoints/, policy/ (for `jaxalign deceptive-paths
plan`), results.json, learning_curve.png and paths.png (paths on a train and an unseen map with the observer's
posterior of the true goal along each path).
"""
from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np

from agents.deceptive_paths import baselines, evaluation, maps
from agents.deceptive_paths.env import BONUSES, DeceptivePathEnv, EnvParams, make_params
from agents.deceptive_paths.learner import CurriculumConfig, make_learner
from agents.deceptive_paths.metrics import OBSERVERS
from agents.deceptive_paths.planning import save_policy
from agents.deceptive_paths.plots import paths_figure
from jaxalign.rundir import RunDir, params_sha256
from rl import harness
from rl.ppo import PPOConfig

TRAIN_SETS = ("train_8x8", "train_16x16")
TEST_SETS = ("test_8x8", "test_16x16")
UNSEEN_SETS = ("unseen_24x24", "unseen_32x32")
SIZE_SETS = {"8": "train_8x8", "16": "train_16x16", "24": "unseen_24x24", "32": "unseen_32x32"}
EVAL_SHAPE = (32, 32)  # every evaluation map padded alike: one compilation of the evaluation episodes
DEFAULT_PPO = PPOConfig(num_envs=64, num_steps=64, total_timesteps=64 * 64 * 120, update_epochs=4,
                        num_minibatches=4, learning_rate=1e-4, anneal_lr=False, ent_coef=0.01, activation="relu",
                        hidden_size=64, num_layers=2)


@dataclasses.dataclass(frozen=True)
class DeceptivePathsConfig:
    seed: int = 0  # network initialisation, map and T_max draws, actions, minibatch order; sampled eval paths
    # deception bonus (Fatemi et al. 2024): exaggeration (value-difference observer), ambiguity or none
    bonus: str = "exaggeration"
    # cost per move in the exaggeration observer's goal values V_g: 0.05 as in the authors' code; 0 is the paper's
    # V_g = 0.99^d, whose nearly uniform posterior made the bonus too small to reproduce the claims (README)
    value_step_cost: float = float(EnvParams.value_step_cost)  # the environment's default, 0.05
    ego_radius: int = 2  # radius k of the observed ego-graph: the cells within k moves (2k^2 + 2k + 1 slots)
    ppo: PPOConfig = DEFAULT_PPO
    curriculum: CurriculumConfig = CurriculumConfig()
    num_chunks: int = 4  # jitted chunks the PPO updates are split into, each checkpointed (<= ppo.num_updates)
    eval_maps: int = 0  # maps per set in the evaluation (0: all)
    # f of the tables and the moved-decoy test: T_max = d(s,g) + round(f (d(s,D) + d(D,g) - d(s,g))), in [0, 1]
    eval_budget_fraction: float = 1.0
    budget_fractions: str = "0,0.25,0.5,0.75,1"  # comma-separated f (>= 2, in [0, 1]) of the test maps' budget curve
    decoy_move_step: int = 3  # moves after which the decoy jumps to the map's moved decoy (adaptation test, >= 1)
    # the evaluation's goal recognition: cost_difference (Masters and Sardina 2017) or value (value-difference)
    observer: str = "cost_difference"
    greedy: bool = True  # evaluation paths take the most probable move; false: sampled (from seed)
    throughput_envs: int = 256  # vmapped environments acting with the policy in the throughput measurement
    throughput_steps: int = 64  # steps of one timed scan of the throughput measurement (best of 2 timings)
    throughput_sizes: str = "8,16,24,32"  # map sizes (square) whose throughput is measured; "" for none
    show_progress: bool = True  # a progress bar with rate and ETA

    def __post_init__(self):
        if self.bonus not in BONUSES:
            raise ValueError(f"bonus must be one of {BONUSES}, got {self.bonus!r}")
        if self.observer not in OBSERVERS:
            raise ValueError(f"observer must be one of {OBSERVERS}, got {self.observer!r}")
        if not 1 <= self.num_chunks <= self.ppo.num_updates:
            raise ValueError(f"num_chunks must lie in [1, ppo.num_updates={self.ppo.num_updates}], got "
                             f"{self.num_chunks!r}")
        if self.value_step_cost < 0:
            raise ValueError(f"value_step_cost must be >= 0, got {self.value_step_cost!r}")
        if self.eval_maps < 0 or self.decoy_move_step < 1 or self.ego_radius < 1:
            raise ValueError(f"eval_maps must be >= 0, decoy_move_step and ego_radius >= 1; got {self.eval_maps}, "
                             f"{self.decoy_move_step}, {self.ego_radius}")
        if self.throughput_envs < 1 or self.throughput_steps < 1:
            raise ValueError("throughput_envs and throughput_steps must be positive")
        if not 0.0 <= self.eval_budget_fraction <= 1.0:
            raise ValueError(f"eval_budget_fraction must lie in [0, 1], got {self.eval_budget_fraction!r}")
        self.fractions()
        self.sizes()

    def sizes(self) -> list[int]:
        sizes = [s.strip() for s in self.throughput_sizes.split(",") if s.strip()]
        if any(s not in SIZE_SETS for s in sizes):
            raise ValueError(f"throughput_sizes must be comma-separated sizes among {sorted(SIZE_SETS)}, got "
                             f"{self.throughput_sizes!r}")
        return [int(s) for s in sizes]

    def fractions(self) -> list[float]:
        try:
            values = [float(f) for f in self.budget_fractions.split(",") if f.strip()]
        except ValueError:
            raise ValueError(f"budget_fractions must be comma-separated numbers, got "
                             f"{self.budget_fractions!r}") from None
        if len(values) < 2 or not all(0.0 <= f <= 1.0 for f in values):
            raise ValueError(f"budget_fractions needs >= 2 fractions in [0, 1], got {self.budget_fractions!r}")
        return values


def map_sets(cfg: DeceptivePathsConfig) -> dict[str, list[maps.GridMap]]:
    names = TRAIN_SETS + TEST_SETS + UNSEEN_SETS
    return {name: maps.load_map_set(name)[:cfg.eval_maps or None] for name in names}


class Evaluator:
    """The trained policy on every evaluation map at once (one padded set), split back per map set."""

    def __init__(self, cfg, network, params, env, sets: dict[str, list]):
        self.cfg, self.network, self.params, self.env, self.sets = cfg, network, params, env, sets
        self.grids = [g for grids in sets.values() for g in grids]
        self.env_params = evaluation.eval_params(self.grids, EVAL_SHAPE)
        self.max_steps = max(evaluation.budget(g, 1.0) for g in self.grids)

    def paths(self, fraction: float, decoy_move_step: int = -1) -> dict[str, list]:
        cells = evaluation.policy_paths(self.network, self.params, self.env, self.grids, self.env_params, fraction,
                                        decoy_move_step, self.cfg.greedy, self.cfg.seed, self.max_steps)
        out, start = {}, 0
        for name, grids in self.sets.items():
            out[name] = cells[start:start + len(grids)]
            start += len(grids)
        return out


def adaptation(cfg, sets, moved_paths, still_paths) -> dict:
    """Every path measured against the moved decoy (module docstring), per method, whole path and after the move."""
    names = TEST_SETS + UNSEEN_SETS
    grids = [g for n in names for g in sets[n]]
    adapting = [p for n in names for p in moved_paths[n]]
    stale = [p for n in names for p in still_paths[n]]
    f = cfg.eval_budget_fraction
    table = evaluation.compare_methods(grids, adapting, f, cfg.observer, moved_decoy=True)
    table["policy_without_move"] = evaluation.compare_methods(grids, stale, f, cfg.observer, moved_decoy=True)["policy"]
    methods = {"policy": adapting, "policy_without_move": stale,
               "honest": [baselines.honest_path(g) for g in grids],
               "pi_d4": [baselines.pi_d4(g) for g in grids]}
    for name, paths in methods.items():
        after = [evaluation.deceptive_fraction_after(g, p, cfg.decoy_move_step, cfg.observer,
                                                     maps.choose_moved_decoy(g)) for g, p in zip(grids, paths)]
        after = [a for a in after if a is not None]
        table[name]["deceptive_fraction_after_move"] = float(np.mean(after)) if after else None
    return {"decoy_move_step": cfg.decoy_move_step, "sets": list(names), "budget_fraction": f, "methods": table}


def run(cfg: DeceptivePathsConfig, workdir: str) -> dict:
    """Train (or resume), evaluate, and write results.json and the figures (module docstring)."""
    clock = time.perf_counter()
    env = DeceptivePathEnv(cfg.ego_radius, cfg.bonus)
    train_params = make_params([g for name in TRAIN_SETS for g in maps.load_map_set(name)],
                               value_step_cost=cfg.value_step_cost)
    learner = make_learner(cfg.ppo, env, train_params, cfg.curriculum)
    trained = harness.train(learner.trainer, cfg, workdir, jax.random.key(cfg.seed), cfg.num_chunks,
                            show_progress=cfg.show_progress, desc=f"deceptive paths ({cfg.bonus})")
    params = trained.state.train_state.params
    if jax.process_index() == 0:
        save_policy(workdir, learner.network, params, cfg.bonus)

    sets = map_sets(cfg)
    evaluator = Evaluator(cfg, learner.network, params, env, sets)
    f = cfg.eval_budget_fraction
    main_paths = evaluator.paths(f)
    tables = {name: evaluation.compare_methods(grids, main_paths[name], f, cfg.observer)
              for name, grids in sets.items()}

    test_grids = [g for n in TEST_SETS for g in sets[n]]
    curve = []
    for fraction in cfg.fractions():
        paths = evaluator.paths(fraction)
        row = evaluation.compare_methods(test_grids, [p for n in TEST_SETS for p in paths[n]], fraction,
                                         cfg.observer)
        curve.append({"budget_fraction": fraction, **row})
    moved = adaptation(cfg, sets, evaluator.paths(f, cfg.decoy_move_step), main_paths)

    throughput = {}
    for size in cfg.sizes():
        grids = sets[SIZE_SETS[str(size)]]
        throughput[f"{size}x{size}"] = evaluation.policy_steps_per_second(
            learner.network, params, env, evaluation.eval_params(grids), cfg.throughput_envs, cfg.throughput_steps,
            cfg.seed)

    history = trained.history
    last = history[-min(len(history), 10):]
    reach = [r["goal_reach_rate"] for r in last if r.get("goal_reach_rate") is not None]
    results = {
        "tables": tables,
        "tables_budget_fraction": f,
        "tunability": curve,
        "adaptation": moved,
        "throughput": throughput,
        "observer": cfg.observer,
        "policy_actions": "greedy" if cfg.greedy else "sampled",
        "final_train_goal_reach_rate": float(np.mean(reach)) if reach else None,
        "final_curriculum_coefficient": float(np.asarray(trained.state.reach_rate)),
        "env_steps": cfg.ppo.num_updates * cfg.ppo.batch_size,
        "train_seconds": trained.train_seconds,
        "wall_seconds": time.perf_counter() - clock,
        "seed": cfg.seed,
        "params_sha256": params_sha256(params),
        "device": str(jax.devices()[0]),
        "config": dataclasses.asdict(cfg),
    }
    harness.write_results(workdir, results)
    harness.plot_learning_curve(workdir, history, "env_steps", {"episode return": "episode_return",
                                                                "goal-reach rate": "goal_reach_rate",
                                                                "curriculum coefficient": "deceptiveness"},
                                title=f"PPO + GraphSAGE, {cfg.bonus} bonus", xlabel="environment steps",
                                ylabel="per update")
    if jax.process_index() == 0:
        rows = []
        for name in (TRAIN_SETS[-1], UNSEEN_SETS[-1]):
            grid, budget = sets[name][0], evaluation.budget(sets[name][0], f)
            paths = {"policy": main_paths[name][0], "honest": baselines.honest_path(grid),
                     "pi_d4": baselines.pi_d4(grid)}
            rows.append((f"{name} map 0, T_max = {budget}", grid, paths, budget))
        paths_figure(rows, RunDir(workdir).file("paths.png"))
    results["wall_seconds"] = time.perf_counter() - clock
    harness.write_results(workdir, results)
    return results
