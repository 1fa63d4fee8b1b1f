"""The main job: SFT on noisy ARITH demonstrations, then DPO on on-policy pairs labelled by the oracle.

Pipeline (each phase resumable; re-running the same command continues where a killed run stopped):
1. SFT on demonstrations that drop most carries (`jaxalign.tasks.arith`), so the greedy SFT policy is
   systematically wrong on the prompts that need a carry.
2. Pairs: sample K completions per training prompt from the SFT policy (KV-cached sampler, temperature, top-k),
   grade them with the oracle, and pair the best- against the worst-scored sample; tied prompts are dropped and
   counted.
3. Preference training with `dpo.objective` (default: the sigmoid loss, Rafailov et al. 2023, eq. 7; any registered
   pairwise, reference-free or unpaired objective, `loss=NAME`) and the SFT policy as reference, `dpo.reference`:
   cached log-probs (default), an online frozen copy, or TR-DPO's periodic sync.
4. Guard against over-optimisation: with a fixed reference DPO keeps pushing rejected likelihoods down, responses
   drift and answers the SFT policy had right start to break. Every `dpo.eval_every` steps the policy is decoded
   greedily on validation prompts (training problems never used for pairs) and checkpointed; the run returns the
   checkpoint with the best validation accuracy (earliest on ties), not the last one. results.json reports both.
5. Greedy exact-match accuracy of both policies on held-out problems (disjoint from all training problems).
"""
from __future__ import annotations

import time

from jaxalign import paths
from jaxalign.data.iterator import dropped_per_epoch
from jaxalign.experiments import arith_kit as kit
from jaxalign.experiments.arith_kit import ArithDPOConfig, task_config  # noqa: F401  (the registry's entry points)
from jaxalign.models.llama import count_params
from jaxalign.rundir import config_to_dict, params_sha256
from jaxalign.tasks import arith
from jaxalign.train.preference import select_checkpoint


def run(cfg: ArithDPOConfig, workdir: str) -> dict:
    """Run (or resume) the whole pipeline in `workdir`; returns and writes results.json."""
    clock = time.perf_counter()
    start = kit.start_experiment(cfg, cfg, workdir)
    mesh, problems, log, sft_params = start.mesh, start.problems, start.log, start.sft_params
    data, data_stats = kit.training_data(cfg, sft_params, problems, workdir)
    dpo_params, last_params, guard = kit.train_dpo(cfg, mesh, sft_params, data, problems, workdir, log)

    sft_eval, sft_correct = kit.greedy_eval(sft_params, cfg.model, problems.test, cfg.eval_batch_size)
    dpo_eval, dpo_correct = kit.greedy_eval(dpo_params, cfg.model, problems.test, cfg.eval_batch_size)
    if last_params is dpo_params:  # the guard kept the last step: its evaluation is the one just done
        last_eval, last_correct = dpo_eval, dpo_correct
    else:
        last_eval, last_correct = kit.greedy_eval(last_params, cfg.model, problems.test, cfg.eval_batch_size)
    on_sft_correct = lambda correct: float(correct[sft_correct].mean()) if sft_correct.any() else float("nan")  # noqa: E731
    results = {
        "sft_accuracy": sft_eval["accuracy"],
        "dpo_accuracy": dpo_eval["accuracy"],
        "dpo_accuracy_on_sft_correct": on_sft_correct(dpo_correct),
        "sft_mean_length": sft_eval["mean_length"],
        "dpo_mean_length": dpo_eval["mean_length"],
        "dpo_last_step_accuracy": last_eval["accuracy"],
        "dpo_last_step_accuracy_on_sft_correct": on_sft_correct(last_correct),
        "dpo_last_step_mean_length": last_eval["mean_length"],
        "guard": guard,
        "carry_share": arith.carry_share(cfg.task.num_operands),
        "num_test_prompts": int(len(problems.test)),
        "sft_examples_dropped_per_epoch": dropped_per_epoch(len(problems.train), cfg.sft.batch_size),
        **data_stats,
        "steps": {"sft": cfg.sft.steps, "dpo": cfg.dpo.steps},
        "num_params": count_params(sft_params),
        "wall_seconds": time.perf_counter() - clock,
        "params_sha256": params_sha256(dpo_params),
        "config": config_to_dict(cfg),
    }
    return kit.finish_experiment(workdir, results,
                             lambda path: _plot(guard["validation_history"], log.records("dpo"), path),
                             "dpo_validation.png")


def _plot(history: list[dict], records: list[dict], path: str) -> None:
    """Validation accuracy and response length over DPO steps, with the selected checkpoint marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history]
    fig, (ax_acc, ax_len) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax_acc.plot(steps, [r["val/accuracy"] for r in history], marker="o")
    best = select_checkpoint(history, "val/accuracy")
    ax_acc.axvline(best["step"], color="gray", linestyle="--", label=f"selected step {best['step']}")
    ax_acc.set(xlabel="DPO step", ylabel="validation accuracy (greedy)", title="DPO on ARITH")
    ax_acc.legend()
    ax_len.plot(steps, [r["val/mean_length"] for r in history], marker="o", label="mean response length")
    dpo = [r for r in records if "rewards/margin" in r]
    if dpo:
        twin = ax_len.twinx()
        twin.plot([r["step"] for r in dpo], [r["rewards/margin"] for r in dpo], color="tab:orange", alpha=0.6)
        twin.set_ylabel("reward margin", color="tab:orange")
    ax_len.set(xlabel="DPO step", ylabel="tokens")
    fig.tight_layout()
    paths.save_figure(fig, path, dpi=120)
    plt.close(fig)
