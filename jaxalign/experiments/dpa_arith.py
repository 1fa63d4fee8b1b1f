"""DPA on ARITH (Wang et al. 2024, "Arithmetic Control of LLMs for Diverse User Preferences: Directional Preference
Alignment with Multi-Objective Rewards"; docs/algorithms.md, "DPA"): one model steered by a user direction in the
prompt.

DPA scores a response with a vector of rewards r and represents a user's preference as a unit direction v, so the
user's reward is v.r. The direction is part of the prompt, and the model learns to follow it by rejection-sampling
fine-tuning: for each prompt and a sampled direction, draw N responses, keep the one with the largest v.r, fine-tune
on (direction + prompt, that response), and repeat. The paper's claim is arithmetic control: moving v moves the
responses along the trade-off (their verbosity against helpfulness), from a single model.

Here r = `jaxalign.tasks.judges.reward_vector` = (correctness = graded score / 6, conciseness = 1 - completion
tokens / sampling budget) on the verbose ARITH task (`kit.task_config(cfg, "verbose")`): demonstrations end
with 0-3 recaps of the answer (";24"), which the oracle accepts, and dropping a carry also shortens the numbers that
follow, so length and correctness trade off. The direction v_b = (cos theta_b, sin theta_b) lies in the first
quadrant, theta_b = 90 deg * b / (num_directions - 1) for bucket b (0: correctness only, the last: conciseness only),
and enters the prompt as the bucket's digit and ';' (the char tokenizer has "0123456789+=;"): "3;7+5+3+9=".

Pipeline (every phase resumable; re-running the same command continues where a killed run stopped):
1. Direction-conditioned SFT (`conditioned_sft_dataset`, `kit.train_supervised`, checkpoints/dpa_sft, not the
   main job's checkpoints/sft: this policy reads direction-prefixed prompts, a plain SFT checkpoint cannot stand in
   for it): every training problem's usual noisy verbose demonstration after a uniformly drawn direction prefix, so
   the SFT policy has seen every prefix and ignores it.
2. For t = 0 .. iterations - 1 (`jaxalign.algorithms.iterative.run_iterations`), in workdir/iterations/iter_<t>:
   `prompts_per_iteration` fresh training prompts, a uniformly drawn direction each, `samples_per_prompt` samples
   each from the current model at `temperature`; keep argmax_i v.r_i (`select_best`, first on ties); fine-tune the
   current model on the kept responses (`rsf`: steps, batch, optimizer; checkpoints/rsf).
3. Steering (`steering_table`): greedy decoding of `num_eval_prompts` held-out problems under every direction in
   `eval_directions`, for the SFT policy and the final model: accuracy, mean length (tokens incl. EOS), mean reward
   vector and v.r. results.json's "claim_holds": the final model's mean length never increases as the conciseness
   weight sin(theta) grows (over `eval_directions`), AND its accuracy at the most correctness-heavy of them is above
   the SFT policy's at the same direction.

Layout: config.json, metrics.jsonl (conditioned SFT), checkpoints/dpa_sft, sft_steering.json,
iterations/iter_<t>/{selected.npz (the kept responses), metrics.jsonl, checkpoints/rsf}, steering.json, results.json,
dpa_arith.png.
"""
from __future__ import annotations

import dataclasses
import itertools
import numbers
import time
from typing import Any

import jax
import numpy as np

from jaxalign import paths
from jaxalign.algorithms.iterative import run_iterations
from jaxalign.data.iterator import ArrayDataset
from jaxalign.distributed import host_local, is_primary
from jaxalign.experiments import arith_kit as kit
from jaxalign.models.llama import ModelConfig, check_model_fits_mesh, count_params
from jaxalign.sampling import SamplingConfig, generate
from jaxalign.sharding import check_batch_fits_mesh, make_mesh
from jaxalign.tasks import arith, judges
from jaxalign.tasks.tokenizer import CharTokenizer
from jaxalign.train.loop import MetricsLog
from jaxalign.train.optim import OptimConfig
from jaxalign.rundir import RunDir, claim, config_to_dict, load_json, params_sha256, write_json_atomic

PREFIX_LEN = 2  # the direction bucket's digit and ';'
DPA_PROMPT_LEN = kit.PROMPT_LEN + PREFIX_LEN  # "3;7+5+3+9="
MAX_DIRECTIONS = 10  # one digit per bucket

# The verbose task, with room in the context for the direction prefix.
_VERBOSE = kit.task_config(kit.ArithDPOConfig(), "verbose")
_BASE = dataclasses.replace(_VERBOSE, model=dataclasses.replace(
    _VERBOSE.model, max_len=DPA_PROMPT_LEN + kit.completion_len(_VERBOSE.task)))


def _is_int(value: Any, lowest: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Integral) and value >= lowest


@dataclasses.dataclass(frozen=True)
class DPAArithConfig:
    """base: the main job's config on the verbose task (task, model, the conditioned SFT in `base.sft`; its pairs and
    dpo sections are unused). model.max_len must hold the direction prefix too.
    num_directions: angle buckets b = 0 .. num_directions - 1 (2 to 10), theta_b = 90 deg * b / (num_directions - 1).
    iterations: rejection-sampling fine-tuning rounds, each from the previous round's model
    prompts_per_iteration: fresh training prompts per round, one uniformly drawn direction each
    samples_per_prompt: DPA's N: responses sampled per prompt, the best v.r of them kept (>= 2)
    temperature: sampling temperature of those responses (> 0: the selection needs varied samples)
    rsf: the fine-tuning of every iteration (from the current model).
    eval_directions: comma-separated buckets evaluated (at least 3 distinct).
    num_eval_prompts: held-out problems greedily decoded under every evaluated direction (the steering table)
    """

    base: kit.ArithDPOConfig = _BASE
    num_directions: int = 10
    iterations: int = 2
    prompts_per_iteration: int = 1024
    samples_per_prompt: int = 8
    temperature: float = 1.0
    rsf: kit.SFTConfig = kit.SFTConfig(steps=150, batch_size=64,
                                                   optim=OptimConfig(learning_rate=5e-4, warmup_steps=10))
    eval_directions: str = "0,3,6,9"
    num_eval_prompts: int = 1000

    def __post_init__(self):
        if not _is_int(self.num_directions, 2) or self.num_directions > MAX_DIRECTIONS:
            raise ValueError(f"num_directions must be an integer in [2, {MAX_DIRECTIONS}] (one digit per direction "
                             f"bucket), got {self.num_directions!r}")
        for name, lowest in (("iterations", 1), ("prompts_per_iteration", 1), ("samples_per_prompt", 2),
                             ("num_eval_prompts", 1)):
            if not _is_int(getattr(self, name), lowest):
                raise ValueError(f"{name} must be an integer >= {lowest}, got {getattr(self, name)!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not self.temperature > 0:
            raise ValueError(f"temperature must be a number > 0 (rejection sampling needs varied samples), got "
                             f"{self.temperature!r}")
        if self.prompts_per_iteration < self.rsf.batch_size:
            raise ValueError(f"prompts_per_iteration={self.prompts_per_iteration} is smaller than rsf.batch_size="
                             f"{self.rsf.batch_size}: an iteration keeps one response per prompt")
        self.eval_buckets  # noqa: B018 - validates

    @property
    def eval_buckets(self) -> tuple[int, ...]:
        """The evaluated buckets, by increasing angle (increasing conciseness weight)."""
        parts = [p.strip() for p in self.eval_directions.split(",") if p.strip()]
        if not all(p.isdigit() for p in parts):
            raise ValueError(f"eval_directions must be comma-separated bucket numbers, got {self.eval_directions!r}")
        buckets = sorted({int(p) for p in parts})
        if len(buckets) < 3 or buckets[-1] >= self.num_directions:
            raise ValueError(f"eval_directions must name at least 3 distinct buckets in [0, {self.num_directions - 1}]"
                             f" (num_directions={self.num_directions}), got {self.eval_directions!r}")
        return tuple(buckets)


# ---------------------------------------------------------------------------------------------------------------
# Directions and prompts.


def direction_angles(num_directions: int) -> np.ndarray:
    """theta_b in degrees for every bucket, evenly from 0 (correctness only) to 90 (conciseness only)."""
    return np.linspace(0.0, 90.0, num_directions)


def direction_vectors(num_directions: int) -> np.ndarray:
    """[num_directions, 2] unit vectors v_b = (cos theta_b, sin theta_b), in the order of judges.REWARD_DIMENSIONS
    (correctness, conciseness)."""
    theta = np.deg2rad(direction_angles(num_directions))
    return np.stack([np.cos(theta), np.sin(theta)], axis=1)


def directed_prompt(bucket: int, operands) -> str:
    """The prompt with its direction prefix: bucket 3 and 7+5+3+9 -> "3;7+5+3+9="."""
    if not 0 <= int(bucket) < MAX_DIRECTIONS:
        raise ValueError(f"a direction bucket is one digit, got {bucket!r}")
    return f"{int(bucket)};{arith.prompt_text(operands)}"


def completion_budget(model_cfg: ModelConfig) -> int:
    """Tokens a completion may take after a direction-prefixed prompt: the conciseness reward's max_tokens too."""
    return model_cfg.max_len - DPA_PROMPT_LEN


def conditioned_sft_dataset(base: kit.ArithDPOConfig, problems: np.ndarray,
                            num_directions: int) -> ArrayDataset:
    """Every problem's noisy verbose demonstration (the main job's draw, `kit.sft_dataset`'s seed) after a
    uniformly drawn direction prefix: the demonstrations do not depend on the direction, so neither does the SFT
    policy, and every prefix is in its training data."""
    examples = arith.make_sft_examples(problems, np.random.default_rng([base.seed, 2]), base.task.carry_drop_prob,
                                       base.task.max_recaps, base.task.recap_prob)
    buckets = np.random.default_rng([base.seed, 9]).integers(num_directions, size=len(problems))
    prompts = [directed_prompt(b, p) for b, p in zip(buckets, problems)]
    return ArrayDataset(arith.encode_batch(CharTokenizer(), prompts, [c for _, c in examples],
                                           max_len=base.model.max_len))


# ---------------------------------------------------------------------------------------------------------------
# Sampling, rewards and selection.


def sample_directed(params, model_cfg: ModelConfig, problems: np.ndarray, buckets: np.ndarray, temperature: float,
                    rng, batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(prompt tokens [N, DPA_PROMPT_LEN] left-padded, completions [N, C], masks [N, C]) for problem i under
    direction buckets[i]; temperature 0 is greedy. C = `completion_budget(model_cfg)`."""
    params = host_local(params)
    tok = CharTokenizer()
    prompts = [directed_prompt(b, p) for b, p in zip(buckets, problems)]
    prompt_tokens, prompt_mask = arith.encode_prompts(tok, prompts, pad_to=DPA_PROMPT_LEN)
    sampling = SamplingConfig(max_new_tokens=completion_budget(model_cfg), temperature=temperature)
    out_tokens, out_masks = [], []
    for start in range(0, len(problems), batch_size):
        rng, sub = jax.random.split(rng)
        tokens, mask = generate(params, prompt_tokens[start : start + batch_size],
                                prompt_mask[start : start + batch_size], sub, cfg=model_cfg, sampling=sampling,
                                eos_id=tok.EOS_ID, pad_id=tok.PAD_ID, num_tokens=tok.vocab_size)
        out_tokens.append(np.asarray(tokens))
        out_masks.append(np.asarray(mask))
    return prompt_tokens, np.concatenate(out_tokens), np.concatenate(out_masks)


def reward_vectors(problems: np.ndarray, completions: np.ndarray, masks: np.ndarray,
                   max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """([N, 2] reward vectors `judges.reward_vector`, [N] exact correctness) of completion i as an answer to problem
    i; lengths count the completion's tokens with EOS (its mask)."""
    tok = CharTokenizer()
    grades = judges.grade_texts(problems, [tok.decode(c) for c in completions])
    lengths = masks.sum(axis=1)
    rewards = np.stack([judges.reward_vector(g, int(n), max_tokens) for g, n in zip(grades, lengths)])
    return rewards, np.array([g.correct for g in grades])


def select_best(rewards: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """DPA's rejection sampling: for every prompt, the index of the sample with the largest v.r (the first on ties).

    rewards [P, N, D] (N samples of each prompt), directions [P, D] (the prompt's unit direction v)."""
    rewards, directions = np.asarray(rewards), np.asarray(directions)
    if rewards.ndim != 3 or directions.shape != (rewards.shape[0], rewards.shape[2]):
        raise ValueError(f"select_best: rewards must be [prompts, samples, dims] and directions [prompts, dims], got "
                         f"{rewards.shape} and {directions.shape}")
    return np.argmax(np.einsum("pnd,pd->pn", rewards, directions), axis=1)


def sft_rows(prompt_tokens: np.ndarray, completions: np.ndarray, masks: np.ndarray) -> dict[str, np.ndarray]:
    """SFT rows (tokens, attention_mask, completion_mask) of left-padded prompts followed by sampled completions
    (their masks already cover the EOS)."""
    prompt_mask = (prompt_tokens != CharTokenizer.PAD_ID).astype(np.int32)
    return {"tokens": np.concatenate([prompt_tokens, completions], axis=1).astype(np.int32),
            "attention_mask": np.concatenate([prompt_mask, masks], axis=1).astype(np.int32),
            "completion_mask": np.concatenate([np.zeros_like(prompt_mask), masks], axis=1).astype(np.int32)}


# ---------------------------------------------------------------------------------------------------------------
# The loop.


def iteration_problems(cfg: DPAArithConfig, train: np.ndarray, t: int) -> tuple[np.ndarray, np.ndarray]:
    """Iteration t's prompts (slice t of a seeded permutation: fresh every iteration) and their direction buckets."""
    needed = cfg.iterations * cfg.prompts_per_iteration
    if needed > len(train):
        raise ValueError(f"iterations x prompts_per_iteration = {cfg.iterations} x {cfg.prompts_per_iteration} = "
                         f"{needed} fresh prompts, but ARITH has {len(train)} training problems")
    order = np.random.default_rng([cfg.base.seed, 10]).permutation(len(train))
    problems = train[order[t * cfg.prompts_per_iteration : (t + 1) * cfg.prompts_per_iteration]]
    buckets = np.random.default_rng([cfg.base.seed, 11, t]).integers(cfg.num_directions, size=len(problems))
    return problems, buckets


def rejection_sample(cfg: DPAArithConfig, params, problems: np.ndarray, buckets: np.ndarray, t: int,
                     path: str) -> tuple[dict[str, np.ndarray], dict]:
    """N samples per (prompt, direction), the argmax of v.r kept: (SFT rows of the kept responses, statistics);
    cached at `path` so that a resumed run fine-tunes on exactly the same responses."""
    cached = kit.load_dataset(path)
    if cached is not None:
        return cached[0].arrays, cached[1]
    base, k = cfg.base, cfg.samples_per_prompt
    budget = completion_budget(base.model)
    prompt_tokens, completions, masks = sample_directed(
        params, base.model, np.repeat(problems, k, axis=0), np.repeat(buckets, k), cfg.temperature,
        jax.random.key(base.seed * 1000 + 500 + t), base.eval_batch_size)
    rewards, correct = reward_vectors(np.repeat(problems, k, axis=0), completions, masks, budget)
    best = select_best(rewards.reshape(len(problems), k, -1), direction_vectors(cfg.num_directions)[buckets])
    kept = np.arange(len(problems)) * k + best
    rows = sft_rows(prompt_tokens[kept], completions[kept], masks[kept])
    lengths = masks.sum(axis=1)
    stats = {"prompts": len(problems), "samples_correct_rate": float(correct.mean()),
             "samples_mean_length": float(lengths.mean()), "kept_correct_rate": float(correct[kept].mean()),
             "kept_mean_length": float(lengths[kept].mean()),
             "kept_mean_length_per_bucket": [float(lengths[kept][buckets == b].mean()) if (buckets == b).any()
                                             else None for b in range(cfg.num_directions)]}
    kit.save_dataset(path, ArrayDataset(rows), stats)
    return rows, stats


def train_iterations(cfg: DPAArithConfig, mesh, sft_params, problems: kit.Problems,
                     workdir: str) -> tuple[list[Any], list[dict]]:
    """The rejection-sampling loop (module docstring, step 2); returns (the iterates, their records)."""
    records: list[dict] = []

    def iterate(t: int, latest, previous):
        del previous  # every iteration fine-tunes the latest model
        it_dir = paths.join(workdir, "iterations", f"iter_{t}")
        paths.makedirs(it_dir)
        prompts, buckets = iteration_problems(cfg, problems.train, t)
        rows, stats = rejection_sample(cfg, latest, prompts, buckets, t, RunDir(it_dir).file("selected.npz"))
        params, _ = kit.train_supervised(cfg.base, cfg.rsf, mesh, ArrayDataset(rows), it_dir,
                                               MetricsLog(RunDir(it_dir).metrics), params=latest,
                                               phase="rsf")
        records.append({"iteration": t + 1, **stats, "params_sha256": params_sha256(params)})
        return host_local(params)

    return run_iterations(sft_params, cfg.iterations, iterate), records


# ---------------------------------------------------------------------------------------------------------------
# Evaluation and the claim.


def steering_table(cfg: DPAArithConfig, params, problems: np.ndarray) -> list[dict]:
    """One row per evaluated direction (by increasing angle): greedy accuracy, mean length, mean reward vector and
    mean v.r on `problems` with that direction's prefix."""
    base, vectors, angles = cfg.base, direction_vectors(cfg.num_directions), direction_angles(cfg.num_directions)
    rows = []
    for b in cfg.eval_buckets:
        _, completions, masks = sample_directed(params, base.model, problems, np.full(len(problems), b), 0.0,
                                                jax.random.key(0), base.eval_batch_size)
        rewards, correct = reward_vectors(problems, completions, masks, completion_budget(base.model))
        rows.append({"bucket": int(b), "angle_deg": float(angles[b]), "correctness_weight": float(vectors[b, 0]),
                     "conciseness_weight": float(vectors[b, 1]), "accuracy": float(correct.mean()),
                     "mean_length": float(masks.sum(axis=1).mean()),
                     "mean_correctness_reward": float(rewards[:, 0].mean()),
                     "mean_conciseness_reward": float(rewards[:, 1].mean()),
                     "mean_directional_reward": float((rewards @ vectors[b]).mean())})
    return rows


def cached_steering_table(cfg: DPAArithConfig, params, problems: np.ndarray, path: str) -> list[dict]:
    """`steering_table`, read back from `path` when it holds the table of the same parameters and directions."""
    sha = params_sha256(params)
    saved = load_json(path)
    if saved is not None and saved.get("params_sha256") == sha and saved.get("buckets") == list(cfg.eval_buckets):
        return saved["table"]
    table = steering_table(cfg, params, problems)
    if is_primary():
        write_json_atomic(path, {"params_sha256": sha, "buckets": list(cfg.eval_buckets), "table": table})
    return table


def claim_check(dpa_table: list[dict], sft_table: list[dict]) -> dict:
    """The claim from the numbers: mean length non-increasing as the conciseness weight grows (each evaluated
    direction's mean length <= the previous one's, rows ordered by angle) AND the most correctness-heavy direction's
    accuracy above the SFT policy's at the same direction."""
    lengths = [r["mean_length"] for r in dpa_table]
    monotone = all(later <= earlier for earlier, later in itertools.pairwise(lengths))
    beats_sft = dpa_table[0]["accuracy"] > sft_table[0]["accuracy"]
    return {"length_non_increasing": bool(monotone), "correctness_direction_beats_sft": bool(beats_sft),
            "claim_holds": bool(monotone and beats_sft)}


_SUMMARY_KEYS = ("accuracy", "mean_length", "mean_correctness_reward", "mean_conciseness_reward",
                 "mean_directional_reward", "angle_deg")


def comparison(dpa_table: list[dict], sft_table: list[dict]) -> dict[str, dict]:
    """results.json's comparison: "dpa" and "sft" at the most correctness-heavy evaluated direction (the claim's
    accuracy comparison), then both methods at every evaluated direction ("dpa_theta<angle>", "sft_theta<angle>")."""
    def summary(row: dict) -> dict:
        return {k: row[k] for k in _SUMMARY_KEYS}

    return {"sft": summary(sft_table[0]), "dpa": summary(dpa_table[0]),
            **{f"dpa_theta{row['angle_deg']:g}": summary(row) for row in dpa_table},
            **{f"sft_theta{row['angle_deg']:g}": summary(row) for row in sft_table}}


def validate_config(cfg: DPAArithConfig, mesh) -> None:
    base = cfg.base
    check_model_fits_mesh(base.model, mesh)
    for name, sft in (("base.sft", base.sft), ("rsf", cfg.rsf)):
        check_batch_fits_mesh(sft.batch_size // sft.grad_accum_steps, mesh, f"{name}.batch_size / grad_accum_steps")
    needed = DPA_PROMPT_LEN + kit.completion_len(base.task)
    if base.model.max_len < needed:
        raise ValueError(f"base.model.max_len={base.model.max_len} is too short for DPA on ARITH with "
                         f"base.task.max_recaps={base.task.max_recaps}; expected at least {needed} (direction-prefixed "
                         f"prompt {DPA_PROMPT_LEN} + completion {kit.completion_len(base.task)})")


def run(cfg: DPAArithConfig, workdir: str) -> dict:
    """Run (or resume) DPA on ARITH in `workdir`; returns and writes results.json (module docstring)."""
    clock = time.perf_counter()
    base = cfg.base
    paths.makedirs(workdir)
    mesh = make_mesh(base.mesh)
    validate_config(cfg, mesh)
    claim(cfg, workdir)
    problems = kit.split(base)
    iteration_problems(cfg, problems.train, 0)  # too many prompts asked for: fail before SFT
    log = MetricsLog(RunDir(workdir).metrics)
    sft_params, _ = kit.train_supervised(base, base.sft, mesh,
                                               conditioned_sft_dataset(base, problems.train, cfg.num_directions),
                                               workdir, log, phase="dpa_sft")
    sft_params = host_local(sft_params)
    held_out = problems.test[: cfg.num_eval_prompts]
    sft_table = cached_steering_table(cfg, sft_params, held_out, RunDir(workdir).file("sft_steering.json"))
    iterates, records = train_iterations(cfg, mesh, sft_params, problems, workdir)
    dpa_table = cached_steering_table(cfg, iterates[-1], held_out, RunDir(workdir).file("steering.json"))

    results = {
        "comparison": comparison(dpa_table, sft_table),
        "claim": "DPA (Wang et al. 2024) makes one model steerable by a reward direction in its prompt: as the "
                 "direction turns from correctness to conciseness the mean response length does not increase, and "
                 "the correctness-heavy direction is more accurate than the SFT policy (greedy, held-out ARITH, "
                 "verbose task)",
        **claim_check(dpa_table, sft_table),
        "steering": dpa_table,
        "sft_steering": sft_table,
        "iterations": records,
        "num_eval_prompts": len(held_out),
        "directions": {"angles_deg": direction_angles(cfg.num_directions).tolist(),
                       "evaluated_buckets": list(cfg.eval_buckets)},
        "steps": {"sft": base.sft.steps, "rsf_per_iteration": cfg.rsf.steps},
        "num_params": count_params(sft_params),
        "wall_seconds": time.perf_counter() - clock,
        "params_sha256": params_sha256(iterates[-1]),
        "config": config_to_dict(cfg),
    }
    return kit.finish_experiment(workdir, results, lambda path: plot(results, path), "dpa_arith.png")


def plot(results: dict, path: str) -> None:
    """Mean response length and accuracy against the direction angle, DPA and the SFT policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_len, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.5))
    for label, table, style in (("DPA", results["steering"], "o-"), ("SFT", results["sft_steering"], "s--")):
        angles = [r["angle_deg"] for r in table]
        ax_len.plot(angles, [r["mean_length"] for r in table], style, label=label)
        ax_acc.plot(angles, [r["accuracy"] for r in table], style, label=label)
    ax_len.set(xlabel="direction angle (deg; 0 = correctness, 90 = conciseness)", ylabel="mean length (tokens)",
               title="steering the response length")
    ax_acc.set(xlabel="direction angle (deg)", ylabel="held-out accuracy (greedy)", title="the accuracy it costs")
    ax_len.legend(fontsize=8)
    fig.tight_layout()
    paths.save_figure(fig, path, dpi=120)
    plt.close(fig)
