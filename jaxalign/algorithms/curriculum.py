"""Curry-DPO (Pattnaik et al., 2024, "Curry-DPO: Enhancing Alignment using Curriculum Learning & Ranked
Preferences"; docs/algorithms.md, "Curry-DPO"): host-side pair building and curriculum staging, pure NumPy.

From K rated responses per prompt, the paper builds several preference pairs per prompt, the best-rated response
against each other response, orders them from easy to hard by rating gap (a large gap is an easy pair) and trains
DPO iteratively: iteration i trains on the i-th group of pairs, and the model trained in iteration i becomes both
the starting policy and the reference model of iteration i + 1 (`run_curriculum`). The loss of every iteration is
plain DPO (`sigmoid`).

Two groupings of the ordered pairs into `num_iterations` stages:

- "global" (default): all pairs of the dataset sorted by gap, largest first (ties: by prompt, then rejected
  index), cut into `num_iterations` contiguous chunks of near-equal size (`np.array_split`), so stage 0 holds the
  easiest pairs of the whole dataset.
- "per_prompt": each prompt's pairs sorted by gap, largest first, and the r-th of its m pairs goes to stage
  floor(r * num_iterations / m). With 4 responses per prompt and 3 iterations this is the arrangement the paper
  describes for UltraFeedback [unverified: from memory of the paper]: iteration 1 trains on (best, worst) of every
  prompt, iteration 2 on (best, third), iteration 3 on (best, second). A prompt with fewer pairs than iterations
  fills the first stages.

ordering="random" replaces the gap order by a permutation drawn from `np.random.default_rng(seed)` (the paper's
random-curriculum baseline): of all pairs ("global") or of each prompt's pairs ("per_prompt").

Ties and missing candidates are never skipped silently: a response that ties with the best one forms no pair and is
counted in stats["tied_pairs_skipped"]; prompts with no valid candidate, a single one, or only tied ones form no
pair and are counted (stats["empty_prompts"], ["single_candidate_prompts"], ["all_tied_prompts"]). When several
responses share the best rating, the lowest-index one is the chosen response of every pair.
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Callable, Sequence

import numpy as np

ORDERINGS = ("easy_to_hard", "random")
GROUPINGS = ("global", "per_prompt")


@dataclasses.dataclass(frozen=True)
class CurriculumConfig:
    """num_iterations: curriculum stages (DPO iterations, each with a fresh reference), >= 1.
    ordering: "easy_to_hard" (largest rating gap first) or "random" (seeded permutation).
    grouping: "global" or "per_prompt" (module docstring).
    seed: seeds the permutation of ordering="random" (unused by "easy_to_hard")."""

    num_iterations: int = 3
    ordering: str = "easy_to_hard"
    grouping: str = "global"
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.num_iterations, bool) or not isinstance(self.num_iterations, numbers.Integral) or (
            self.num_iterations < 1
        ):
            raise ValueError(f"CurriculumConfig.num_iterations must be an integer >= 1, got {self.num_iterations!r}")
        if self.ordering not in ORDERINGS:
            raise ValueError(f"CurriculumConfig.ordering must be one of {ORDERINGS}, got {self.ordering!r}")
        if self.grouping not in GROUPINGS:
            raise ValueError(f"CurriculumConfig.grouping must be one of {GROUPINGS}, got {self.grouping!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise ValueError(f"CurriculumConfig.seed must be an integer, got {self.seed!r}")


@dataclasses.dataclass(frozen=True)
class CurriculumPairs:
    """Preference pairs as parallel index arrays, in curriculum order (stage by stage, easy to hard within a stage
    for ordering="easy_to_hard"): prompt, chosen, rejected (candidate indices into the [P, K] score table), gap =
    score[chosen] - score[rejected] > 0, stage (0-based; -1 before staging)."""

    prompt: np.ndarray
    chosen: np.ndarray
    rejected: np.ndarray
    gap: np.ndarray
    stage: np.ndarray

    def __len__(self) -> int:
        return int(self.prompt.shape[0])

    def take(self, index: np.ndarray) -> "CurriculumPairs":
        """The pairs at `index` (an integer or boolean index array), in that order."""
        return CurriculumPairs(*(getattr(self, f.name)[index] for f in dataclasses.fields(self)))


def _check_table(scores: Any, valid: Any) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"curriculum: scores must be a [prompts, K] array, got shape {scores.shape}")
    if valid is None:
        valid_b = np.ones(scores.shape, bool)
    else:
        valid_a = np.asarray(valid)
        if valid_a.shape != scores.shape:
            raise ValueError(f"curriculum: valid must have the shape of scores {scores.shape}, got {valid_a.shape}")
        if not np.all((valid_a == 0) | (valid_a == 1)):
            raise ValueError("curriculum: valid must hold only 0/1 (or booleans)")
        valid_b = valid_a.astype(bool)
    bad = valid_b & ~np.isfinite(scores)
    if bad.any():
        p, k = np.argwhere(bad)[0]
        raise ValueError(
            f"curriculum: scores must be finite on valid candidates; prompt {p}, candidate {k} has {scores[p, k]!r} "
            f"({int(bad.sum())} such entries; mark missing candidates with valid=0)"
        )
    return scores, valid_b


def build_pairs(scores: Any, valid: Any = None) -> tuple[CurriculumPairs, dict[str, int]]:
    """Best-vs-rest pairs of every prompt (unordered: by prompt, then rejected index; stage -1) and their counts.

    scores [P, K] (higher is better), valid [P, K] (default: all valid). stats: prompts, valid_candidates,
    invalid_candidates, pairs, tied_pairs_skipped, prompts_without_pairs (= empty_prompts + single_candidate_prompts
    + all_tied_prompts) and those three counts.
    """
    scores, valid = _check_table(scores, valid)
    prompts, chosen, rejected, gaps = [], [], [], []
    stats = {"prompts": int(scores.shape[0]), "valid_candidates": int(valid.sum()),
             "invalid_candidates": int((~valid).sum()), "tied_pairs_skipped": 0, "empty_prompts": 0,
             "single_candidate_prompts": 0, "all_tied_prompts": 0}  # fmt: skip
    for p in range(scores.shape[0]):
        candidates = np.flatnonzero(valid[p])
        if candidates.size == 0:
            stats["empty_prompts"] += 1
            continue
        if candidates.size == 1:
            stats["single_candidate_prompts"] += 1
            continue
        best = candidates[np.argmax(scores[p, candidates])]  # argmax: the lowest index among the best
        others = candidates[candidates != best]
        gap = scores[p, best] - scores[p, others]
        stats["tied_pairs_skipped"] += int(np.sum(gap == 0))
        keep = gap > 0
        if not keep.any():
            stats["all_tied_prompts"] += 1
            continue
        prompts.append(np.full(int(keep.sum()), p))
        chosen.append(np.full(int(keep.sum()), best))
        rejected.append(others[keep])
        gaps.append(gap[keep])
    stats["prompts_without_pairs"] = stats["empty_prompts"] + stats["single_candidate_prompts"] + stats[
        "all_tied_prompts"]
    cat = lambda xs, dtype: np.concatenate(xs).astype(dtype) if xs else np.zeros((0,), dtype)  # noqa: E731
    pairs = CurriculumPairs(cat(prompts, np.int64), cat(chosen, np.int64), cat(rejected, np.int64),
                            cat(gaps, np.float64), np.full(sum(map(len, prompts)), -1, np.int64))  # fmt: skip
    stats["pairs"] = len(pairs)
    return pairs, stats


def _easy_to_hard(pairs: CurriculumPairs) -> np.ndarray:
    """Indices sorting pairs by gap descending, ties by prompt then rejected index."""
    return np.lexsort((pairs.rejected, pairs.prompt, -pairs.gap))


def build_curriculum(scores: Any, valid: Any = None, config: CurriculumConfig = CurriculumConfig()
                     ) -> tuple[CurriculumPairs, dict[str, Any]]:
    """Curry-DPO's pairs with their stages, in curriculum order (module docstring), and stats: those of
    `build_pairs` plus "pairs_per_stage" (a list of num_iterations ints summing to "pairs")."""
    if not isinstance(config, CurriculumConfig):
        raise ValueError(f"curriculum: config must be a CurriculumConfig, got {type(config).__name__}")
    pairs, stats = build_pairs(scores, valid)
    n, stages = len(pairs), config.num_iterations
    rng = np.random.default_rng(config.seed)
    stage = np.empty(n, np.int64)
    if config.grouping == "global":
        order = _easy_to_hard(pairs) if config.ordering == "easy_to_hard" else rng.permutation(n)
        for s, chunk in enumerate(np.array_split(order, stages)):
            stage[chunk] = s
        position = np.empty(n, np.int64)
        position[order] = np.arange(n)
    else:
        position = np.empty(n, np.int64)
        for p in np.unique(pairs.prompt):
            mine = np.flatnonzero(pairs.prompt == p)
            if config.ordering == "easy_to_hard":
                mine = mine[_easy_to_hard(pairs.take(mine))]
            else:
                mine = mine[rng.permutation(mine.size)]
            stage[mine] = np.arange(mine.size) * stages // mine.size
            position[mine] = np.arange(mine.size)
        if config.ordering == "easy_to_hard":  # within a stage: by gap like the global order
            rank = np.empty(n, np.int64)
            rank[_easy_to_hard(pairs)] = np.arange(n)
            position = rank
        else:
            position = rng.permutation(n)
    final = np.lexsort((position, stage))
    staged = dataclasses.replace(pairs, stage=stage).take(final)
    stats = dict(stats, pairs_per_stage=[int(np.sum(staged.stage == s)) for s in range(stages)])
    return staged, stats


def curriculum_stages(scores: Any, valid: Any = None, config: CurriculumConfig = CurriculumConfig()
                      ) -> list[CurriculumPairs]:
    """The pairs of each stage (a list of num_iterations `CurriculumPairs`, possibly empty ones when there are
    fewer pairs than iterations); `build_curriculum` gives the same pairs with the counts of what was dropped."""
    staged, _ = build_curriculum(scores, valid, config)
    return [staged.take(staged.stage == s) for s in range(config.num_iterations)]


def run_curriculum(stages: Sequence[CurriculumPairs], params: Any,
                   train_stage: Callable[[Any, Any, CurriculumPairs, int], Any]) -> list[Any]:
    """Curry-DPO's iterative loop: for stage i, params = train_stage(params, reference, pairs_i, i) with the
    reference = the parameters the stage starts from (the initial/SFT model for stage 0, then the model trained by
    the previous stage). Every stage is run, an empty one too (train_stage decides what that means). Returns the
    parameters after each stage (the last one is the final model)."""
    history = []
    for i, stage in enumerate(stages):
        reference = params
        params = train_stage(params, reference, stage, i)
        history.append(params)
    return history
