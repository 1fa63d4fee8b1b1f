"""`python -m agents.pdppo.diagnose RUN [--episodes N] [--json OUT]`: the diagnosis of `critics.py` (which critic each
PDPPO seed trained, the critics' errors, the baseline's dependence on the action, idle fractions) for every arm and
seed of a finished `pdppo_lot_sizing` run, also runs made before results.json carried it.

The state is restored by re-entering the run (`harness.train` with the run's config.json: every update is already
done, so nothing trains and nothing in the directory changes but the log).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from agents.pdppo.critics import diagnosis
from agents.pdppo.experiment import PDPPOLotSizingConfig, arm_learners, arms_trainer, load, seed_keys
from agents.pdppo.learners import ALGORITHMS
from jaxalign.overrides import apply_overrides, file_overrides
from rl import harness


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
    report = {"run": str(run_dir), "instance": instance.name, "seeds": cfg.seed_list(), "episodes": episodes}
    for arm, learner in learners.items():
        report[arm] = diagnosis(learner, instance, state[arm].train_state.params, episodes)
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
