"""Method-vs-baseline comparisons on ARITH (TRPA and BRAIn against DPO on the same samples): each method runs the
same iteration loop from the same SFT policy (fresh prompts per iteration, K samples of the current policy, the
method's own training rows and loss through the shared preference phase), then held-out accuracy and Monte-Carlo
KL(pi || pi_old) of every iterate, the claim judged on the last ones, results.json and a plot."""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable

import jax
import numpy as np

from jaxalign import paths
from jaxalign.algorithms.iterative import run_iterations
from jaxalign.algorithms.preference_pairs import pair_arrays, select_pairs
from jaxalign.data.iterator import ArrayDataset
from jaxalign.experiments.arith_kit.config import ARITH_DPO, ArithDPOConfig, completion_budget
from jaxalign.experiments.arith_kit import data as arith_data
from jaxalign.experiments.arith_kit import evaluation
from jaxalign.experiments.arith_kit.data import Problems, build_ranked_lists, load_dataset, save_dataset
from jaxalign.experiments.arith_kit.loop import iteration_config, iteration_prompts
from jaxalign.experiments.arith_kit.phases import finish_experiment, start_experiment, train_dpo
from jaxalign.models.llama import DecoderLM, ModelConfig, count_params
from jaxalign.rundir import RunDir, config_to_dict, load_json, params_sha256
from jaxalign.sampling import SamplingConfig
from jaxalign.tasks.tokenizer import CharTokenizer
from jaxalign.train.listwise import compute_list_reference_logprobs
from jaxalign.train.loop import MetricsLog
from jaxalign.train.optim import OptimConfig
from jaxalign.train.preference import CustomLoss
from jaxalign.train.step import logits_fn


# The main job with a preference phase sized for these comparisons: validation every 50 steps, no checkpoint
# selection (both methods are compared after the same number of steps; the guard could pick step 0 and report a
# KL of exactly 0).
BASE = dataclasses.replace(
    ArithDPOConfig(),
    dpo=dataclasses.replace(ARITH_DPO, eval_every=50, select_best=False,
                            optim=OptimConfig(learning_rate=5e-5, warmup_steps=10)),
)


@dataclasses.dataclass(frozen=True)
class Method:
    """One trained method of a comparison.

    make_data(t, latest, prompts, prompt_tokens, completions, masks) -> (ArrayDataset, stats): the training rows of
        iteration t from its samples (completions / masks [P, K, C]) of the sampling policy `latest`.
    custom: the loss it trains (`CustomLoss`), or None for the main job's DPO step on pairs.
    rows_needed: the fewest rows a training set may have (the batch size)."""

    name: str
    make_data: Callable
    custom: CustomLoss | None
    rows_needed: int


def sample_iteration(base: ArithDPOConfig, params, problems: np.ndarray, t: int, path: str):
    """`base.pairs.samples_per_prompt` samples per prompt from `params` (iteration t's key), cached at `path`:
    (prompt tokens [P, L], completions [P, K, C], masks [P, K, C])."""
    cached = load_dataset(path)
    if cached is not None:
        a = cached[0].arrays
        return a["prompt_tokens"], a["completions"], a["masks"]
    k = base.pairs.samples_per_prompt
    sampling = SamplingConfig(max_new_tokens=completion_budget(base.model),
                              temperature=base.pairs.temperature, top_k=base.pairs.top_k)
    prompt_tokens, completions, masks = arith_data.sample_completions(
        params, base.model, np.repeat(problems, k, axis=0), sampling, jax.random.key(base.seed * 1000 + 300 + t),
        base.eval_batch_size)
    arrays = {"prompt_tokens": prompt_tokens[::k], "completions": completions.reshape(len(problems), k, -1),
              "masks": masks.reshape(len(problems), k, -1)}
    save_dataset(path, ArrayDataset(arrays), {})
    return arrays["prompt_tokens"], arrays["completions"], arrays["masks"]


def decode_texts(completions: np.ndarray) -> list[str]:
    """The text of every completion of a [P, K, C] array, row-major (prompt-major)."""
    tok = CharTokenizer()
    return [tok.decode(c) for c in completions.reshape(-1, completions.shape[-1])]


def sample_lists(problems: np.ndarray, prompt_tokens: np.ndarray, completions: np.ndarray, masks: np.ndarray,
                 rows: np.ndarray) -> dict[str, np.ndarray]:
    """The ranked-list arrays (list_tokens / list_attention_mask / list_completion_mask [R, K, L + C], list_valid
    [R, K]) of the prompts `rows`, all K samples each (`ranked_lists.build_ranked_lists` with nothing dropped)."""
    _, k, width = completions.shape
    rows = np.asarray(rows, np.int64)
    dataset, _ = build_ranked_lists(problems[rows], prompt_tokens[rows], completions[rows].reshape(-1, width),
                                    masks[rows].reshape(-1, width), k, min_score_gap=0.0,
                                    require_correct_chosen=False)
    return {key: a for key, a in dataset.arrays.items() if key != "list_scores"}


@functools.lru_cache(maxsize=8)
def _apply_fn(model_cfg: ModelConfig) -> Callable:
    """One apply function per model config: `compute_list_reference_logprobs` compiles once per function."""
    return logits_fn(DecoderLM(model_cfg))


def frozen_list_logprobs(model_cfg: ModelConfig, params, lists: dict[str, np.ndarray], batch_size: int) -> np.ndarray:
    """[R, K, T] float32: a frozen model's masked per-token log-probs of every list candidate (the same flattened
    forward pass the loss runs, `compute_list_reference_logprobs`)."""
    return compute_list_reference_logprobs(_apply_fn(model_cfg), params, lists, batch_size)["list_reference"]


def dpo_baseline(base: ArithDPOConfig, score_fn: Callable[[np.ndarray, list[str]], np.ndarray]) -> Method:
    """The baseline: the main job's DPO step (base.dpo) on the best- against the worst-scored sample of every prompt
    whose samples are not all tied, `score_fn(repeated problems, texts) -> [P * K]` (higher is better), reference
    = the sampling policy (train_dpo's start parameters)."""

    def make_data(t, latest, prompts, prompt_tokens, completions, masks):
        num_prompts, k, _ = completions.shape
        scores = np.asarray(score_fn(np.repeat(prompts, k, axis=0), decode_texts(completions)),
                            np.float64).reshape(num_prompts, k)
        selection, stats = select_pairs(scores)
        arrays = pair_arrays(prompt_tokens, prompt_tokens != CharTokenizer.PAD_ID, completions, masks, selection)
        return ArrayDataset(arrays), stats

    return Method(name="dpo", make_data=make_data, custom=None, rows_needed=base.dpo.batch_size)


def _evaluate_iterate(cfg, selected, latest, sft_params, problems: Problems, path: str, info: dict) -> dict:
    """The iteration record: `info`, held-out greedy accuracy and the two sampled KLs, read back from `path` when it
    holds the record of the same parameters (a resumed run samples nothing again)."""
    saved = load_json(path)
    if saved is not None and saved.get("params_sha256") == params_sha256(selected):
        return saved
    base = cfg.base
    held_out = problems.test[: cfg.num_kl_prompts]
    to_old = evaluation.sampled_kl(selected, latest, base.model, held_out, base.eval_batch_size, base.seed + 31)
    to_sft = to_old if latest is sft_params else evaluation.sampled_kl(selected, sft_params, base.model, held_out,
                                                            base.eval_batch_size, base.seed + 31)
    info = dict(info, kl_to_old=to_old["kl"], kl_to_old_stderr=to_old["kl_stderr"], kl_to_sft=to_sft["kl"],
                kl_to_sft_stderr=to_sft["kl_stderr"])
    return evaluation.cached_greedy_eval(selected, base, problems.test, path, info)


def train_method(cfg, method: Method, mesh, sft_params, problems: Problems, workdir: str) -> list[dict]:
    """The loop of one method (module docstring, step 2) from `sft_params`; returns its iteration records."""
    base, records = cfg.base, []

    def iterate(t: int, latest, previous):
        it = RunDir(workdir).sub(method.name, f"iter_{t}")
        it_dir = it.root
        paths.makedirs(it_dir)
        prompts = iteration_prompts(cfg, problems.train, t)
        # Iteration 0 samples the SFT policy for every method: one shared file, the same samples.
        samples_path = RunDir(workdir).file("samples_sft.npz") if t == 0 else it.samples
        prompt_tokens, completions, masks = sample_iteration(base, latest, prompts, t, samples_path)
        data_path = it.file("data.npz")
        cached = load_dataset(data_path)
        if cached is None:
            cached = method.make_data(t, latest, prompts, prompt_tokens, completions, masks)
            if len(cached[0]) < method.rows_needed:
                raise ValueError(
                    f"{method.name}, iteration {t}: only {len(cached[0])} training rows from "
                    f"prompts_per_iteration={cfg.prompts_per_iteration} prompts (statistics: {cached[1]}), fewer "
                    f"than the batch size {method.rows_needed}; raise prompts_per_iteration or "
                    f"base.pairs.samples_per_prompt")
            save_dataset(data_path, *cached)
        data, stats = cached
        selected, _, guard = train_dpo(iteration_config(cfg), mesh, latest, data, problems, it_dir,
                                       MetricsLog(it.metrics), custom=method.custom)
        samples = completions.reshape(-1, completions.shape[-1])
        repeated = np.repeat(prompts, completions.shape[1], axis=0)
        correct = [g.correct for g in arith_data.grade_completions(repeated, samples)]
        # train_dpo returns the guard's choice only with base.dpo.select_best, else the last step: record that one.
        kept = "selected" if base.dpo.select_best else "last"
        info = {"iteration": t + 1, **stats, "train_rows": len(data), "samples_correct_rate": float(np.mean(correct)),
                "sampling_sha256": params_sha256(latest), "kept_step": guard[f"{kept}_step"],
                "val_accuracy": guard[f"{kept}_val_accuracy"], "validation_history": guard["validation_history"]}
        records.append(_evaluate_iterate(cfg, selected, latest, sft_params, problems,
                                         it.file("iteration.json"), info))
        return selected

    run_iterations(sft_params, cfg.iterations, iterate)
    return records


def method_summary(records: list[dict]) -> dict:
    """The comparison entry of one method: its last iterate's numbers."""
    last = records[-1]
    return {"accuracy": last["test_accuracy"], "kl_to_old": last["kl_to_old"],
            "kl_to_old_stderr": last["kl_to_old_stderr"], "kl_to_sft": last["kl_to_sft"],
            "val_accuracy": last["val_accuracy"], "mean_length": last["test_mean_length"]}


def run_comparison(cfg, workdir: str, make_methods: Callable, judge_claim: Callable, plot_title: str,
                   plot_name: str) -> dict:
    """SFT, then every method of `make_methods(sft_params)` through the loop, then results.json with
    "comparison" and the claim `judge_claim(comparison) -> (sentence, holds)`, and a plot."""
    clock = time.perf_counter()
    base = cfg.base
    start = start_experiment(cfg, base, workdir, iteration_config(cfg),
                                       check=lambda problems: iteration_prompts(cfg, problems.train, 0))
    mesh, problems, sft_params = start.mesh, start.problems, start.sft_params
    sft_eval = evaluation.cached_greedy_eval(sft_params, base, problems.test, RunDir(workdir).file("sft_eval.json"),
                                            {"iteration": 0})
    methods = {}
    for method in make_methods(sft_params):
        records = train_method(cfg, method, mesh, sft_params, problems, workdir)
        methods[method.name] = {
            "accuracy_per_iteration": [sft_eval["test_accuracy"]] + [r["test_accuracy"] for r in records],
            "kl_to_old_per_iteration": [0.0] + [r["kl_to_old"] for r in records],
            "kl_to_sft_per_iteration": [0.0] + [r["kl_to_sft"] for r in records],
            "iterations": records,
        }
    comparison = {name: method_summary(m["iterations"]) for name, m in methods.items()}
    claim, holds = judge_claim(comparison)
    results = {
        "comparison": comparison,
        "claim": claim,
        "claim_holds": bool(holds),
        "sft_accuracy": sft_eval["test_accuracy"],
        "methods": methods,
        "num_test_prompts": len(problems.test),
        "num_kl_prompts": int(min(cfg.num_kl_prompts, len(problems.test))),
        "steps": {"sft": base.sft.steps, "per_iteration": cfg.steps_per_iteration,
                  "total": cfg.steps_per_iteration * cfg.iterations},
        "num_params": count_params(sft_params),
        "wall_seconds": time.perf_counter() - clock,
        "config": config_to_dict(cfg),
    }
    return finish_experiment(workdir, results, lambda path: plot(results, plot_title, path), plot_name)


def plot(results: dict, title: str, path: str) -> None:
    """Held-out accuracy and the sampled KL to the sampling policy against the iteration, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax_acc, ax_kl) = plt.subplots(1, 2, figsize=(10, 3.5))
    for name, m in results["methods"].items():
        steps = range(len(m["accuracy_per_iteration"]))
        ax_acc.plot(steps, m["accuracy_per_iteration"], marker="o", label=name)
        ax_kl.plot(steps, m["kl_to_old_per_iteration"], marker="o", label=name)
    for ax in (ax_acc, ax_kl):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_acc.set(xlabel="iteration (0 = SFT)", ylabel="held-out accuracy (greedy)", title=title)
    ax_kl.set(xlabel="iteration", ylabel="KL(pi || pi_old) per response", title="distance to the sampling policy")
    ax_acc.legend(fontsize=8)
    fig.tight_layout()
    paths.save_figure(fig, path, dpi=120)
    plt.close(fig)
