"""The ARITH judges: each one's values on hand-written completions, computed independently of the oracle's code."""
import numpy as np
import pytest

from jaxalign.tasks import arith, judges

OPERANDS = [7, 5, 3, 9]  # 7+5=12;12+3=15;15+9=24


def grade(text):
    return arith.grade(OPERANDS, text)


@pytest.mark.parametrize("text, binary, graded, labels", [
    ("7+5=12;12+3=15;15+9=24", 1.0, 6, [1, 1, 1]),
    ("7+5=12;12+3=15;15+9=24;24", 1.0, 6, [1, 1, 1]),      # a recap is neutral
    ("7+5=12;12+3=15;15+9=14", 0.0, 4, [1, 1, 0]),         # last carry dropped: two of three steps
    ("7+5=2;2+3=5;5+9=14", 0.0, 0, [0, -1, -1]),           # first carry dropped, wrong from step 0
    ("7+5=12;12+3=15", 0.0, 3, [1, 1, 0]),                 # missing step: malformed, 4 - 1
    ("7+5=12;12+3=15;15+9=24;99", 0.0, 5, [1, 1, 1]),      # right steps, then garbage: never the top grade
    ("", 0.0, 0, [0, -1, -1]),
])
def test_judges_on_hand_written_completions(text, binary, graded, labels):
    g = grade(text)
    assert judges.binary_correctness(g) == binary
    assert judges.graded_score(g) == graded
    np.testing.assert_array_equal(judges.step_labels(g), labels)


def test_graded_score_is_six_exactly_when_correct_over_many_samples():
    rng = np.random.default_rng(0)
    for _ in range(300):
        ops = rng.integers(0, 10, size=4)
        text = arith.noisy_solution_text(ops, rng, carry_drop_prob=0.5)
        g = arith.grade(ops, text)
        assert (judges.graded_score(g) == judges.GRADED_MAX) == g.correct
        assert 0 <= judges.graded_score(g) <= judges.GRADED_MAX


def test_first_wrong_step():
    assert judges.first_wrong_step(grade("7+5=12;12+3=15;15+9=14")) == 2
    assert judges.first_wrong_step(grade("7+5=12;12+3=15;15+9=24")) is None


def test_reward_vector_dimensions():
    np.testing.assert_allclose(judges.reward_vector(grade("7+5=12;12+3=15;15+9=14"), 23, 24),
                               [4 / 6, 1 - 23 / 24], rtol=1e-6)
    with pytest.raises(ValueError, match="num_tokens must lie in"):
        judges.reward_vector(grade(""), 25, 24)
    with pytest.raises(ValueError, match="max_tokens must be an integer >= 1"):
        judges.reward_vector(grade(""), 0, 0)


def test_judge_scores_by_name_and_unknown_name():
    grades = [grade("7+5=12;12+3=15;15+9=24"), grade("7+5=2;2+3=5;5+9=14")]
    np.testing.assert_array_equal(judges.judge_scores("graded", grades), [6, 0])
    np.testing.assert_array_equal(judges.judge_scores("binary", grades), [1, 0])
    np.testing.assert_array_equal(judges.judge_scores("score", grades), [4.0, 0.0])
    with pytest.raises(ValueError, match="judge must be one of"):
        judges.judge_scores("gpt4", grades)
    with pytest.raises(ValueError, match="2 problems but 1 completions"):
        judges.grade_texts(np.array([OPERANDS, OPERANDS]), ["x"])
