"""TRPA on ARITH against sigmoid DPO on the same samples (Su et al. 2025; docs/algorithms.md, "TRPA", from the
authors' code).

TRPA (Su et al. 2025, "Trust Region Preference Approximation: A simple and stable reinforcement learning algorithm
for LLM reasoning", arXiv:2504.04524, and the authors' code): K responses per prompt graded into rule-based levels
(`jaxalign.tasks.levels`: 1 correct, 2 wrong, 3 incomplete, 4 malformed); every pair of responses at different levels
is a preference, scored with l(y) = the masked MEAN token log-ratio against the frozen initial model,
h = kappa * beta * (l(a) - l(b)) (kappa = 2.5 when the better response is correct), plus a k3-KL trust region to the
sampling ("old") policy with c = 0.001. The objective is `jaxalign.losses.iterative.trpa`, trained here through
`kit.train_dpo(..., custom=CustomLoss(trpa_loss_fn(...)))`.

Claim checked (the paper: TRPA improves reasoning accuracy while the trust region keeps the policy close to the old
policy, "stable"): TRPA's held-out greedy accuracy is at least sigmoid DPO's minus `accuracy_tolerance` (0.02) AND
its Monte-Carlo KL(pi || pi_old) on held-out prompts is smaller than DPO's.

Pipeline (every phase resumable; re-running the same command continues where a killed run stopped):
1. SFT exactly as the main job (`kit.train_sft`, WORKDIR/checkpoints/sft).
2. For each method (TRPA, then the DPO baseline) and t = 0 .. iterations - 1, in WORKDIR/<method>/iter_<t>:
   a. `prompts_per_iteration` fresh training prompts (`arith_kit.iteration_prompts`: the same prompts for both
      methods), `base.pairs.samples_per_prompt` samples each from the method's current policy pi_t at
      `base.pairs.temperature` (t = 0: the SFT policy, so both methods see the SAME samples, WORKDIR/samples_sft.npz).
   b. The levels of every sample. TRPA: one list per prompt with at least two distinct levels (the others have no
      pair), the frozen initial (SFT) model's and pi_old = pi_t's per-token log-probs precomputed into the lists.
      DPO: the best- against the worst-level sample of the same prompts (`preference_pairs.select_pairs` on -level).
   c. `steps_per_iteration` steps of `kit.train_dpo` from pi_t (optimizer, checkpoints, validation guard,
      resume). DPO is the main job's step (base.dpo: sigmoid, beta, chosen-NLL weight) with reference pi_t (online
      DPO); TRPA keeps the frozen initial model as its reference and pi_t as its trust-region anchor.
   d. Held-out greedy accuracy of pi_{t+1}, and KL(pi_{t+1} || pi_t) and KL(pi_{t+1} || pi_SFT) estimated by
      Monte Carlo: mean over y ~ pi_{t+1}(.|x) (temperature 1) on the first `num_kl_prompts` held-out prompts of
      L_{pi_{t+1}}(y) - L_{old}(y) (summed completion log-probs), with its standard error.
3. results.json: per method and iteration, the comparison of the last iterates, the claim; trpa_arith.png.

The loop, the DPO baseline and the KL estimates are the kit's method-vs-baseline comparison
(`jaxalign.experiments.arith_kit.comparison`), shared with `brain_arith`; this module holds TRPA's loss and rows.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax.numpy as jnp
import numpy as np

from jaxalign.data.iterator import ArrayDataset
from jaxalign.experiments.arith_kit import ArithDPOConfig, check_loop_fields
from jaxalign.experiments.arith_kit.comparison import (
    BASE,
    Method,
    decode_texts,
    dpo_baseline,
    frozen_list_logprobs,
    run_comparison,
    sample_lists,
)
from jaxalign.losses.common import check_hyperparameter, check_objective_beta
from jaxalign.losses.iterative import trpa
from jaxalign.models.llama import DecoderLM
from jaxalign.tasks import levels as trpa_levels_lib
from jaxalign.train.listwise import list_token_logprobs
from jaxalign.train.preference import LIST_TOKEN_KEYS, CustomLoss
from jaxalign.train.step import logits_fn

# The batch keys of the frozen models' precomputed per-token log-probs [P, K, T] and the levels [P, K].
REFERENCE_KEY = "list_reference"  # the frozen initial (SFT) model: l(y)'s reference
OLD_KEY = "list_old"  # the sampling policy pi_old: the trust region's anchor
LEVELS_KEY = "list_levels"


@dataclasses.dataclass(frozen=True)
class TRPAConfig:
    """base: the main job's config (model, SFT, samples per prompt and temperature in `base.pairs`, the baseline's
    DPO step and the shared optimizer / validation cadence in `base.dpo`; base.dpo.steps is replaced by
    steps_per_iteration, base.dpo.list_batch_size is TRPA's prompts per step: 16 lists of 8 = the sequences of
    64 pairs).
    iterations: sample -> grade -> train rounds per method; each round starts from the previous round's policy
    prompts_per_iteration: fresh training prompts per round, the same for both methods
    steps_per_iteration: optimizer steps per round and method (replaces base.dpo.steps)
    beta: TRPA's scale of the MEAN token log-ratio l(y) in h = kappa * beta * (l(a) - l(b))
        (`jaxalign.losses.iterative.trpa`; |y| is about 20 tokens here). 10 had the best validation accuracy of
        {2, 10, 40} with the default budget (seed 0): at 40 the pair loss saturates within 30 steps and the policy
        barely moves, at 2 the rejected samples' likelihoods collapse and accuracy falls back after 50 steps.
    kl_coef: TRPA's c: weight of the k3-KL trust region to the sampling policy pi_old (Su et al. 2025)
    kappa: TRPA's extra factor on beta when the better response of a pair is correct (level 1)
    num_kl_prompts: held-out prompts whose samples estimate KL(pi || pi_old).
    accuracy_tolerance: how far below DPO's accuracy TRPA's may be for the claim to hold."""

    base: ArithDPOConfig = BASE
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
    """TRPA (Su et al. 2025; `jaxalign.losses.iterative.trpa`) as a `jaxalign.train.step` loss function:
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
# TRPA's training rows.


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
    custom = CustomLoss(loss, base.dpo.list_batch_size, LIST_TOKEN_KEYS)
    return Method(name="trpa", make_data=make_data, custom=custom, rows_needed=base.dpo.list_batch_size)


def level_scores(problems: np.ndarray, texts: list[str]) -> np.ndarray:
    """-level: the TRPA levels as a judge (higher is better), for the DPO baseline's best-vs-worst pairs."""
    return -trpa_levels_lib.trpa_levels(problems, texts).astype(np.float64)


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
