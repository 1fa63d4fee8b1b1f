"""BRAIn on ARITH against DPO on best-vs-worst pairs of the same samples (docs/algorithms.md, "BRAIn"; the form
is not checked against the paper).

BRAIn (Pandey et al. 2024, "BRAIn: Bayesian Reward-conditioned Amortized Inference for natural language generation
from feedback"): the target is the posterior pi_SFT(y|x) e^{r(x,y)/beta}; with n samples y_i per prompt from a
proposal q, alpha_i = softmax_i(L_SFT(y_i) + r_i/beta - L_q(y_i)) are its self-normalised importance weights and
the policy is trained to match them, b_i = softmax_i(L_theta(y_i) - L_q(y_i)), loss = -sum_i alpha_i log b_i
(`jaxalign.losses.iterative.brain`, the form docs/algorithms.md gives, without the paper's baseline term). For n = 2 and
one-hot alpha it is sigmoid DPO with beta = 1 and reference q: BRAIn generalises DPO to all n samples with soft
weights.

Claim checked (the paper: BRAIn, using all n samples with self-normalised weights, outperforms DPO): BRAIn's
held-out greedy accuracy is higher than DPO's on the same samples, with the same number of steps.

The pipeline is `trpa_arith`'s (same SFT, prompts, samples, loop, evaluation and results layout; see its module
docstring), with:
- rewards: the graded judge / 6 (`jaxalign.tasks.judges.graded_score`, 0..1 in sixths) or the binary one (`judge`);
- BRAIn's rows: one list per prompt whose samples are not all equally rewarded (a tied prompt is not a preference,
  and DPO drops the same prompts), with the SFT model's (`list_sft`) and the proposal's (`list_proposal`: the
  sampling policy, the SFT model at t = 0) per-token log-probs precomputed;
- the baseline: the main job's DPO step (base.dpo) on the best- against the worst-rewarded sample of the same prompts,
  reference = the sampling policy.
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
from jaxalign.losses.common import check_objective_beta
from jaxalign.losses.iterative import brain
from jaxalign.models.llama import DecoderLM
from jaxalign.tasks import judges
from jaxalign.train.listwise import list_token_logprobs
from jaxalign.train.step import logits_fn
from jaxalign.train.preference import LIST_TOKEN_KEYS, CustomLoss

SFT_KEY = "list_sft"  # the SFT model pi_SFT: the posterior's prior
PROPOSAL_KEY = "list_proposal"  # the proposal q the samples came from
REWARDS_KEY = "list_rewards"
JUDGES = ("graded", "binary")


@dataclasses.dataclass(frozen=True)
class BRAInConfig:
    """base: the main job's config (`trpa_arith.TRPAConfig` explains its use; base.dpo.list_batch_size is BRAIn's
    prompts per step, 16 lists of 8 = the sequences of the baseline's 64 pairs).
    iterations: sample -> reward -> train rounds per method; each round starts from the previous round's policy
    prompts_per_iteration: fresh training prompts per round, the same for BRAIn and the DPO baseline
    steps_per_iteration: optimizer steps per round and method (replaces base.dpo.steps)
    num_kl_prompts: held-out prompts whose samples estimate KL(pi || pi_old) and KL(pi || pi_SFT)
    judge: "graded" (graded_score / 6) or "binary" (exactly correct).
    beta: the posterior's temperature, pi_SFT e^{r/beta}; with graded rewards one more correct step (1/3) weighs
        e^{1/(3 beta)} (x28 at the default 0.1)."""

    base: ArithDPOConfig = BASE
    iterations: int = 1
    prompts_per_iteration: int = 2048
    steps_per_iteration: int = 150
    judge: str = "graded"
    beta: float = 0.1
    num_kl_prompts: int = 512

    def __post_init__(self):
        check_loop_fields(self)
        if self.judge not in JUDGES:
            raise ValueError(f"judge must be one of {JUDGES}, got {self.judge!r}")
        check_objective_beta("brain_arith", self.beta)


def brain_loss_fn(model: DecoderLM, beta: float) -> Callable:
    """BRAIn (docs/algorithms.md; `jaxalign.losses.iterative.brain`) as a `jaxalign.train.step` loss function:
    loss_fn(params, frozen, batch) -> (loss * P, (P, metrics)), P the lists (prompts) in the batch.

    The policy's per-token log-probs of the P*n sequences come from ONE forward pass (`list_token_logprobs`); the
    SFT model's (`list_sft`) and the proposal's (`list_proposal`) are precomputed in the batch (`frozen` is unused).
    `brain` is a mean of per-prompt losses, so microbatch accumulation is exact."""

    apply = logits_fn(model)

    def loss_fn(params, frozen, batch):
        del frozen
        policy = list_token_logprobs(apply, params, batch)
        loss, metrics = brain(policy, batch[SFT_KEY], batch[PROPOSAL_KEY], batch["list_completion_mask"],
                              batch[REWARDS_KEY], beta=beta)
        prompts = jnp.asarray(policy.shape[0], jnp.float32)
        return loss * prompts, (prompts, metrics)

    return loss_fn


def reward_fn(judge: str) -> Callable[[np.ndarray, list[str]], np.ndarray]:
    """(problems, texts) -> rewards in [0, 1]: graded_score / GRADED_MAX, or binary correctness."""
    scale = judges.GRADED_MAX if judge == "graded" else 1.0

    def rewards(problems: np.ndarray, texts: list[str]) -> np.ndarray:
        return judges.judge_scores(judge, judges.grade_texts(problems, texts)) / scale

    return rewards


def brain_method(cfg: BRAInConfig, sft_params) -> Method:
    """BRAIn: lists of the prompts whose samples are not all equally rewarded, with the rewards, the SFT model's and
    the proposal's (the sampling policy's) log-probs precomputed."""
    base, rewards_of = cfg.base, reward_fn(cfg.judge)

    def make_data(t, latest, prompts, prompt_tokens, completions, masks):
        num_prompts, n, _ = completions.shape
        rewards = rewards_of(np.repeat(prompts, n, axis=0), decode_texts(completions)).reshape(num_prompts, n)
        rows = np.flatnonzero(rewards.max(axis=1) > rewards.min(axis=1))
        lists = sample_lists(prompts, prompt_tokens, completions, masks, rows)
        sft = frozen_list_logprobs(base.model, sft_params, lists, base.eval_batch_size)
        # At t = 0 the proposal is the SFT model itself.
        proposal = sft if latest is sft_params else frozen_list_logprobs(base.model, latest, lists,
                                                                         base.eval_batch_size)
        arrays = {**lists, REWARDS_KEY: rewards[rows].astype(np.float32), SFT_KEY: sft, PROPOSAL_KEY: proposal}
        stats = {"prompts": int(num_prompts), "lists": len(rows), "dropped_tied": int(num_prompts - len(rows)),
                 "samples_mean_reward": float(rewards.mean())}
        return ArrayDataset(arrays), stats

    custom = CustomLoss(brain_loss_fn(DecoderLM(base.model), cfg.beta), base.dpo.list_batch_size,
                                  LIST_TOKEN_KEYS)
    return Method(name="brain", make_data=make_data, custom=custom, rows_needed=base.dpo.list_batch_size)


def judge_brain_claim(comparison: dict) -> tuple[str, bool]:
    claim = ("BRAIn (Pandey et al. 2024) claims that training on all n samples with self-normalised posterior weights "
             "generalises and outperforms DPO; checked: BRAIn's held-out greedy accuracy is higher than DPO's on "
             "best-vs-worst pairs of the same samples with the same number of steps")
    return claim, comparison["brain"]["accuracy"] > comparison["dpo"]["accuracy"]


def run(cfg: BRAInConfig, workdir: str) -> dict:
    """Run (or resume) BRAIn and the DPO baseline on ARITH in `workdir`; returns and writes results.json."""
    return run_comparison(cfg, workdir,
                          lambda sft: [brain_method(cfg, sft), dpo_baseline(cfg.base, reward_fn(cfg.judge))],
                          judge_brain_claim, "BRAIn vs DPO on ARITH", "brain_arith.png")
