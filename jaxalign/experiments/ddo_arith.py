"""DDO on ARITH (Zheng et al. 2025, "Direct Discriminative Optimization: Your Likelihood-Based Generative Model is
Secretly a GAN Discriminator"; docs/algorithms.md, "DDO"), multi-round, against continued maximum likelihood.

DDO reads the likelihood ratio of the model being trained and a frozen reference as a GAN discriminator,
d(x) = sig(beta Delta(x)), Delta(x) = log p_theta(x) - log p_ref(x), and trains it to tell data from the reference's
own samples: loss = -E_{x~data} logsig(beta Delta) - alpha E_{x~p_ref} log(1 - sig(beta Delta)) (the pure function
`jaxalign.losses.iterative.ddo`). Started from a likelihood-trained model (theta = ref), it pushes probability mass
off the reference's own mistakes as well as onto the data, which maximum likelihood alone never does; the paper
reports that it improves models beyond what MLE reaches, and that repeating it with ref <- theta keeps improving.

Here the "data distribution" is the clean one: the gold ARITH solutions, while the SFT policy learned from noisy
demonstrations that mostly drop carries (`jaxalign.tasks.arith`), so its samples are mostly wrong.

Pipeline (every phase resumable; re-running the same command continues where a killed run stopped):
1. SFT exactly as the main job (`kit.train_sft`, checkpoints/sft).
2. The data: the gold solutions of `num_prompts` training prompts (a seeded draw, the same for every round and the
   baseline).
3. For round t = 0 .. rounds - 1 (`jaxalign.algorithms.iterative.run_iterations`), in workdir/rounds/round_<t>:
   a. one sample per data prompt from the reference p_ref = the current model (the SFT policy for t = 0, the previous
      round's model after it) at `sample_temperature` (1: the reference's own distribution);
   b. rows (gold, sample) as the trainer's chosen / rejected pair arrays (`pair_arrays`), with the reference's per-token
      log-probs of both cached on disk (`cached_reference_logprobs`);
   c. `steps_per_round` steps of the DDO loss (`ddo_loss_fn`) from theta = ref, through the main job's preference
      phase (`kit.train_dpo` with a `CustomLoss`: base.dpo's optimizer, batch size, validation every
      base.dpo.eval_every steps and, with base.dpo.select_best, its checkpoint selection);
   d. held-out greedy accuracy of the round's model.
4. The baseline (workdir/continued_sft): continued SFT (token-level NLL, maximum likelihood) on the SAME gold rows, for
   rounds x steps_per_round steps from the same SFT policy, through the same trainer with the same optimizer, batch
   size and guard, so the two methods differ only in their loss.
5. results.json: held-out greedy accuracy of SFT, every DDO round and the baseline ("comparison"; beside it the
   accuracy of temperature-1 samples, `sampled_accuracy`, the quality of the model's own distribution), and
   "claim_holds": DDO's final greedy accuracy above the baseline's AND no round losing more than `round_tolerance`
   to the one before it (round 2 >= round 1 - 0.01 by default).

Defaults: base.dpo.select_best=false (each round keeps its last step: the guard would let a round fall back to its
start, which would make "later rounds do not get worse" true by construction); beta = 1 and alpha = 1, the
values for which the loss's optimum is p_theta = p_data exactly (the optimal discriminator sig(beta Delta) =
p_data / (p_data + alpha p_ref) gives p_theta = p_data only at beta = alpha = 1), not the paper's tuned values.

Layout: config.json, metrics.jsonl (SFT), checkpoints/sft, sft_eval.json,
rounds/round_<t>/{samples.npz, metrics.jsonl, checkpoints/dpo, reference_cache, round.json},
continued_sft/{metrics.jsonl, checkpoints/dpo, eval.json}, results.json, ddo_arith.png.
"""
from __future__ import annotations

import dataclasses
import itertools
import numbers
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign import paths
from jaxalign.algorithms.iterative import run_iterations
from jaxalign.algorithms.preference_pairs import PairSelection, pair_arrays
from jaxalign.data.iterator import ArrayDataset
from jaxalign.experiments import arith_kit as kit
from jaxalign.experiments.arith_kit import teacher_completions
from jaxalign.logprobs import pair_token_logprobs
from jaxalign.losses.common import check_hyperparameter, check_objective_beta
from jaxalign.losses.iterative import ddo
from jaxalign.models.llama import DecoderLM, count_params
from jaxalign.sampling import SamplingConfig
from jaxalign.tasks import arith
from jaxalign.tasks.tokenizer import CharTokenizer
from jaxalign.train.loop import MetricsLog
from jaxalign.train.optim import OptimConfig
from jaxalign.train.reference import cached_reference_logprobs
from jaxalign.train.step import LossFn, logits_fn, sft_loss_fn
from jaxalign.rundir import RunDir, config_to_dict, params_sha256, write_json_atomic
from jaxalign.train.preference import CustomLoss

# The main job with a preference phase sized for one round: validation every 20 steps, the last step kept.
_BASE = dataclasses.replace(
    kit.ArithDPOConfig(),
    dpo=dataclasses.replace(kit.ARITH_DPO, eval_every=20, select_best=False,
                            optim=OptimConfig(learning_rate=1e-4, warmup_steps=5)),
)


def _is_int(value: Any, lowest: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Integral) and value >= lowest


@dataclasses.dataclass(frozen=True)
class DDOArithConfig:
    """base: the main job's config (task, model, SFT; of `base.dpo` only the optimizer, batch_size (rows = data +
    reference sample per step), grad_accum_steps, eval_every and select_best are used, by DDO and the baseline alike).
    rounds: DDO rounds; after each the reference becomes the trained model (ref <- theta, Zheng et al. 2025)
    steps_per_round: DDO optimizer steps per round (the baseline trains rounds x this many)
    num_prompts: training prompts whose gold solutions are the data (one reference sample each per round).
    beta: DDO's discriminator scale: d(x) = sig(beta (log p_theta(x) - log p_ref(x))), sequence log-probs
    alpha: weight of DDO's reference-sample term -E_{x~p_ref} log(1 - d(x)) against the data term
    sample_temperature: temperature of the reference samples (1: the reference's own distribution).
    round_tolerance: how much held-out accuracy a round may lose to the one before it with the claim still holding.
    """

    base: kit.ArithDPOConfig = _BASE
    rounds: int = 2
    steps_per_round: int = 60
    num_prompts: int = 1024
    beta: float = 1.0
    alpha: float = 1.0
    sample_temperature: float = 1.0
    round_tolerance: float = 0.01

    def __post_init__(self):
        for name in ("rounds", "steps_per_round", "num_prompts"):
            if not _is_int(getattr(self, name), 1):
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        check_objective_beta("ddo", self.beta)
        check_hyperparameter("ddo", "alpha", self.alpha, lambda a: a >= 0, "alpha >= 0")
        if isinstance(self.sample_temperature, bool) or not isinstance(self.sample_temperature, (int, float)) \
                or not self.sample_temperature > 0:
            raise ValueError(f"sample_temperature must be a number > 0 (the reference's samples; 1 = its own "
                             f"distribution), got {self.sample_temperature!r}")
        if isinstance(self.round_tolerance, bool) or not isinstance(self.round_tolerance, (int, float)) \
                or not self.round_tolerance >= 0:
            raise ValueError(f"round_tolerance must be a number >= 0, got {self.round_tolerance!r}")
        if self.num_prompts < self.base.dpo.batch_size:
            raise ValueError(f"num_prompts={self.num_prompts} is smaller than base.dpo.batch_size="
                             f"{self.base.dpo.batch_size}: a step needs that many gold rows")
        if self.base.lora.rank or self.base.dpo.reference == "sync":
            raise ValueError("DDO trains full parameters against a cached reference: set base.lora.rank=0 and "
                             "base.dpo.reference to cached or online")


def round_config(cfg: DDOArithConfig, steps: int) -> kit.ArithDPOConfig:
    """The main job's config for `steps` steps of the preference phase (a DDO round or the whole baseline)."""
    return dataclasses.replace(cfg.base, dpo=dataclasses.replace(cfg.base.dpo, steps=steps))


# ---------------------------------------------------------------------------------------------------------------
# The loss.


def ddo_loss_fn(model: DecoderLM, beta: float, alpha: float) -> LossFn:
    """DDO's loss (Zheng et al. 2025; docs/algorithms.md, "DDO") in the trainer's signature.

    A batch holds rows of the pair layout: chosen_* = data sequences, rejected_* = reference samples, and the
    reference's precomputed per-token log-probs of both (reference_chosen, reference_rejected). The policy's log-probs
    of both halves come from one concatenated forward pass; `jaxalign.losses.iterative.ddo` turns them into the loss
    (two batch means). Returned as (mean * rows, (rows, metrics)): both means run over the same number of rows, so
    summing over microbatches and dividing by the total rows is the large-batch loss exactly."""
    apply = logits_fn(model)

    def loss_fn(params, frozen, batch):
        del frozen  # the reference enters through its cached log-probs
        data_logps, sample_logps = pair_token_logprobs(apply, params, batch)
        loss, metrics = ddo(data_logps, batch["reference_chosen"], batch["chosen_completion_mask"], sample_logps,
                            batch["reference_rejected"], batch["rejected_completion_mask"], beta=beta, alpha=alpha)
        rows = jnp.asarray(data_logps.shape[0], jnp.float32)
        return loss * rows, (rows, metrics)

    return loss_fn


# ---------------------------------------------------------------------------------------------------------------
# Data.


def data_problems(cfg: DDOArithConfig, train: np.ndarray) -> np.ndarray:
    """The prompts whose gold solutions are the data: a seeded draw of `num_prompts` training problems."""
    if cfg.num_prompts > len(train):
        raise ValueError(f"num_prompts={cfg.num_prompts}, but ARITH has {len(train)} training problems")
    order = np.random.default_rng([cfg.base.seed, 8]).permutation(len(train))
    return train[np.sort(order[: cfg.num_prompts])]


def gold_rows(problems: np.ndarray, prompt_tokens: np.ndarray, width: int) -> dict[str, np.ndarray]:
    """SFT rows (tokens, attention_mask, completion_mask) of every problem's gold solution after its left-padded
    prompt: the continued-SFT baseline's data, laid out exactly as the data half of DDO's rows."""
    gold, gold_mask = teacher_completions(problems, width)
    prompt_mask = (prompt_tokens != CharTokenizer.PAD_ID).astype(np.int32)
    return {"tokens": np.concatenate([prompt_tokens, gold], axis=1).astype(np.int32),
            "attention_mask": np.concatenate([prompt_mask, gold_mask], axis=1).astype(np.int32),
            "completion_mask": np.concatenate([np.zeros_like(prompt_mask), gold_mask], axis=1).astype(np.int32)}


def ddo_rows(problems: np.ndarray, prompt_tokens: np.ndarray, samples: np.ndarray,
             sample_masks: np.ndarray) -> tuple[dict[str, np.ndarray], dict]:
    """Row i = (gold solution of problem i, reference sample i) as the trainer's chosen / rejected pair arrays, with
    the oracle's verdict on each side as its score (1 correct, 0 not; the gold side is always 1)."""
    num, width = samples.shape
    gold, gold_mask = teacher_completions(problems, width)
    sample_correct = np.array([g.correct for g in kit.grade_completions(problems, samples)], np.float64)
    rows = np.arange(num)
    selection = PairSelection(prompt=rows, chosen=np.zeros(num, int), rejected=np.ones(num, int),
                              chosen_score=np.ones(num), rejected_score=sample_correct,
                              chosen_is_teacher=np.ones(num, bool))
    arrays = pair_arrays(prompt_tokens, prompt_tokens != CharTokenizer.PAD_ID, np.stack([gold, samples], axis=1),
                         np.stack([gold_mask, sample_masks], axis=1), selection)
    stats = {"samples_correct_rate": float(sample_correct.mean()),
             "samples_mean_length": float(sample_masks.sum(axis=1).mean())}
    return arrays, stats


def reference_samples(cfg: DDOArithConfig, reference, problems: np.ndarray, t: int, path: str):
    """One sample per problem from the round's reference (cached at `path`): (prompt tokens, completions, masks)."""
    cached = kit.load_dataset(path)
    if cached is not None:
        a = cached[0].arrays
        return a["prompt_tokens"], a["completions"], a["masks"]
    base = cfg.base
    sampling = SamplingConfig(max_new_tokens=kit.completion_budget(base.model),
                              temperature=cfg.sample_temperature)
    prompt_tokens, completions, masks = kit.sample_completions(
        reference, base.model, problems, sampling, jax.random.key(base.seed * 1000 + 300 + t), base.eval_batch_size)
    kit.save_dataset(path, ArrayDataset({"prompt_tokens": prompt_tokens, "completions": completions,
                                               "masks": masks}), {})
    return prompt_tokens, completions, masks


def with_reference_logprobs(cfg: DDOArithConfig, reference, arrays: dict[str, np.ndarray],
                            cache: str) -> dict[str, np.ndarray]:
    """`arrays` plus the reference's per-token log-probs of both halves, cached on disk under a content hash."""
    tok = CharTokenizer()
    tokenization = {"tokenizer": "CharTokenizer", "chars": tok.CHARS, "pad": tok.PAD_ID, "eos": tok.EOS_ID}
    reference_logps, _ = cached_reference_logprobs(cache, logits_fn(DecoderLM(cfg.base.model)), reference, arrays,
                                                   tokenization, cfg.base.eval_batch_size)
    return {**arrays, **reference_logps}


def sampled_accuracy(params, base: kit.ArithDPOConfig, problems: np.ndarray) -> float:
    """Exact-match accuracy of one temperature-1 sample per problem (a fixed key): the quality of the model's own
    distribution, which is what DDO's discriminator judges and what the paper's sample metrics (FID) measure."""
    sampling = SamplingConfig(max_new_tokens=kit.completion_budget(base.model), temperature=1.0)
    _, completions, _ = kit.sample_completions(params, base.model, problems, sampling,
                                                     jax.random.key(base.seed * 1000 + 400), base.eval_batch_size)
    return float(np.mean([g.correct for g in kit.grade_completions(problems, completions)]))


def evaluate(params, base: kit.ArithDPOConfig, problems: np.ndarray, path: str, extra: dict) -> dict:
    """`kit.cached_greedy_eval`'s record (test_accuracy, test_mean_length) plus test_sample_accuracy
    (`sampled_accuracy`), all cached at `path` for these parameters."""
    record = kit.cached_greedy_eval(params, base, problems, path, extra)
    if "test_sample_accuracy" not in record:
        record = dict(record, test_sample_accuracy=sampled_accuracy(params, base, problems))
        write_json_atomic(path, record)
    return record


# ---------------------------------------------------------------------------------------------------------------
# The two methods.


def train_rounds(cfg: DDOArithConfig, mesh, sft_params, problems: kit.Problems,
                 data: np.ndarray, workdir: str) -> tuple[list[Any], list[dict]]:
    """Multi-round DDO (module docstring, step 3) from `sft_params`; returns (the rounds' models, their records)."""
    rounds_dir = paths.join(workdir, "rounds")
    round_cfg = round_config(cfg, cfg.steps_per_round)
    loss = CustomLoss(ddo_loss_fn(DecoderLM(cfg.base.model), cfg.beta, cfg.alpha), cfg.base.dpo.batch_size,
                                ("chosen_attention_mask", "rejected_attention_mask"))
    records: list[dict] = []

    def one_round(t: int, reference, previous):
        del previous  # DDO's reference is the latest model alone
        round_dir = paths.join(rounds_dir, f"round_{t}")
        paths.makedirs(round_dir)
        prompt_tokens, samples, masks = reference_samples(cfg, reference, data, t,
                                                          RunDir(round_dir).samples)
        arrays, stats = ddo_rows(data, prompt_tokens, samples, masks)
        rows = ArrayDataset(with_reference_logprobs(cfg, reference, arrays,
                                                    RunDir(round_dir).reference_cache))
        selected, _, guard = kit.train_dpo(round_cfg, mesh, reference, rows, problems,
                                                 round_dir, MetricsLog(RunDir(round_dir).metrics),
                                                 custom=loss)
        info = {"round": t + 1, **stats, "rows": len(rows), "reference_sha256": params_sha256(reference),
                "selected_step": guard["selected_step"], "val_accuracy": guard["selected_val_accuracy"],
                "validation_history": guard["validation_history"]}
        records.append(evaluate(selected, cfg.base, problems.test, RunDir(round_dir).file("round.json"), info))
        return selected

    return run_iterations(sft_params, cfg.rounds, one_round), records


def continued_sft(cfg: DDOArithConfig, mesh, sft_params, problems: kit.Problems,
                  rows: dict[str, np.ndarray], workdir: str) -> dict:
    """The baseline (module docstring, step 4): maximum likelihood on the gold rows for all of DDO's steps."""
    baseline_dir = paths.join(workdir, "continued_sft")
    paths.makedirs(baseline_dir)
    steps = cfg.rounds * cfg.steps_per_round
    loss = CustomLoss(sft_loss_fn(DecoderLM(cfg.base.model)), cfg.base.dpo.batch_size, ("attention_mask",))
    selected, _, guard = kit.train_dpo(round_config(cfg, steps), mesh, sft_params,
                                             ArrayDataset(rows), problems, baseline_dir,
                                             MetricsLog(RunDir(baseline_dir).metrics), custom=loss)
    info = {"steps": steps, "rows": len(rows["tokens"]), "selected_step": guard["selected_step"],
            "val_accuracy": guard["selected_val_accuracy"], "validation_history": guard["validation_history"]}
    return evaluate(selected, cfg.base, problems.test, RunDir(baseline_dir).file("eval.json"), info)


def claim_check(round_accuracy: list[float], baseline_accuracy: float, tolerance: float) -> dict:
    """The claim's two parts from the numbers: DDO's final held-out accuracy above continued SFT's, and no round
    losing more than `tolerance` to the one before it (round 2 >= round 1 - tolerance, ...; vacuous with one round,
    which `multi_round_checked` says)."""
    beats_mle = round_accuracy[-1] > baseline_accuracy
    steady = all(later >= earlier - tolerance for earlier, later in itertools.pairwise(round_accuracy))
    return {"ddo_beats_continued_sft": bool(beats_mle), "later_rounds_hold": bool(steady),
            "multi_round_checked": len(round_accuracy) >= 2, "claim_holds": bool(beats_mle and steady)}


def run(cfg: DDOArithConfig, workdir: str) -> dict:
    """Run (or resume) DDO and its baseline in `workdir`; returns and writes results.json (module docstring)."""
    clock = time.perf_counter()
    base = cfg.base
    start = kit.start_experiment(cfg, base, workdir, round_config(cfg, cfg.steps_per_round),
                                       check=lambda problems: data_problems(cfg, problems.train))
    mesh, problems, sft_params = start.mesh, start.problems, start.sft_params
    data = data_problems(cfg, problems.train)
    sft_eval = evaluate(sft_params, base, problems.test, RunDir(workdir).file("sft_eval.json"), {"round": 0})

    width = kit.completion_budget(base.model)
    prompt_tokens, _ = arith.encode_prompts(CharTokenizer(), [arith.prompt_text(p) for p in data],
                                            pad_to=kit.PROMPT_LEN)
    gold = gold_rows(data, prompt_tokens, width)
    iterates, records = train_rounds(cfg, mesh, sft_params, problems, data, workdir)
    baseline = continued_sft(cfg, mesh, sft_params, problems, gold, workdir)

    round_accuracy = [r["test_accuracy"] for r in records]
    check = claim_check(round_accuracy, baseline["test_accuracy"], cfg.round_tolerance)
    comparison = {
        "sft": {"accuracy": sft_eval["test_accuracy"], "sample_accuracy": sft_eval["test_sample_accuracy"],
                "mean_length": sft_eval["test_mean_length"]},
        "ddo": {"accuracy": round_accuracy[-1], "sample_accuracy": records[-1]["test_sample_accuracy"],
                "mean_length": records[-1]["test_mean_length"], "accuracy_per_round": round_accuracy,
                "sample_accuracy_per_round": [r["test_sample_accuracy"] for r in records],
                "steps": cfg.rounds * cfg.steps_per_round},
        "continued_sft": {"accuracy": baseline["test_accuracy"], "sample_accuracy": baseline["test_sample_accuracy"],
                          "mean_length": baseline["test_mean_length"], "steps": baseline["steps"]},
    }
    results = {
        "comparison": comparison,
        "claim": "DDO (Zheng et al. 2025) fine-tunes a likelihood-trained model beyond what continued maximum "
                 "likelihood on the same data and steps reaches, and a further round with ref <- theta does not lose "
                 f"more than {cfg.round_tolerance} held-out accuracy (here: gold ARITH data, SFT policy trained on "
                 "noisy demonstrations)",
        **check,
        "sft_accuracy": sft_eval["test_accuracy"],
        "ddo_accuracy": round_accuracy[-1],
        "continued_sft_accuracy": baseline["test_accuracy"],
        "accuracy_per_round": [sft_eval["test_accuracy"]] + round_accuracy,  # [SFT, after round 1, ...]
        "samples_correct_rate_per_round": [r["samples_correct_rate"] for r in records],
        "rounds": records,
        "continued_sft": baseline,
        "data_rows": len(data),
        "num_test_prompts": len(problems.test),
        "steps": {"sft": base.sft.steps, "per_round": cfg.steps_per_round,
                  "ddo_total": cfg.rounds * cfg.steps_per_round, "continued_sft": baseline["steps"]},
        "num_params": count_params(sft_params),
        "wall_seconds": time.perf_counter() - clock,
        "params_sha256": params_sha256(iterates[-1]),
        "config": config_to_dict(cfg),
    }
    return kit.finish_experiment(workdir, results, lambda path: plot(results, path), "ddo_arith.png")


def plot(results: dict, path: str) -> None:
    """Validation accuracy against training steps from the SFT policy, DDO (rounds end to end) and continued SFT,
    and the held-out accuracy (greedy and of temperature-1 samples) per round with the baseline's as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_val, ax_test) = plt.subplots(1, 2, figsize=(10, 3.5))
    per_round = results["steps"]["per_round"]
    steps, accuracy = [], []
    for t, record in enumerate(results["rounds"]):
        history = record["validation_history"][1:] if t else record["validation_history"]
        steps += [t * per_round + r["step"] for r in history]
        accuracy += [r["val/accuracy"] for r in history]
    ax_val.plot(steps, accuracy, marker="o", label="DDO")
    for t in range(1, len(results["rounds"])):
        ax_val.axvline(t * per_round, color="gray", linestyle=":", linewidth=1)
    baseline = results["continued_sft"]["validation_history"]
    ax_val.plot([r["step"] for r in baseline], [r["val/accuracy"] for r in baseline], marker="s",
                label="continued SFT (MLE)")
    ax_val.set(xlabel="steps from the SFT policy (dotted: ref <- theta)", ylabel="validation accuracy (greedy)",
               title="DDO vs maximum likelihood on gold ARITH")
    ax_val.legend(fontsize=8)
    comparison = results["comparison"]
    rounds = results["accuracy_per_round"]
    ax_test.plot(range(len(rounds)), rounds, marker="o", color="tab:blue", label="DDO, greedy")
    sampled = [comparison["sft"]["sample_accuracy"]] + comparison["ddo"]["sample_accuracy_per_round"]
    ax_test.plot(range(len(sampled)), sampled, marker="o", color="tab:blue", linestyle=":",
                 label="DDO, temperature-1 samples")
    steps = results["steps"]["continued_sft"]
    ax_test.axhline(results["continued_sft_accuracy"], color="tab:orange", linestyle="--",
                    label=f"continued SFT ({steps} steps), greedy")
    ax_test.axhline(comparison["continued_sft"]["sample_accuracy"], color="tab:orange", linestyle=":",
                    label=f"continued SFT ({steps} steps), samples")
    ax_test.set(xlabel="round (0 = SFT)", ylabel="held-out accuracy", xticks=range(len(rounds)))
    ax_test.legend(fontsize=8)
    fig.tight_layout()
    paths.save_figure(fig, path, dpi=120)
    plt.close(fig)
