"""Preference oracles and judges for the built-in ARITH task: the labels the iterative algorithms learn from.

Every judge reads the oracle's `arith.Grade` of a completion (exact string matching against the true chain, so no
judge can be fooled by a plausible-looking answer) and turns it into the signal one family of algorithms needs
(docs/algorithms.md):

- `binary_correctness`: 1 if the completion is exactly right, else 0 (online DPO's and OREO's sparse reward R,
  rejection sampling).
- `graded_score`: an integer from 0 to 6, DNO-Prct's graded judge (Rosset et al. 2024 score every candidate on a
  scale and keep pairs by score and margin); here 6 * (fraction of leading correct steps), rounded, minus 1 for a
  malformed completion, clipped to [0, 6]. 6 exactly when the completion is correct; with the default 3 steps each
  correct step is worth 2 points, so a margin of 2 is "one more correct step".
- `step_labels`: per-step correctness (Step-DPO's first wrong step, process supervision): 1 for each leading
  correct step, 0 for the first wrong (or missing) step, -1 (unlabelled) after it, as process reward data labels
  nothing past the first error.
- `reward_vector`: a multi-objective reward (DPA, Wang et al. 2024: arithmetic of preferences over several reward
  dimensions): (correctness = graded_score / 6, conciseness = 1 - completion tokens / max_tokens).
- "score": the main job's ranking `arith.score` (correct steps + 1 if correct - 0.5 if malformed), kept as a judge so
  that the iterative algorithms can rank exactly as the offline pairs do.

`judge_scores(name, problems, texts, lengths)` evaluates a named scalar judge over many completions at once.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from jaxalign.tasks import arith

GRADED_MAX = 6
REWARD_DIMENSIONS = ("correctness", "conciseness")


def binary_correctness(grade: arith.Grade) -> float:
    """1.0 for an exactly correct completion (`arith.Grade.correct`), else 0.0."""
    return float(grade.correct)


def graded_score(grade: arith.Grade) -> int:
    """An integer in [0, GRADED_MAX]: round(6 * correct_steps / num_steps) - (1 if malformed), clipped; 6 if and
    only if the completion is exactly correct (DNO-Prct's graded judge; module docstring)."""
    if grade.correct:
        return GRADED_MAX
    points = int(round(GRADED_MAX * grade.correct_steps / grade.num_steps)) - (0 if grade.well_formed else 1)
    # All steps right but something other than recaps after them is not a correct answer: never the top grade.
    return int(np.clip(points, 0, GRADED_MAX - 1))


def step_labels(grade: arith.Grade) -> np.ndarray:
    """int8 [num_steps]: 1 for the leading correct steps, 0 for the first wrong or missing step, -1 after it.

    A correct completion is all ones. A completion whose steps are all right but continues with anything other
    than recaps keeps all ones here (its steps are right; `binary_correctness` judges the whole)."""
    labels = np.full(grade.num_steps, -1, np.int8)
    labels[: grade.correct_steps] = 1
    if grade.correct_steps < grade.num_steps:
        labels[grade.correct_steps] = 0
    return labels


def first_wrong_step(grade: arith.Grade) -> int | None:
    """Index of the first wrong or missing step (Step-DPO's rejected step), or None when every step is right."""
    return grade.correct_steps if grade.correct_steps < grade.num_steps else None


def reward_vector(grade: arith.Grade, num_tokens: int, max_tokens: int) -> np.ndarray:
    """float32 [2]: (graded_score / 6, 1 - num_tokens / max_tokens), the dimensions of REWARD_DIMENSIONS.

    num_tokens counts the completion's tokens (EOS included), max_tokens the sampler's budget; both must satisfy
    0 <= num_tokens <= max_tokens, max_tokens >= 1."""
    if not (isinstance(max_tokens, (int, np.integer)) and max_tokens >= 1):
        raise ValueError(f"reward_vector: max_tokens must be an integer >= 1, got {max_tokens!r}")
    if not 0 <= num_tokens <= max_tokens:
        raise ValueError(f"reward_vector: num_tokens must lie in [0, max_tokens={max_tokens}], got {num_tokens!r}")
    return np.array([graded_score(grade) / GRADED_MAX, 1.0 - num_tokens / max_tokens], np.float32)


SCALAR_JUDGES: dict[str, Callable[[arith.Grade], float]] = {
    "score": arith.score,
    "binary": binary_correctness,
    "graded": graded_score,
}


def check_judge(name: str, where: str = "judge") -> None:
    """One clear error for an unknown judge name."""
    if name not in SCALAR_JUDGES:
        raise ValueError(f"{where} must be one of {sorted(SCALAR_JUDGES)}, got {name!r}")


def grade_texts(problems: np.ndarray, texts: Sequence[str]) -> list[arith.Grade]:
    """The oracle's grade of texts[i] as an answer to problems[i]."""
    problems = np.asarray(problems)
    if len(problems) != len(texts):
        raise ValueError(f"grade_texts: {len(problems)} problems but {len(texts)} completions")
    return [arith.grade(p, t) for p, t in zip(problems, texts)]


def judge_scores(name: str, grades: Sequence[arith.Grade]) -> np.ndarray:
    """float64 [N]: the scalar judge `name` ("score", "binary" or "graded") of every grade."""
    check_judge(name)
    judge = SCALAR_JUDGES[name]
    return np.array([judge(g) for g in grades], np.float64)
