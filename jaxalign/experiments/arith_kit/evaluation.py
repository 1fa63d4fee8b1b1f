"""Evaluating ARITH policies: greedy exact-match accuracy on a problem set (cached per parameter hash, so a resumed
multi-phase run does not evaluate finished phases again) and how far a policy drifted from its reference."""
from __future__ import annotations

import jax
import numpy as np

from jaxalign.algorithms.objective_extras import summed_logprobs
from jaxalign.data.iterator import ArrayDataset
from jaxalign.experiments.arith_kit.config import ArithDPOConfig, completion_budget
from jaxalign.experiments.arith_kit import data as arith_data
from jaxalign.models.llama import ModelConfig
from jaxalign.rundir import load_json, params_sha256, write_json_atomic
from jaxalign.sampling import SamplingConfig
from jaxalign.tasks.tokenizer import CharTokenizer


def greedy_eval(params, model_cfg: ModelConfig, problems: np.ndarray, batch_size: int):
    """Greedy exact-match accuracy, per-problem correctness and mean completion length (tokens incl. EOS)."""
    greedy = SamplingConfig(max_new_tokens=completion_budget(model_cfg), temperature=0.0)
    _, tokens, mask = arith_data.sample_completions(params, model_cfg, problems, greedy, jax.random.key(0), batch_size)
    correct = np.array([g.correct for g in arith_data.grade_completions(problems, tokens)])
    return {"accuracy": float(correct.mean()), "mean_length": float(mask.sum(-1).mean())}, correct


def cached_greedy_eval(params, cfg: ArithDPOConfig, problems: np.ndarray, path: str, extra: dict,
                       split_name: str = "test") -> dict:
    """`extra` plus <split_name>_accuracy, <split_name>_mean_length and params_sha256 of a greedy evaluation of
    `params` on `problems`, written to `path`; read back instead when `path` holds the record of the same parameters
    (a resumed multi-phase run does not evaluate finished phases again)."""
    sha = params_sha256(params)
    saved = load_json(path)
    if saved is not None and saved.get("params_sha256") == sha:
        return saved
    evaluation, _ = greedy_eval(params, cfg.model, problems, cfg.eval_batch_size)
    record = dict(extra, params_sha256=sha, **{f"{split_name}_accuracy": evaluation["accuracy"],
                                                f"{split_name}_mean_length": evaluation["mean_length"]})
    write_json_atomic(path, record)
    return record


def log_ratios(params, other, model_cfg: ModelConfig, tokens, attention, completion, batch_size: int) -> np.ndarray:
    """L_params(y) - L_other(y) per row: summed completion log-probs under two policies."""
    return (summed_logprobs(params, model_cfg, tokens, attention, completion, batch_size)
            - summed_logprobs(other, model_cfg, tokens, attention, completion, batch_size))


def sampled_kl(params, other, model_cfg: ModelConfig, problems: np.ndarray, batch_size: int,
               seed: int) -> dict[str, float]:
    """Monte-Carlo KL(pi || other) per response: mean over y ~ pi(.|x) (temperature 1, one sample per problem) of
    L_pi(y) - L_other(y), and its standard error."""
    sampling = SamplingConfig(max_new_tokens=completion_budget(model_cfg), temperature=1.0)
    prompts, completions, masks = arith_data.sample_completions(params, model_cfg, problems, sampling,
                                                                jax.random.key(seed), batch_size)
    tokens = np.concatenate([prompts, completions], axis=1)
    attention = np.concatenate([prompts != CharTokenizer.PAD_ID, masks], axis=1).astype(np.int32)
    completion = np.concatenate([np.zeros_like(prompts), masks], axis=1).astype(np.int32)
    ratio = log_ratios(params, other, model_cfg, tokens, attention, completion, batch_size)
    return {"kl": float(ratio.mean()), "kl_stderr": float(ratio.std(ddof=1) / np.sqrt(len(ratio)))
            if len(ratio) > 1 else 0.0}


def drift_from_reference(params, reference, model_cfg: ModelConfig, problems: np.ndarray, pairs: ArrayDataset,
                         batch_size: int, num_samples: int = 512, seed: int = 0) -> dict[str, float]:
    """How far a policy moved from its reference (the objectives benchmark's columns).

    kl_to_ref: `sampled_kl` on the first `num_samples` of `problems`;
    chosen_logp_change / rejected_logp_change: mean L_pi(y) - L_ref(y) over the first `num_samples` training pairs'
        chosen and rejected completions (DPO's implicit rewards divided by beta).
    """
    report = {"kl_to_ref": sampled_kl(params, reference, model_cfg, problems[:num_samples], batch_size, seed)["kl"]}
    for side in ("chosen", "rejected"):
        arrays = [pairs.arrays[f"{side}_{k}"][:num_samples] for k in ("tokens", "attention_mask", "completion_mask")]
        report[f"{side}_logp_change"] = float(log_ratios(params, reference, model_cfg, *arrays, batch_size).mean())
    return report
