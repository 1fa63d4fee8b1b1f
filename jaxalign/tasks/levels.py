"""TRPA's rule-based preference levels for ARITH completions (docs/algorithms.md, "TRPA"; from the authors' code).

TRPA (Su et al. 2025, "Trust Region Preference Approximation") ranks K responses per prompt by rules, not by a
reward model: level 1 = correct, 2 = wrong, 3 = incomplete, 4 = malformed (the authors' reward function: format and
answer right / format right, answer wrong / format right, answer missing or unparseable / format wrong). Every
pair of responses at different levels becomes a preference (`jaxalign.losses.iterative.trpa`). On ARITH the levels
read the oracle's `arith.Grade` and, for the incomplete/malformed split, the completion text:

1 CORRECT     `Grade.correct`: exactly the true chain (recaps of its answer allowed).
2 WRONG       `Grade.well_formed` but not correct: a complete, parseable chain of `num_steps` steps "x+y=z" (then
              only recaps) with wrong arithmetic somewhere.
3 INCOMPLETE  a well-formed prefix: between 1 and num_steps - 1 ';'-separated parts, each a complete step "x+y=z"
              (decimal x, y, z), and nothing else: the policy stopped before the chain was finished.
4 MALFORMED   everything else, i.e. not parseable as a (prefix of a) chain: the empty completion, a step cut
              mid-way or mis-written ("12+3=", "7+5=1x"), too many parts that are not recaps, stray characters.

Pure Python + NumPy.
"""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from jaxalign.losses.iterative import TRPA_LEVELS
from jaxalign.tasks import arith

CORRECT, WRONG, INCOMPLETE, MALFORMED = TRPA_LEVELS
LEVEL_NAMES = {CORRECT: "correct", WRONG: "wrong", INCOMPLETE: "incomplete", MALFORMED: "malformed"}

# One complete step, the same syntax `arith.grade` calls well formed.
_STEP = re.compile(r"[0-9]+\+[0-9]+=[0-9]+")


def trpa_level(operands, text: str, grade: arith.Grade | None = None) -> int:
    """The TRPA level (1-4, module docstring) of completion `text` (decoded, EOS excluded) for `operands`; pass the
    oracle's `grade` of the same text to avoid grading twice."""
    g = arith.grade(operands, text) if grade is None else grade
    if g.correct:
        return CORRECT
    if g.well_formed:
        return WRONG
    parts = text.split(";") if isinstance(text, str) else [""]
    if 0 < len(parts) < g.num_steps and all(_STEP.fullmatch(p) is not None for p in parts):
        return INCOMPLETE
    return MALFORMED


def trpa_levels(problems: np.ndarray, texts: Sequence[str]) -> np.ndarray:
    """int32 [N]: `trpa_level(problems[i], texts[i])` for every completion."""
    problems = np.asarray(problems)
    if len(problems) != len(texts):
        raise ValueError(f"trpa_levels: {len(problems)} problems but {len(texts)} completions")
    return np.array([trpa_level(p, t) for p, t in zip(problems, texts)], np.int32)


def level_counts(levels: np.ndarray) -> dict[str, int]:
    """How many completions sit at each level, by name (every level listed, zeros included)."""
    levels = np.asarray(levels)
    return {name: int(np.sum(levels == level)) for level, name in LEVEL_NAMES.items()}
