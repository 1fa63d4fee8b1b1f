"""Curry-DPO pair building and staging (jaxalign.algorithms.curriculum) on hand-built score tables."""
from __future__ import annotations

import numpy as np
import pytest

from jaxalign.algorithms.curriculum import (
    CurriculumConfig,
    CurriculumPairs,
    build_curriculum,
    build_pairs,
    curriculum_stages,
    run_curriculum,
)

X = np.nan  # an invalid candidate (its score must never be read)
SCORES = np.array([
    [1.0, 4.0, 2.0, 0.0],  # 0: best 1; pairs (1,0) gap 3, (1,2) gap 2, (1,3) gap 4
    [3.0, 3.0, 1.0, X],    # 1: best 0 (tie with 1 -> skipped); pair (0,2) gap 2
    [2.0, 2.0, 2.0, 2.0],  # 2: all tied -> no pair, 3 tied pairs skipped
    [X, 5.0, X, X],        # 3: a single candidate -> no pair
    [X, X, X, X],          # 4: no candidate
    [0.5, X, -0.5, 0.5],   # 5: best 0 (tie with 3 -> skipped); pair (0,2) gap 1
])  # fmt: skip
VALID = ~np.isnan(SCORES)

# (prompt, chosen, rejected, gap), sorted easy -> hard (gap desc, then prompt, then rejected)
EXPECTED = [(0, 1, 3, 4.0), (0, 1, 0, 3.0), (0, 1, 2, 2.0), (1, 0, 2, 2.0), (5, 0, 2, 1.0)]


def rows(pairs: CurriculumPairs):
    return [(int(p), int(c), int(r), float(g)) for p, c, r, g in zip(pairs.prompt, pairs.chosen, pairs.rejected,
                                                                     pairs.gap)]  # fmt: skip


def test_pairs_are_best_vs_rest_with_ties_and_missing_candidates_counted():
    pairs, stats = build_pairs(SCORES, VALID)
    assert sorted(rows(pairs)) == sorted(EXPECTED)
    assert np.all(pairs.stage == -1) and np.all(pairs.gap > 0)
    assert stats == {"prompts": 6, "valid_candidates": 15, "invalid_candidates": 9, "pairs": 5,
                     "tied_pairs_skipped": 5, "empty_prompts": 1, "single_candidate_prompts": 1,
                     "all_tied_prompts": 1, "prompts_without_pairs": 3}  # fmt: skip
    np.testing.assert_array_equal(SCORES[pairs.prompt, pairs.chosen] - SCORES[pairs.prompt, pairs.rejected], pairs.gap)


def test_easy_to_hard_global_order_and_stages():
    staged, stats = build_curriculum(SCORES, VALID, CurriculumConfig(num_iterations=3))
    assert rows(staged) == EXPECTED
    np.testing.assert_array_equal(staged.stage, [0, 0, 1, 1, 2])  # np.array_split: sizes 2, 2, 1
    assert stats["pairs_per_stage"] == [2, 2, 1] and sum(stats["pairs_per_stage"]) == stats["pairs"]
    assert np.all(np.diff(staged.gap) <= 0)


def test_stages_partition_the_pairs_in_order():
    for n in (1, 2, 3, 5, 7):
        config = CurriculumConfig(num_iterations=n)
        stages = curriculum_stages(SCORES, VALID, config)
        assert len(stages) == n
        assert sum(len(s) for s in stages) == 5
        assert [len(s) for s in stages] == build_curriculum(SCORES, VALID, config)[1]["pairs_per_stage"]
        flat = [r for s in stages for r in rows(s)]
        assert flat == EXPECTED  # stage by stage = the easy -> hard order
        for i, s in enumerate(stages):
            assert np.all(s.stage == i)
        gaps = [s.gap for s in stages if len(s)]
        assert all(a.min() >= b.max() for a, b in zip(gaps, gaps[1:]))  # every stage is easier than the next


def test_per_prompt_grouping_puts_each_prompts_kth_easiest_pair_in_stage_k():
    staged, stats = build_curriculum(SCORES, VALID, CurriculumConfig(num_iterations=3, grouping="per_prompt"))
    by_pair = {(p, c, r): s for (p, c, r, _), s in zip(rows(staged), staged.stage)}
    assert by_pair == {(0, 1, 3): 0, (0, 1, 0): 1, (0, 1, 2): 2, (1, 0, 2): 0, (5, 0, 2): 0}
    assert stats["pairs_per_stage"] == [3, 1, 1]
    assert np.all(np.diff(staged.stage) >= 0)
    first = staged.take(staged.stage == 0)
    assert np.all(np.diff(first.gap) <= 0)  # easy -> hard inside a stage too


def test_uniform_four_response_table_gives_the_papers_three_iterations():
    scores = np.array([[4.0, 1.0, 3.0, 2.0], [1.0, 2.0, 3.0, 4.0], [9.0, 7.0, 8.0, 6.0]])
    stages = curriculum_stages(scores, None, CurriculumConfig(num_iterations=3, grouping="per_prompt"))
    ranks = np.argsort(np.argsort(-scores, axis=1), axis=1)  # 0 = best
    for i, stage in enumerate(stages):
        assert len(stage) == 3 and sorted(stage.prompt) == [0, 1, 2]
        assert np.all(ranks[stage.prompt, stage.chosen] == 0)
        assert np.all(ranks[stage.prompt, stage.rejected] == 3 - i)  # iteration 1: vs worst ... 3: vs second


@pytest.mark.parametrize("grouping", ["global", "per_prompt"])
def test_random_ordering_is_reproducible_by_seed(grouping):
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, (40, 5)).astype(float)
    valid = rng.uniform(size=scores.shape) > 0.2
    make = lambda seed: build_curriculum(scores, valid, CurriculumConfig(4, "random", grouping, seed))  # noqa: E731
    a, stats = make(3)
    b, _ = make(3)
    c, _ = make(4)
    for field in ("prompt", "chosen", "rejected", "gap", "stage"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert rows(a) != rows(c)
    ordered, _ = build_curriculum(scores, valid, CurriculumConfig(4, "easy_to_hard", grouping))
    assert sorted(rows(a)) == sorted(rows(ordered))  # same pairs, different order
    assert rows(a) != rows(ordered)
    assert sum(stats["pairs_per_stage"]) == stats["pairs"] == len(a)
    assert np.all(np.diff(a.stage) >= 0)


def test_no_pairs_at_all():
    staged, stats = build_curriculum([[1.0, 1.0], [2.0, 2.0]], None, CurriculumConfig(num_iterations=2))
    assert len(staged) == 0 and stats["pairs_per_stage"] == [0, 0] and stats["all_tied_prompts"] == 2
    assert [len(s) for s in curriculum_stages([[3.0]], None, CurriculumConfig(2))] == [0, 0]


def test_run_curriculum_hands_each_stages_model_on_as_the_next_reference():
    stages = curriculum_stages(SCORES, VALID, CurriculumConfig(num_iterations=3))
    calls = []

    def train_stage(params, reference, pairs, index):
        calls.append((params, reference, len(pairs), index))
        return params + 10 ** index

    history = run_curriculum(stages, 0, train_stage)
    assert history == [1, 11, 111]
    assert calls == [(0, 0, 2, 0), (1, 1, 2, 1), (11, 11, 1, 2)]


@pytest.mark.parametrize(
    "kwargs,match",
    [({"num_iterations": 0}, "num_iterations"), ({"num_iterations": 2.0}, "num_iterations"),
     ({"ordering": "hard_to_easy"}, "ordering"), ({"grouping": "stage"}, "grouping"), ({"seed": 1.5}, "seed"),
     ({"num_iterations": True}, "num_iterations")],
)  # fmt: skip
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=f"CurriculumConfig.{match}"):
        CurriculumConfig(**kwargs)


def test_bad_tables_raise():
    with pytest.raises(ValueError, match=r"\[prompts, K\]"):
        build_pairs(np.zeros(4))
    with pytest.raises(ValueError, match="shape of scores"):
        build_pairs(np.zeros((2, 3)), np.ones((2, 2)))
    with pytest.raises(ValueError, match="prompt 1, candidate 3"):
        build_pairs(SCORES)  # NaN on a candidate marked valid
    with pytest.raises(ValueError, match="0/1"):
        build_pairs(np.zeros((1, 2)), np.array([[0.5, 1.0]]))
    with pytest.raises(ValueError, match="CurriculumConfig"):
        build_curriculum(SCORES, VALID, {"num_iterations": 3})
