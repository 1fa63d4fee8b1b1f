"""The main job's pure pieces: on-policy pair construction, the over-optimisation guard's choice, workdir claims."""
import dataclasses

import numpy as np
import pytest

from jaxalign.experiments import arith_dpo
from jaxalign.tasks import arith
from jaxalign.tasks.tokenizer import CharTokenizer

TOK = CharTokenizer()
C = arith_dpo.completion_len(arith.ArithConfig(max_recaps=3))  # room for the length-bias task's recaps


def _encode_completion(text: str) -> tuple[np.ndarray, np.ndarray]:
    ids = TOK.encode(text) + [TOK.EOS_ID]
    tokens = np.full(C, TOK.PAD_ID, np.int32)
    tokens[: len(ids)] = ids
    mask = np.zeros(C, np.int32)
    mask[: len(ids)] = 1
    return tokens, mask


def _samples(problems, texts_per_problem):
    prompts, _ = arith.encode_prompts(TOK, [arith.prompt_text(p) for p in problems], arith_dpo.PROMPT_LEN)
    encoded = [_encode_completion(t) for texts in texts_per_problem for t in texts]
    return prompts, np.stack([e[0] for e in encoded]), np.stack([e[1] for e in encoded])


PROBLEMS = np.array([[7, 5, 3, 9], [1, 2, 3, 0], [8, 8, 8, 8]])
TEXTS = [
    # best (correct) vs worst (malformed): a pair
    [arith.solution_text(PROBLEMS[0]), arith.dropped_carry_solution_text(PROBLEMS[0]), "7+5"],
    # every sample identical: tied, no pair
    [arith.solution_text(PROBLEMS[1])] * 3,
    # no correct sample: a pair only when a correct chosen is not required
    [arith.dropped_carry_solution_text(PROBLEMS[2]), "9", arith.dropped_carry_solution_text(PROBLEMS[2])],
]


def test_pairs_take_best_against_worst_and_count_what_they_drop():
    """Chosen is the best-scored sample, rejected the worst; tied prompts and prompts without a correct sample
    give no pair and are counted."""
    prompts, completions, masks = _samples(PROBLEMS, TEXTS)
    pairs, stats = arith_dpo.build_pairs(PROBLEMS, prompts, completions, masks, 3, 0.5, require_correct_chosen=True)
    assert stats["pairs"] == 1 and stats["pairs_dropped_tied"] == 1 and stats["pairs_dropped_no_correct_sample"] == 1
    assert stats["pairs_chosen_correct_rate"] == 1.0
    chosen = pairs.arrays["chosen_tokens"][0, arith_dpo.PROMPT_LEN:]
    rejected = pairs.arrays["rejected_tokens"][0, arith_dpo.PROMPT_LEN:]
    assert TOK.decode(chosen) == arith.solution_text(PROBLEMS[0])
    assert TOK.decode(rejected) == "7+5"
    # The prompt is never part of the completion mask; the completion mask ends with the EOS.
    for side in ("chosen", "rejected"):
        completion_mask = pairs.arrays[f"{side}_completion_mask"][0]
        tokens = pairs.arrays[f"{side}_tokens"][0]
        assert not completion_mask[: arith_dpo.PROMPT_LEN].any()
        assert tokens[np.nonzero(completion_mask)[0][-1]] == TOK.EOS_ID
        assert (pairs.arrays[f"{side}_attention_mask"][0] >= completion_mask).all()

    pairs, stats = arith_dpo.build_pairs(PROBLEMS, prompts, completions, masks, 3, 0.5, require_correct_chosen=False)
    assert stats["pairs"] == 2 and stats["pairs_dropped_no_correct_sample"] == 0
    assert TOK.decode(pairs.arrays["chosen_tokens"][1, arith_dpo.PROMPT_LEN:]) == \
        arith.dropped_carry_solution_text(PROBLEMS[2])


def test_a_length_biased_judge_prefers_the_longer_response_over_a_better_one():
    """With a large enough length_bonus the judge's chosen is the longest sample, not the correct one (the
    length-bias task); without it the correct answer wins."""
    long_wrong = arith.solution_text(PROBLEMS[0]) + "0"  # one token longer, wrong total
    texts = [[arith.solution_text(PROBLEMS[0]), long_wrong, "7+5"]]
    prompts, completions, masks = _samples(PROBLEMS[:1], texts)
    fair, fair_stats = arith_dpo.build_pairs(PROBLEMS[:1], prompts, completions, masks, 3, 0.5, True)
    biased, stats = arith_dpo.build_pairs(PROBLEMS[:1], prompts, completions, masks, 3, 0.5, True, length_bonus=5.0)
    assert TOK.decode(fair.arrays["chosen_tokens"][0, arith_dpo.PROMPT_LEN:]) == arith.solution_text(PROBLEMS[0])
    assert TOK.decode(biased.arrays["chosen_tokens"][0, arith_dpo.PROMPT_LEN:]) == long_wrong
    assert stats["pairs_chosen_longer_rate"] == 1.0 and stats["pairs_chosen_correct_rate"] == 0.0


def test_the_length_bias_task_decouples_length_from_quality():
    """length_bias = verbose demonstrations (neutral recaps), room for them in the model, a length-rewarding judge;
    the judge then prefers a wrong answer with recaps to a right one without, and the task needs its own SFT."""
    base = arith_dpo.ArithDPOConfig()
    cfg = arith_dpo.task_config(base, "length_bias")
    assert (cfg.task.max_recaps, cfg.pairs.length_bonus) == (3, 0.5)
    assert cfg.model.max_len == arith_dpo.PROMPT_LEN + len("9+9=18;18+9=27;27+9=36;36;36;36") + 2
    assert dataclasses.replace(cfg, task=base.task, model=base.model, pairs=base.pairs) == base
    # length_bias and its control (verbose) share one SFT policy of their own; noisy_labels shares the main job's
    assert arith_dpo.sft_variant("length_bias") == arith_dpo.sft_variant("verbose") != ""
    assert arith_dpo.sft_variant("noisy_labels") == arith_dpo.sft_variant("arith") == ""
    assert arith_dpo.task_config(base, "verbose") == dataclasses.replace(cfg, pairs=base.pairs)
    arith_dpo.validate_config(cfg, arith_dpo.make_mesh(cfg.mesh))
    with pytest.raises(ValueError, match=r"model.max_len=32 is too short.*max_recaps=3.*at least 41"):
        arith_dpo.validate_config(dataclasses.replace(cfg, model=base.model), arith_dpo.make_mesh(cfg.mesh))

    demonstrations = [TOK.decode(row[arith_dpo.PROMPT_LEN:])
                      for row in arith_dpo.sft_dataset(cfg, arith.all_problems(4)[:400]).arrays["tokens"]]
    recaps = np.array([arith.grade(p, d).recaps for p, d in zip(arith.all_problems(4)[:400], demonstrations)])
    assert 0.5 < np.mean(recaps == 0) < 0.7 and recaps.max() == 3  # P(0) = 1 - recap_prob = 0.6

    # the last carry dropped (2 of 3 steps right) plus two recaps: 2 + 0.5 * 29 tokens beats 4 + 0.5 * 23
    right, wrong_verbose = arith.solution_text(PROBLEMS[0]), "7+5=12;12+3=15;15+9=14;14;14"
    prompts, completions, masks = _samples(PROBLEMS[:1], [[right, wrong_verbose, "7+5"]])
    _, stats = arith_dpo.build_pairs(PROBLEMS[:1], prompts, completions, masks, 3, 0.5, True,
                                     length_bonus=cfg.pairs.length_bonus)
    assert stats["pairs_chosen_correct_rate"] == 0.0 and stats["pairs_chosen_longer_rate"] == 1.0


def test_label_flips_swap_chosen_and_rejected_at_the_stated_rate_and_are_counted():
    problems = np.array([[7, 5, 3, 9]] * 400)
    texts = [[arith.solution_text(problems[0]), "7+5"]] * 400
    prompts, completions, masks = _samples(problems, texts)
    pairs, stats = arith_dpo.build_pairs(problems, prompts, completions, masks, 2, 0.5, True, label_flip_rate=0.25,
                                         seed=3)
    flipped = [TOK.decode(t[arith_dpo.PROMPT_LEN:]) == "7+5" for t in pairs.arrays["chosen_tokens"]]
    assert stats["pairs_label_flipped"] == sum(flipped)
    assert 0.18 < sum(flipped) / 400 < 0.32
    with pytest.raises(ValueError, match="label_flip_rate"):
        arith_dpo.PairConfig(label_flip_rate=0.5)


def test_guard_selects_best_validation_step_and_the_earliest_on_ties():
    """Over-optimisation guard: the best validation accuracy wins, ties go to the step closest to the reference,
    and step 0 (the SFT policy) can win when DPO never helps."""
    history = [{"step": 0, "val/accuracy": 0.1}, {"step": 25, "val/accuracy": 0.6},
               {"step": 50, "val/accuracy": 0.9}, {"step": 75, "val/accuracy": 0.9}, {"step": 100, "val/accuracy": 0.2}]
    assert arith_dpo.select_checkpoint(history)["step"] == 50
    collapsed = [{"step": 0, "val/accuracy": 0.3}, {"step": 25, "val/accuracy": 0.0}]
    assert arith_dpo.select_checkpoint(collapsed)["step"] == 0


def test_a_workdir_refuses_a_run_with_another_config(tmp_path):
    """Resuming in a workdir with a different config is one clear error naming the field; presentation-only
    fields (progress bar, eval batch size) may change."""
    cfg = arith_dpo.ArithDPOConfig()
    arith_dpo.claim_workdir(cfg, str(tmp_path))
    arith_dpo.claim_workdir(dataclasses.replace(cfg, show_progress=False, eval_batch_size=7), str(tmp_path))
    changed = dataclasses.replace(cfg, dpo=dataclasses.replace(cfg.dpo, beta=0.3))
    with pytest.raises(ValueError, match=r"dpo\.beta=2\.0, but this run has 0\.3"):
        arith_dpo.claim_workdir(changed, str(tmp_path))
