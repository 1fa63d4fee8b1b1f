"""`jaxalign bench iterative --workdir DIR`: the iterative algorithms of issue 7 side by side, several seeds.

Two demonstrations, each a CSV, a markdown table and a PNG in DIR:

1. APO on a tabular bandit with exact proximal steps (`jaxalign.algorithms.apo_bandit`): iterative DPO (alpha 0)
   against APO with alpha 0.3 and 0.5, closed-form steps and, side by side, steps found by minimising the library's
   own `apo_dpo` loss numerically. Claim checked: APO reaches iterative DPO's final expected reward in fewer
   iterations. -> apo_bandit.{csv,md,png}
2. ARITH (`jaxalign.experiments.iterative_dpo`), from ONE SFT policy per seed shared by every algorithm: offline DPO
   (one iteration on pairs from the SFT policy, the same prompts and DPO steps as the iterative runs), online DPO,
   DNO-Prct, APO with alpha 0.3 and 0.5. Claims checked: DNO and online DPO beat offline DPO; APO reaches online
   DPO's final held-out accuracy in fewer iterations. -> iterative.{csv,md} (summary),
   iterative_per_iteration.csv (every iterate of every run), iterative_arith.png
3. The other algorithms' claims (`CLAIM_EXPERIMENTS`: OREO vs rejection-sampling SFT and DPO, value-guided beam
   search vs greedy, ...): each registered experiment's default run per seed; its results.json states the claim and
   whether it held, with the accuracies behind it. -> claims.{csv,md}

Every ARITH run lives in DIR/seed<s>/<algorithm> and resumes (a killed benchmark re-run continues); rows are
rebuilt from each run's results.json. Overrides (key=value) apply to every ARITH run's IterativeConfig.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time

import numpy as np

from jaxalign import paths
from jaxalign.bench.report import text_table, write_csv, write_csv_and_markdown
from jaxalign.overrides import apply_overrides
from jaxalign.rundir import RunDir

# name -> (preset, overrides on top of it); "offline_dpo" is online DPO's config `.offline()`.
ALGORITHMS: dict[str, tuple[str, tuple[str, ...]]] = {
    "offline_dpo": ("online_dpo", ()),
    "online_dpo": ("online_dpo", ()),
    "dno": ("dno", ()),
    "apo_0.3": ("apo", ("alpha=0.3",)),
    "apo_0.5": ("apo", ("alpha=0.5",)),
}
BASELINE = "online_dpo"  # the run whose final accuracy APO must reach


def algorithm_config(name: str, overrides: list[str], seed: int):
    """The IterativeConfig of one benchmarked algorithm for one seed."""
    from jaxalign.registry import get_experiment

    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; available: {', '.join(ALGORITHMS)}")
    preset, extra = ALGORITHMS[name]
    cfg = apply_overrides(get_experiment(preset).default_config(), [*overrides, *extra, f"base.seed={seed}"])
    return cfg.offline() if name == "offline_dpo" else cfg


def iterations_to_reach(accuracy: list[float], target: float) -> int | None:
    """The first iteration (1-based; index 0 is the SFT policy) whose accuracy is >= target, or None."""
    for iteration, value in enumerate(accuracy[1:], start=1):
        if value >= target - 1e-12:
            return iteration
    return None


def copy_tree(source: str, target: str) -> None:
    """Copy the directory `source` (an SFT checkpoint) to `target`: `shutil.copytree` when both are local, else
    file by file through `jaxalign.paths` (an object store has no directory copy)."""
    if paths.is_local(source) and paths.is_local(target):
        shutil.copytree(source, target)
        return
    for relative in paths.files_under(source):
        names = relative.split("/")
        destination = paths.join(target, *names)
        paths.makedirs(paths.dirname(destination))
        paths.write_atomic(destination, paths.read_bytes(paths.join(source, *names)))


def arith_rows(workdir: str, names: list[str], seeds: list[int], overrides: list[str]) -> list[dict]:
    """Run (or resume) every algorithm for every seed; one row per (algorithm, seed, iteration)."""
    from jaxalign.experiments import arith_kit as kit
    from jaxalign.registry import get_experiment
    from jaxalign.sharding import make_mesh
    from jaxalign.train.loop import MetricsLog

    rows = []
    for seed in seeds:
        seed_dir = paths.join(workdir, f"seed{seed}")
        sft_dir = paths.join(seed_dir, "sft")
        base = algorithm_config(names[0], overrides, seed).base
        # One SFT policy per seed: every algorithm's run starts from a copy of its final checkpoint.
        kit.train_sft(base, make_mesh(base.mesh), kit.split(base), sft_dir,
                      MetricsLog(RunDir(sft_dir).metrics))
        results = {}
        for name in names:
            cfg = algorithm_config(name, overrides, seed)
            run_dir = paths.join(seed_dir, name)
            if not paths.exists(RunDir(run_dir).checkpoints("sft")):
                copy_tree(RunDir(sft_dir).checkpoints("sft"), RunDir(run_dir).checkpoints("sft"))
            print(f"[iterative] seed {seed}: {name} ...", file=sys.stderr, flush=True)
            results[name] = get_experiment(ALGORITHMS[name][0]).run(cfg, run_dir)
        target = results[BASELINE]["accuracy_per_iteration"][-1] if BASELINE in results else None
        for name, r in results.items():
            # Offline DPO has one long iteration: its iteration count is not comparable ("n/a").
            reach = "n/a" if target is None or name == "offline_dpo" else iterations_to_reach(
                r["accuracy_per_iteration"], target)
            for iteration, accuracy in enumerate(r["accuracy_per_iteration"]):
                record = r["iterations"][iteration - 1] if iteration else {}
                rows.append({"algorithm": name, "seed": seed, "iteration": iteration, "accuracy": accuracy,
                             "val_accuracy": r["val_accuracy_per_iteration"][iteration],
                             "samples_correct_rate": record.get("samples_correct_rate"),
                             "pairs": record.get("pairs"), "train_pairs": record.get("train_pairs"),
                             "final_accuracy": r["final_accuracy"], "selected_iteration": r["selected_iteration"],
                             "iterations_to_online_final": reach, "online_final": target,
                             "dpo_steps_total": r["steps"]["dpo_total"], "wall_seconds": r["wall_seconds"]})
    return rows


def arith_summary(rows: list[dict], names: list[str]) -> list[dict]:
    """Per algorithm: mean (std) held-out accuracy after each iteration, the selected iterate's, and iterations to
    reach online DPO's final accuracy per seed."""
    out = []
    for name in names:
        mine = [r for r in rows if r["algorithm"] == name]
        if not mine:
            continue
        seeds = sorted({r["seed"] for r in mine})
        entry = {"algorithm": name, "seeds": len(seeds)}
        for iteration in sorted({r["iteration"] for r in mine}):
            values = np.array([r["accuracy"] for r in mine if r["iteration"] == iteration])
            entry[f"acc_{iteration}"] = f"{values.mean():.3f} ± {values.std():.3f}"
        finals = np.array([next(r["final_accuracy"] for r in mine if r["seed"] == s) for s in seeds])
        entry["final"] = f"{finals.mean():.3f} ± {finals.std():.3f}"
        reach = [next(r["iterations_to_online_final"] for r in mine if r["seed"] == s) for s in seeds]
        entry["reach"] = "n/a" if "n/a" in reach else "/".join("-" if x is None else str(x) for x in reach)
        steps = next(r["dpo_steps_total"] for r in mine)
        entry["steps"] = steps
        out.append(entry)
    iterations = sorted({k for entry in out for k in entry if k.startswith("acc_")}, key=lambda k: int(k[4:]))
    # Every row gets every column (offline DPO has a single iteration): one CSV header, blank cells.
    return [{**{k: v for k, v in entry.items() if not k.startswith("acc_")},
             **{k: entry.get(k, "") for k in iterations}} for entry in out]


def _plot_arith(rows: list[dict], names: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_rate) = plt.subplots(1, 2, figsize=(11, 3.8))
    for name in names:
        mine = [r for r in rows if r["algorithm"] == name]
        if not mine:
            continue
        iterations = sorted({r["iteration"] for r in mine})
        if name == "offline_dpo":
            final = np.mean([r["accuracy"] for r in mine if r["iteration"] == iterations[-1]])
            ax_acc.axhline(final, color="gray", linestyle="--", label="offline DPO (same prompts and steps)")
            continue
        mean = [np.mean([r["accuracy"] for r in mine if r["iteration"] == i]) for i in iterations]
        std = [np.std([r["accuracy"] for r in mine if r["iteration"] == i]) for i in iterations]
        ax_acc.errorbar(iterations, mean, yerr=std, marker="o", capsize=3, label=name)
        rate_iterations = iterations[1:]
        rate = [np.mean([r["samples_correct_rate"] for r in mine if r["iteration"] == i]) for i in rate_iterations]
        ax_rate.plot([i - 1 for i in rate_iterations], rate, marker="o", label=name)
    ax_acc.set(xlabel="iteration (0 = SFT)", ylabel="held-out greedy accuracy", title="ARITH: accuracy per iteration")
    ax_rate.set(xlabel="iteration (samples drawn from its starting policy)", ylabel="sampled completions correct",
                title="ARITH: on-policy reward")
    ax_acc.legend(fontsize=8)
    ax_rate.legend(fontsize=8)
    fig.tight_layout()
    paths.save_figure(fig, path, dpi=120)
    plt.close(fig)


def bandit_section(workdir: str, seeds: list[int]) -> list[dict]:
    """APO on the tabular bandit, closed-form and numerical steps; apo_bandit.{csv,md,png}; the summary rows."""
    from jaxalign.algorithms import apo_bandit

    rows = []
    for method in apo_bandit.BANDIT_METHODS:
        rows += apo_bandit.bandit_demo(seeds=tuple(seeds), method=method)
    apo_bandit.plot_bandit(rows, RunDir(workdir).file("apo_bandit.png"))
    summary = []
    for method in apo_bandit.BANDIT_METHODS:
        for alpha in sorted({r["alpha"] for r in rows}):
            mine = [r for r in rows if r["method"] == method and r["alpha"] == alpha]
            last = max(r["iteration"] for r in mine)
            finals = [r["expected_reward"] for r in mine if r["iteration"] == last]
            reach = [next(r["iterations_to_target"] for r in mine if r["seed"] == s) for s in seeds]
            summary.append({"method": method, "alpha": alpha, "final_expected_reward": float(np.mean(finals)),
                            "reach": "/".join("-" if x is None else str(x) for x in reach)})
    columns = [("method", 12, "method", "s"), ("alpha", 6, "alpha", ".1f"),
               ("mean final E[r]", 16, "final_expected_reward", ".4f"),
               ("iterations to reach alpha=0's final E[r], per seed", 50, "reach", "s")]
    write_csv_and_markdown(summary, columns, "APO on a tabular bandit (exact proximal steps)",
                           [f"seeds {seeds}; `jaxalign.algorithms.apo_bandit.bandit_demo` defaults (8 arms, beta 1, "
                            f"10 iterations)", "numerical: each proximal step minimises the population apo_dpo loss "
                            "with L-BFGS in float64"], workdir, "apo_bandit")
    print(text_table(summary, columns))
    return summary


# Registered experiments whose results.json states a paper's claim ("claim", "claim_holds") with the numbers behind it
# ("comparison": method -> accuracy); True where the experiment's SFT phase is the main job's (so the seed's shared
# SFT policy is copied in instead of training it again).
CLAIM_EXPERIMENTS: dict[str, bool] = {
    "oreo_arith": True,
    "step_dpo": True,
    "drpo_arith": True,
    "ddo_arith": True,
    "trpa_arith": True,
    "brain_arith": True,
    "dpa_arith": False,  # its own direction-conditioned SFT on the verbose task
}


def claim_rows(workdir: str, names: list[str], seeds: list[int]) -> list[dict]:
    """Run (or resume) each claim experiment per seed from its default config; one row per (experiment, seed,
    method) with the method's held-out accuracy and whether the experiment's claim held in that run."""
    from jaxalign.registry import get_experiment

    rows = []
    for seed in seeds:
        for name in names:
            if name not in CLAIM_EXPERIMENTS:
                raise ValueError(f"unknown claim experiment {name!r}; available: {', '.join(CLAIM_EXPERIMENTS)}")
            experiment = get_experiment(name)
            cfg = apply_overrides(experiment.default_config(), [f"base.seed={seed}"])
            run_dir = paths.join(workdir, f"seed{seed}", name)
            shared = paths.join(workdir, f"seed{seed}", "sft", "checkpoints", "sft")
            if CLAIM_EXPERIMENTS[name] and paths.exists(shared) and \
                    not paths.exists(RunDir(run_dir).checkpoints("sft")):
                copy_tree(shared, RunDir(run_dir).checkpoints("sft"))
            print(f"[iterative] seed {seed}: {name} ...", file=sys.stderr, flush=True)
            results = experiment.run(cfg, run_dir)
            for method, numbers in results["comparison"].items():
                rows.append({"experiment": name, "seed": seed, "method": method, "accuracy": numbers["accuracy"],
                             "claim": results["claim"], "claim_holds": bool(results["claim_holds"])})
    return rows


def claim_summary(rows: list[dict]) -> list[dict]:
    """Per (experiment, method): mean (std) accuracy over seeds and in how many seeds the experiment's claim held."""
    out = []
    for name in dict.fromkeys(r["experiment"] for r in rows):
        mine = [r for r in rows if r["experiment"] == name]
        seeds = sorted({r["seed"] for r in mine})
        held = sum(next(r["claim_holds"] for r in mine if r["seed"] == s) for s in seeds)
        for method in dict.fromkeys(r["method"] for r in mine):
            values = np.array([r["accuracy"] for r in mine if r["method"] == method])
            out.append({"experiment": name, "method": method, "seeds": len(values),
                        "accuracy": f"{values.mean():.3f} ± {values.std():.3f}",
                        "claim_held": f"{held}/{len(seeds)}"})
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="jaxalign bench iterative", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS), help=f"comma list of {', '.join(ALGORITHMS)}")
    parser.add_argument("--no-arith", action="store_true", help="only the bandit demonstration")
    parser.add_argument("--claims", default=",".join(CLAIM_EXPERIMENTS),
                        help=f"comma list of claim experiments ({', '.join(CLAIM_EXPERIMENTS)}), '' for none")
    parser.add_argument("overrides", nargs="*", help="IterativeConfig overrides for every ARITH run (key=value)")
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    names = [n.strip() for n in args.algorithms.split(",") if n.strip()]
    for name in names:
        algorithm_config(name, args.overrides, 0)  # unknown names and bad overrides fail before any training
    claims = [n.strip() for n in args.claims.split(",") if n.strip()]
    unknown = [n for n in claims if n not in CLAIM_EXPERIMENTS]
    if unknown:
        raise ValueError(f"unknown claim experiment(s) {', '.join(unknown)}; available: {', '.join(CLAIM_EXPERIMENTS)}")
    paths.makedirs(args.workdir)
    clock = time.perf_counter()
    bandit_section(args.workdir, seeds)
    if args.no_arith:
        return []
    rows = arith_rows(args.workdir, names, seeds, args.overrides)
    summary = arith_summary(rows, names)
    iterations = sorted({k for s in summary for k in s if k.startswith("acc_")}, key=lambda k: int(k[4:]))
    columns = [("algorithm", 12, "algorithm", "s"), ("seeds", 5, "seeds", "d"), ("DPO steps", 9, "steps", "d")]
    columns += [(f"after {k[4:]}" if k != "acc_0" else "SFT", 13, k, "s") for k in iterations]
    columns += [("selected iterate", 16, "final", "s"), ("iters to online final", 21, "reach", "s")]
    write_csv(rows, paths.join(args.workdir, "iterative_per_iteration.csv"))
    header = [f"command: jaxalign bench iterative --workdir {args.workdir} --seeds {args.seeds} "
              f"--algorithms {args.algorithms} {' '.join(args.overrides)}".rstrip(),
              "held-out greedy exact-match accuracy (mean ± std over seeds) of each iterate; 'selected iterate' is "
              "the one returned (best on validation); 'iters to online final': per seed, the first iteration whose "
              "accuracy reaches online DPO's last-iteration accuracy ('-': never)",
              "offline DPO: one iteration over the same prompts and the same total DPO steps, pairs from SFT only"]
    write_csv_and_markdown(summary, columns, "Iterative algorithms on ARITH", header, args.workdir, "iterative")
    _plot_arith(rows, names, paths.join(args.workdir, "iterative_arith.png"))
    print(text_table(summary, columns))
    if claims:
        claim_records = claim_rows(args.workdir, claims, seeds)
        claim_table = claim_summary(claim_records)
        stated = {r["experiment"]: r["claim"] for r in claim_records}
        claim_columns = [("experiment", 12, "experiment", "s"), ("method", 24, "method", "s"),
                         ("seeds", 5, "seeds", "d"), ("accuracy", 13, "accuracy", "s"),
                         ("claim held", 10, "claim_held", "s")]
        write_csv_and_markdown(claim_table, claim_columns, "Paper claims on ARITH",
                               [f"seeds {args.seeds}; each experiment's default config from the seed's shared SFT "
                                "policy where its SFT phase is the main job's; accuracy: held-out greedy exact match "
                                "(mean ± std over seeds); 'claim held': seeds in which the experiment's claim "
                                "(results.json 'claim') held"] + [f"{n}: {c}" for n, c in stated.items()],
                               args.workdir, "claims")
        print(text_table(claim_table, claim_columns))
    print(f"wrote apo_bandit.*, iterative.*, claims.* and iterative_arith.png in {args.workdir} "
          f"({time.perf_counter() - clock:.0f} s)")
    return summary
