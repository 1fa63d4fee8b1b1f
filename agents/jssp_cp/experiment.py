"""Agent (d): `jaxalign run jssp_cp --workdir DIR`: imitation of CP-SAT, then PPO on the makespan, then evaluation.

Tassel, Gebser and Schekotihin, ICAPS 2023. Phases:

1. Imitation (agents/jssp_cp/imitation.py): `imitation_instances` generated instances of every training size
   (never a benchmark), solved by CP-SAT (one worker, `cpsat_time_limit` seconds each), replayed into expert
   decisions, and the network cloned on them; then `improvement_rounds` rounds in which CP-SAT improves the
   policy's own sampled schedules on `round_instances` fresh instances per size and the policy is cloned again on
   all the decisions so far (`imitation.improvement_round`). Its output (the expert statistics, per round too, and
   the cloned parameters) is cached under DIR/imitation/ once the phase ends, so a resumed run does not redo it (a
   run killed during the phase redoes the phase).
2. PPO (agents/jssp_cp/ppo.py) from the cloned policy on the RL harness (`rl.harness.train`, `num_chunks` jitted
   chunks, checkpointed and resumable: re-running the same command after a kill continues bit-identically).
3. Selection of the final policy: PPO can make the cloned policy worse (it did in measured runs), and the cloned
   policy's learned waits (No-Ops) can cost more than they gain on instances larger than the training ones, so
   the final policy ("agent", saved as policy.msgpack and policy.json) is whichever of four candidates has the
   lowest mean makespan / lower bound of its best sampled schedules on `validation_instances` generated instances
   of every `validation_sizes` size, a stream apart from training and evaluation (never a benchmark): the cloned
   ("imitation") or the PPO ("ppo") parameters, each free to choose No-Op or restricted to non-delay dispatching
   ("*_nondelay", `inference.NonDelay`).
4. Evaluation, every schedule validated: on `eval_instances` held-out generated instances of every `eval_sizes`
   size (mean makespan / trivial lower bound), and on the Taillard instances `taillard` (mean gap to the
   best-known upper bound), of the four candidates, the final one ("agent_*", the same numbers as the selected
   one's), the five dispatching rules, and optionally CP-SAT given the sampled agent's time (`eval_cpsat`;
   CP-SAT's result depends on the machine's speed, so it stays out of the resume comparison).

Writes config.json, metrics.jsonl (one record per PPO update), checkpoints/, imitation/, policy.msgpack and
policy.json (what `jaxalign jssp solve --checkpoint DIR` and `jaxalign bench jssp` load), results.json
(timings under "timings") and learning_curve.png.
"""
from __future__ import annotations

import dataclasses
import json
import time

import jax
import numpy as np
from flax import serialization

from agents.jssp_cp import env, imitation, inference, rules
from agents.jssp_cp.cpsat import solve as cpsat_solve
from agents.jssp_cp.imitation import BCConfig
from agents.jssp_cp.instances import benchmark, random_instance, taillard_names
from agents.jssp_cp.network import JobShopPolicy, NetworkConfig, init_params
from agents.jssp_cp.ppo import JSSPPPOConfig, make_trainer
from jaxalign import paths
from jaxalign.rundir import claim, config_to_dict, write_json_atomic
from rl import harness

RULES = ("spt", "lpt", "mwkr", "mor", "fifo")


def parse_sizes(text: str, what: str = "sizes") -> list[tuple[int, int]]:
    """'6x6,10x10' -> [(6, 6), (10, 10)]."""
    sizes = []
    for part in text.split(","):
        try:
            jobs, machines = (int(x) for x in part.strip().lower().split("x"))
        except ValueError:
            raise ValueError(f"{what} must be comma-separated JOBSxMACHINES sizes such as 6x6,10x10; got "
                             f"{text!r}") from None
        if jobs < 1 or machines < 1:
            raise ValueError(f"{what}: jobs and machines must be >= 1; got {part!r}")
        sizes.append((jobs, machines))
    return sizes


def parse_taillard(text: str) -> list[str]:
    """'ta01-ta10' or 'ta01,ta05' (or empty) -> instance names, each checked."""
    names, known = [], taillard_names()
    for part in filter(None, (p.strip() for p in text.split(","))):
        first, _, last = part.partition("-")
        span = known[known.index(first):known.index(last) + 1] if last and first in known and last in known else None
        if span is None and (last or part not in known):
            raise ValueError(f"taillard must name instances ta01..ta80 as a list or ranges such as ta01-ta10; got "
                             f"{part!r}")
        names.extend(span or [part])
    return names


@dataclasses.dataclass(frozen=True)
class JSSPCPConfig:
    seed: int = 0  # network init, generated instances, CP-SAT's search, cloning, PPO, sampled evaluation rollouts
    network: NetworkConfig = NetworkConfig()
    train_sizes: str = "6x6,8x8,10x10"  # JOBSxMACHINES sizes of the generated instances of imitation and PPO
    imitation_instances: int = 16  # per training size
    cpsat_time_limit: float = 2.0  # seconds per imitation instance
    imitation: BCConfig = BCConfig()
    # rounds of imitating CP-SAT's improvements of the policy's own sampled schedules, after the first cloning
    improvement_rounds: int = 0
    round_instances: int = 8  # fresh generated instances per training size in each improvement round
    ppo: JSSPPPOConfig = JSSPPPOConfig()
    validation_sizes: str = "15x15,30x20"  # JOBSxMACHINES sizes of the generated instances that pick the final policy
    validation_instances: int = 4  # per validation size
    eval_sizes: str = "10x10,15x15"  # JOBSxMACHINES sizes of the held-out generated evaluation instances
    eval_instances: int = 10  # held-out generated instances per eval size
    taillard: str = "ta01-ta10"  # Taillard instances evaluated, a list or ranges within ta01..ta80; "" for none
    num_samples: int = 16  # rollouts per instance: the greedy one, the rest sampled at temperatures 0.5-2.0
    eval_cpsat: bool = True  # CP-SAT at the sampled agent's time on the Taillard instances
    num_chunks: int = 4  # jitted chunks the PPO updates are split into, each checkpointed (<= ppo.num_updates)
    show_progress: bool = True  # a progress bar with rate and ETA

    def __post_init__(self):
        parse_sizes(self.train_sizes, "train_sizes")
        parse_sizes(self.eval_sizes, "eval_sizes")
        parse_sizes(self.validation_sizes, "validation_sizes")
        parse_taillard(self.taillard)
        counts = ("imitation_instances", "eval_instances", "validation_instances", "num_samples")
        if any(getattr(self, name) < 1 for name in counts):
            raise ValueError(f"{', '.join(counts)} must be >= 1; got "
                             f"{', '.join(str(getattr(self, name)) for name in counts)}")
        if self.improvement_rounds < 0 or self.round_instances < 1:
            raise ValueError(f"improvement_rounds must be >= 0 and round_instances >= 1; got "
                             f"{self.improvement_rounds}, {self.round_instances}")
        if self.cpsat_time_limit <= 0:
            raise ValueError(f"cpsat_time_limit must be > 0, got {self.cpsat_time_limit}")
        if not 1 <= self.num_chunks <= self.ppo.num_updates:
            raise ValueError(f"num_chunks must lie in [1, ppo.num_updates={self.ppo.num_updates}], got "
                             f"{self.num_chunks}")


def imitation_phase(cfg: JSSPCPConfig, network: JobShopPolicy, workdir: str) -> tuple[dict, dict]:
    """(cloned parameters, imitation statistics), computed once and cached in WORKDIR/imitation/."""
    cache = paths.join(workdir, "imitation")
    template = init_params(jax.random.key(cfg.seed), network)
    params_path, stats_path = paths.join(cache, "params.msgpack"), paths.join(cache, "stats.json")
    if paths.exists(params_path) and paths.exists(stats_path):
        params = inference.restore_params(template, paths.read_bytes(params_path), params_path)
        return params, json.loads(paths.read_text(stats_path))
    clock = time.perf_counter()
    sizes = parse_sizes(cfg.train_sizes)
    instances = imitation.training_instances(cfg.seed, sizes, cfg.imitation_instances)
    bar = lambda label: label if cfg.show_progress else None
    solved = imitation.solve_all(instances, cfg.cpsat_time_limit, seed=cfg.seed, progress=bar("CP-SAT expert"))
    jobs, machines = max(j for j, _ in sizes), max(m for _, m in sizes)
    data = imitation.expert_dataset(instances, [r.start for r in solved], [r.makespan for r in solved], jobs,
                                    machines)
    clone = imitation.make_cloning(network.apply, cfg.imitation)
    params, metrics = clone(template, data.obs, data.actions, jax.random.key(cfg.seed + 1), bar("cloning"))
    losses = np.asarray(metrics["bc_loss"])
    first_agreement = imitation.agreement(network.apply, params, data)
    rounds, everything = [], data
    for r in range(1, cfg.improvement_rounds + 1):
        fresh = imitation.training_instances([cfg.seed, r], sizes, cfg.round_instances)
        improved, round_stats = imitation.improvement_round(
            network.apply, params, fresh, cfg.cpsat_time_limit, cfg.num_samples,
            jax.random.fold_in(jax.random.key(cfg.seed + 2), r), jobs, machines, seed=cfg.seed,
            progress=bar(f"round {r}: CP-SAT improves the policy's schedules"))
        everything = imitation.concatenate([everything, improved])
        params, _ = clone(params, everything.obs, everything.actions,
                          jax.random.fold_in(jax.random.key(cfg.seed + 1), r), bar(f"round {r}: cloning"))
        rounds.append({"round": r, **round_stats, "decisions": int(len(everything.actions)),
                       "bc_agreement": imitation.agreement(network.apply, params, everything)})
    stats = {
        "instances": len(instances),
        "cpsat_optimal": sum(r.status == "OPTIMAL" for r in solved),
        "cpsat_mean_makespan": float(data.cpsat_makespans.mean()),
        "replayed_mean_makespan": float(data.replayed_makespans.mean()),
        "replay_shorter_than_cpsat": int((data.replayed_makespans < data.cpsat_makespans).sum()),
        "decisions": int(len(data.actions)),
        "noop_fraction": float((data.actions == jobs).mean()),
        "bc_loss_first": float(losses[:10].mean()),
        "bc_loss_last": float(losses[-10:].mean()),
        "bc_agreement": first_agreement,
        "improvement_rounds": rounds,
        "seconds": time.perf_counter() - clock,
    }
    paths.makedirs(cache)
    paths.write_atomic(params_path, serialization.to_bytes(jax.device_get(params)))
    write_json_atomic(stats_path, stats)  # last: its presence marks a complete cache
    return params, stats


def lower_bound_of(instance) -> int:
    loads = np.bincount(instance.machines.ravel(), instance.durations.ravel())
    return int(max(loads.max(), instance.durations.sum(axis=1).max()))


def schedule_batch(instances, policies: dict, num_samples: int, seed: int) -> tuple[dict, dict]:
    """Makespans [n] and seconds per instance of every rule and policy on instances of one size, every schedule
    validated. policies: label -> (apply, parameters) (greedy and sampled rows for each)."""
    batch = env.stack(instances)
    makespans, seconds = {}, {}

    def record(label, run):
        run()  # compile outside the timing
        clock = time.perf_counter()
        start, makespan = jax.device_get(run())
        seconds[label] = (time.perf_counter() - clock) / len(instances)
        for inst, s, m in zip(instances, start, makespan):
            inference.checked(inst, s, m, label)
        makespans[label] = np.asarray(makespan, np.int64)

    for rule in RULES:
        record(rule, lambda rule=rule: rules.dispatch_batch(batch, rule))
    for label, (apply, p) in policies.items():
        record(f"{label}_greedy", lambda a=apply, p=p: inference.greedy_batch(a, p, batch))
        record(f"{label}_sampled", lambda a=apply, p=p: inference.sampled_batch(a, p, batch, jax.random.key(seed),
                                                                               num_samples))
    return makespans, seconds


def candidates_of(apply, cloned, trained) -> dict:
    """label -> (apply, parameters): the four candidates for the final policy (module docstring, phase 3)."""
    non_delay = inference.NonDelay(apply)
    return {"imitation": (apply, cloned), "ppo": (apply, trained), "imitation_nondelay": (non_delay, cloned),
            "ppo_nondelay": (non_delay, trained)}


def select_policy(cfg: JSSPCPConfig, candidates: dict) -> tuple[str, dict]:
    """(label of the final policy, {label: mean makespan / lower bound of its best sampled schedules}) on the
    generated validation instances (module docstring, phase 3); a tie keeps the first candidate."""
    rng = np.random.default_rng([cfg.seed, 2_000_003])  # apart from the training and evaluation streams
    ratios: dict = {label: [] for label in candidates}
    for jobs, machines in parse_sizes(cfg.validation_sizes):
        instances = [random_instance(rng, jobs, machines) for _ in range(cfg.validation_instances)]
        imitation.refuse_benchmarks(instances)
        bounds, batch = np.array([lower_bound_of(i) for i in instances]), env.stack(instances)
        for label, (apply, params) in candidates.items():
            starts, makespans = jax.device_get(inference.sampled_batch(
                apply, params, batch, jax.random.key(cfg.seed), cfg.num_samples))
            for inst, start, makespan in zip(instances, starts, makespans):
                inference.checked(inst, start, makespan, f"the {label} policy")
            ratios[label].extend(np.asarray(makespans) / bounds)
    scores = {label: float(np.mean(r)) for label, r in ratios.items()}
    return min(scores, key=scores.get), scores


def alias_selected(table: dict, selected: str) -> dict:
    """The table with the selected policy's greedy and sampled entries repeated as the agent's."""
    return {**table, **{f"agent_{mode}": table[f"{selected}_{mode}"] for mode in ("greedy", "sampled")}}


def evaluate(cfg: JSSPCPConfig, policies: dict, selected: str) -> tuple[dict, dict]:
    """(results, timings): held-out generated instances and the Taillard instances (module docstring); the
    `selected` policy's rows are also the agent's."""
    results, timings = {"heldout": {}, "taillard": {}}, {"heldout": {}, "taillard": {}}
    rng = np.random.default_rng([cfg.seed, 1_000_003])  # a stream apart from the training instances'

    def schedule(instances):
        makespans, seconds = schedule_batch(instances, policies, cfg.num_samples, cfg.seed)
        return alias_selected(makespans, selected), alias_selected(seconds, selected)

    for jobs, machines in parse_sizes(cfg.eval_sizes):
        instances = [random_instance(rng, jobs, machines) for _ in range(cfg.eval_instances)]
        imitation.refuse_benchmarks(instances)
        makespans, seconds = schedule(instances)
        bounds = np.array([lower_bound_of(i) for i in instances])
        results["heldout"][f"{jobs}x{machines}"] = {k: float((v / bounds).mean()) for k, v in makespans.items()}
        timings["heldout"][f"{jobs}x{machines}"] = seconds
    names = parse_taillard(cfg.taillard)
    by_size: dict = {}
    for name in names:
        inst, _, ub = benchmark(name)
        by_size.setdefault(inst.machines.shape, []).append((name, inst, ub))
    per_instance = {}
    for group in by_size.values():
        instances = [inst for _, inst, _ in group]
        makespans, seconds = schedule(instances)
        for i, (name, inst, ub) in enumerate(group):
            per_instance[name] = {k: {"makespan": int(v[i]), "gap": 100.0 * (int(v[i]) - ub) / ub}
                                  for k, v in makespans.items()}
            per_instance[name]["upper_bound"] = ub
            if cfg.eval_cpsat:
                limit = max(seconds["agent_sampled"], 0.1)
                try:
                    result = cpsat_solve(inst, time_limit=limit, workers=2, seed=cfg.seed)
                except RuntimeError:  # no schedule found within the agent's time: unsolved
                    found = {"seconds": limit, "makespan": None, "gap": None}
                else:
                    inference.checked(inst, result.start, result.makespan, "CP-SAT")
                    found = {"seconds": limit, "makespan": result.makespan,
                             "gap": 100.0 * (result.makespan - ub) / ub}
                timings["taillard"].setdefault("cpsat_at_agent_time", {})[name] = found
        timings["taillard"][f"{group[0][1].jobs}x{group[0][1].operations}"] = seconds
    if names:
        methods = [k for k in per_instance[names[0]] if k != "upper_bound"]
        results["taillard"] = {"instances": names, "per_instance": per_instance,
                               "mean_gap_percent": {k: float(np.mean([per_instance[n][k]["gap"] for n in names]))
                                                    for k in methods}}
        if cfg.eval_cpsat:
            gaps = [timings["taillard"]["cpsat_at_agent_time"][n]["gap"] for n in names]
            solved = [g for g in gaps if g is not None]
            timings["taillard"]["cpsat_at_agent_time_mean_gap_percent"] = float(np.mean(solved)) if solved else None
            timings["taillard"]["cpsat_at_agent_time_unsolved"] = len(gaps) - len(solved)
    return results, timings


def run(cfg: JSSPCPConfig, workdir: str) -> dict:
    """Imitation, PPO (resumable), evaluation; writes results.json (module docstring)."""
    clock = time.perf_counter()
    root = str(workdir)
    paths.makedirs(root)
    claim(cfg, workdir)  # before the imitation cache is written: a different config is refused first
    network = JobShopPolicy(cfg.network)
    cloned, imitation_stats = imitation_phase(cfg, network, root)
    trainer = make_trainer(network.apply, cloned, cfg.ppo, parse_sizes(cfg.train_sizes))
    trained = harness.train(trainer, cfg, workdir, jax.random.key(cfg.seed), cfg.num_chunks,
                            show_progress=cfg.show_progress, desc="jssp_cp ppo")
    policies = candidates_of(network.apply, cloned, trained.state.train_state.params)
    selected, validation = select_policy(cfg, policies)
    inference.save_policy(root, policies[selected][1], cfg.network, noop=not selected.endswith("_nondelay"))
    evaluation, eval_timings = evaluate(cfg, policies, selected)
    last = trained.history[-1]
    results = {
        "imitation": {k: v for k, v in imitation_stats.items() if k != "seconds"},
        "ppo": {"updates": cfg.ppo.num_updates, "env_steps": cfg.ppo.num_updates * cfg.ppo.batch_size,
                "last_makespan_over_lb": last.get("makespan_over_lb")},
        "selection": {"policy": selected, "validation_makespan_over_lb": validation},
        **evaluation,
        "validator_violations": 0,  # every schedule above was validated; a violation raises before this line
        "timings": {"imitation_seconds": imitation_stats["seconds"], "train_seconds": trained.train_seconds,
                    "evaluation": eval_timings, "wall_seconds": time.perf_counter() - clock},
        "config": config_to_dict(cfg),
    }
    harness.write_results(workdir, results)
    harness.plot_learning_curve(workdir, trained.history, "update", {"PPO episodes": "makespan_over_lb"},
                                ylabel="makespan / lower bound", title="jssp_cp: PPO from the cloned policy")
    return results
