"""Evaluate TRL 1.16.0's own DPO loss code on given per-token log-probs (no model, no downloads).

`DPOTrainer._compute_loss` is run unchanged on an instance made with `DPOTrainer.__new__` that carries only the
attributes the method reads. Its `model` and `ref_model` are stand-ins that return the given per-token log-probs
(as TRL's fused LM head would: [2*pairs, time], chosen rows then rejected rows, zero outside the completion), so
TRL itself reduces them to sequence log-probs (its sums, its ipo/sigmoid_norm lengths from `completion_mask`, its
`sft` mean over chosen tokens, its aot sorting) and evaluates the loss formulas. Used only by the tests, through
`trl_pairwise` (the arrays by name, jaxalign's metric names) or `trl_loss` itself.
"""
from __future__ import annotations

import types
from collections import defaultdict

import numpy as np
import torch
from trl.trainer.dpo_trainer import DPOTrainer


class _LogProbModel:
    """Returns fixed per-token log-probs in the shape of TRL's fused-LM-head output (no parameters)."""

    is_gradient_checkpointing = False
    training = True

    def __init__(self, per_token_logps: torch.Tensor, log_sum_sq_probs: torch.Tensor | None = None):
        self.per_token_logps = per_token_logps
        self.log_sum_sq_probs = log_sum_sq_probs

    def __call__(self, **kwargs):
        logps = self.per_token_logps
        return types.SimpleNamespace(
            log_probs=logps,
            entropy=torch.zeros_like(logps),
            mean_logits=torch.zeros_like(logps),
            is_top1=torch.zeros(logps.shape, dtype=torch.bool),
            log_sum_sq_probs=self.log_sum_sq_probs,
        )


def _pad(a: np.ndarray, width: int) -> np.ndarray:
    return np.pad(a, ((0, 0), (0, width - a.shape[1])))


def trl_loss(
    policy_chosen,
    policy_rejected,
    reference_chosen,
    reference_rejected,
    chosen_mask,
    rejected_mask,
    loss_type: str | list[str],
    loss_weights: list[float] | None = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    discopop_tau: float = 0.05,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    ld_alpha: float | None = None,
    use_weighting: bool = False,
    wpo_log_norm_chosen=None,
    wpo_log_norm_rejected=None,
) -> tuple[float, dict[str, float]]:
    """TRL 1.16.0's DPO loss (float32, as TRL computes it) and its logged reward metrics for these log-probs.

    Arrays are [pairs, time] per-token log-probs, zero outside the masks. A one-token prompt (completion_mask 0)
    is prepended to every row, so TRL's unshifted `completion_mask` counts exactly the completion tokens.

    The modifiers are TRL's own DPOConfig fields (f_divergence_type, f_alpha_divergence_coef, ld_alpha,
    use_weighting); with use_weighting, `wpo_log_norm_*` ([pairs, time], log sum_v p_v^2 of the distribution that
    predicted each token) are what the policy's fused LM head returns as `log_sum_sq_probs`. TRL's __init__-time
    checks of these fields are not run here (the instance is made with __new__).
    """
    arrays = [np.asarray(a, np.float32) for a in (policy_chosen, policy_rejected, reference_chosen, reference_rejected)]
    masks = [np.asarray(m, np.float32) for m in (chosen_mask, rejected_mask)]
    width = max(a.shape[1] for a in arrays)
    pc, pr, rc, rr = (_pad(a, width) for a in arrays)
    mc, mr = (_pad(m, width) for m in masks)
    policy = torch.from_numpy(np.concatenate([pc, pr], axis=0))
    log_sum_sq = None
    if use_weighting:
        norms = [_pad(np.asarray(a, np.float32), width) for a in (wpo_log_norm_chosen, wpo_log_norm_rejected)]
        log_sum_sq = torch.from_numpy(np.concatenate(norms, axis=0))
    reference = torch.from_numpy(np.concatenate([rc, rr], axis=0))
    shift_mask = np.concatenate([mc, mr], axis=0)
    completion_mask = torch.from_numpy(np.concatenate([np.zeros((shift_mask.shape[0], 1)), shift_mask], 1)).long()
    inputs = {
        "input_ids": torch.ones_like(completion_mask),
        "attention_mask": torch.ones_like(completion_mask),
        "completion_mask": completion_mask,
    }

    loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    trainer = DPOTrainer.__new__(DPOTrainer)
    trainer.__dict__.update(
        model=_LogProbModel(policy, log_sum_sq),
        ref_model=_LogProbModel(reference),
        accelerator=types.SimpleNamespace(
            device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x
        ),
        args=types.SimpleNamespace(discopop_tau=discopop_tau, gradient_checkpointing_kwargs=None, max_length=None),
        aux_loss_enabled=False,
        ld_alpha=ld_alpha,
        precompute_ref_logps=False,
        f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef,
        loss_types=loss_types,
        loss_weights=loss_weights or [1.0] * len(loss_types),
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=use_weighting,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, inputs)
    metrics = {key: values[-1] for key, values in trainer._metrics["train"].items() if key.startswith("rewards/")}
    return float(loss), metrics


PAIRWISE_ARRAYS = ("policy_chosen", "policy_rejected", "reference_chosen", "reference_rejected", "chosen_mask",
                   "rejected_mask")
# jaxalign's implicit-reward metric -> TRL 1.16.0's name for it
TRL_METRIC_NAMES = {"rewards/chosen": "rewards/chosen", "rewards/rejected": "rewards/rejected",
                    "rewards/margin": "rewards/margins", "rewards/accuracy": "rewards/accuracies"}


def trl_pairwise(a: dict, loss_type: str | list[str], *, tau: float | None = None, **config) -> tuple[float, dict]:
    """`trl_loss` on the arrays of `a`, named like the fields of `PairwiseInputs` (and, for use_weighting=True, WPO's
    normalisers "wpo_chosen" / "wpo_rejected"); `tau` is DiscoPOP's discopop_tau, `config` the rest of `trl_loss`'s
    keywords. The logged metrics come back under jaxalign's names (those TRL logged)."""
    if tau is not None:
        config["discopop_tau"] = tau
    if config.get("use_weighting"):
        config.update(wpo_log_norm_chosen=a["wpo_chosen"], wpo_log_norm_rejected=a["wpo_rejected"])
    loss, metrics = trl_loss(*(a[k] for k in PAIRWISE_ARRAYS), loss_type=loss_type, **config)
    return loss, {ours: metrics[theirs] for ours, theirs in TRL_METRIC_NAMES.items() if theirs in metrics}
