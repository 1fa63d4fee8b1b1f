"""Curry-DPO on ARITH (Pattnaik et al., 2024, "Curry-DPO: Enhancing Alignment using Curriculum Learning & Ranked
Preferences"; docs/algorithms.md, "Curry-DPO"), end to end.

Pipeline (every phase resumable; re-running the same command continues where a killed run stopped):
1. SFT exactly as the main job (`kit.train_sft`).
2. K on-policy samples per prompt, graded by the oracle and judged with `pairs.*` (length bonus, label flips):
   `ranked_lists.on_policy_lists`, the very samples the main job's pairs come from, cached in lists.npz.
3. The curriculum (`jaxalign.algorithms.curriculum.build_curriculum` on the judged scores): every list's best
   sample against each other sample (exact ties form no pair and are counted), ordered easy -> hard by score gap
   and cut into `curriculum.num_iterations` stages. `pairs.min_score_gap` and `pairs.require_correct_chosen` act
   on whole lists (the prompts the main job drops are dropped here too); within a kept list every strictly worse
   sample pairs with the best one, whatever its gap.
4. Stage i trains the main job's DPO phase (`kit.train_dpo`: `base.dpo.objective`, sigmoid DPO by default
   as in the paper, with its reference mode, sft_weight, validation guard and checkpoints) for `steps_per_stage`
   steps on stage i's pairs, starting from AND referenced to the policy stage i - 1 produced (the SFT policy for
   stage 0). "Produced" is what `train_dpo` returns: the guard's selected checkpoint when base.dpo.select_best
   (possibly the stage's starting policy, when training never beat it on validation), else the last step.
   base.dpo.steps is not used: each stage runs steps_per_stage steps.
5. Baseline (compare_baseline): ordinary DPO on all the curriculum's pairs at once, from the SFT policy with it as
   fixed reference, for the same total number of steps (num_iterations * steps_per_stage).
6. Greedy exact-match accuracy on the held-out problems after SFT, after every stage and for the baseline;
   results.json and curry_dpo_accuracy.png.

Layout of the work directory: config.json, metrics.jsonl (SFT), checkpoints/sft, lists.npz, sft_eval.json,
stages/stage_<i>/{metrics.jsonl, checkpoints/dpo, reference_cache, stage.json}, baseline/{...,
baseline.json}, results.json, curry_dpo_accuracy.png. A finished stage is not trained again: `train_dpo` restores
its final checkpoint (no step runs) and returns the same policy, and its held-out evaluation is read back from
stage.json (checked against the policy's hash).
"""
from __future__ import annotations

import dataclasses
import numbers
import time
from typing import Any, ClassVar

import numpy as np

from jaxalign import paths
from jaxalign.algorithms.curriculum import CurriculumConfig, CurriculumPairs, build_curriculum
from jaxalign.data.iterator import ArrayDataset
from jaxalign.experiments import arith_kit as kit
from jaxalign.experiments.arith_kit import on_policy_lists
from jaxalign.models.llama import count_params
from jaxalign.tasks import arith
from jaxalign.train.loop import MetricsLog
from jaxalign.rundir import RunDir, config_to_dict, params_sha256, write_json_atomic


@dataclasses.dataclass(frozen=True)
class CurryDPOConfig:
    """base: the main job's config (model, SFT, sampling and judge in `base.pairs`, the DPO phase in `base.dpo`).
    curriculum: stages, ordering and grouping of the pairs (`CurriculumConfig`).
    steps_per_stage: DPO steps in every stage (replaces base.dpo.steps).
    compare_baseline: also train ordinary DPO on all pairs with the fixed SFT reference for the same total steps."""

    base: kit.ArithDPOConfig = kit.ArithDPOConfig()
    curriculum: CurriculumConfig = CurriculumConfig()
    steps_per_stage: int = 50
    compare_baseline: bool = True

    OVERRIDE_ALIASES: ClassVar[dict[str, str]] = {"loss": "base.dpo.objective",
                                                  "stages": "curriculum.num_iterations"}

    def __post_init__(self):
        if isinstance(self.steps_per_stage, bool) or not isinstance(self.steps_per_stage, numbers.Integral) or (
                self.steps_per_stage < 1):
            raise ValueError(f"steps_per_stage must be an integer >= 1, got {self.steps_per_stage!r}")


def stage_config(cfg: CurryDPOConfig, steps: int | None = None) -> kit.ArithDPOConfig:
    """The main job's config for one DPO phase of `steps` (default: steps_per_stage) steps."""
    steps = cfg.steps_per_stage if steps is None else steps
    return dataclasses.replace(cfg.base, dpo=dataclasses.replace(cfg.base.dpo, steps=steps))


def pair_dataset(lists: ArrayDataset, pairs: CurriculumPairs) -> ArrayDataset:
    """The main job's pair arrays (chosen_* / rejected_* [n, T]) for curriculum pairs indexing into `lists`."""
    a = lists.arrays
    out = {}
    for side, index in (("chosen", pairs.chosen), ("rejected", pairs.rejected)):
        for key in ("tokens", "attention_mask", "completion_mask"):
            out[f"{side}_{key}"] = a[f"list_{key}"][pairs.prompt, index]
    return ArrayDataset(out)


def _check_stages(stages: list[CurriculumPairs], batch_size: int, stats: dict) -> None:
    small = [(i, len(s)) for i, s in enumerate(stages) if len(s) < batch_size]
    if small:
        raise ValueError(
            f"curriculum stages {', '.join(f'{i} ({n} pairs)' for i, n in small)} hold fewer pairs than "
            f"base.dpo.batch_size={batch_size} (pairs per stage {stats['pairs_per_stage']}, from {stats['prompts']} "
            f"lists; {stats['tied_pairs_skipped']} tied pairs skipped); sample more prompts (base.pairs.num_prompts), "
            f"use fewer stages (curriculum.num_iterations) or a smaller base.dpo.batch_size"
        )


def run(cfg: CurryDPOConfig, workdir: str) -> dict:
    """Run (or resume) Curry-DPO in `workdir`; returns and writes results.json (module docstring)."""
    clock = time.perf_counter()
    base = cfg.base
    start = kit.start_experiment(cfg, base, workdir)
    mesh, problems, sft_params = start.mesh, start.problems, start.sft_params
    lists, list_stats = on_policy_lists(base, sft_params, problems.train, workdir)
    staged, curriculum_stats = build_curriculum(lists.arrays["list_scores"], lists.arrays["list_valid"],
                                                cfg.curriculum)
    stages = [staged.take(staged.stage == s) for s in range(cfg.curriculum.num_iterations)]
    _check_stages(stages, base.dpo.batch_size, curriculum_stats)
    sft_eval = kit.cached_greedy_eval(sft_params, base, problems.test, RunDir(workdir).file("sft_eval.json"),
                                            {"stage": "sft"})

    params, records = sft_params, []
    for i, pairs in enumerate(stages):
        stage_dir = paths.join(workdir, "stages", f"stage_{i}")
        reference_sha = params_sha256(params)  # Curry-DPO: the stage's reference is its starting policy
        selected, _, guard = kit.train_dpo(stage_config(cfg), mesh, params,
                                                 pair_dataset(lists, pairs), problems, stage_dir,
                                                 MetricsLog(RunDir(stage_dir).metrics))
        info = {"stage": i, "pairs": len(pairs), "prompts": int(np.unique(pairs.prompt).size),
                "gap_mean": float(pairs.gap.mean()), "gap_min": float(pairs.gap.min()),
                "gap_max": float(pairs.gap.max()), "reference_sha256": reference_sha,
                "selected_step": guard["selected_step"], "selected_val_accuracy": guard["selected_val_accuracy"],
                "last_val_accuracy": guard["last_val_accuracy"], "validation_history": guard["validation_history"]}
        records.append(kit.cached_greedy_eval(selected, base, problems.test,
                                                    RunDir(stage_dir).file("stage.json"), info))
        params = selected

    baseline = None
    if cfg.compare_baseline:
        total = cfg.steps_per_stage * cfg.curriculum.num_iterations
        baseline_dir = paths.join(workdir, "baseline")
        selected, _, guard = kit.train_dpo(stage_config(cfg, total), mesh, sft_params,
                                                 pair_dataset(lists, staged), problems, baseline_dir,
                                                 MetricsLog(RunDir(baseline_dir).metrics))
        info = {"pairs": len(staged), "steps": total, "reference_sha256": params_sha256(sft_params),
                "selected_step": guard["selected_step"], "selected_val_accuracy": guard["selected_val_accuracy"],
                "last_val_accuracy": guard["last_val_accuracy"], "validation_history": guard["validation_history"]}
        baseline = kit.cached_greedy_eval(selected, base, problems.test,
                                                RunDir(baseline_dir).file("baseline.json"), info)

    accuracy = [sft_eval["test_accuracy"]] + [r["test_accuracy"] for r in records]
    results = {
        "sft_accuracy": sft_eval["test_accuracy"],
        "final_accuracy": accuracy[-1],
        "accuracy_per_stage": accuracy,  # [SFT, after stage 0, after stage 1, ...]
        "baseline_accuracy": None if baseline is None else baseline["test_accuracy"],
        "pairs_per_stage": curriculum_stats["pairs_per_stage"],
        "stages": records,
        "baseline": baseline,
        **list_stats,
        "curriculum": curriculum_stats,
        "num_test_prompts": int(len(problems.test)),
        "carry_share": arith.carry_share(base.task.num_operands),
        "steps": {"sft": base.sft.steps, "per_stage": cfg.steps_per_stage,
                  "dpo_total": cfg.steps_per_stage * cfg.curriculum.num_iterations},
        "num_params": count_params(sft_params),
        "wall_seconds": time.perf_counter() - clock,
        "params_sha256": params_sha256(params),
        "config": config_to_dict(cfg),
    }
    write_json_atomic(RunDir(workdir).results, results)
    _plot(results, RunDir(workdir).file("curry_dpo_accuracy.png"))
    return results


def _plot(results: dict[str, Any], path: str) -> None:
    """Held-out accuracy after SFT and after every stage (baseline marked), and the pairs / mean gap per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    accuracy = results["accuracy_per_stage"]
    fig, (ax_acc, ax_pairs) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax_acc.plot(range(len(accuracy)), accuracy, marker="o", label="Curry-DPO")
    if results["baseline_accuracy"] is not None:
        ax_acc.axhline(results["baseline_accuracy"], color="gray", linestyle="--",
                       label=f"DPO, all pairs, {results['steps']['dpo_total']} steps")
    ax_acc.set_xticks(range(len(accuracy)), ["SFT"] + [f"stage {i}" for i in range(len(accuracy) - 1)])
    ax_acc.set(ylabel="held-out accuracy (greedy)", title="Curry-DPO on ARITH")
    ax_acc.legend()
    stages = results["stages"]
    ax_pairs.bar(range(len(stages)), [s["pairs"] for s in stages], color="tab:blue", alpha=0.6)
    ax_pairs.set_xticks(range(len(stages)))
    ax_pairs.set(xlabel="stage", ylabel="pairs")
    twin = ax_pairs.twinx()
    twin.plot(range(len(stages)), [s["gap_mean"] for s in stages], color="tab:orange", marker="o")
    twin.set_ylabel("mean score gap", color="tab:orange")
    fig.tight_layout()
    paths.save_figure(fig, path, dpi=120)
    plt.close(fig)
