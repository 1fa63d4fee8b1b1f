"""Online / iterative DPO, DNO-Prct and APO on ARITH (docs/algorithms.md): sample -> judge -> pairs -> DPO ->
repeat, every iteration's policy the next one's reference.

Pipeline (every phase resumable; re-running the same command continues where a killed run stopped):
1. SFT exactly as the main job (`kit.train_sft`).
2. For t = 0 .. iterations - 1 (`jaxalign.algorithms.iterative.run_iterations`), in workdir/iterations/iter_<t>:
   a. `prompts_per_iteration` fresh training prompts (disjoint across iterations), `base.pairs.samples_per_prompt`
      samples each from the sampling policy: the current iterate pihat_t, or for APO (`apo`, from the second
      iteration on) its extrapolation with pihat_{t-1}, token-level logits (`apo_sampling=logits`) or weights
      (`apo_sampling=weights`); `apo_sampling=latest` samples pihat_t (APO in the loss only).
   b. The judge (`jaxalign.tasks.judges`: graded 0-6 by default, "binary" or the main job's "score") scores every
      sample; with `teacher`, the gold answer joins as one more candidate (DNO-Prct's teacher response).
   c. Best-vs-worst pairs with DNO-Prct's filters (`jaxalign.algorithms.preference_pairs.select_pairs`:
      min_chosen_score, min_margin / student_min_margin; dropped prompts counted), then replay of earlier
      iterations' pairs (`replay`, e.g. "0.3,0.15").
   d. The main job's DPO phase (`kit.train_dpo`: base.dpo.objective, sigmoid DPO by default, beta, the
      chosen-NLL regulariser, the validation guard within the iteration) for `steps_per_iteration` steps, starting
      from pihat_t, with reference pihat_t (online DPO, DNO), or for APO the extrapolated reference
      (1 + alpha) log pihat_t - alpha log pihat_{t-1} (`iterative.extrapolated_reference`; alpha = 0 is iterative
      DPO exactly). With base.dpo.objective=sppo_hard this is APO on SPPO's squared loss.
   e. Held-out greedy accuracy of the new iterate pihat_{t+1} and its validation accuracy.
3. The returned policy: the iterate with the best validation accuracy (`select_iterate`, DNO-Prct) or the last.

Presets (registered in jaxalign/registry.py): `online_dpo`, `dno` (teacher, margins 2 / 1, replay 0.3 / 0.15) and
`apo` (alpha 0.3). `IterativeConfig.offline()` turns any of them into offline DPO with the same SFT start, prompts
and steps: one iteration on pairs sampled from the SFT policy alone.

Layout: config.json, metrics.jsonl (SFT), checkpoints/sft, sft_eval.json, sft_val.json,
iterations/iter_<t>/{samples.npz, pairs.npz, metrics.jsonl, checkpoints/dpo, reference_cache, iteration.json},
results.json, iterative.png.
"""
from __future__ import annotations

import dataclasses
import numbers
import time
from typing import Any, ClassVar

import jax
import numpy as np

from jaxalign import paths
from jaxalign.algorithms.iterative import best_iterate, extrapolated_reference, run_iterations
from jaxalign.algorithms.preference_pairs import check_replay_fractions, pair_arrays, replay_indices, select_pairs
from jaxalign.data.iterator import ArrayDataset
from jaxalign.experiments import arith_kit as kit
from jaxalign.experiments.arith_kit import iteration_config, iteration_prompts, teacher_completions
from jaxalign.losses.iterative import extrapolate_params
from jaxalign.models.llama import DecoderLM, count_params
from jaxalign.sampling import SamplingConfig
from jaxalign.tasks import arith, judges
from jaxalign.tasks.tokenizer import CharTokenizer
from jaxalign.train.loop import MetricsLog
from jaxalign.train.optim import OptimConfig
from jaxalign.train.reference import cached_reference_logprobs
from jaxalign.train.step import logits_fn
from jaxalign.rundir import RunDir, config_to_dict, params_sha256

APO_SAMPLING = ("latest", "logits", "weights")

# The main job, with a DPO phase sized for one iteration: short warm-up, validation every 20 steps.
_BASE = dataclasses.replace(
    kit.ArithDPOConfig(),
    dpo=dataclasses.replace(kit.ARITH_DPO, steps=40, eval_every=20,
                            optim=OptimConfig(learning_rate=5e-5, warmup_steps=5)),
)


def _is_int(value: Any, lowest: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Integral) and value >= lowest


@dataclasses.dataclass(frozen=True)
class IterativeConfig:
    """base: the main job's config (model, SFT, samples per prompt and temperature in `base.pairs`, the DPO step in
        `base.dpo`; base.dpo.steps is replaced by steps_per_iteration).
    iterations: sample -> judge -> DPO rounds T; each round's policy is the next one's reference
    prompts_per_iteration: fresh training prompts per round (disjoint: iterations x this <= training problems)
    steps_per_iteration: DPO optimizer steps per round (replaces base.dpo.steps)
    judge: "graded" (0-6), "binary" or "score" (`jaxalign.tasks.judges`)
    teacher: add the gold answer as one more candidate per prompt (DNO-Prct's teacher response, Rosset et al. 2024)
    min_chosen_score: drop a prompt whose best candidate scores below this (None: no threshold)
    min_margin: smallest best-minus-worst judge-score gap kept when the chosen is the teacher's (and, by default,
        a student's)
    student_min_margin: the same gap when the chosen is a sampled (student) completion (None: min_margin)
    replay: comma-separated fractions of the current pair count replayed from iterations t-1, t-2, ... ("" = none).
    apo: extrapolate the reference (and the sampling policy) from the two latest iterates with momentum `alpha`;
        apo with alpha 0 computes everything through the extrapolation and reproduces online DPO bit for bit.
    alpha: APO's Nesterov momentum in [0, 1): reference (1 + alpha) log pihat_t - alpha log pihat_{t-1}
        (He et al. 2024)
    apo_sampling: "logits" (token level), "weights" or "latest" (sample the plain iterate: APO in the loss only).
    select_iterate: return the iterate with the best validation accuracy (else the last)."""

    base: kit.ArithDPOConfig = _BASE
    iterations: int = 4
    prompts_per_iteration: int = 512
    steps_per_iteration: int = 40
    judge: str = "graded"
    teacher: bool = False
    min_chosen_score: float | None = float(judges.GRADED_MAX)
    min_margin: float = 1.0
    student_min_margin: float | None = None
    replay: str = ""
    apo: bool = False
    alpha: float = 0.0
    apo_sampling: str = "logits"
    select_iterate: bool = True

    OVERRIDE_ALIASES: ClassVar[dict[str, str]] = {"loss": "base.dpo.objective"}

    def __post_init__(self):
        for name in ("iterations", "prompts_per_iteration", "steps_per_iteration"):
            if not _is_int(getattr(self, name), 1):
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        judges.check_judge(self.judge, "judge")
        if self.apo_sampling not in APO_SAMPLING:
            raise ValueError(f"apo_sampling must be one of {APO_SAMPLING}, got {self.apo_sampling!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0.0 <= self.alpha < 1.0:
            raise ValueError(f"alpha must be a number in [0, 1) (APO's Nesterov momentum), got {self.alpha!r}")
        if self.apo and self.base.dpo.reference == "sync":
            raise ValueError("apo=true computes its extrapolated reference from two frozen checkpoints; it "
                             "cannot train with base.dpo.reference=sync")
        if self.base.lora.rank:
            raise ValueError("the iterative algorithms train full parameters: set base.lora.rank=0")
        select_pairs(np.zeros((1, 2)), min_margin=self.min_margin, student_min_margin=self.student_min_margin,
                     min_chosen_score=-np.inf if self.min_chosen_score is None else self.min_chosen_score)
        self.replay_fractions  # noqa: B018 - validates

    @property
    def replay_fractions(self) -> tuple[float, ...]:
        parts = [p.strip() for p in self.replay.split(",") if p.strip()]
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise ValueError(f"replay must be comma-separated numbers in [0, 1], got {self.replay!r}") from None
        return check_replay_fractions(values, f"replay={self.replay!r}")

    def offline(self) -> "IterativeConfig":
        """Offline DPO with this config's budget: one iteration on pairs from the SFT policy alone, over all the
        prompts and steps the iterative run uses (no teacher, no replay, no momentum; the judge and filters are
        kept)."""
        return dataclasses.replace(self, iterations=1,
                                   prompts_per_iteration=self.iterations * self.prompts_per_iteration,
                                   steps_per_iteration=self.iterations * self.steps_per_iteration, teacher=False,
                                   replay="", apo=False, alpha=0.0)


# The registered experiments: IterativeConfig fields each changes from the defaults (online DPO).
PRESETS: dict[str, dict[str, Any]] = {
    "online_dpo": {},
    # DNO-Prct (Rosset et al. 2024, Algorithm 2): the gold answer as teacher, margins 2 (teacher) / 1 (student),
    # 30% / 15% of the pairs replayed from the two previous iterations, the best iterate on validation.
    "dno": {"teacher": True, "min_margin": 2.0, "student_min_margin": 1.0, "replay": "0.3,0.15"},
    # APO (He et al. 2024): Nesterov momentum 0.3 on the reference, sampling from the extrapolated logits.
    "apo": {"apo": True, "alpha": 0.3, "apo_sampling": "logits"},
}


def preset(name: str) -> IterativeConfig:
    """The default config of a registered iterative experiment (PRESETS)."""
    if name not in PRESETS:
        raise ValueError(f"unknown iterative preset {name!r}; available: {', '.join(PRESETS)}")
    return dataclasses.replace(IterativeConfig(), **PRESETS[name])


def sample_candidates(cfg: IterativeConfig, latest, previous, problems: np.ndarray, t: int, path: str):
    """K samples per prompt from iteration t's sampling policy (module docstring), cached at `path`:
    (prompt tokens [P, L], completions [P, K, C], masks [P, K, C])."""
    cached = kit.load_dataset(path)
    if cached is not None:
        a = cached[0].arrays
        return a["prompt_tokens"], a["completions"], a["masks"]
    base, k = cfg.base, cfg.base.pairs.samples_per_prompt
    sampling = SamplingConfig(max_new_tokens=kit.completion_budget(base.model),
                              temperature=base.pairs.temperature, top_k=base.pairs.top_k)
    params, previous_params = latest, None
    if cfg.apo and previous is not None:
        if cfg.apo_sampling == "weights":
            params = extrapolate_params(latest, previous, cfg.alpha)
        elif cfg.apo_sampling == "logits":
            previous_params = previous
    prompt_tokens, completions, masks = kit.sample_completions(
        params, base.model, np.repeat(problems, k, axis=0), sampling, jax.random.key(base.seed * 1000 + 100 + t),
        base.eval_batch_size, previous_params=previous_params, alpha=cfg.alpha)
    arrays = {"prompt_tokens": prompt_tokens[::k], "completions": completions.reshape(len(problems), k, -1),
              "masks": masks.reshape(len(problems), k, -1)}
    kit.save_dataset(path, ArrayDataset(arrays), {})
    return arrays["prompt_tokens"], arrays["completions"], arrays["masks"]


def judged_pairs(cfg: IterativeConfig, problems: np.ndarray, prompt_tokens: np.ndarray, completions: np.ndarray,
                 masks: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Judge every candidate (plus the teacher's, with `cfg.teacher`) and select the iteration's own pairs."""
    num_prompts, k, width = completions.shape
    tok = CharTokenizer()
    texts = [tok.decode(c) for c in completions.reshape(-1, width)]
    grades = judges.grade_texts(np.repeat(problems, k, axis=0), texts)
    scores = judges.judge_scores(cfg.judge, grades).reshape(num_prompts, k)
    correct = np.array([g.correct for g in grades]).reshape(num_prompts, k)
    is_teacher = np.zeros(k, bool)
    if cfg.teacher:
        gold, gold_mask = teacher_completions(problems, width)
        completions = np.concatenate([completions, gold[:, None]], axis=1)
        masks = np.concatenate([masks, gold_mask[:, None]], axis=1)
        gold_scores = judges.judge_scores(cfg.judge, [arith.grade(p, arith.solution_text(p)) for p in problems])
        scores = np.concatenate([scores, gold_scores[:, None]], axis=1)
        is_teacher = np.append(is_teacher, True)
    selection, stats = select_pairs(
        scores, teacher=is_teacher, min_margin=cfg.min_margin, student_min_margin=cfg.student_min_margin,
        min_chosen_score=-np.inf if cfg.min_chosen_score is None else cfg.min_chosen_score)
    arrays = pair_arrays(prompt_tokens, prompt_tokens != tok.PAD_ID, completions, masks, selection)
    stats.update(samples_correct_rate=float(correct.mean()), samples_mean_judge_score=float(scores[:, :k].mean()),
                 prompts_with_correct_sample=int(correct.any(axis=1).sum()))
    return arrays, stats


def with_replay(cfg: IterativeConfig, own: ArrayDataset, t: int, iterations_dir: str) -> tuple[ArrayDataset, dict]:
    """The iteration's own pairs plus the replayed pairs of earlier iterations (read from their pairs.npz)."""
    fractions = cfg.replay_fractions
    if not fractions or t == 0:
        return own, {"replayed": 0, "replay_shortfall": 0}
    earlier = [kit.load_dataset(paths.join(iterations_dir, f"iter_{s}", "pairs.npz"))[0]
               for s in range(t - 1, max(t - 1 - len(fractions), -1), -1)]
    picks, stats = replay_indices(len(own), [len(d) for d in earlier], fractions,
                                  np.random.default_rng([cfg.base.seed, 6, t]))
    parts = [own.arrays] + [{k: v[idx] for k, v in d.arrays.items()} for d, idx in zip(earlier, picks)]
    return ArrayDataset({k: np.concatenate([p[k] for p in parts]) for k in own.arrays}), stats


def _reference_logprobs(cfg: IterativeConfig, params, data: ArrayDataset, cache: str) -> dict[str, np.ndarray]:
    tok = CharTokenizer()
    tokenization = {"tokenizer": "CharTokenizer", "chars": tok.CHARS, "pad": tok.PAD_ID, "eos": tok.EOS_ID}
    arrays, _ = cached_reference_logprobs(cache, logits_fn(DecoderLM(cfg.base.model)), params, data.arrays,
                                          tokenization, cfg.base.eval_batch_size)
    return arrays


def train_iterations(cfg: IterativeConfig, mesh, sft_params, problems: kit.Problems,
                     workdir: str) -> tuple[list[Any], list[dict]]:
    """The loop (module docstring, step 2) from `sft_params`; returns (iterates pihat_1..pihat_T, their records)."""
    iterations_dir = paths.join(workdir, "iterations")
    records: list[dict] = []

    def iterate(t: int, latest, previous):
        it_dir = paths.join(iterations_dir, f"iter_{t}")
        paths.makedirs(it_dir)
        prompts = iteration_prompts(cfg, problems.train, t)
        prompt_tokens, completions, masks = sample_candidates(cfg, latest, previous, prompts, t,
                                                              RunDir(it_dir).samples)
        pairs_path = RunDir(it_dir).pairs
        cached = kit.load_dataset(pairs_path)
        if cached is None:
            arrays, stats = judged_pairs(cfg, prompts, prompt_tokens, completions, masks)
            cached = (ArrayDataset(arrays), stats)
            if stats["pairs"]:
                kit.save_dataset(pairs_path, *cached)
        own, stats = cached
        data, replay_stats = with_replay(cfg, own, t, iterations_dir)
        if len(data) < cfg.base.dpo.batch_size:
            raise ValueError(
                f"iteration {t}: only {len(data)} preference pairs ({stats['pairs']} own, {replay_stats['replayed']} "
                f"replayed) for base.dpo.batch_size={cfg.base.dpo.batch_size}: {stats['dropped_tied']} of "
                f"{stats['prompts']} prompts tied, {stats['dropped_low_chosen_score']} below min_chosen_score, "
                f"{stats['dropped_small_margin']} below the margin; raise prompts_per_iteration or relax the filters")
        if cfg.apo and previous is not None:  # APO: the reference is the extrapolated iterate
            cache = RunDir(it_dir).reference_cache
            data = ArrayDataset({**data.arrays, **extrapolated_reference(
                _reference_logprobs(cfg, latest, data, cache), _reference_logprobs(cfg, previous, data, cache),
                cfg.alpha)})
        selected, _, guard = kit.train_dpo(iteration_config(cfg), mesh, latest, data,
                                                 problems, it_dir, MetricsLog(RunDir(it_dir).metrics))
        info = {"iteration": t + 1, **stats, **replay_stats, "train_pairs": len(data),
                "reference": "extrapolated" if cfg.apo and previous is not None else "previous iterate",
                "reference_sha256": params_sha256(latest), "selected_step": guard["selected_step"],
                "val_accuracy": guard["selected_val_accuracy"], "validation_history": guard["validation_history"]}
        records.append(kit.cached_greedy_eval(selected, cfg.base, problems.test,
                                                    RunDir(it_dir).file("iteration.json"), info))
        return selected

    iterates = run_iterations(sft_params, cfg.iterations, iterate)
    return iterates, records


def run(cfg: IterativeConfig, workdir: str) -> dict:
    """Run (or resume) the iterative algorithm in `workdir`; returns and writes results.json (module docstring)."""
    clock = time.perf_counter()
    base = cfg.base
    start = kit.start_experiment(cfg, base, workdir, iteration_config(cfg),
                                       check=lambda problems: iteration_prompts(cfg, problems.train, 0))
    mesh, problems, sft_params = start.mesh, start.problems, start.sft_params
    sft_eval = kit.cached_greedy_eval(sft_params, base, problems.test, RunDir(workdir).file("sft_eval.json"),
                                            {"iteration": 0})
    sft_val = kit.cached_greedy_eval(sft_params, base, problems.validation,
                                           RunDir(workdir).file("sft_val.json"), {"iteration": 0}, "val")
    iterates, records = train_iterations(cfg, mesh, sft_params, problems, workdir)
    chosen = best_iterate(records) if cfg.select_iterate else len(records) - 1
    accuracy = [sft_eval["test_accuracy"]] + [r["test_accuracy"] for r in records]
    results = {
        "sft_accuracy": sft_eval["test_accuracy"],
        "final_accuracy": records[chosen]["test_accuracy"],
        "last_iteration_accuracy": accuracy[-1],
        "selected_iteration": chosen + 1,
        "accuracy_per_iteration": accuracy,  # [SFT, after iteration 1, ...]
        "val_accuracy_per_iteration": [sft_val["val_accuracy"]] + [r["val_accuracy"] for r in records],
        "samples_correct_rate_per_iteration": [r["samples_correct_rate"] for r in records],
        "pairs_per_iteration": [r["pairs"] for r in records],
        "iterations": records,
        "num_test_prompts": int(len(problems.test)),
        "steps": {"sft": base.sft.steps, "per_iteration": cfg.steps_per_iteration,
                  "dpo_total": cfg.steps_per_iteration * cfg.iterations},
        "num_params": count_params(sft_params),
        "wall_seconds": time.perf_counter() - clock,
        "params_sha256": params_sha256(iterates[chosen]),
        "config": config_to_dict(cfg),
    }
    return kit.finish_experiment(workdir, results, lambda path: plot([("this run", results)], path),
                                       "iterative.png")


def plot(runs: list[tuple[str, dict]], path: str) -> None:
    """Held-out accuracy and the sampled policy's correct rate against the iteration, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_reward) = plt.subplots(1, 2, figsize=(10, 3.5))
    for label, results in runs:
        accuracy = results["accuracy_per_iteration"]
        ax_acc.plot(range(len(accuracy)), accuracy, marker="o", label=label)
        rate = results["samples_correct_rate_per_iteration"]
        ax_reward.plot(range(len(rate)), rate, marker="o", label=label)
    ax_acc.set(xlabel="iteration (0 = SFT)", ylabel="held-out accuracy (greedy)", title="iterative preference "
               "optimisation on ARITH")
    ax_reward.set(xlabel="iteration (samples drawn at its start)", ylabel="sampled completions correct",
                  title="on-policy reward")
    ax_acc.legend(fontsize=8)
    fig.tight_layout()
    paths.save_figure(fig, path, dpi=120)
    plt.close(fig)
