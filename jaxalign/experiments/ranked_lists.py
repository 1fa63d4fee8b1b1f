"""Ranked lists from on-policy ARITH samples, graded by the oracle: the data of the listwise objectives and of
Curry-DPO (issue 3 item 5: "listwise ones train on ranked lists built from the oracle's graded scores").

The same samples and the same judge as the main job's pairs (`arith_dpo.build_pairs` / `on_policy_pairs`), kept
whole: every prompt gives one list of its K samples with their judged scores, instead of one (best, worst) pair.
"""
from __future__ import annotations

import os

import numpy as np

from jaxalign.data.iterator import ArrayDataset
from jaxalign.experiments.arith_dpo import (
    ArithDPOConfig,
    grade_completions,
    load_dataset,
    on_policy_samples,
    save_dataset,
)
from jaxalign.tasks import arith
from jaxalign.tasks.tokenizer import CharTokenizer


def build_ranked_lists(problems, prompt_tokens, completions, masks, samples_per_prompt: int, min_score_gap: float,
                       require_correct_chosen: bool, length_bonus: float = 0.0, label_flip_rate: float = 0.0,
                       seed: int = 0) -> tuple[ArrayDataset, dict]:
    """One ranked list per prompt: its K samples with their judged scores.

    problems [N, num_operands]; prompt_tokens [N, PROMPT_LEN] (one row per prompt); completions / masks
    [N * K, C] with the K samples of prompt i at rows i*K .. i*K+K-1 (as `arith_dpo.build_pairs`).

    The judge is `arith_dpo.build_pairs`'s: arith.score(grade) + length_bonus * (completion tokens). A prompt is
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
    grades = grade_completions(np.repeat(problems, k, axis=0), completions)
    lengths = np.asarray(masks).sum(axis=1).reshape(-1, k)
    scores = np.array([arith.score(g) for g in grades]).reshape(-1, k) + length_bonus * lengths
    correct = np.array([g.correct for g in grades]).reshape(-1, k)
    tied = scores.max(axis=1) - scores.min(axis=1) < min_score_gap
    no_correct = ~correct.any(axis=1) if require_correct_chosen else np.zeros(len(scores), bool)
    rows = np.nonzero(~tied & ~no_correct)[0]
    flipped = np.random.default_rng([seed, 4]).random(len(rows)) < label_flip_rate
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
        "lists_dropped_tied": int(tied.sum()),
        "lists_dropped_no_correct_sample": int((no_correct & ~tied).sum()),
        "lists_label_flipped": int(flipped.sum()),
        "lists_top_correct_rate": float(correct[rows, top].mean()) if len(rows) else 0.0,
        "lists_distinct_scores_mean": float(np.mean(distinct)) if len(rows) else 0.0,
        "samples_correct_rate": float(correct.mean()) if correct.size else 0.0,
    }
    return ArrayDataset(arrays), stats


def on_policy_lists(cfg: ArithDPOConfig, params, problems: np.ndarray, workdir: str) -> tuple[ArrayDataset, dict]:
    """Sample (`on_policy_samples`), grade and rank with `cfg.pairs`' judge settings; cached in
    workdir/lists.npz so a resumed run reuses exactly the same lists. No list surviving is one clear error."""
    path = os.path.join(workdir, "lists.npz")
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
