"""ARITH data for every experiment: the problem split, SFT demonstrations, on-policy samples from a policy, and the
pairs and ranked lists graded by the oracle from those samples (each cached in the run directory, so a resumed run
reuses exactly the same data), plus the gold answers as completions (a teacher)."""
from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np

from jaxalign.data.iterator import ArrayDataset
from jaxalign.distributed import host_local
from jaxalign.experiments.arith_kit.config import PROMPT_LEN, ArithDPOConfig, completion_budget
from jaxalign.models.llama import ModelConfig
from jaxalign.rundir import RunDir, load_arrays, save_arrays
from jaxalign.sampling import SamplingConfig, generate, generate_extrapolated
from jaxalign.tasks import arith
from jaxalign.tasks.tokenizer import CharTokenizer


@dataclasses.dataclass(frozen=True)
class Problems:
    """Disjoint problem sets: SFT/pair training, validation (for DPO checkpoint selection) and held-out test."""

    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray


def split(cfg: ArithDPOConfig) -> Problems:
    train, test = arith.split_problems(cfg.task.num_operands, cfg.eval_fraction, cfg.seed)
    order = np.random.default_rng([cfg.seed, 1]).permutation(len(train))
    validation = train[order[: cfg.num_val_prompts]]
    return Problems(train=train[order[cfg.num_val_prompts :]], validation=validation, test=test)


def sft_dataset(cfg: ArithDPOConfig, problems: np.ndarray) -> ArrayDataset:
    rng = np.random.default_rng([cfg.seed, 2])
    examples = arith.make_sft_examples(problems, rng, cfg.task.carry_drop_prob, cfg.task.max_recaps,
                                       cfg.task.recap_prob)
    batch = arith.encode_batch(CharTokenizer(), [p for p, _ in examples], [c for _, c in examples],
                               max_len=cfg.model.max_len)
    return ArrayDataset(batch)


def sample_completions(params, model_cfg: ModelConfig, problems: np.ndarray, sampling: SamplingConfig, rng,
                       batch_size: int, previous_params=None,
                       alpha: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(prompt tokens [N, P], completion tokens [N, C], completion masks [N, C]) for every problem, in order.

    With `previous_params`, tokens are drawn from APO's token-level extrapolation of the two policies
    (`jaxalign.sampling.generate_extrapolated`, momentum `alpha`).
    In a multi-process run every process samples all problems itself, identically, from a local copy of the
    parameters (`host_local`): the decode loop then needs no collectives and every process gets the same result."""
    params = host_local(params)
    if previous_params is None:
        decode = functools.partial(generate, params)
    else:
        decode = functools.partial(generate_extrapolated, params, host_local(previous_params), alpha)
    tok = CharTokenizer()
    prompts = [arith.prompt_text(p) for p in problems]
    prompt_tokens, prompt_mask = arith.encode_prompts(tok, prompts, pad_to=PROMPT_LEN)
    out_tokens, out_masks = [], []
    for start in range(0, len(problems), batch_size):
        rng, sub = jax.random.split(rng)
        tokens, mask = decode(
            prompt_tokens[start : start + batch_size], prompt_mask[start : start + batch_size], sub,
            cfg=model_cfg, sampling=sampling, eos_id=tok.EOS_ID, pad_id=tok.PAD_ID, num_tokens=tok.vocab_size,
        )
        out_tokens.append(np.asarray(tokens))
        out_masks.append(np.asarray(mask))
    return prompt_tokens, np.concatenate(out_tokens), np.concatenate(out_masks)


def grade_completions(problems: np.ndarray, completion_tokens: np.ndarray) -> list[arith.Grade]:
    tok = CharTokenizer()
    return [arith.grade(p, tok.decode(t)) for p, t in zip(problems, completion_tokens)]


@dataclasses.dataclass(frozen=True)
class Judged:
    """The judge's view of K samples per prompt, shared by pairs and ranked lists so that both keep, drop and flip
    exactly the same prompts. scores / correct / lengths: [N, K]; tied, no_correct: [N] reasons to drop a prompt;
    rows: the kept prompts; flipped: [len(rows)] which kept prompts have their preference reversed."""

    grades: list
    scores: np.ndarray
    correct: np.ndarray
    lengths: np.ndarray
    tied: np.ndarray
    no_correct: np.ndarray
    rows: np.ndarray
    flipped: np.ndarray


def judge_samples(problems, completions, masks, k: int, min_score_gap: float, require_correct_chosen: bool,
                  length_bonus: float, label_flip_rate: float, seed: int) -> Judged:
    """Grade every sample with the oracle; the judge's score is `arith.score` plus `length_bonus` per completion
    token. A prompt is dropped when its judged scores lie within `min_score_gap` of each other (tied) or, with
    `require_correct_chosen`, when none of its samples is exactly correct; each kept prompt is flipped with
    probability `label_flip_rate` (seeded: the label-noise model of cDPO / robust DPO)."""
    grades = grade_completions(np.repeat(problems, k, axis=0), completions)
    lengths = np.asarray(masks).sum(axis=1).reshape(-1, k)
    scores = np.array([arith.score(g) for g in grades]).reshape(-1, k) + length_bonus * lengths
    correct = np.array([g.correct for g in grades]).reshape(-1, k)
    tied = scores.max(axis=1) - scores.min(axis=1) < min_score_gap
    no_correct = ~correct.any(axis=1) if require_correct_chosen else np.zeros(len(scores), bool)
    rows = np.nonzero(~tied & ~no_correct)[0]
    flipped = np.random.default_rng([seed, 4]).random(len(rows)) < label_flip_rate
    return Judged(grades, scores, correct, lengths, tied, no_correct, rows, flipped)


def build_pairs(problems, prompt_tokens, completions, masks, samples_per_prompt: int, min_score_gap: float,
                require_correct_chosen: bool, length_bonus: float = 0.0, label_flip_rate: float = 0.0, seed: int = 0):
    """Pair, for every prompt, its best-judged sample (chosen) with its worst-judged one (rejected).

    `completions`/`masks` are [N * K, C] with the K samples of prompt i at rows i*K .. i*K+K-1. The judge's score is
    the oracle's `arith.score` plus `length_bonus` per completion token. Prompts whose best and worst judged scores
    differ by less than `min_score_gap` (or, with `require_correct_chosen`, without any exactly correct sample) give
    no pair; both counts are reported. Then each pair is flipped with probability `label_flip_rate` (counted).
    """
    k = samples_per_prompt
    judged = judge_samples(problems, completions, masks, k, min_score_gap, require_correct_chosen, length_bonus,
                           label_flip_rate, seed)
    grades, scores, lengths, rows, flipped = judged.grades, judged.scores, judged.lengths, judged.rows, judged.flipped
    best, worst = scores.argmax(axis=1), scores.argmin(axis=1)
    best, worst = best.copy(), worst.copy()
    best[rows[flipped]], worst[rows[flipped]] = worst[rows[flipped]], best[rows[flipped]]
    pick = lambda which: rows * k + which[rows]  # noqa: E731
    prompt_part = prompt_tokens[rows]
    prompt_mask, zeros = prompt_part != CharTokenizer.PAD_ID, np.zeros_like(prompt_part)
    arrays = {}
    for side, idx in (("chosen", pick(best)), ("rejected", pick(worst))):
        arrays[f"{side}_score"] = scores.ravel()[idx].astype(np.float32)  # the judge's score: DRO's reward
        arrays[f"{side}_tokens"] = np.concatenate([prompt_part, completions[idx]], axis=1).astype(np.int32)
        arrays[f"{side}_attention_mask"] = np.concatenate([prompt_mask, masks[idx]], axis=1).astype(np.int32)
        arrays[f"{side}_completion_mask"] = np.concatenate([zeros, masks[idx]], axis=1).astype(np.int32)
    stats = {
        "pairs": int(len(rows)),
        "pairs_dropped_tied": int(judged.tied.sum()),
        "pairs_dropped_no_correct_sample": int((judged.no_correct & ~judged.tied).sum()),
        "pairs_label_flipped": int(flipped.sum()),
        "pairs_chosen_correct_rate": float(np.mean([grades[i].correct for i in pick(best)])) if len(rows) else 0.0,
        "pairs_chosen_longer_rate": float(np.mean(lengths.ravel()[pick(best)] > lengths.ravel()[pick(worst)]))
        if len(rows) else 0.0,
        "samples_correct_rate": float(np.mean([g.correct for g in grades])),
    }
    return ArrayDataset(arrays), stats


def load_dataset(path: str) -> tuple[ArrayDataset, dict] | None:
    """(dataset, stats) from an .npz written by `save_dataset`, or None when the file does not exist."""
    loaded = load_arrays(path)
    return None if loaded is None else (ArrayDataset(loaded[0]), loaded[1])


def save_dataset(path: str, dataset: ArrayDataset, stats: dict) -> None:
    """Atomically (temporary file + rename) store a dataset and its statistics."""
    save_arrays(path, dataset.arrays, stats)


def on_policy_samples(cfg: ArithDPOConfig, params, problems: np.ndarray, workdir: str | None = None):
    """`cfg.pairs.samples_per_prompt` samples from the SFT policy for each of `cfg.pairs.num_prompts` prompts drawn
    from `problems`: (prompt problems [N, ops], prompt tokens [N, P], completions [N*K, C], masks [N*K, C]). Pairs
    and ranked lists are both built from these; with a `workdir` they are cached in workdir/samples.npz."""
    path = workdir and RunDir(workdir).samples
    cached = load_dataset(path) if path else None
    if cached is not None:
        a = cached[0].arrays
        width = a["completions"].shape[-1]
        return a["problems"], a["prompt_tokens"], a["completions"].reshape(-1, width), a["masks"].reshape(-1, width)
    chosen = problems[np.random.default_rng([cfg.seed, 3]).permutation(len(problems))[: cfg.pairs.num_prompts]]
    k = cfg.pairs.samples_per_prompt
    sampling = SamplingConfig(max_new_tokens=completion_budget(cfg.model), temperature=cfg.pairs.temperature,
                              top_k=cfg.pairs.top_k)
    prompt_tokens, completions, masks = sample_completions(params, cfg.model, np.repeat(chosen, k, axis=0), sampling,
                                                           jax.random.key(cfg.seed + 17), cfg.eval_batch_size)
    if path:
        save_dataset(path, ArrayDataset({"problems": chosen, "prompt_tokens": prompt_tokens[::k],
                                         "completions": completions.reshape(len(chosen), k, -1),
                                         "masks": masks.reshape(len(chosen), k, -1)}), {})
    return chosen, prompt_tokens[::k], completions, masks


def on_policy_pairs(cfg: ArithDPOConfig, params, problems: np.ndarray, workdir: str):
    """Sample, grade and pair; cached in workdir/pairs.npz so a resumed run reuses exactly the same pairs."""
    path = RunDir(workdir).pairs
    cached = load_dataset(path)
    if cached is not None:
        return cached
    chosen, prompt_tokens, completions, masks = on_policy_samples(cfg, params, problems, workdir)
    p = cfg.pairs
    dataset, stats = build_pairs(chosen, prompt_tokens, completions, masks, p.samples_per_prompt, p.min_score_gap,
                                  p.require_correct_chosen, p.length_bonus, p.label_flip_rate, cfg.seed)
    if stats["pairs"] < cfg.dpo.batch_size:
        raise ValueError(
            f"only {stats['pairs']} preference pairs survived pairs.min_score_gap={p.min_score_gap} "
            f"({stats['pairs_dropped_tied']} prompts tied, {stats['pairs_dropped_no_correct_sample']} without a "
            f"correct sample), fewer than dpo.batch_size={cfg.dpo.batch_size}"
        )
    save_dataset(path, dataset, stats)
    return dataset, stats


def build_ranked_lists(problems, prompt_tokens, completions, masks, samples_per_prompt: int, min_score_gap: float,
                       require_correct_chosen: bool, length_bonus: float = 0.0, label_flip_rate: float = 0.0,
                       seed: int = 0) -> tuple[ArrayDataset, dict]:
    """One ranked list per prompt: its K samples with their judged scores.

    problems [N, num_operands]; prompt_tokens [N, PROMPT_LEN] (one row per prompt); completions / masks
    [N * K, C] with the K samples of prompt i at rows i*K .. i*K+K-1 (as `build_pairs`).

    The judge is `build_pairs`'s (`judge_samples`): arith.score(grade) + length_bonus * (completion tokens). A prompt is
    dropped, and counted, when all its judged scores lie within `min_score_gap` of each other (max - min <
    min_score_gap: "lists_dropped_tied") or, with `require_correct_chosen`, when none of its samples is exactly
    correct ("lists_dropped_no_correct_sample", counted only among untied prompts). These are exactly the prompts
    `build_pairs` drops, so the lists and the pairs cover the same prompts. Duplicate completions within a list are
    kept: they score the same and tie (the objectives never push tied candidates apart).

    Label noise: each kept list is flipped with probability `label_flip_rate`, drawn from the same seeded stream
    as `build_pairs`' pair flips (so the same prompts flip): its ranking is reversed by s -> max(s) + min(s) - s,
    which keeps the scores' range and gaps but makes the best sample the worst and vice versa (for K = 2, exactly
    the swapped pair). Counted in "lists_label_flipped".

    Returns (ArrayDataset with list_tokens / list_attention_mask / list_completion_mask [N', K, P + C] int32 (prompt
    and completion concatenated, completion mask 0 on the prompt), list_scores [N', K] float32 (the judged, possibly
    flipped, scores), list_valid [N', K] int32 (all ones), stats).
    """
    k = int(samples_per_prompt)
    problems = np.asarray(problems)
    if k < 2:
        raise ValueError(f"build_ranked_lists: samples_per_prompt must be >= 2, got {samples_per_prompt!r}")
    if len(completions) != len(problems) * k or len(masks) != len(completions):
        raise ValueError(f"build_ranked_lists: expected {len(problems)} prompts x {k} samples = {len(problems) * k} "
                         f"completion rows, got {len(completions)} completions and {len(masks)} masks")
    if len(prompt_tokens) != len(problems):
        raise ValueError(f"build_ranked_lists: prompt_tokens must have one row per prompt ({len(problems)}), got "
                         f"{len(prompt_tokens)}")
    if not 0.0 <= label_flip_rate < 0.5:
        raise ValueError(f"build_ranked_lists: label_flip_rate must lie in [0, 0.5), got {label_flip_rate!r}")
    judged = judge_samples(problems, completions, masks, k, min_score_gap, require_correct_chosen, length_bonus,
                           label_flip_rate, seed)
    scores, correct, rows, flipped = judged.scores, judged.correct, judged.rows, judged.flipped
    kept = scores[rows]
    kept = np.where(flipped[:, None], kept.max(axis=1, keepdims=True) + kept.min(axis=1, keepdims=True) - kept, kept)

    prompt_part = np.asarray(prompt_tokens)[rows]
    width = prompt_part.shape[1] + np.asarray(completions).shape[1]
    sample_rows = (rows[:, None] * k + np.arange(k)[None, :]).reshape(-1)
    prompt_rep = np.repeat(prompt_part, k, axis=0)
    arrays = {
        "list_tokens": np.concatenate([prompt_rep, np.asarray(completions)[sample_rows]], axis=1),
        "list_attention_mask": np.concatenate([prompt_rep != CharTokenizer.PAD_ID, np.asarray(masks)[sample_rows]],
                                              axis=1),
        "list_completion_mask": np.concatenate([np.zeros_like(prompt_rep), np.asarray(masks)[sample_rows]], axis=1),
    }
    arrays = {name: a.astype(np.int32).reshape(len(rows), k, width) for name, a in arrays.items()}
    arrays["list_scores"] = kept.astype(np.float32)
    arrays["list_valid"] = np.ones((len(rows), k), np.int32)

    top = kept.argmax(axis=1) if len(rows) else np.zeros((0,), int)
    distinct = [len(np.unique(s)) for s in kept]
    stats = {
        "lists": int(len(rows)),
        "list_size": k,
        "lists_dropped_tied": int(judged.tied.sum()),
        "lists_dropped_no_correct_sample": int((judged.no_correct & ~judged.tied).sum()),
        "lists_label_flipped": int(flipped.sum()),
        "lists_top_correct_rate": float(correct[rows, top].mean()) if len(rows) else 0.0,
        "lists_distinct_scores_mean": float(np.mean(distinct)) if len(rows) else 0.0,
        "samples_correct_rate": float(correct.mean()) if correct.size else 0.0,
    }
    return ArrayDataset(arrays), stats


def on_policy_lists(cfg: ArithDPOConfig, params, problems: np.ndarray, workdir: str) -> tuple[ArrayDataset, dict]:
    """Sample (`on_policy_samples`), grade and rank with `cfg.pairs`' judge settings; cached in
    workdir/lists.npz so a resumed run reuses exactly the same lists. No list surviving is one clear error."""
    path = RunDir(workdir).lists
    cached = load_dataset(path)
    if cached is not None:
        return cached
    chosen, prompt_tokens, completions, masks = on_policy_samples(cfg, params, problems, workdir)
    p = cfg.pairs
    dataset, stats = build_ranked_lists(chosen, prompt_tokens, completions, masks, p.samples_per_prompt,
                                        p.min_score_gap, p.require_correct_chosen, p.length_bonus, p.label_flip_rate,
                                        cfg.seed)
    if stats["lists"] == 0:
        raise ValueError(
            f"no ranked list survived pairs.min_score_gap={p.min_score_gap} ({stats['lists_dropped_tied']} of "
            f"{len(chosen)} prompts tied, {stats['lists_dropped_no_correct_sample']} without a correct sample, "
            f"pairs.require_correct_chosen={p.require_correct_chosen})"
        )
    save_dataset(path, dataset, stats)
    return dataset, stats


def teacher_completions(problems: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The gold answer of every problem as a completion (tokens + EOS, PAD after it) [N, width] and its mask."""
    tok = CharTokenizer()
    tokens = np.full((len(problems), width), tok.PAD_ID, np.int32)
    mask = np.zeros((len(problems), width), np.int32)
    for i, p in enumerate(problems):
        ids = tok.encode(arith.solution_text(p)) + [tok.EOS_ID]
        if len(ids) > width:
            raise ValueError(f"the gold answer of {arith.prompt_text(p)!r} has {len(ids)} tokens, more than the "
                             f"sampler's {width} completion slots")
        tokens[i, : len(ids)], mask[i, : len(ids)] = ids, 1
    return tokens, mask
