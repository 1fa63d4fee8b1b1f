"""Pair selection with DNO-Prct's filters against a plain-Python reading of the rules, and replay."""
import numpy as np
import pytest

from jaxalign.algorithms.preference_pairs import pair_arrays, replay_indices, select_pairs


def brute_force(scores, valid, teacher, min_margin, student_min_margin, min_chosen_score):
    """The rules of the module docstring, one prompt at a time, as a reader would apply them by hand."""
    out, reasons = [], []
    for p in range(len(scores)):
        cands = [k for k in range(scores.shape[1]) if valid[p, k]]
        if len(cands) < 2:
            reasons.append("few")
            continue
        best = max(cands, key=lambda k: (scores[p, k], not teacher[p, k], -k))
        worst = min(cands, key=lambda k: (scores[p, k], k))
        margin = scores[p, best] - scores[p, worst]
        required = min_margin if teacher[p, best] else student_min_margin
        if scores[p, best] < min_chosen_score:
            reasons.append("low")
        elif margin <= 0:
            reasons.append("tied")
        elif margin < required:
            reasons.append("small")
        else:
            out.append((p, best, worst))
            reasons.append("kept")
    return out, reasons


@pytest.mark.parametrize("seed", range(5))
def test_select_pairs_matches_brute_force_on_random_tables(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 7, size=(200, 6)).astype(float)  # many ties on purpose
    valid = rng.random((200, 6)) > 0.15
    teacher = np.zeros((200, 6), bool)
    teacher[:, -1] = True
    scores[:, -1] = 6.0
    sel, stats = select_pairs(scores, valid, teacher[0], min_margin=2.0, student_min_margin=1.0,
                              min_chosen_score=5.0)
    expected, reasons = brute_force(scores, valid, teacher, 2.0, 1.0, 5.0)
    assert list(zip(sel.prompt, sel.chosen, sel.rejected)) == expected
    assert stats["pairs"] == reasons.count("kept") == len(sel)
    assert stats["dropped_no_candidates"] == reasons.count("few")
    assert stats["dropped_low_chosen_score"] == reasons.count("low")
    assert stats["dropped_tied"] == reasons.count("tied")
    assert stats["dropped_small_margin"] == reasons.count("small")
    assert sum(v for k, v in stats.items() if k.startswith("dropped_")) + stats["pairs"] == 200
    np.testing.assert_array_equal(sel.chosen_is_teacher, sel.chosen == 5)
    assert stats["pairs_chosen_teacher"] == int(sel.chosen_is_teacher.sum())


def test_a_student_sample_beats_the_teacher_on_ties_and_margins_depend_on_who_is_chosen():
    scores = np.array([[6.0, 5.0, 6.0],    # student 0 ties the teacher: the student is chosen, margin 1 >= 1
                       [4.0, 3.0, 6.0],    # teacher chosen, margin 3 >= 2
                       [2.0, 1.0, 2.0],    # student chosen (tie with teacher), margin 1: kept
                       [5.0, 5.0, 6.0]])   # teacher chosen, margin 1 < 2: dropped
    sel, stats = select_pairs(scores, teacher=[False, False, True], min_margin=2.0, student_min_margin=1.0)
    assert list(zip(sel.prompt, sel.chosen, sel.rejected)) == [(0, 0, 1), (1, 2, 1), (2, 0, 1)]
    assert stats["dropped_small_margin"] == 1


def test_empty_and_single_candidate_prompts_are_counted():
    sel, stats = select_pairs(np.array([[1.0, 2.0], [3.0, 3.0], [0.0, 1.0]]),
                              valid=np.array([[0, 0], [1, 1], [1, 0]]))
    assert len(sel) == 0
    assert stats["dropped_no_candidates"] == 2 and stats["dropped_tied"] == 1


def test_pair_arrays_concatenate_prompt_and_completion():
    prompts = np.array([[0, 5, 6], [7, 8, 9]])
    completions = np.arange(2 * 3 * 4).reshape(2, 3, 4) + 20
    masks = np.ones((2, 3, 4), int)
    masks[:, :, -1] = 0
    sel, _ = select_pairs(np.array([[1.0, 0.0, 2.0], [0.0, 1.0, 0.5]]))
    arrays = pair_arrays(prompts, prompts != 0, completions, masks, sel)
    np.testing.assert_array_equal(arrays["chosen_tokens"][0], [0, 5, 6, *completions[0, 2]])
    np.testing.assert_array_equal(arrays["rejected_tokens"][1], [7, 8, 9, *completions[1, 0]])
    np.testing.assert_array_equal(arrays["chosen_attention_mask"][0], [0, 1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(arrays["chosen_completion_mask"][0], [0, 0, 0, 1, 1, 1, 0])
    np.testing.assert_array_equal(arrays["chosen_score"], [2.0, 1.0])


def test_replay_takes_the_stated_fractions_and_counts_the_shortfall():
    rng = np.random.default_rng(0)
    picks, stats = replay_indices(100, [50, 10, 40], (0.3, 0.15), rng)
    assert [len(p) for p in picks] == [30, 10, 0]
    assert stats == {"replayed": 40, "replay_shortfall": 5}
    assert len(np.unique(picks[0])) == 30 and picks[0].max() < 50


@pytest.mark.parametrize("kwargs, message", [
    ({"min_margin": -1.0}, "min_margin must be >= 0"),
    ({"min_chosen_score": float("nan")}, "min_chosen_score must be a number"),
    ({"valid": np.ones((2, 3))}, "valid must have shape"),
])
def test_bad_arguments_are_one_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        select_pairs(np.zeros((2, 2)), **kwargs)


def test_non_finite_valid_scores_are_refused():
    with pytest.raises(ValueError, match="prompt 1, candidate 0 has nan"):
        select_pairs(np.array([[0.0, 1.0], [np.nan, 1.0]]))
    with pytest.raises(ValueError, match="fraction 1 .* must be a number in"):
        replay_indices(10, [10, 10], (0.3, 1.5), np.random.default_rng(0))
