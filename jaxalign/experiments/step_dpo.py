"""Step-DPO on ARITH (Lai et al., 2024, "Step-DPO: Step-wise Preference Optimization for Long-chain Reasoning";
docs/algorithms.md, "Step-DPO"), against response-level DPO with the same number of pairs and steps.

Pipeline (every phase resumable; re-running the same command continues where a killed run stopped):
1. SFT exactly as the main job (`kit.train_sft`, checkpoints/sft): a policy that drops most carries.
2. Graded samples: `base.pairs.samples_per_prompt` samples for each of `base.pairs.num_prompts` training prompts from
   the SFT policy (`kit.on_policy_samples`, samples.npz), graded by the oracle.
3. Step pairs (`jaxalign.algorithms.step_pairs.build_step_pairs`, step_pairs.npz): for every prompt with an incorrect
   sample, the prompt x + the correct prefix steps, the first wrong step (rejected) and a correct step for the same
   prefix among `samples_per_prefix` continuations sampled from the SFT policy (chosen; prefixes without one are
   dropped and counted, or with `gold_fallback` get the gold step).
4. Response pairs (response_pairs.npz): each prompt's best- against worst-judged full sample (`judge`, graded 0-6 by
   default) with `preference_pairs.select_pairs` (`min_chosen_score`, `min_margin`; dropped prompts counted).
5. Both pair sets cut to the same size: `num_pairs`, or by default as many as the smaller set has (the first pairs in
   prompt order, the prompts being a seeded random draw).
6. Step-DPO: the main job's DPO phase (`kit.train_dpo`: base.dpo, sigmoid DPO with beta 0.4, no SFT term, the
   SFT policy as reference, the validation guard) on the step pairs, whose completion masks cover the step tokens
   only, so the loss is exactly `jaxalign.losses.iterative.step_dpo` (tested); in step_dpo/.
7. Response-level DPO: the same phase, same config and steps, on the response pairs; in response_dpo/.
8. Held-out greedy accuracy of SFT and both policies; gain per pair = (accuracy - SFT accuracy) / pairs. The
   paper's claim checked here: Step-DPO gains more per pair than response-level DPO.

Layout of the work directory: config.json, metrics.jsonl (SFT), checkpoints/sft, samples.npz, step_pairs.npz,
response_pairs.npz, sft_eval.json, step_dpo/{checkpoints/dpo, metrics.jsonl, reference_cache, eval.json},
response_dpo/{...}, results.json, step_dpo.png. A finished phase is not run again: the pair files are read back,
`train_dpo` restores its final checkpoint (no step runs) and the evaluations are read back from their JSON files
(checked against the policy's hash).
"""
from __future__ import annotations

import dataclasses
import numbers
import time
from typing import Any, ClassVar

import jax
import numpy as np

from jaxalign import paths
from jaxalign.algorithms.preference_pairs import pair_arrays, select_pairs
from jaxalign.algorithms.step_pairs import build_step_pairs
from jaxalign.data.iterator import ArrayDataset
from jaxalign.experiments import arith_kit as kit
from jaxalign.models.llama import count_params
from jaxalign.tasks import arith, judges
from jaxalign.tasks.tokenizer import CharTokenizer
from jaxalign.train.loop import MetricsLog
from jaxalign.train.optim import OptimConfig
from jaxalign.rundir import RunDir, config_to_dict

METHODS = ("step_dpo", "response_dpo")

# The main job with Step-DPO's DPO phase: beta 0.4 (the authors use 0.4 to 0.5) and no chosen-NLL term, so the loss is
# step_dpo exactly; fewer prompts and steps than the main job, as the claim is about gain per pair.
_BASE = dataclasses.replace(
    kit.ArithDPOConfig(),
    pairs=dataclasses.replace(kit.PairConfig(), num_prompts=256, samples_per_prompt=4),
    dpo=dataclasses.replace(kit.ARITH_DPO, beta=0.4, sft_weight=0.0, steps=60, batch_size=32, eval_every=20,
                            optim=OptimConfig(learning_rate=5e-5, warmup_steps=10)),
)


def _is_int(value: Any, lowest: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Integral) and value >= lowest


@dataclasses.dataclass(frozen=True)
class StepDPOConfig:
    """base: the main job's config (task, model, SFT; the graded samples' count and temperature in base.pairs, whose
    pair filters min_score_gap / require_correct_chosen / length_bonus / label_flip_rate are not used here; the DPO
    phase of both methods in base.dpo, which must be plain sigmoid DPO; base.dpo.sft_weight > 0 would add the
    chosen-NLL term to both, the default 0 keeps Step-DPO's loss exactly `step_dpo`).
    samples_per_prefix: continuations sampled per prefix to find a chosen step (at base.pairs.temperature / top_k).
    gold_fallback: a prefix without a correct continuation takes the gold step as chosen (else it is dropped).
    num_pairs: pairs each method trains on (None: as many as the smaller of the two pair sets).
    judge: scores the baseline's full samples: "graded" (0-6), "binary" or "score" (`jaxalign.tasks.judges`)
    min_chosen_score: the baseline drops a prompt whose best sample scores below this (None: no threshold)
    min_margin: the baseline drops a prompt whose best-minus-worst judge-score gap is below this"""

    base: kit.ArithDPOConfig = _BASE
    samples_per_prefix: int = 8
    gold_fallback: bool = False
    num_pairs: int | None = None
    judge: str = "graded"
    min_chosen_score: float | None = float(judges.GRADED_MAX)
    min_margin: float = 1.0

    OVERRIDE_ALIASES: ClassVar[dict[str, str]] = {"beta": "base.dpo.beta"}

    def __post_init__(self):
        if not _is_int(self.samples_per_prefix, 1):
            raise ValueError(f"samples_per_prefix must be an integer >= 1, got {self.samples_per_prefix!r}")
        if self.num_pairs is not None and not _is_int(self.num_pairs, 1):
            raise ValueError(f"num_pairs must be an integer >= 1 or None (as many as both methods have), got "
                             f"{self.num_pairs!r}")
        judges.check_judge(self.judge, "judge")
        select_pairs(np.zeros((1, 2)), min_margin=self.min_margin,
                     min_chosen_score=-np.inf if self.min_chosen_score is None else self.min_chosen_score)
        dpo, base = self.base.dpo, self.base
        if dpo.objective != "sigmoid" or dpo.objective_args or dpo.label_smoothing is not None:
            raise ValueError(f"Step-DPO is sigmoid DPO on the step tokens: base.dpo.objective must be 'sigmoid' "
                             f"without objective_args or label_smoothing, got objective={dpo.objective!r}, "
                             f"objective_args={dpo.objective_args!r}, label_smoothing={dpo.label_smoothing!r}")
        if dpo.reference == "sync":
            raise ValueError("Step-DPO keeps the SFT policy as its fixed reference: base.dpo.reference must be "
                             "'cached' or 'online', got 'sync'")
        if base.task.max_recaps:
            raise ValueError(f"step pairs treat the chain's steps only, and a recap is not a step: "
                             f"base.task.max_recaps must be 0, got {base.task.max_recaps!r}")


def graded_samples(cfg: StepDPOConfig, sft_params, train: np.ndarray, workdir: str):
    """The SFT policy's samples (cached in samples.npz): (problems [P, ops], prompt tokens [P, L], completions and
    masks [P, K, C])."""
    problems, prompt_tokens, completions, masks = kit.on_policy_samples(cfg.base, sft_params, train, workdir)
    k = cfg.base.pairs.samples_per_prompt
    return problems, prompt_tokens, completions.reshape(len(problems), k, -1), masks.reshape(len(problems), k, -1)


def step_pair_data(cfg: StepDPOConfig, sft_params, problems, completions, masks,
                   workdir: str) -> tuple[ArrayDataset, dict]:
    """Step-DPO's pairs from the graded samples, chosen steps sampled from the SFT policy; cached in step_pairs.npz."""
    path = RunDir(workdir).file("step_pairs.npz")
    cached = kit.load_dataset(path)
    if cached is not None:
        return cached
    base = cfg.base
    arrays, stats = build_step_pairs(sft_params, base.model, problems, completions, masks,
                                     samples_per_prefix=cfg.samples_per_prefix, rng=jax.random.key(base.seed + 31),
                                     batch_size=base.eval_batch_size, temperature=base.pairs.temperature,
                                     top_k=base.pairs.top_k, gold_fallback=cfg.gold_fallback)
    data = ArrayDataset(arrays)
    kit.save_dataset(path, data, stats)
    return data, stats


def response_pair_data(cfg: StepDPOConfig, problems, prompt_tokens, completions, masks,
                       workdir: str) -> tuple[ArrayDataset, dict]:
    """The baseline's best-vs-worst full-response pairs of the same samples (`select_pairs` on the judge's scores);
    cached in response_pairs.npz."""
    path = RunDir(workdir).file("response_pairs.npz")
    cached = kit.load_dataset(path)
    if cached is not None:
        return cached
    num_prompts, k, width = completions.shape
    grades = kit.grade_completions(np.repeat(problems, k, axis=0), completions.reshape(-1, width))
    scores = judges.judge_scores(cfg.judge, grades).reshape(num_prompts, k)
    selection, stats = select_pairs(
        scores, min_margin=cfg.min_margin,
        min_chosen_score=-np.inf if cfg.min_chosen_score is None else cfg.min_chosen_score)
    arrays = pair_arrays(prompt_tokens, prompt_tokens != CharTokenizer.PAD_ID, completions, masks, selection)
    arrays["prompt_index"] = selection.prompt.astype(np.int32)
    correct = np.array([g.correct for g in grades]).reshape(num_prompts, k)
    stats.update(samples_correct_rate=float(correct.mean()),
                 prompts_with_correct_sample=int(correct.any(axis=1).sum()))
    data = ArrayDataset(arrays)
    kit.save_dataset(path, data, stats)
    return data, stats


def equal_pairs(cfg: StepDPOConfig, step: ArrayDataset, response: ArrayDataset) -> int:
    """How many pairs each method trains on: `num_pairs`, or the smaller pair set's size; one clear error when a set
    is too small for it or for a batch."""
    wanted = min(len(step), len(response)) if cfg.num_pairs is None else cfg.num_pairs
    short = [f"{name} has {len(data)}" for name, data in (("Step-DPO", step), ("response-level DPO", response))
             if len(data) < wanted]
    if short:
        raise ValueError(f"num_pairs={cfg.num_pairs}: {' and '.join(short)} pairs; sample more prompts "
                         f"(base.pairs.num_prompts) or ask for fewer pairs")
    if wanted < cfg.base.dpo.batch_size:
        raise ValueError(f"only {wanted} pairs per method (Step-DPO has {len(step)}, response-level DPO "
                         f"{len(response)}), fewer than base.dpo.batch_size={cfg.base.dpo.batch_size}; sample more "
                         f"prompts (base.pairs.num_prompts) or lower the batch size")
    return wanted


def first_rows(data: ArrayDataset, n: int) -> ArrayDataset:
    return ArrayDataset({k: v[:n] for k, v in data.arrays.items()})


def train_method(cfg: StepDPOConfig, name: str, mesh, sft_params, data: ArrayDataset, problems,
                 workdir: str, extra: dict) -> dict:
    """The main job's DPO phase on `data` from the SFT policy, in workdir/<name>; its held-out evaluation record."""
    method_dir = paths.join(workdir, name)
    paths.makedirs(method_dir)
    selected, _, guard = kit.train_dpo(cfg.base, mesh, sft_params, data, problems, method_dir,
                                             MetricsLog(RunDir(method_dir).metrics))
    # Without base.dpo.select_best train_dpo returns the last step, whatever the guard would have chosen.
    evaluated = guard["selected_step"] if cfg.base.dpo.select_best else cfg.base.dpo.steps
    info = dict(extra, pairs=len(data), steps=cfg.base.dpo.steps, evaluated_step=evaluated,
                selected_val_accuracy=guard["selected_val_accuracy"], last_val_accuracy=guard["last_val_accuracy"],
                validation_history=guard["validation_history"])
    return kit.cached_greedy_eval(selected, cfg.base, problems.test, RunDir(method_dir).file("eval.json"), info)


def run(cfg: StepDPOConfig, workdir: str) -> dict:
    """Run (or resume) Step-DPO and its response-level baseline in `workdir`; returns and writes results.json."""
    clock = time.perf_counter()
    base = cfg.base
    start = kit.start_experiment(cfg, base, workdir)
    mesh, problems, sft_params = start.mesh, start.problems, start.sft_params
    prompts, prompt_tokens, completions, masks = graded_samples(cfg, sft_params, problems.train, workdir)
    step_data, step_stats = step_pair_data(cfg, sft_params, prompts, completions, masks, workdir)
    response_data, response_stats = response_pair_data(cfg, prompts, prompt_tokens, completions, masks, workdir)
    n = equal_pairs(cfg, step_data, response_data)
    sft_eval = kit.cached_greedy_eval(sft_params, base, problems.test, RunDir(workdir).file("sft_eval.json"),
                                            {"method": "sft"})

    step_data = first_rows(step_data, n)
    records = {
        "step_dpo": train_method(cfg, "step_dpo", mesh, sft_params, step_data, problems, workdir,
                                 {"mean_step_tokens": {side: float(step_data.arrays[f"{side}_step_lengths"].mean())
                                                       for side in ("chosen", "rejected")}}),
        "response_dpo": train_method(cfg, "response_dpo", mesh, sft_params,
                                     first_rows(response_data, n), problems, workdir, {}),
    }
    sft_accuracy = sft_eval["test_accuracy"]
    comparison = {"sft": {"accuracy": sft_accuracy}}
    for name, record in records.items():
        comparison[name] = {"accuracy": record["test_accuracy"], "pairs": n, "steps": base.dpo.steps,
                            "gain_per_pair": (record["test_accuracy"] - sft_accuracy) / n,
                            "evaluated_step": record["evaluated_step"]}
    results = {
        "comparison": comparison,
        "claim": "Step-DPO (preferences over the first wrong step given the correct prefix, chosen steps sampled from "
                 "the policy) gains more held-out accuracy per preference pair than response-level DPO trained from "
                 "the same SFT policy on the same number of pairs for the same number of steps",
        "claim_holds": bool(comparison["step_dpo"]["gain_per_pair"] > comparison["response_dpo"]["gain_per_pair"]),
        "sft_accuracy": sft_accuracy,
        "pairs_per_method": n,
        "step_pairs": step_stats,
        "response_pairs": response_stats,
        "methods": records,
        "carry_share": arith.carry_share(base.task.num_operands),
        "num_test_prompts": len(problems.test),
        "steps": {"sft": base.sft.steps, "dpo_per_method": base.dpo.steps},
        "num_params": count_params(sft_params),
        "wall_seconds": time.perf_counter() - clock,
        "config": config_to_dict(cfg),
    }
    return kit.finish_experiment(workdir, results, lambda path: plot(results, path), "step_dpo.png")


def plot(results: dict, path: str) -> None:
    """Held-out accuracy of SFT and both methods, and their validation accuracy over the DPO steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    comparison = results["comparison"]
    fig, (ax_acc, ax_val) = plt.subplots(1, 2, figsize=(10, 3.5))
    names = ["sft", *METHODS]
    ax_acc.bar(range(len(names)), [comparison[n]["accuracy"] for n in names], color=["gray", "tab:blue", "tab:orange"])
    ax_acc.set_xticks(range(len(names)), ["SFT", "Step-DPO", "response DPO"])
    ax_acc.set(ylabel="held-out accuracy (greedy)",
               title=f"ARITH, {results['pairs_per_method']} pairs per method")
    for name in METHODS:
        history = results["methods"][name]["validation_history"]
        ax_val.plot([r["step"] for r in history], [r["val/accuracy"] for r in history], marker="o", label=name)
    ax_val.set(xlabel="DPO step", ylabel="validation accuracy (greedy)")
    ax_val.legend()
    fig.tight_layout()
    paths.save_figure(fig, path, dpi=120)
    plt.close(fig)
