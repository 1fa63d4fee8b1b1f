"""TRPA on ARITH against sigmoid DPO on the same samples (METHODS.md section 6, TRPA [code]).

TRPA (Su et al. 2025, "Trust Region Preference Approximation: A simple and stable reinforcement learning algorithm
for LLM reasoning", arXiv:2504.04524, and the authors' code): K responses per prompt graded into rule-based levels
(`jaxalign.tasks.levels`: 1 correct, 2 wrong, 3 incomplete, 4 malformed); every pair of responses at different levels
is a preference, scored with l(y) = the masked MEAN token log-ratio against the frozen initial model,
h = kappa * beta * (l(a) - l(b)) (kappa = 2.5 when the better response is correct), plus a k3-KL trust region to the
sampling ("old") policy with c = 0.001. The objective is `jaxalign.losses.iterative.trpa`, trained here through
`arith_dpo.train_dpo(..., custom=CustomLoss(trpa_loss_fn(...)))`.

Claim checked (the paper: TRPA improves reasoning accuracy while the trust region keeps the policy close to the old
policy, "stable"): TRPA's held-out greedy accuracy is at least sigmoid DPO's minus `accuracy_tolerance` (0.02) AND
its Monte-Carlo KL(pi || pi_old) on held-out prompts is smaller than DPO's.

Pipeline (every phase resumable; re-running the same command continues where a killed run stopped):
1. SFT exactly as the main job (`arith_dpo.train_sft`, WORKDIR/checkpoints/sft).
2. For each method (TRPA, then the DPO baseline) and t = 0 .. iterations - 1, in WORKDIR/<method>/iter_<t>:
   a. `prompts_per_iteration` fresh training prompts (`iterative_dpo.iteration_prompts`: the same prompts for both
      methods), `base.pairs.samples_per_prompt` samples each from the method's current policy pi_t at
      `base.pairs.temperature` (t = 0: the SFT policy, so both methods see the SAME samples, WORKDIR/samples_sft.npz).
   b. The levels of every sample. TRPA: one list per prompt with at least two distinct levels (the others have no
      pair), the frozen initial (SFT) model's and pi_old = pi_t's per-token log-probs precomputed into the lists.
      DPO: the best- against the worst-level sample of the same prompts (`preference_pairs.select_pairs` on -level).
   c. `steps_per_iteration` steps of `arith_dpo.train_dpo` from pi_t (optimizer, checkpoints, validation guard,
      resume). DPO is the main job's step (base.dpo: sigmoid, beta, chosen-NLL weight) with reference pi_t (online
      DPO); TRPA keeps the frozen initial model as its reference and pi_t as its trust-region anchor.
   d. Held-out greedy accuracy of pi_{t+1}, and KL(pi_{t+1} || pi_t) and KL(pi_{t+1} || pi_SFT) estimated by
      Monte Carlo: mean over y ~ pi_{t+1}(.|x) (temperature 1) on the first `num_kl_prompts` held-out prompts of
      L_{pi_{t+1}}(y) - L_{old}(y) (summed completion log-probs), with its standard error.
3. results.json: per method and iteration, the comparison of the last iterates, the claim; trpa_arith.png.

Helpers shared with `brain_arith` (same pipeline, another objective): `Method`, `sample_iteration`, `sample_lists`,
`frozen_list_logprobs`, `dpo_baseline`, `sampled_kl`, `run_comparison`.
"""
from __future__ import annotations

import dataclasses
import functools
import numbers
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.algorithms.iterative import run_iterations
from jaxalign.algorithms.preference_pairs import pair_arrays, select_pairs
from jaxalign.data.iterator import ArrayDataset
from jaxalign.experiments import arith_dpo, objective_extras
from jaxalign.experiments.iterative_dpo import iteration_config, iteration_prompts
from jaxalign.experiments.ranked_lists import build_ranked_lists
from jaxalign.losses import get_spec
from jaxalign.losses.common import check_hyperparameter, check_objective_beta
from jaxalign.losses.iterative import trpa
from jaxalign.models.llama import DecoderLM, ModelConfig, count_params
from jaxalign.sampling import SamplingConfig
from jaxalign.tasks import levels as trpa_levels_lib
from jaxalign.tasks.tokenizer import CharTokenizer
from jaxalign.train.listwise import compute_list_reference_logprobs, list_token_logprobs
from jaxalign.train.loop import MetricsLog
from jaxalign.train.optim import OptimConfig
from jaxalign.train.step import logits_fn

# The batch keys of the frozen models' precomputed per-token log-probs [P, K, T] and the levels [P, K].
REFERENCE_KEY = "list_reference"  # the frozen initial (SFT) model: l(y)'s reference
OLD_KEY = "list_old"  # the sampling policy pi_old: the trust region's anchor
LEVELS_KEY = "list_levels"
LIST_TOKEN_KEYS = ("list_attention_mask",)

# The main job with a preference phase sized for these comparisons: validation every 50 steps, no checkpoint
# selection (both methods are compared after the same number of steps; the guard could pick step 0 and report a
# KL of exactly 0).
BASE = dataclasses.replace(
    arith_dpo.ArithDPOConfig(),
    dpo=dataclasses.replace(arith_dpo.DPOConfig(), eval_every=50, select_best=False,
                            optim=OptimConfig(learning_rate=5e-5, warmup_steps=10)),
)


def _is_int(value: Any, lowest: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Integral) and value >= lowest


def check_loop_fields(cfg: Any) -> None:
    """One clear error for a bad loop size (the fields every comparison config shares)."""
    for name in ("iterations", "prompts_per_iteration", "steps_per_iteration", "num_kl_prompts"):
        if not _is_int(getattr(cfg, name), 1):
            raise ValueError(f"{name} must be an integer >= 1, got {getattr(cfg, name)!r}")
    if cfg.base.lora.rank:
        raise ValueError("these comparisons train full parameters (a custom loss refuses LoRA): set base.lora.rank=0")
    if cfg.base.dpo.reference == "sync":
        raise ValueError("base.dpo.reference=sync: the custom losses read precomputed frozen log-probs; use cached "
                         "or online")
    if get_spec(cfg.base.dpo.objective).family == "listwise":
        raise ValueError(f"base.dpo.objective={cfg.base.dpo.objective!r} is listwise; the baseline trains on "
                         f"best-vs-worst pairs: use a pairwise objective (default sigmoid)")


@dataclasses.dataclass(frozen=True)
class TRPAConfig:
    """base: the main job's config (model, SFT, samples per prompt and temperature in `base.pairs`, the baseline's
    DPO step and the shared optimizer / validation cadence in `base.dpo`; base.dpo.steps is replaced by
    steps_per_iteration, base.dpo.list_batch_size is TRPA's prompts per step: 16 lists of 8 = the sequences of
    64 pairs).
    iterations, prompts_per_iteration, steps_per_iteration: the loop's size (fresh prompts every iteration).
    beta, kl_coef (c), kappa: TRPA's hyper-parameters (`jaxalign.losses.iterative.trpa`). beta multiplies a MEAN
        token log-ratio (|y| is about 20 tokens here). 10 had the best validation accuracy of {2, 10, 40} with the
        default budget (seed 0): at 40 the pair loss saturates within 30 steps and the policy barely moves, at 2
        the rejected samples' likelihoods collapse and accuracy falls back after 50 steps.
    num_kl_prompts: held-out prompts whose samples estimate KL(pi || pi_old).
    accuracy_tolerance: how far below DPO's accuracy TRPA's may be for the claim to hold."""

    base: arith_dpo.ArithDPOConfig = BASE
    iterations: int = 1
    prompts_per_iteration: int = 2048
    steps_per_iteration: int = 150
    beta: float = 10.0
    kl_coef: float = 0.001
    kappa: float = 2.5
    num_kl_prompts: int = 512
    accuracy_tolerance: float = 0.02

    def __post_init__(self):
        check_loop_fields(self)
        check_objective_beta("trpa_arith", self.beta)
        check_hyperparameter("trpa_arith", "kl_coef", self.kl_coef, lambda c: c >= 0, "kl_coef >= 0")
        check_hyperparameter("trpa_arith", "kappa", self.kappa, lambda k: k > 0, "kappa > 0")
        check_hyperparameter("trpa_arith", "accuracy_tolerance", self.accuracy_tolerance, lambda a: a >= 0,
                             "accuracy_tolerance >= 0")


# ---------------------------------------------------------------------------------------------------------------
# The loss.


def trpa_loss_fn(model: DecoderLM, beta: float, kl_coef: float, kappa: float) -> Callable:
    """TRPA (METHODS.md section 6; `jaxalign.losses.iterative.trpa`) as a `jaxalign.train.step` loss function:
    loss_fn(params, frozen, batch) -> (loss * P, (P, metrics)), P the lists (prompts) in the batch.

    The policy's per-token log-probs of the P*K sequences come from ONE forward pass (`list_token_logprobs`); the
    frozen initial model's (`list_reference`) and the sampling policy's (`list_old`) are precomputed in the batch
    (`frozen` is unused). The objective averages over the batch's preference pairs, so accumulating microbatches
    (base.dpo.grad_accum_steps > 1) gives a P-weighted mean of microbatch means, not the large-batch loss."""

    apply = logits_fn(model)

    def loss_fn(params, frozen, batch):
        del frozen
        policy = list_token_logprobs(apply, params, batch)
        loss, metrics = trpa(policy, batch[REFERENCE_KEY], batch[OLD_KEY], batch["list_completion_mask"],
                             batch[LEVELS_KEY], batch["list_valid"], beta=beta, kl_coef=kl_coef, kappa=kappa)
        prompts = jnp.asarray(policy.shape[0], jnp.float32)
        return loss * prompts, (prompts, metrics)

    return loss_fn


# ---------------------------------------------------------------------------------------------------------------
# Host-side pieces shared with brain_arith.


@dataclasses.dataclass(frozen=True)
class Method:
    """One trained method of a comparison.

    make_data(t, latest, prompts, prompt_tokens, completions, masks) -> (ArrayDataset, stats): the training rows of
        iteration t from its samples (completions / masks [P, K, C]) of the sampling policy `latest`.
    custom: the loss it trains (`arith_dpo.CustomLoss`), or None for the main job's DPO step on pairs.
    rows_needed: the fewest rows a training set may have (the batch size)."""

    name: str
    make_data: Callable
    custom: arith_dpo.CustomLoss | None
    rows_needed: int


def sample_iteration(base: arith_dpo.ArithDPOConfig, params, problems: np.ndarray, t: int, path: str):
    """`base.pairs.samples_per_prompt` samples per prompt from `params` (iteration t's key), cached at `path`:
    (prompt tokens [P, L], completions [P, K, C], masks [P, K, C])."""
    cached = arith_dpo.load_dataset(path)
    if cached is not None:
        a = cached[0].arrays
        return a["prompt_tokens"], a["completions"], a["masks"]
    k = base.pairs.samples_per_prompt
    sampling = SamplingConfig(max_new_tokens=arith_dpo.completion_budget(base.model),
                              temperature=base.pairs.temperature, top_k=base.pairs.top_k)
    prompt_tokens, completions, masks = arith_dpo.sample_completions(
        params, base.model, np.repeat(problems, k, axis=0), sampling, jax.random.key(base.seed * 1000 + 300 + t),
        base.eval_batch_size)
    arrays = {"prompt_tokens": prompt_tokens[::k], "completions": completions.reshape(len(problems), k, -1),
              "masks": masks.reshape(len(problems), k, -1)}
    arith_dpo.save_dataset(path, ArrayDataset(arrays), {})
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


def dpo_baseline(base: arith_dpo.ArithDPOConfig, score_fn: Callable[[np.ndarray, list[str]], np.ndarray]) -> Method:
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


def trpa_method(cfg: TRPAConfig, sft_params) -> Method:
    """TRPA: lists of the prompts whose samples span at least two levels, with the levels, the frozen initial
    model's log-probs (reference) and the sampling policy's (old) precomputed."""
    base = cfg.base

    def make_data(t, latest, prompts, prompt_tokens, completions, masks):
        num_prompts, k, _ = completions.shape
        levels = trpa_levels_lib.trpa_levels(np.repeat(prompts, k, axis=0),
                                             decode_texts(completions)).reshape(num_prompts, k)
        rows = np.flatnonzero(levels.min(axis=1) < levels.max(axis=1))
        lists = sample_lists(prompts, prompt_tokens, completions, masks, rows)
        reference = frozen_list_logprobs(base.model, sft_params, lists, base.eval_batch_size)
        # At t = 0 the sampling policy is the SFT model itself: its log-probs are the reference's.
        old = reference if latest is sft_params else frozen_list_logprobs(base.model, latest, lists,
                                                                          base.eval_batch_size)
        arrays = {**lists, LEVELS_KEY: levels[rows], REFERENCE_KEY: reference, OLD_KEY: old}
        stats = {"prompts": int(num_prompts), "lists": len(rows),
                 "dropped_single_level": int(num_prompts - len(rows)),
                 "pairs_per_list_mean": float(np.mean([np.sum(l[:, None] < l[None, :]) for l in levels[rows]]))
                 if len(rows) else 0.0,
                 **{f"level_{name}": n for name, n in trpa_levels_lib.level_counts(levels).items()}}
        return ArrayDataset(arrays), stats

    loss = trpa_loss_fn(DecoderLM(base.model), cfg.beta, cfg.kl_coef, cfg.kappa)
    custom = arith_dpo.CustomLoss(loss, base.dpo.list_batch_size, LIST_TOKEN_KEYS)
    return Method(name="trpa", make_data=make_data, custom=custom, rows_needed=base.dpo.list_batch_size)


def level_scores(problems: np.ndarray, texts: list[str]) -> np.ndarray:
    """-level: the TRPA levels as a judge (higher is better), for the DPO baseline's best-vs-worst pairs."""
    return -trpa_levels_lib.trpa_levels(problems, texts).astype(np.float64)


def sampled_kl(params, old, model_cfg: ModelConfig, problems: np.ndarray, batch_size: int,
               seed: int) -> dict[str, float]:
    """Monte-Carlo KL(pi || old) per response: mean over y ~ pi(.|x) (temperature 1, one sample per problem) of
    L_pi(y) - L_old(y), and its standard error."""
    sampling = SamplingConfig(max_new_tokens=arith_dpo.completion_budget(model_cfg), temperature=1.0)
    prompts, completions, masks = arith_dpo.sample_completions(params, model_cfg, problems, sampling,
                                                               jax.random.key(seed), batch_size)
    tokens = np.concatenate([prompts, completions], axis=1)
    attention = np.concatenate([prompts != CharTokenizer.PAD_ID, masks], axis=1).astype(np.int32)
    completion = np.concatenate([np.zeros_like(prompts), masks], axis=1).astype(np.int32)
    ratio = (objective_extras.summed_logprobs(params, model_cfg, tokens, attention, completion, batch_size)
             - objective_extras.summed_logprobs(old, model_cfg, tokens, attention, completion, batch_size))
    return {"kl": float(ratio.mean()), "kl_stderr": float(ratio.std(ddof=1) / np.sqrt(len(ratio)))
            if len(ratio) > 1 else 0.0}


# ---------------------------------------------------------------------------------------------------------------
# The comparison loop (shared with brain_arith).


def _evaluate_iterate(cfg, selected, latest, sft_params, problems: arith_dpo.Problems, path: str, info: dict) -> dict:
    """The iteration record: `info`, held-out greedy accuracy and the two sampled KLs, read back from `path` when it
    holds the record of the same parameters (a resumed run samples nothing again)."""
    saved = arith_dpo.load_json(path)
    if saved is not None and saved.get("params_sha256") == arith_dpo.params_sha256(selected):
        return saved
    base = cfg.base
    held_out = problems.test[: cfg.num_kl_prompts]
    to_old = sampled_kl(selected, latest, base.model, held_out, base.eval_batch_size, base.seed + 31)
    to_sft = to_old if latest is sft_params else sampled_kl(selected, sft_params, base.model, held_out,
                                                            base.eval_batch_size, base.seed + 31)
    info = dict(info, kl_to_old=to_old["kl"], kl_to_old_stderr=to_old["kl_stderr"], kl_to_sft=to_sft["kl"],
                kl_to_sft_stderr=to_sft["kl_stderr"])
    return arith_dpo.cached_greedy_eval(selected, base, problems.test, path, info)


def train_method(cfg, method: Method, mesh, sft_params, param_shardings, problems: arith_dpo.Problems,
                 workdir: str) -> list[dict]:
    """The loop of one method (module docstring, step 2) from `sft_params`; returns its iteration records."""
    base, records = cfg.base, []

    def iterate(t: int, latest, previous):
        it_dir = os.path.join(workdir, method.name, f"iter_{t}")
        os.makedirs(it_dir, exist_ok=True)
        prompts = iteration_prompts(cfg, problems.train, t)
        # Iteration 0 samples the SFT policy for every method: one shared file, the same samples.
        samples_path = os.path.join(workdir, "samples_sft.npz") if t == 0 else os.path.join(it_dir, "samples.npz")
        prompt_tokens, completions, masks = sample_iteration(base, latest, prompts, t, samples_path)
        data_path = os.path.join(it_dir, "data.npz")
        cached = arith_dpo.load_dataset(data_path)
        if cached is None:
            cached = method.make_data(t, latest, prompts, prompt_tokens, completions, masks)
            if len(cached[0]) < method.rows_needed:
                raise ValueError(
                    f"{method.name}, iteration {t}: only {len(cached[0])} training rows from "
                    f"prompts_per_iteration={cfg.prompts_per_iteration} prompts (statistics: {cached[1]}), fewer "
                    f"than the batch size {method.rows_needed}; raise prompts_per_iteration or "
                    f"base.pairs.samples_per_prompt")
            arith_dpo.save_dataset(data_path, *cached)
        data, stats = cached
        selected, _, guard = arith_dpo.train_dpo(iteration_config(cfg), mesh, latest, param_shardings, data,
                                                 problems, it_dir, MetricsLog(os.path.join(it_dir, "metrics.jsonl")),
                                                 custom=method.custom)
        samples = completions.reshape(-1, completions.shape[-1])
        correct = [g.correct for g in arith_dpo.grade_completions(np.repeat(prompts, completions.shape[1], axis=0),
                                                                   samples)]
        # train_dpo returns the guard's choice only with base.dpo.select_best, else the last step: record that one.
        kept = "selected" if base.dpo.select_best else "last"
        info = {"iteration": t + 1, **stats, "train_rows": len(data), "samples_correct_rate": float(np.mean(correct)),
                "sampling_sha256": arith_dpo.params_sha256(latest), "kept_step": guard[f"{kept}_step"],
                "val_accuracy": guard[f"{kept}_val_accuracy"], "validation_history": guard["validation_history"]}
        records.append(_evaluate_iterate(cfg, selected, latest, sft_params, problems,
                                         os.path.join(it_dir, "iteration.json"), info))
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
    start = arith_dpo.start_experiment(cfg, base, workdir, iteration_config(cfg),
                                       check=lambda problems: iteration_prompts(cfg, problems.train, 0))
    mesh, problems, sft_params, param_shardings = start.mesh, start.problems, start.sft_params, start.param_shardings
    sft_eval = arith_dpo.cached_greedy_eval(sft_params, base, problems.test, os.path.join(workdir, "sft_eval.json"),
                                            {"iteration": 0})
    methods = {}
    for method in make_methods(sft_params):
        records = train_method(cfg, method, mesh, sft_params, param_shardings, problems, workdir)
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
        "config": arith_dpo.config_to_dict(cfg),
    }
    return arith_dpo.finish_experiment(workdir, results, lambda path: plot(results, plot_title, path), plot_name)


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
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# The experiment.


def judge_trpa_claim(cfg: TRPAConfig) -> Callable[[dict], tuple[str, bool]]:
    def judge(comparison: dict) -> tuple[str, bool]:
        ours, dpo = comparison["trpa"], comparison["dpo"]
        claim = (f"TRPA (Su et al. 2025) claims that rule-based preference levels with a k3-KL trust region to the "
                 f"sampling policy improve reasoning accuracy while keeping the policy close to the old one; checked: "
                 f"TRPA's held-out accuracy is at least sigmoid DPO's minus {cfg.accuracy_tolerance} on the same "
                 f"samples and steps, and its Monte-Carlo KL(pi || pi_old) is smaller than DPO's")
        holds = ours["accuracy"] >= dpo["accuracy"] - cfg.accuracy_tolerance and ours["kl_to_old"] < dpo["kl_to_old"]
        return claim, holds

    return judge


def run(cfg: TRPAConfig, workdir: str) -> dict:
    """Run (or resume) TRPA and the DPO baseline on ARITH in `workdir`; returns and writes results.json."""
    return run_comparison(cfg, workdir, lambda sft: [trpa_method(cfg, sft), dpo_baseline(cfg.base, level_scores)],
                          judge_trpa_claim(cfg), "TRPA vs DPO on ARITH", "trpa_arith.png")
