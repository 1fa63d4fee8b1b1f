"""DR-PO vs PPO on ARITH: Chang et al. (2024), "Dataset Reset Policy Optimization for RLHF" (arXiv:2404.08495);
docs/algorithms.md, "DR-PO". The paper's claim checked here: resetting PPO's rollouts into states of the offline
data makes it more sample-efficient, so with the same number of rollouts and updates from the same SFT policy,
DR-PO ends with a better policy than plain PPO.

Pipeline (every phase resumable; re-running the same command continues where a killed run stopped):
1. SFT exactly as the main job (`kit.train_sft`, checkpoints in WORKDIR/checkpoints/sft): a policy that drops
   most carries under greedy decoding.
2. For each of `rl_seeds` seeds, two RL runs from that SFT policy (`jaxalign.algorithms.lm_ppo.train_lm_ppo`), the
   SFT policy also being the KL reference, with the same `ppo` settings, the same prompts in the same order (the
   seed's) and the same number of rollouts (ppo.num_updates x ppo.rollouts_per_update, one per prompt) and
   optimizer steps:
   - "drpo": with probability ppo.beta_reset a rollout starts from a teacher-forced prefix y*[:h],
     h ~ U{1..len-1}, of the prompt's offline reference response: for ARITH the gold solution
     `arith.solution_text` + EOS (the preferred response of every pair); the loss is masked on the prefix;
   - "ppo": beta_reset = 0, every rollout starts at the prompt.
   The terminal reward is the oracle's (`jaxalign.tasks.judges`): `judge=binary` (exactly correct) or `judge=graded`
   (graded_score / 6). Every `eval_every` updates the policy's greedy accuracy on the validation prompts is logged
   (the learning curves: sample efficiency). Checkpoints in WORKDIR/<method>/seed_<s>/checkpoints every
   `checkpoint_every` updates and at the end.
3. Held-out greedy exact-match accuracy of SFT and of every run's final policy (no selection); a method's accuracy
   is its mean over the seeds (one RL run on ARITH moves by a few points from seed to seed, as much as the two
   methods differ). results.json ("comparison", "claim", "claim_holds" = DR-PO's mean accuracy > PPO's) and
   drpo_arith.png (validation accuracy against rollouts, every run and the seed means).

The `base.pairs` and `base.dpo` sections of the main job's config are not used. The RL phase runs under plain
`jax.jit` on the default device (`lm_ppo`); SFT uses `base.mesh`.

Layout: config.json, metrics.jsonl (SFT), checkpoints/sft, sft_eval.json, sft_val.json,
{drpo, ppo}/seed_<s>/{checkpoints, metrics.jsonl, eval.json}, results.json, drpo_arith.png.
"""
from __future__ import annotations

import dataclasses
import numbers
import time

import jax
import numpy as np

from jaxalign import paths
from jaxalign.algorithms.lm_ppo import LMPPOConfig, init_ppo_state, train_lm_ppo
from jaxalign.data.iterator import ArrayDataset
from jaxalign.distributed import host_local
from jaxalign.experiments import arith_kit as kit
from jaxalign.experiments.arith_kit import teacher_completions
from jaxalign.models.llama import count_params
from jaxalign.tasks import arith, judges
from jaxalign.tasks.tokenizer import CharTokenizer
from jaxalign.train.checkpoint import CheckpointConfig, Checkpointer
from jaxalign.train.loop import MetricsLog
from jaxalign.train.optim import OptimConfig
from jaxalign.rundir import RunDir, config_to_dict, params_sha256

JUDGES = ("binary", "graded")
METHODS = ("drpo", "ppo")


@dataclasses.dataclass(frozen=True)
class DRPOArithConfig:
    """base: the main job's config (task, model, SFT, evaluation sizes; its pairs and dpo sections are unused).
    ppo: the RL settings both methods share (`lm_ppo.LMPPOConfig`); ppo.beta_reset is DR-PO's reset probability
        (> 0), the PPO baseline runs the same settings with beta_reset = 0.
    judge: the terminal reward, "binary" (1 if exactly correct) or "graded" (judges.graded_score / 6).
    rl_seeds: RL runs per method (`rl_seed`: prompt order, resets, sampling, critic head), all from the one SFT policy.
    eval_every: updates between greedy validation evaluations (the learning curves); the last update is always
        evaluated.
    checkpoint_every: updates between checkpoints of each run (and the last update)."""

    base: kit.ArithDPOConfig = kit.ArithDPOConfig()
    ppo: LMPPOConfig = LMPPOConfig(beta_reset=0.5, num_updates=12, rollouts_per_update=32, update_epochs=2,
                                   num_minibatches=2,
                                   policy_optim=OptimConfig(learning_rate=3e-4, warmup_steps=4),
                                   critic_optim=OptimConfig(learning_rate=1e-3, warmup_steps=4))
    judge: str = "binary"
    rl_seeds: int = 3
    eval_every: int = 3
    checkpoint_every: int = 3

    def __post_init__(self):
        if self.judge not in JUDGES:
            raise ValueError(f"judge must be one of {JUDGES}, got {self.judge!r}")
        if not self.ppo.beta_reset > 0:
            raise ValueError(f"ppo.beta_reset must be > 0 for DR-PO (the PPO baseline runs with 0), got "
                             f"{self.ppo.beta_reset!r}")
        for name in ("rl_seeds", "eval_every", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def method_configs(cfg: DRPOArithConfig) -> dict[str, LMPPOConfig]:
    """The two methods: DR-PO with cfg.ppo as given, PPO with the same settings and no resets."""
    return {"drpo": cfg.ppo, "ppo": dataclasses.replace(cfg.ppo, beta_reset=0.0)}


def rl_seed(cfg: DRPOArithConfig, index: int) -> int:
    """The seed of RL run `index` (0 .. rl_seeds - 1); DR-PO and PPO runs with the same index share it."""
    return cfg.base.seed * 1000 + 100 + index


def prompt_dataset(problems: np.ndarray, completion_width: int) -> ArrayDataset:
    """The RL prompts with their offline reference responses: problem [N, ops], left-padded prompt_tokens /
    prompt_mask [N, PROMPT_LEN], and the gold solution + EOS as reference_tokens / reference_mask
    [N, completion_width] (`iterative_dpo.teacher_completions`)."""
    tok = CharTokenizer()
    prompt_tokens, prompt_mask = arith.encode_prompts(tok, [arith.prompt_text(p) for p in problems],
                                                      pad_to=kit.PROMPT_LEN)
    reference_tokens, reference_mask = teacher_completions(problems, completion_width)
    return ArrayDataset({"problem": np.asarray(problems), "prompt_tokens": prompt_tokens, "prompt_mask": prompt_mask,
                         "reference_tokens": reference_tokens, "reference_mask": reference_mask})


def oracle_rewards(judge: str, problems: np.ndarray, completion_tokens: np.ndarray) -> np.ndarray:
    """float32 [N]: the terminal reward of each completion, "binary" (exact correctness) or "graded" (the graded
    judge, 0-6, divided by 6), both in [0, 1] (`jaxalign.tasks.judges`)."""
    if judge not in JUDGES:
        raise ValueError(f"judge must be one of {JUDGES}, got {judge!r}")
    tok = CharTokenizer()
    grades = judges.grade_texts(problems, [tok.decode(c) for c in completion_tokens])
    scores = judges.judge_scores(judge, grades)
    return (scores / judges.GRADED_MAX if judge == "graded" else scores).astype(np.float32)


def train_method(cfg: DRPOArithConfig, ppo: LMPPOConfig, seed: int, sft_params, problems: kit.Problems,
                 data: ArrayDataset, sft_val_accuracy: float, run_dir: str):
    """One RL run from the SFT policy in `run_dir`, resumed from its checkpoints. Returns (final policy params,
    validation history [{"step": updates, "rollouts", "val/accuracy"}] starting with the SFT policy at step 0, the
    last update's record)."""
    base, tok = cfg.base, CharTokenizer()
    paths.makedirs(run_dir)
    log = MetricsLog(RunDir(run_dir).metrics)
    phase = "drpo" if ppo.beta_reset else "ppo"

    def validate(updates: int, policy):
        if updates % cfg.eval_every and updates != ppo.num_updates:
            return None
        evaluation, _ = kit.greedy_eval(policy, base.model, problems.validation, base.eval_batch_size)
        return {"val/accuracy": evaluation["accuracy"], "val/mean_length": evaluation["mean_length"]}

    state = init_ppo_state(ppo, base.model, sft_params, jax.random.key(seed))
    metadata = {"phase": phase, "model": dataclasses.asdict(base.model), "value_model": ppo.value_model}
    with Checkpointer(paths.join(run_dir, "checkpoints"), CheckpointConfig(every_steps=1, keep_last=2),
                      metadata=metadata) as ckpt:
        state, _ = train_lm_ppo(
            state, sft_params, data, cfg=ppo, model_cfg=base.model,
            reward_fn=lambda rows, completions: oracle_rewards(cfg.judge, rows["problem"], completions),
            seed=seed, max_new_tokens=kit.completion_budget(base.model), eos_id=tok.EOS_ID,
            pad_id=tok.PAD_ID, num_tokens=tok.vocab_size, checkpointer=ckpt, checkpoint_every=cfg.checkpoint_every,
            metrics_log=log, hooks=(validate,), desc=phase)
    records = log.records(phase)
    history = [{"step": 0, "rollouts": 0, "val/accuracy": sft_val_accuracy}]
    history += [{"step": r["step"], "rollouts": r["step"] * ppo.rollouts_per_update, "val/accuracy": r["val/accuracy"]}
                for r in records if "val/accuracy" in r]
    return host_local(state.params["policy"]), history, (records[-1] if records else {})


def learning_curve_mean(history: list[dict]) -> float:
    """Mean validation accuracy over the evaluated points of a run (SFT included): the area under its learning curve
    per evaluation, a sample-efficiency summary (higher = better sooner)."""
    return float(np.mean([r["val/accuracy"] for r in history]))


def run(cfg: DRPOArithConfig, workdir: str) -> dict:
    """Run (or resume) SFT, DR-PO and PPO on ARITH in `workdir`; returns and writes results.json (module
    docstring)."""
    clock = time.perf_counter()
    base = cfg.base

    def check(problems):
        if cfg.ppo.rollouts_per_update > len(problems.train):
            raise ValueError(f"ppo.rollouts_per_update={cfg.ppo.rollouts_per_update} is more than the "
                             f"{len(problems.train)} training problems")

    start = kit.start_experiment(cfg, base, workdir, check=check)
    problems, sft_params = start.problems, start.sft_params
    sft_eval = kit.cached_greedy_eval(sft_params, base, problems.test, RunDir(workdir).file("sft_eval.json"),
                                            {"method": "sft"})
    sft_val = kit.cached_greedy_eval(sft_params, base, problems.validation,
                                           RunDir(workdir).file("sft_val.json"), {"method": "sft"}, "val")
    data = prompt_dataset(problems.train, kit.completion_budget(base.model))

    comparison = {"sft": {"accuracy": sft_eval["test_accuracy"], "mean_length": sft_eval["test_mean_length"]}}
    runs, final_params = {}, {}
    for name, ppo in method_configs(cfg).items():
        runs[name] = []
        for index in range(cfg.rl_seeds):
            seed, run_dir = rl_seed(cfg, index), paths.join(workdir, name, f"seed_{index}")
            policy, history, last = train_method(cfg, ppo, seed, sft_params, problems, data, sft_val["val_accuracy"],
                                                 run_dir)
            evaluation = kit.cached_greedy_eval(policy, base, problems.test, RunDir(run_dir).file("eval.json"),
                                                      {"method": name, "seed": seed})
            final_params[name] = policy
            runs[name].append({"seed": seed, "accuracy": evaluation["test_accuracy"],
                               "mean_length": evaluation["test_mean_length"],
                               "val_learning_curve_mean": learning_curve_mean(history),
                               "validation_history": history, "last_update": last,
                               "params_sha256": evaluation["params_sha256"]})
        accuracy = [r["accuracy"] for r in runs[name]]
        comparison[name] = {
            "accuracy": float(np.mean(accuracy)),
            "accuracy_per_seed": accuracy,
            "accuracy_std": float(np.std(accuracy)),
            "mean_length": float(np.mean([r["mean_length"] for r in runs[name]])),
            "val_learning_curve_mean": float(np.mean([r["val_learning_curve_mean"] for r in runs[name]])),
            "final_val_accuracy": float(np.mean([r["validation_history"][-1]["val/accuracy"] for r in runs[name]])),
            "rollouts": ppo.num_updates * ppo.rollouts_per_update,
            "optimizer_steps": ppo.total_steps,
            "beta_reset": ppo.beta_reset,
        }
    wins = sum(d["accuracy"] > p["accuracy"] for d, p in zip(runs["drpo"], runs["ppo"]))
    results = {
        "comparison": comparison,
        "claim": "resetting PPO's rollouts into the offline (gold) responses makes it more sample-efficient: with the "
                 "same rollouts and updates from the same SFT policy, DR-PO reaches a higher held-out greedy accuracy "
                 "than PPO, mean over RL seeds (Chang et al. 2024)",
        "claim_holds": bool(comparison["drpo"]["accuracy"] > comparison["ppo"]["accuracy"]),
        "sft_accuracy": comparison["sft"]["accuracy"],
        "drpo_accuracy": comparison["drpo"]["accuracy"],
        "ppo_accuracy": comparison["ppo"]["accuracy"],
        "drpo_wins_per_seed": f"{wins}/{cfg.rl_seeds}",
        "runs": runs,
        "judge": cfg.judge,
        "carry_share": arith.carry_share(base.task.num_operands),
        "num_test_prompts": int(len(problems.test)),
        "num_val_prompts": int(len(problems.validation)),
        "steps": {"sft": base.sft.steps, "updates_per_run": cfg.ppo.num_updates,
                  "optimizer_steps_per_run": cfg.ppo.total_steps},
        "num_params": count_params(sft_params),
        "wall_seconds": time.perf_counter() - clock,
        "params_sha256": params_sha256(final_params["drpo"]),
        "config": config_to_dict(cfg),
    }
    return kit.finish_experiment(workdir, results, lambda path: plot(results, path), "drpo_arith.png")


def plot(results: dict, path: str) -> None:
    """Validation accuracy (greedy) against rollouts: every run (thin) and the seed mean (thick) of DR-PO and PPO,
    the SFT policy at 0 rollouts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for (name, label), color in zip((("drpo", "DR-PO"), ("ppo", "PPO")), ("tab:blue", "tab:orange")):
        histories = [r["validation_history"] for r in results["runs"][name]]
        rollouts = [h["rollouts"] for h in histories[0]]
        for history in histories:
            ax.plot(rollouts, [h["val/accuracy"] for h in history], color=color, alpha=0.3, linewidth=1)
        mean = np.mean([[h["val/accuracy"] for h in history] for history in histories], axis=0)
        ax.plot(rollouts, mean, color=color, marker="o", linewidth=2,
                label=f"{label} (held-out {results['comparison'][name]['accuracy']:.3f})")
    ax.set(xlabel="rollouts", ylabel="validation accuracy (greedy)", title="DR-PO vs PPO on ARITH")
    ax.legend()
    fig.tight_layout()
    paths.save_figure(fig, path, dpi=120)
    plt.close(fig)
