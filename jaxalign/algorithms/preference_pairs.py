"""Pair builders for the iterative algorithms: judged candidates -> preference pairs, with margin and score
filters, a teacher (gold) candidate, and replay of earlier iterations' pairs. Host-side NumPy.

Input: a score table [P, K] (higher is better) for K candidates per prompt (samples of the current policy, and
optionally a teacher / gold response), a validity mask and which candidates are the teacher's. One pair per prompt,
its best against its worst candidate (online DPO, Xiong et al. 2024 / Guo et al. 2024; DNO-Prct, Rosset et al.
2024, Algorithm 2), kept only if

- the best score is at least `min_chosen_score` (DNO: "the positive must be good enough"), and
- the margin best - worst is at least `min_margin` when the chosen response is the teacher's and at least
  `student_min_margin` when it is one of the policy's own samples (DNO-Prct: margin >= 2, >= 1 if the
  positive is a student sample), and always > 0 (a tied prompt has no preference to learn).

Ties for the best candidate go to a student sample over the teacher (on-policy pairs are the point of the online
algorithms; the teacher is chosen only when no sample is as good), then to the lowest index; ties for the worst go
to the lowest index. Nothing is dropped silently: `stats` counts every prompt that gives no pair, by reason.

Replay (DNO-Prct): iteration t trains on its own pairs plus, from iteration t - j, round(fractions[j-1] * n_t)
pairs drawn without replacement (n_t = this iteration's pair count), capped at what that iteration had; the
shortfall is counted.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class PairSelection:
    """Selected pairs as parallel arrays over kept prompts: prompt index, chosen / rejected candidate index, their
    scores, and whether the chosen one is the teacher's."""

    prompt: np.ndarray
    chosen: np.ndarray
    rejected: np.ndarray
    chosen_score: np.ndarray
    rejected_score: np.ndarray
    chosen_is_teacher: np.ndarray

    def __len__(self) -> int:
        return int(self.prompt.shape[0])


def _check_table(scores: Any, valid: Any, teacher: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scores = np.asarray(scores, np.float64)
    if scores.ndim != 2:
        raise ValueError(f"select_pairs: scores must be a [prompts, candidates] array, got shape {scores.shape}")
    masks = []
    for name, value in (("valid", valid), ("teacher", teacher)):
        if value is None:
            masks.append(np.full(scores.shape, name == "valid"))
            continue
        array = np.asarray(value)
        if array.ndim == 1:  # one flag per candidate column, the same for every prompt
            array = np.broadcast_to(array, scores.shape)
        if array.shape != scores.shape:
            raise ValueError(f"select_pairs: {name} must have shape {scores.shape} (or [{scores.shape[1]}]), got "
                             f"{np.asarray(value).shape}")
        if not np.all((array == 0) | (array == 1)):
            raise ValueError(f"select_pairs: {name} must hold only 0/1 or booleans")
        masks.append(array.astype(bool))
    valid_b, teacher_b = masks
    bad = valid_b & ~np.isfinite(scores)
    if bad.any():
        p, k = np.argwhere(bad)[0]
        raise ValueError(f"select_pairs: scores must be finite on valid candidates; prompt {p}, candidate {k} has "
                         f"{float(scores[p, k])} ({int(bad.sum())} such entries; mark missing candidates with valid=0)")
    return scores, valid_b, teacher_b


def _check_threshold(name: str, value: Any, lowest: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) or np.isnan(value):
        raise ValueError(f"select_pairs: {name} must be a number, got {value!r}")
    if lowest is not None and value < lowest:
        raise ValueError(f"select_pairs: {name} must be >= {lowest}, got {value!r}")
    return float(value)


def select_pairs(scores: Any, valid: Any = None, teacher: Any = None, *, min_margin: float = 0.0,
                 student_min_margin: float | None = None, min_chosen_score: float = -np.inf
                 ) -> tuple[PairSelection, dict[str, int]]:
    """Best-vs-worst pairs with DNO-Prct's filters (module docstring).

    scores [P, K]; valid [P, K] or [K] (default all valid); teacher [P, K] or [K] (default none): which candidates
    are the teacher's. student_min_margin defaults to min_margin. Returns (selection, stats) with stats: prompts,
    pairs, pairs_chosen_teacher, and the prompts without a pair by reason: dropped_no_candidates (fewer than two
    valid), dropped_low_chosen_score, dropped_tied (best == worst), dropped_small_margin (0 < margin < required).
    """
    scores, valid, teacher = _check_table(scores, valid, teacher)
    min_margin = _check_threshold("min_margin", min_margin, 0.0)
    student_min_margin = min_margin if student_min_margin is None else _check_threshold(
        "student_min_margin", student_min_margin, 0.0)
    min_chosen_score = _check_threshold("min_chosen_score", min_chosen_score)
    num_prompts, k = scores.shape
    index = np.arange(k)
    # Lexicographic keys: best = highest score, then student before teacher, then lowest index.
    best_key = np.where(valid, scores, -np.inf)
    order_best = np.lexsort((np.broadcast_to(index, scores.shape), teacher, -best_key), axis=1)[:, 0]
    worst_key = np.where(valid, scores, np.inf)
    order_worst = np.lexsort((np.broadcast_to(index, scores.shape), worst_key), axis=1)[:, 0]
    rows = np.arange(num_prompts)
    best_score, worst_score = scores[rows, order_best], scores[rows, order_worst]
    chosen_teacher = teacher[rows, order_best]
    margin = best_score - worst_score
    required = np.where(chosen_teacher, min_margin, student_min_margin)

    few = valid.sum(axis=1) < 2
    low = ~few & (best_score < min_chosen_score)
    tied = ~few & ~low & (margin <= 0)
    small = ~few & ~low & ~tied & (margin < required)
    keep = ~(few | low | tied | small)
    kept = np.flatnonzero(keep)
    selection = PairSelection(prompt=kept, chosen=order_best[kept], rejected=order_worst[kept],
                              chosen_score=best_score[kept], rejected_score=worst_score[kept],
                              chosen_is_teacher=chosen_teacher[kept])
    stats = {"prompts": int(num_prompts), "pairs": int(kept.size),
             "pairs_chosen_teacher": int(chosen_teacher[kept].sum()),
             "dropped_no_candidates": int(few.sum()), "dropped_low_chosen_score": int(low.sum()),
             "dropped_tied": int(tied.sum()), "dropped_small_margin": int(small.sum())}
    return selection, stats


def pair_arrays(prompt_tokens: np.ndarray, prompt_mask: np.ndarray, completions: np.ndarray,
                completion_masks: np.ndarray, selection: PairSelection) -> dict[str, np.ndarray]:
    """The trainer's pair arrays for a selection: chosen_/rejected_ tokens, attention_mask, completion_mask
    ([pairs, P + C] int32: prompt then completion, completion mask 0 on the prompt) and chosen_/rejected_score.

    prompt_tokens / prompt_mask [prompts, P] (left-padded); completions / completion_masks [prompts, K, C]."""
    completions, completion_masks = np.asarray(completions), np.asarray(completion_masks)
    if completions.ndim != 3 or completions.shape != completion_masks.shape:
        raise ValueError(f"pair_arrays: completions and completion_masks must both be [prompts, K, C], got "
                         f"{completions.shape} and {completion_masks.shape}")
    prompts, mask = np.asarray(prompt_tokens)[selection.prompt], np.asarray(prompt_mask)[selection.prompt]
    arrays = {}
    for side, candidate, score in (("chosen", selection.chosen, selection.chosen_score),
                                   ("rejected", selection.rejected, selection.rejected_score)):
        tokens = completions[selection.prompt, candidate]
        completion = completion_masks[selection.prompt, candidate]
        arrays[f"{side}_tokens"] = np.concatenate([prompts, tokens], axis=1).astype(np.int32)
        arrays[f"{side}_attention_mask"] = np.concatenate([mask, completion], axis=1).astype(np.int32)
        arrays[f"{side}_completion_mask"] = np.concatenate([np.zeros_like(mask), completion], axis=1).astype(np.int32)
        arrays[f"{side}_score"] = score.astype(np.float32)
    return arrays


def check_replay_fractions(fractions: Sequence[float], where: str = "replay") -> tuple[float, ...]:
    """The fractions as floats, each in [0, 1]; one clear error otherwise."""
    out = []
    for j, f in enumerate(fractions):
        if isinstance(f, bool) or not isinstance(f, (int, float, np.floating, np.integer)) or not 0.0 <= f <= 1.0:
            raise ValueError(f"{where}: fraction {j} (for iteration t-{j + 1}) must be a number in [0, 1], got {f!r}")
        out.append(float(f))
    return tuple(out)


def replay_indices(current_pairs: int, earlier_pairs: Sequence[int], fractions: Sequence[float],
                   rng: np.random.Generator) -> tuple[list[np.ndarray], dict[str, int]]:
    """Which pairs of earlier iterations to replay (module docstring).

    earlier_pairs[j] is the pair count of iteration t - 1 - j (most recent first); returns one index array per
    entry (empty beyond the fractions given) and stats: replayed, replay_shortfall (pairs wanted but not there)."""
    fractions = check_replay_fractions(fractions)
    picks, replayed, shortfall = [], 0, 0
    for j, available in enumerate(earlier_pairs):
        wanted = int(round(fractions[j] * current_pairs)) if j < len(fractions) else 0
        take = min(wanted, int(available))
        shortfall += wanted - take
        picks.append(np.sort(rng.choice(int(available), size=take, replace=False)) if take else
                     np.zeros((0,), np.int64))
        replayed += take
    return picks, {"replayed": replayed, "replay_shortfall": shortfall}
