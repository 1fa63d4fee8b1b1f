"""`jaxalign bench objectives --workdir DIR`: every objective, the same budget, several seeds and three tasks.

For each seed the SFT policy is trained once (the main job's phase 1) and shared by every task and objective. For
each task the on-policy pairs are sampled and judged once (phase 2) and shared by every objective. Then each
objective trains from the SFT policy for the same number of steps with the same batch size, learning rate, beta
(where it takes one) and chosen-NLL weight, and is evaluated on held-out problems at its LAST step (no
checkpoint selection: the benchmark compares what each objective does with a fixed budget, over-optimisation
included). Rows are appended to DIR/objectives.csv as they finish, so a killed benchmark resumes where it stopped.

Tasks (`arith_kit.TASK_VARIANTS`): ARITH as in the main job; `length_bias`, whose demonstrations end with a random
number of recaps of the answer (neutral for the oracle, so length and correctness are independent) and whose judge
adds a bonus per completion token, so longer responses win more often than their quality warrants (length-normalised
objectives such as LD-DPO's ld_alpha and SimPO should lengthen responses less); `verbose`, its control: the same
verbose demonstrations judged by the oracle alone (these two share an SFT policy of their own); `noisy_labels`,
where a stated fraction of pairs is flipped (robust, cdpo and adpo should lose less accuracy than sigmoid).

Columns: objective, task, seed, accuracy (greedy exact match on held-out problems), kl_to_ref (Monte-Carlo
KL(pi || ref) per response), chosen_logp_change and rejected_logp_change (mean L_pi - L_ref on training pairs),
mean_length (greedy response tokens), the run's wall time, and config: a short sha256 of the run's resolved config
(`config_key`), so that a rerun with other overrides adds rows instead of taking another config's rows for its
own. Listwise objectives train on ranked lists of the same samples (all K graded completions of a prompt),
`dpo.list_batch_size` lists per step (the tokens of `dpo.batch_size` pairs). DIR/objectives.md holds the
per-objective mean and standard deviation over seeds for every task, DIR/objectives.png the accuracy and length per
task.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import sys
import time

import numpy as np

from jaxalign import paths
from jaxalign.bench.report import csv_stream, read_csv
from jaxalign.experiments.arith_kit import TASK_VARIANTS as TASKS
from jaxalign.losses import SPECS
from jaxalign.overrides import apply_overrides
from jaxalign.rundir import RunDir, config_to_dict, json_normalise, without_presentation_fields

# The fixed budget every objective gets (on top of the main job's defaults and the user's overrides).
BUDGET: tuple[str, ...] = ("dpo.select_best=false",)
COLUMNS = ("objective", "task", "seed", "accuracy", "kl_to_ref", "chosen_logp_change", "rejected_logp_change",
           "mean_length", "sft_accuracy", "pairs", "wall_seconds", "config")
FILE_STEM = "objectives"


def trainable_objectives() -> list[str]:
    """Every registered objective: `arith_dpo` trains the pairwise, reference-free and unpaired ones on the pairs
    (with the extras `objective_extras` builds), the listwise ones on ranked lists of the same samples."""
    return sorted(SPECS)


# Modifier variants benchmarked beside the registry names, written NAME[objective_args]: LD-DPO is sigmoid DPO with
# ld_alpha (Liu et al. 2024 use alpha in [0.3, 0.7] for 7-8B models); WPO and f-DPO likewise.
VARIANTS = ("sigmoid[ld_alpha=0.5]", "sigmoid[wpo=true]", "sigmoid[f_divergence=js_divergence]")


def describe_task(task: str) -> str:
    """A task variant's config changes as overrides, e.g. 'pairs.label_flip_rate=0.3'."""
    changes = [f"{section}.{name}={value}" for section, fields in TASKS[task].items() for name, value in fields.items()]
    return ", ".join(changes) or "as the main job"


def parse_entry(entry: str) -> tuple[str, str]:
    """'name' or 'name[k=v,k=v]' -> (objective name, objective_args)."""
    if entry.endswith("]") and "[" in entry:
        name, args = entry[:-1].split("[", 1)
        return name, args
    return entry, ""


def config_key(cfg) -> str:
    """A short sha256 of a run's resolved config (what it computes: presentation fields such as show_progress
    are left out, as when a run is resumed), the `config` column that tells rows of different overrides apart."""
    payload = without_presentation_fields(json_normalise(config_to_dict(cfg)))
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def row_key(row: dict) -> tuple[str, str, int, str]:
    """(objective, task, seed, config) of a CSV row; a row written before the config column has config ''."""
    return row["objective"], row["task"], int(row["seed"]), row.get("config") or ""


def is_done(done: set, objective: str, task: str, seed: int, key: str) -> bool:
    """Whether a row for this run exists: one with its config, or a row from before the config column (whose
    config is unknown; it is taken as this run's, as it always was)."""
    return (objective, task, seed, key) in done or (objective, task, seed, "") in done


def of_command(key: tuple[str, str, int, str], planned: set) -> bool:
    """Whether a row belongs to this command's runs (and so to the summary labelled with its command line): the
    same config, or a row from before the config column for one of its (objective, task, seed)."""
    if key[3]:
        return key in planned
    return any(p[:3] == key[:3] for p in planned)


def upgrade_csv(path: str) -> None:
    """Give a CSV written before the config column that column (empty in its rows), so rows can be appended."""
    if not paths.exists(path):
        return
    header = next(csv.reader(csv_stream(path)), [])
    if "config" in header:
        return
    rows = read_csv(path)
    upgraded = io.StringIO(newline="")
    writer = csv.DictWriter(upgraded, fieldnames=list(dict.fromkeys([*header, *COLUMNS])), restval="")
    writer.writeheader()
    writer.writerows(rows)
    paths.write_atomic(path, upgraded.getvalue())


def append_row(path: str, row: dict) -> None:
    upgrade_csv(path)
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=COLUMNS)
    if not paths.exists(path):
        writer.writeheader()
    writer.writerow({k: row[k] for k in COLUMNS})
    paths.append_text(path, text.getvalue())


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds for every (objective, task)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["objective"], row["task"]), []).append(row)
    out = []
    for (objective, task), group in sorted(groups.items()):
        entry = {"objective": objective, "task": task, "seeds": len(group)}
        for key in ("accuracy", "kl_to_ref", "chosen_logp_change", "rejected_logp_change", "mean_length"):
            values = np.array([float(r[key]) for r in group])
            entry[key], entry[f"{key}_std"] = float(values.mean()), float(values.std())
        out.append(entry)
    return out


def markdown_table(summary: list[dict], header: list[str]) -> str:
    lines = ["# Objectives benchmark", "", *(f"- {line}" for line in header), ""]
    tasks = sorted({s["task"] for s in summary}, key=lambda t: list(TASKS).index(t) if t in TASKS else 99)
    for task in tasks:
        lines += [f"## {task}", "", "| objective | seeds | accuracy | KL to ref | chosen logp change | rejected logp "
                  "change | mean length |", "|---|---:|---:|---:|---:|---:|---:|"]
        for s in sorted((s for s in summary if s["task"] == task), key=lambda s: -s["accuracy"]):
            cell = lambda k, f: f"{s[k]:{f}} ± {s[k + '_std']:{f}}"  # noqa: E731
            lines.append(f"| {s['objective']} | {s['seeds']} | {cell('accuracy', '.3f')} | {cell('kl_to_ref', '.2f')}"
                         f" | {cell('chosen_logp_change', '.2f')} | {cell('rejected_logp_change', '.2f')} | "
                         f"{cell('mean_length', '.1f')} |")
        lines.append("")
    return "\n".join(lines)


def plot(summary: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in TASKS if any(s["task"] == t for s in summary)]
    fig, axes = plt.subplots(len(tasks), 2, figsize=(14, 3.2 * len(tasks)), squeeze=False)
    for row, task in zip(axes, tasks):
        entries = sorted((s for s in summary if s["task"] == task), key=lambda s: s["objective"])
        x = np.arange(len(entries))
        for ax, key, label in ((row[0], "accuracy", "held-out accuracy"), (row[1], "mean_length", "mean length")):
            ax.bar(x, [s[key] for s in entries], yerr=[s[f"{key}_std"] for s in entries], capsize=2)
            ax.set_xticks(x, [s["objective"] for s in entries], rotation=70, fontsize=7)
            ax.set(title=f"{task}: {label}", ylabel=label)
    fig.tight_layout()
    paths.save_figure(fig, path, dpi=110)
    plt.close(fig)


def objective_config(task_cfg, objective: str):
    """A task's config for one benchmark entry ('name' or 'name[k=v,...]'): what its `config` key is made of (the
    reference cache directory, a location rather than a setting, is added after). Every objective keeps the task
    config's beta, label smoothing and chosen-NLL weight (the comparison's common setting), which choosing an
    objective would otherwise reset to the objective's own defaults (`PreferenceConfig.RESET_WITH`)."""
    name, objective_args = parse_entry(objective)
    dpo = task_cfg.dpo
    common = [f"dpo.{key}={'none' if getattr(dpo, key) is None else getattr(dpo, key)}"
              for key in ("beta", "label_smoothing", "sft_weight")]
    return apply_overrides(task_cfg, [f"dpo.objective={name}", f"dpo.objective_args={objective_args}", *common])


def run_objective(cfg, mesh, problems, sft, pairs, workdir: str, data=None) -> dict:
    """Train one objective from the shared SFT policy on `data` (default: the pairs); evaluate its last step."""
    from jaxalign.experiments import arith_kit as kit
    from jaxalign.rundir import claim
    from jaxalign.train.loop import MetricsLog

    clock = time.perf_counter()
    paths.makedirs(workdir)
    claim(cfg, workdir)
    log = MetricsLog(RunDir(workdir).metrics)
    sft_params, _ = sft
    params, _, _ = kit.train_dpo(cfg, mesh, sft_params, pairs if data is None else data, problems, workdir, log)
    evaluation, _ = kit.greedy_eval(params, cfg.model, problems.test, cfg.eval_batch_size)
    drift = kit.drift_from_reference(params, sft_params, cfg.model, problems.test, pairs, cfg.eval_batch_size,
                                     seed=cfg.seed)
    return {"accuracy": evaluation["accuracy"], "mean_length": evaluation["mean_length"], **drift,
            "wall_seconds": time.perf_counter() - clock}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="jaxalign bench objectives", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma list of {', '.join(TASKS)}")
    parser.add_argument("--objectives", default="all",
                        help="comma list (';' when an entry has [args]), or 'all': every objective and VARIANTS")
    parser.add_argument("overrides", nargs="*", help="config overrides for every run (key=value)")
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))

    from jaxalign.experiments import arith_kit as kit
    from jaxalign.sharding import make_mesh
    from jaxalign.train.loop import MetricsLog

    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for task in tasks:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; available: {', '.join(TASKS)}")
    available = trainable_objectives()
    objectives = ([*available, *VARIANTS] if args.objectives == "all"
                  else [o.strip() for o in args.objectives.split(";" if "[" in args.objectives else ",")])
    for objective in objectives:
        if parse_entry(objective)[0] not in available:
            raise ValueError(f"objective {objective!r} cannot be benchmarked here; trainable: {', '.join(available)} "
                             f"(modifier variants as NAME[k=v,...], several separated by ';')")

    paths.makedirs(args.workdir)
    csv_path = paths.join(args.workdir, f"{FILE_STEM}.csv")
    done = {row_key(r) for r in read_csv(csv_path)}
    planned: set[tuple[str, str, int, str]] = set()  # this command's runs: the ones its summary is made of
    clock = time.perf_counter()
    for seed in seeds:
        base = apply_overrides(kit.ArithDPOConfig(), [*args.overrides, *BUDGET, f"seed={seed}"])
        mesh = make_mesh(base.mesh)
        kit.validate_config(base, mesh)
        problems = kit.split(base)
        seed_dir = paths.join(args.workdir, f"seed{seed}")
        sft_policies: dict[str, tuple] = {}  # SFT directory -> (train_sft's result, its greedy evaluation)
        for task in tasks:
            task_cfg = kit.task_config(base, task)
            keys = {o: config_key(objective_config(task_cfg, o)) for o in objectives}
            planned.update((o, task, seed, keys[o]) for o in objectives)
            todo = [o for o in objectives if not is_done(done, o, task, seed, keys[o])]
            if not todo:
                continue
            task_dir = paths.join(seed_dir, task)
            paths.makedirs(task_dir)
            # Tasks with the same demonstrations and model share one SFT policy (the main job's in seed_dir).
            sft_dir = paths.join(seed_dir, kit.sft_variant(task)).rstrip(os.sep)
            if sft_dir not in sft_policies:
                trained = kit.train_sft(task_cfg, mesh, problems, sft_dir, MetricsLog(RunDir(sft_dir).metrics))
                sft_policies[sft_dir] = trained, kit.greedy_eval(trained[0], task_cfg.model, problems.test,
                                                                 base.eval_batch_size)[0]
            sft, sft_eval = sft_policies[sft_dir]
            pairs, pair_stats = kit.on_policy_pairs(task_cfg, sft[0], problems.train, task_dir)
            cache = RunDir(task_dir).reference_cache
            for objective in todo:
                print(f"[objectives] seed {seed} task {task} objective {objective} ...", file=sys.stderr, flush=True)
                name, _ = parse_entry(objective)
                cfg = apply_overrides(objective_config(task_cfg, objective), [f"dpo.reference_cache_dir={cache}"])
                run_dir = paths.join(task_dir, objective.replace("[", "_").replace("]", "").replace(",", "_")
                                       .replace("=", "-"))
                lists = None
                if SPECS[name].family == "listwise":
                    lists, _ = kit.on_policy_lists(task_cfg, sft[0], problems.train, task_dir)
                result = run_objective(cfg, mesh, problems, sft, pairs, run_dir, data=lists)
                append_row(csv_path, {"objective": objective, "task": task, "seed": seed, **result,
                                      "sft_accuracy": sft_eval["accuracy"], "pairs": pair_stats["pairs"],
                                      "config": keys[objective]})
    rows = [r for r in read_csv(csv_path) if of_command(row_key(r), planned)]
    summary = summarise(rows)
    header = [f"command: jaxalign bench objectives --workdir {args.workdir} --seeds {args.seeds} --tasks {args.tasks} "
              f"--objectives {args.objectives} {' '.join(args.overrides)}".rstrip(),
              f"budget: the main job's defaults with {' '.join(BUDGET)}; tasks: "
              + "; ".join(f"{t} ({describe_task(t)})" for t in TASKS),
              "listwise objectives train on ranked lists of the same samples, dpo.list_batch_size lists per step"]
    paths.write_atomic(paths.join(args.workdir, f"{FILE_STEM}.md"), markdown_table(summary, header))
    plot(summary, paths.join(args.workdir, f"{FILE_STEM}.png"))
    print(markdown_table(summary, header))
    print(f"wrote {csv_path}, {FILE_STEM}.md and {FILE_STEM}.png in {args.workdir} "
          f"({time.perf_counter() - clock:.0f} s)")
    return summary

