"""ARITH: chains, carry semantics, noisy demonstrations, carry share, oracle grading, splits and encoding."""
import dataclasses
import itertools

import numpy as np
import pytest

from jaxalign.tasks import arith
from jaxalign.tasks.tokenizer import CharTokenizer

TOK = CharTokenizer()


# ---------------------------------------------------------------------------------------------------- config


def test_config_defaults_and_validation():
    config = arith.ArithConfig()
    assert (config.num_operands, config.carry_drop_prob) == (4, 0.8)
    with pytest.raises(ValueError, match=r"num_operands.*1"):
        arith.ArithConfig(num_operands=1)
    with pytest.raises(ValueError, match=r"num_operands.*2\.5"):
        arith.ArithConfig(num_operands=2.5)
    with pytest.raises(ValueError, match=r"carry_drop_prob.*1\.5"):
        arith.ArithConfig(carry_drop_prob=1.5)
    with pytest.raises(ValueError, match=r"carry_drop_prob.*-0\.1"):
        arith.ArithConfig(carry_drop_prob=-0.1)
    arith.ArithConfig(num_operands=2, carry_drop_prob=0.0)
    arith.ArithConfig(num_operands=6, carry_drop_prob=1.0)
    assert (config.max_recaps, config.recap_prob) == (0, 0.4)  # the main job's demonstrations are never verbose
    with pytest.raises(ValueError, match=r"max_recaps.*-1"):
        arith.ArithConfig(max_recaps=-1)
    with pytest.raises(ValueError, match=r"max_recaps.*True"):
        arith.ArithConfig(max_recaps=True)
    with pytest.raises(ValueError, match=r"recap_prob.*1\.2"):
        arith.ArithConfig(recap_prob=1.2)


# ---------------------------------------------------------------------------------------------------- chains


def test_prompt_and_solution_hand_worked():
    assert arith.prompt_text([7, 5, 3, 9]) == "7+5+3+9="
    assert arith.solution_steps([7, 5, 3, 9]) == ["7+5=12", "12+3=15", "15+9=24"]
    assert arith.solution_text([7, 5, 3, 9]) == "7+5=12;12+3=15;15+9=24"
    assert arith.solution_steps([0, 0, 0, 0]) == ["0+0=0", "0+0=0", "0+0=0"]
    assert arith.solution_steps([9, 9, 9, 9]) == ["9+9=18", "18+9=27", "27+9=36"]
    assert arith.solution_text([3, 4]) == "3+4=7"
    assert arith.prompt_text(np.array([1, 2, 3], dtype=np.int32)) == "1+2+3="
    assert arith.solution_text([1, 2, 3]) == "1+2=3;3+3=6"


@pytest.mark.parametrize("bad", [[7], [1, 10], [1, -1], [[1, 2], [3, 4]], [1.5, 2.0]])
def test_bad_operands_raise(bad):
    with pytest.raises(ValueError, match="operands"):
        arith.solution_text(bad)


def test_carry_semantics_hand_worked():
    assert arith.step_needs_carry(7, 5) and arith.add_step(7, 5, drop_carry=True) == 2
    assert arith.step_needs_carry(12, 9) and arith.add_step(12, 9, drop_carry=True) == 11
    assert arith.add_step(12, 9) == 21
    assert arith.step_needs_carry(15, 5) and arith.add_step(15, 5, drop_carry=True) == 10
    assert not arith.step_needs_carry(12, 7) and arith.add_step(12, 7, drop_carry=True) == 19
    assert not arith.step_needs_carry(0, 9) and arith.add_step(0, 9, drop_carry=True) == 9
    assert arith.carry_steps([7, 5, 3, 9]) == [True, False, True]
    assert arith.needs_carry([7, 5, 3, 9])
    assert not arith.needs_carry([1, 2, 3, 3])
    assert arith.needs_carry([1, 2, 3, 4])  # 6 + 4 = 10 carries


def test_dropped_carry_chain_continues_from_written_value():
    # 7+5 drops to 2, then 2+3=5, then 5+9 drops to 4.
    assert arith.dropped_carry_solution_text([7, 5, 3, 9]) == "7+5=2;2+3=5;5+9=4"
    # 9+9 drops to 8, 8+9 drops to 7, 7+9 drops to 6.
    assert arith.dropped_carry_solution_text([9, 9, 9, 9]) == "9+9=8;8+9=7;7+9=6"
    # 1+2=3, 3+9 drops to 2 (from 12): the chain then adds to 2.
    assert arith.dropped_carry_solution_text([1, 2, 9, 5]) == "1+2=3;3+9=2;2+5=7"
    # Without a carry step nothing changes.
    assert arith.dropped_carry_solution_text([1, 2, 3, 3]) == arith.solution_text([1, 2, 3, 3])


# ---------------------------------------------------------------------------------------------------- noisy demos


def _parse(text):
    return [tuple(int(v) for v in step.replace("+", " ").replace("=", " ").split()) for step in text.split(";")]


def test_noisy_prob_zero_is_solution_and_prob_one_drops_every_carry():
    rng = np.random.default_rng(0)
    for row in arith.all_problems(3)[::7]:
        assert arith.noisy_solution_text(row, rng, 0.0) == arith.solution_text(row)
        noisy = arith.noisy_solution_text(row, rng, 1.0)
        assert noisy == arith.dropped_carry_solution_text(row)
        steps = _parse(noisy)
        for (x, y, z), digit in zip(steps, row[1:]):
            assert y == digit
            assert z == (x // 10) * 10 + (x % 10 + y) % 10  # never a carry written
            assert z // 10 == x // 10
        for (_, _, z), (x_next, _, _) in zip(steps, steps[1:]):
            assert x_next == z  # chain continues from the written value
        final = steps[-1][2]
        assert (final == sum(row)) == (not arith.needs_carry(row))


def test_noisy_is_consistent_except_for_dropped_carries():
    rng = np.random.default_rng(1)
    for row in arith.all_problems(4)[::37]:
        steps = _parse(arith.noisy_solution_text(row, rng, 0.5))
        assert steps[0][0] == row[0]
        for k, (x, y, z) in enumerate(steps):
            assert y == row[k + 1]
            assert z in (x + y, arith.add_step(x, y, drop_carry=True))
            if k:
                assert x == steps[k - 1][2]


@pytest.mark.parametrize("prob", [0.2, 0.8])
def test_empirical_drop_rate_matches_prob(prob):
    rng = np.random.default_rng(123)
    problems = arith.all_problems(4)
    carry_total = dropped = 0
    for row in problems[rng.integers(0, len(problems), size=4000)]:
        for (x, y, z) in _parse(arith.noisy_solution_text(row, rng, prob)):
            if (x % 10) + y >= 10:
                carry_total += 1
                dropped += z != x + y
    rate = dropped / carry_total
    # carry_total is several thousand: the binomial standard error is < 0.01, so 0.03 is > 3 sigma.
    assert carry_total > 3000
    assert abs(rate - prob) < 0.03, (rate, prob, carry_total)


def test_noisy_is_deterministic_given_rng():
    row = [7, 5, 3, 9]
    a = [arith.noisy_solution_text(row, np.random.default_rng(5), 0.5) for _ in range(3)]
    assert len(set(a)) == 1
    with pytest.raises(ValueError, match="carry_drop_prob"):
        arith.noisy_solution_text(row, np.random.default_rng(0), 1.2)


# ---------------------------------------------------------------------------------------------------- carry share


def _brute_force_carry_count(num_operands):
    """Independent count with string column arithmetic: a step carries iff the last digit of the running total
    (as a string) plus the next digit is a two-character number."""
    count = 0
    for digits in itertools.product("0123456789", repeat=num_operands):
        running = digits[0]
        carried = False
        for d in digits[1:]:
            units = int(running[-1]) + int(d)
            if len(str(units)) == 2:
                carried = True
            running = str(int(running) + int(d))
        count += carried
    return count


@pytest.mark.parametrize("num_operands", [2, 3, 4])
def test_carry_share_matches_brute_force(num_operands):
    expected = _brute_force_carry_count(num_operands) / 10**num_operands
    assert arith.carry_share(num_operands) == pytest.approx(expected, abs=1e-12)


def test_carry_share_hand_values():
    # Two digits: a + b >= 10 for 45 of the 100 pairs.
    assert arith.carry_share(2) == pytest.approx(0.45)
    # needs_carry agrees with carry_share on the full enumeration.
    problems = arith.all_problems(3)
    assert np.mean([arith.needs_carry(row) for row in problems]) == pytest.approx(arith.carry_share(3))


# ---------------------------------------------------------------------------------------------------- grading

OPS = [7, 5, 3, 9]  # 7+5=12;12+3=15;15+9=24


def test_grade_correct():
    g = arith.grade(OPS, "7+5=12;12+3=15;15+9=24")
    assert g == arith.Grade(correct=True, final_correct=True, correct_steps=3, num_steps=3, well_formed=True)
    assert arith.score(g) == 4.0


def test_grade_partially_correct_dropped_carry():
    g = arith.grade(OPS, "7+5=12;12+3=15;15+9=14")
    assert (g.correct, g.final_correct, g.correct_steps, g.well_formed) == (False, False, 2, True)
    g = arith.grade(OPS, arith.dropped_carry_solution_text(OPS))
    assert (g.correct, g.final_correct, g.correct_steps, g.well_formed) == (False, False, 0, True)


def test_grade_counts_only_leading_correct_steps():
    # The third step is right but the second is not: counting stops at the first mismatch.
    g = arith.grade(OPS, "7+5=12;12+3=16;15+9=24")
    assert (g.correct, g.final_correct, g.correct_steps, g.well_formed) == (False, True, 1, True)


def test_grade_off_by_one():
    g = arith.grade(OPS, "7+5=12;12+3=15;15+9=25")
    assert (g.correct, g.final_correct, g.correct_steps) == (False, False, 2)
    g = arith.grade(OPS, "7+5=12;12+3=15;15+9=024")  # leading zero: not the exact answer string
    assert (g.correct, g.final_correct, g.correct_steps, g.well_formed) == (False, False, 2, True)


@pytest.mark.parametrize("garbage", ["", ";;;", "=", "+++", "abc", "7+5", "12;15;24", "9" * 5000, "==24", "\n\x00é"])
def test_grade_garbage_never_raises(garbage):
    g = arith.grade(OPS, garbage)
    assert g.correct_steps == 0 and not g.well_formed and not g.correct
    assert g.num_steps == 3
    assert arith.score(g) == -0.5


def test_grade_final_only_answer_is_final_correct_but_malformed():
    g = arith.grade(OPS, "=24")
    assert (g.final_correct, g.well_formed, g.correct_steps) == (True, False, 0)


def test_grade_overlong():
    g = arith.grade(OPS, "7+5=12;12+3=15;15+9=24;24+1=25")
    assert (g.correct, g.final_correct, g.correct_steps, g.well_formed) == (False, False, 3, False)
    g = arith.grade(OPS, "7+5=12;12+3=15;15+9=24;")
    assert (g.correct, g.correct_steps, g.well_formed) == (False, 3, False)
    g = arith.grade(OPS, "7+5=12;12+3=15;15+9=2424")
    assert (g.correct, g.final_correct, g.correct_steps) == (False, False, 2)


# Recaps (the length-bias task's verbosity): neutral for every field but `recaps`.


@pytest.mark.parametrize("recaps", [1, 2, 5])
def test_grade_recaps_of_the_answer_are_neutral(recaps):
    plain = arith.grade(OPS, "7+5=12;12+3=15;15+9=24")
    verbose = arith.grade(OPS, "7+5=12;12+3=15;15+9=24" + ";24" * recaps)
    assert verbose == dataclasses.replace(plain, recaps=recaps)
    assert arith.score(verbose) == arith.score(plain)
    # a wrong chain stays exactly as wrong when it recaps its own (wrong) answer
    wrong = arith.grade(OPS, "7+5=2;2+3=5;5+9=4")
    assert arith.grade(OPS, "7+5=2;2+3=5;5+9=4;4;4") == dataclasses.replace(wrong, recaps=2)


@pytest.mark.parametrize("tail", [";25", ";24;25", ";024", ";24;", ";", ";24+0=24", ";=24"])
def test_grade_tail_that_is_not_a_recap_is_malformed(tail):
    g = arith.grade(OPS, "7+5=12;12+3=15;15+9=24" + tail)
    assert (g.correct, g.final_correct, g.correct_steps, g.well_formed, g.recaps) == (False, False, 3, False, 0)


def test_grade_recap_of_a_truncated_chain_is_not_a_recap():
    # Two steps and a "recap" of 15 is three parts: the third part is read as a (malformed) step, not a recap.
    g = arith.grade(OPS, "7+5=12;12+3=15;15")
    assert (g.correct, g.correct_steps, g.well_formed, g.recaps) == (False, 2, False, 0)


def test_noisy_solution_with_recaps_repeats_the_written_answer():
    rng = np.random.default_rng(0)
    counts = []
    for row in arith.all_problems(4)[::97]:
        text = arith.noisy_solution_text(row, rng, 0.5, max_recaps=3, recap_prob=0.4)
        parts = text.split(";")
        tail, answer = parts[3:], parts[2].rsplit("=", 1)[1]
        assert tail == [answer] * len(tail) and len(tail) <= 3
        assert arith.grade(row, text).recaps == len(tail)
        counts.append(len(tail))
    assert set(counts) == {0, 1, 2, 3}


def test_num_recaps_follows_the_truncated_geometric_law():
    rng = np.random.default_rng(1)
    draws = np.array([arith.num_recaps(rng, 3, 0.4) for _ in range(20000)])
    expected = [0.6, 0.4 * 0.6, 0.4**2 * 0.6, 0.4**3]  # P(n) = p^n (1 - p) for n < max, P(max) = p^max
    assert np.allclose(np.bincount(draws, minlength=4) / len(draws), expected, atol=0.01)
    assert arith.num_recaps(rng, 0, 0.9) == 0
    assert arith.num_recaps(rng, 4, 1.0) == 4


def test_no_recaps_draw_no_random_numbers():
    # max_recaps=0 (the main job) consumes exactly the carry draws, so its data does not depend on recap settings.
    row = [7, 5, 3, 9]
    a, b = np.random.default_rng(3), np.random.default_rng(3)
    arith.noisy_solution_text(row, a, 0.5)
    arith.noisy_solution_text(row, b, 0.5, max_recaps=0, recap_prob=0.9)
    assert a.random() == b.random()


def test_max_completion_chars_bounds_every_demonstration():
    config = arith.ArithConfig(max_recaps=3, recap_prob=1.0)
    assert arith.max_completion_chars(arith.ArithConfig()) == len("9+9=18;18+9=27;27+9=36")
    assert arith.max_completion_chars(config) == len("9+9=18;18+9=27;27+9=36;36;36;36")
    longest = max(len(arith.noisy_solution_text(row, np.random.default_rng(0), 0.0, 3, 1.0))
                  for row in arith.all_problems(4)[::7])
    assert longest <= arith.max_completion_chars(config)


def test_score_orders_samples():
    texts = [
        "7+5=12;12+3=15;15+9=24",  # correct
        "7+5=12;12+3=15;15+9=24;",  # all steps then junk
        "7+5=12;12+3=15;15+9=14",  # dropped last carry
        "7+5=12;12+3=15",  # truncated
        "7+5=2;2+3=5;5+9=4",  # all carries dropped
        "garbage",
    ]
    scores = [arith.score(arith.grade(OPS, t)) for t in texts]
    assert scores == sorted(scores, reverse=True)
    assert scores[0] > scores[1] > scores[2] > scores[3] > scores[4] > scores[5]


# ---------------------------------------------------------------------------------------------------- splits


def test_all_problems_order_and_shape():
    problems = arith.all_problems(3)
    assert problems.shape == (1000, 3)
    assert problems[0].tolist() == [0, 0, 0] and problems[1].tolist() == [0, 0, 1]
    assert problems[123].tolist() == [1, 2, 3] and problems[-1].tolist() == [9, 9, 9]
    assert len({tuple(r) for r in problems.tolist()}) == 1000
    with pytest.raises(ValueError, match="num_operands"):
        arith.all_problems(1)


def test_split_disjoint_complete_and_deterministic():
    train, evals = arith.split_problems(4, 0.1, seed=0)
    assert len(evals) == 1000 and len(train) == 9000
    train_set = {tuple(r) for r in train.tolist()}
    eval_set = {tuple(r) for r in evals.tolist()}
    assert not train_set & eval_set
    assert len(train_set | eval_set) == 10**4
    again_train, again_eval = arith.split_problems(4, 0.1, seed=0)
    np.testing.assert_array_equal(train, again_train)
    np.testing.assert_array_equal(evals, again_eval)
    _, other_eval = arith.split_problems(4, 0.1, seed=1)
    assert {tuple(r) for r in other_eval.tolist()} != eval_set


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.5, 0.001])
def test_split_rejects_empty_sides(fraction):
    with pytest.raises(ValueError, match="eval"):
        arith.split_problems(2, fraction, seed=0)


# ---------------------------------------------------------------------------------------------------- SFT data


def test_make_sft_examples():
    problems = arith.all_problems(4)[:50]
    examples = arith.make_sft_examples(problems, np.random.default_rng(0), 0.0)
    assert examples == [(arith.prompt_text(r), arith.solution_text(r)) for r in problems]
    noisy = arith.make_sft_examples(problems, np.random.default_rng(0), 1.0)
    assert [c for _, c in noisy] == [arith.dropped_carry_solution_text(r) for r in problems]


# ---------------------------------------------------------------------------------------------------- encoding


def test_encode_batch_right_padding():
    batch = arith.encode_batch(TOK, ["1+2=", "7+5="], ["1+2=3", "7+5=12"], max_len=12)
    assert set(batch) == {"tokens", "attention_mask", "completion_mask"}
    for value in batch.values():
        assert value.dtype == np.int32 and value.shape == (2, 12)
    row = batch["tokens"][0].tolist()
    assert row == TOK.encode("1+2=") + TOK.encode("1+2=3") + [TOK.EOS_ID] + [TOK.PAD_ID] * 2
    assert TOK.decode(batch["tokens"][1]) == "7+5=7+5=12"
    assert batch["attention_mask"][0].tolist() == [1] * 10 + [0] * 2
    assert batch["completion_mask"][0].tolist() == [0] * 4 + [1] * 6 + [0] * 2
    assert batch["attention_mask"][1].tolist() == [1] * 11 + [0]
    assert batch["completion_mask"][1].tolist() == [0] * 4 + [1] * 7 + [0]
    # EOS is inside both masks.
    eos = batch["tokens"][1].tolist().index(TOK.EOS_ID)
    assert batch["attention_mask"][1, eos] == 1 and batch["completion_mask"][1, eos] == 1


def test_encode_batch_left_padding():
    batch = arith.encode_batch(TOK, ["1+2=", "7+5="], ["1+2=3", "7+5=12"], max_len=12, pad_side="left")
    assert batch["tokens"][0].tolist() == [0, 0] + TOK.encode("1+2=1+2=3") + [TOK.EOS_ID]
    assert batch["attention_mask"][0].tolist() == [0] * 2 + [1] * 10
    assert batch["completion_mask"][0].tolist() == [0] * 6 + [1] * 6
    assert batch["completion_mask"][1].tolist() == [0] * 5 + [1] * 7
    right = arith.encode_batch(TOK, ["1+2=", "7+5="], ["1+2=3", "7+5=12"], max_len=12)
    # Same real tokens, only the padding moves.
    for key in batch:
        for b in range(2):
            left_real = batch[key][b][batch["attention_mask"][b] == 1]
            right_real = right[key][b][right["attention_mask"][b] == 1]
            np.testing.assert_array_equal(left_real, right_real)


def test_encode_batch_exact_fit_and_too_long():
    batch = arith.encode_batch(TOK, ["1+2="], ["1+2=3"], max_len=10)
    assert batch["attention_mask"].sum() == 10
    with pytest.raises(ValueError, match=r"example 1: .*11 tokens.*max_len=10"):
        arith.encode_batch(TOK, ["1+2=", "7+5="], ["1+2=3", "7+5=12"], max_len=10)
    with pytest.raises(ValueError, match="pad_side"):
        arith.encode_batch(TOK, ["1+2="], ["1+2=3"], max_len=12, pad_side="middle")
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        arith.encode_batch(TOK, ["1+2=", "7+5="], ["1+2=3"], max_len=12)
    assert arith.encode_batch(TOK, [], [], max_len=4)["tokens"].shape == (0, 4)


def test_encode_prompts_left_padded():
    tokens, mask = arith.encode_prompts(TOK, ["1+2=", "1+2+3="], pad_to=7)
    assert tokens.dtype == np.int32 and mask.dtype == np.int32
    assert tokens[0].tolist() == [0, 0, 0] + TOK.encode("1+2=")
    assert tokens[1].tolist() == [0] + TOK.encode("1+2+3=")
    assert mask.tolist() == [[0, 0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1]]
    with pytest.raises(ValueError, match=r"example 1: prompt has 6 tokens.*pad_to=5"):
        arith.encode_prompts(TOK, ["1+2=", "1+2+3="], pad_to=5)
