"""Pairs and ranked lists from graded ARITH samples (jaxalign.experiments.arith_kit.data): what is kept, dropped and
counted, the length-biased judge, the label-flip model (the same prompts flip in pairs and lists), the layout of the
arrays, and that on-policy lists use exactly the main job's samples."""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest


from jaxalign.models.llama import ModelConfig, init_params
from jaxalign.tasks import arith
from jaxalign.tasks.tokenizer import CharTokenizer
from jaxalign.experiments import arith_kit as kit
from jaxalign.sharding import make_mesh

TOK = CharTokenizer()
C = kit.completion_len(arith.ArithConfig(max_recaps=3))  # room for the length-bias task's recaps
PL = kit.PROMPT_LEN


def _encode_completion(text: str) -> tuple[np.ndarray, np.ndarray]:
    ids = TOK.encode(text) + [TOK.EOS_ID]
    tokens = np.full(C, TOK.PAD_ID, np.int32)
    tokens[: len(ids)] = ids
    mask = np.zeros(C, np.int32)
    mask[: len(ids)] = 1
    return tokens, mask


def _samples(problems, texts_per_problem):
    prompts, _ = arith.encode_prompts(TOK, [arith.prompt_text(p) for p in problems], PL)
    encoded = [_encode_completion(t) for texts in texts_per_problem for t in texts]
    return prompts, np.stack([e[0] for e in encoded]), np.stack([e[1] for e in encoded])


PROBLEMS = np.array([[7, 5, 3, 9], [1, 2, 3, 0], [8, 8, 8, 8]])
TEXTS = [
    # correct, dropped carry, malformed: three distinct scores
    [arith.solution_text(PROBLEMS[0]), arith.dropped_carry_solution_text(PROBLEMS[0]), "7+5"],
    # every sample identical: tied, dropped
    [arith.solution_text(PROBLEMS[1])] * 3,
    # no correct sample; a duplicate completion
    [arith.dropped_carry_solution_text(PROBLEMS[2]), "9", arith.dropped_carry_solution_text(PROBLEMS[2])],
]


def test_pairs_take_best_against_worst_and_count_what_they_drop():
    """Chosen is the best-scored sample, rejected the worst; tied prompts and prompts without a correct sample
    give no pair and are counted."""
    prompts, completions, masks = _samples(PROBLEMS, TEXTS)
    pairs, stats = kit.build_pairs(PROBLEMS, prompts, completions, masks, 3, 0.5, require_correct_chosen=True)
    assert stats["pairs"] == 1 and stats["pairs_dropped_tied"] == 1 and stats["pairs_dropped_no_correct_sample"] == 1
    assert stats["pairs_chosen_correct_rate"] == 1.0
    chosen = pairs.arrays["chosen_tokens"][0, kit.PROMPT_LEN:]
    rejected = pairs.arrays["rejected_tokens"][0, kit.PROMPT_LEN:]
    assert TOK.decode(chosen) == arith.solution_text(PROBLEMS[0])
    assert TOK.decode(rejected) == "7+5"
    # The prompt is never part of the completion mask; the completion mask ends with the EOS.
    for side in ("chosen", "rejected"):
        completion_mask = pairs.arrays[f"{side}_completion_mask"][0]
        tokens = pairs.arrays[f"{side}_tokens"][0]
        assert not completion_mask[: kit.PROMPT_LEN].any()
        assert tokens[np.nonzero(completion_mask)[0][-1]] == TOK.EOS_ID
        assert (pairs.arrays[f"{side}_attention_mask"][0] >= completion_mask).all()

    pairs, stats = kit.build_pairs(PROBLEMS, prompts, completions, masks, 3, 0.5, require_correct_chosen=False)
    assert stats["pairs"] == 2 and stats["pairs_dropped_no_correct_sample"] == 0
    assert TOK.decode(pairs.arrays["chosen_tokens"][1, kit.PROMPT_LEN:]) == \
        arith.dropped_carry_solution_text(PROBLEMS[2])


def test_a_length_biased_judge_prefers_the_longer_response_over_a_better_one():
    """With a large enough length_bonus the judge's chosen is the longest sample, not the correct one (the
    length-bias task); without it the correct answer wins."""
    long_wrong = arith.solution_text(PROBLEMS[0]) + "0"  # one token longer, wrong total
    texts = [[arith.solution_text(PROBLEMS[0]), long_wrong, "7+5"]]
    prompts, completions, masks = _samples(PROBLEMS[:1], texts)
    fair, fair_stats = kit.build_pairs(PROBLEMS[:1], prompts, completions, masks, 3, 0.5, True)
    biased, stats = kit.build_pairs(PROBLEMS[:1], prompts, completions, masks, 3, 0.5, True, length_bonus=5.0)
    assert TOK.decode(fair.arrays["chosen_tokens"][0, kit.PROMPT_LEN:]) == arith.solution_text(PROBLEMS[0])
    assert TOK.decode(biased.arrays["chosen_tokens"][0, kit.PROMPT_LEN:]) == long_wrong
    assert stats["pairs_chosen_longer_rate"] == 1.0 and stats["pairs_chosen_correct_rate"] == 0.0


def test_the_length_bias_task_decouples_length_from_quality():
    """length_bias = verbose demonstrations (neutral recaps), room for them in the model, a length-rewarding judge;
    the judge then prefers a wrong answer with recaps to a right one without, and the task needs its own SFT."""
    base = kit.ArithDPOConfig()
    cfg = kit.task_config(base, "length_bias")
    assert (cfg.task.max_recaps, cfg.pairs.length_bonus) == (3, 0.5)
    assert cfg.model.max_len == kit.PROMPT_LEN + len("9+9=18;18+9=27;27+9=36;36;36;36") + 2
    assert dataclasses.replace(cfg, task=base.task, model=base.model, pairs=base.pairs) == base
    # length_bias and its control (verbose) share one SFT policy of their own; noisy_labels shares the main job's
    assert kit.sft_variant("length_bias") == kit.sft_variant("verbose") != ""
    assert kit.sft_variant("noisy_labels") == kit.sft_variant("arith") == ""
    assert kit.task_config(base, "verbose") == dataclasses.replace(cfg, pairs=base.pairs)
    kit.validate_config(cfg, make_mesh(cfg.mesh))
    with pytest.raises(ValueError, match=r"model.max_len=32 is too short.*max_recaps=3.*at least 41"):
        kit.validate_config(dataclasses.replace(cfg, model=base.model), make_mesh(cfg.mesh))

    demonstrations = [TOK.decode(row[kit.PROMPT_LEN:])
                      for row in kit.sft_dataset(cfg, arith.all_problems(4)[:400]).arrays["tokens"]]
    recaps = np.array([arith.grade(p, d).recaps for p, d in zip(arith.all_problems(4)[:400], demonstrations)])
    assert 0.5 < np.mean(recaps == 0) < 0.7 and recaps.max() == 3  # P(0) = 1 - recap_prob = 0.6

    # the last carry dropped (2 of 3 steps right) plus two recaps: 2 + 0.5 * 29 tokens beats 4 + 0.5 * 23
    right, wrong_verbose = arith.solution_text(PROBLEMS[0]), "7+5=12;12+3=15;15+9=14;14;14"
    prompts, completions, masks = _samples(PROBLEMS[:1], [[right, wrong_verbose, "7+5"]])
    _, stats = kit.build_pairs(PROBLEMS[:1], prompts, completions, masks, 3, 0.5, True,
                                     length_bonus=cfg.pairs.length_bonus)
    assert stats["pairs_chosen_correct_rate"] == 0.0 and stats["pairs_chosen_longer_rate"] == 1.0


def test_label_flips_swap_chosen_and_rejected_at_the_stated_rate_and_are_counted():
    problems = np.array([[7, 5, 3, 9]] * 400)
    texts = [[arith.solution_text(problems[0]), "7+5"]] * 400
    prompts, completions, masks = _samples(problems, texts)
    pairs, stats = kit.build_pairs(problems, prompts, completions, masks, 2, 0.5, True, label_flip_rate=0.25,
                                         seed=3)
    flipped = [TOK.decode(t[kit.PROMPT_LEN:]) == "7+5" for t in pairs.arrays["chosen_tokens"]]
    assert stats["pairs_label_flipped"] == sum(flipped)
    assert 0.18 < sum(flipped) / 400 < 0.32
    with pytest.raises(ValueError, match="label_flip_rate"):
        kit.PairConfig(label_flip_rate=0.5)


def _score(problem, text):
    return arith.score(arith.grade(problem, text))


def test_lists_keep_every_sample_with_its_judged_score_and_count_what_they_drop():
    prompts, completions, masks = _samples(PROBLEMS, TEXTS)
    lists, stats = kit.build_ranked_lists(PROBLEMS, prompts, completions, masks, 3, 0.5, True)
    assert stats["lists"] == 1 and stats["lists_dropped_tied"] == 1 and stats["lists_dropped_no_correct_sample"] == 1
    assert stats["lists_label_flipped"] == 0 and stats["lists_top_correct_rate"] == 1.0
    a = lists.arrays
    assert a["list_tokens"].shape == (1, 3, PL + C) and a["list_scores"].shape == (1, 3)
    assert {k: v.dtype for k, v in a.items()} == {
        "list_tokens": np.int32, "list_attention_mask": np.int32, "list_completion_mask": np.int32,
        "list_scores": np.float32, "list_valid": np.int32}
    assert (a["list_valid"] == 1).all()
    for k, text in enumerate(TEXTS[0]):
        assert TOK.decode(a["list_tokens"][0, k, PL:]) == text
        np.testing.assert_array_equal(a["list_tokens"][0, k, :PL], prompts[0])
        assert a["list_scores"][0, k] == pytest.approx(_score(PROBLEMS[0], text))
        completion = a["list_completion_mask"][0, k]
        assert not completion[:PL].any() and completion.sum() == len(text) + 1  # + EOS
        assert a["list_tokens"][0, k, np.nonzero(completion)[0][-1]] == TOK.EOS_ID
        assert (a["list_attention_mask"][0, k] >= completion).all()
        assert (a["list_attention_mask"][0, k, :PL] == (prompts[0] != TOK.PAD_ID)).all()
    assert a["list_scores"][0, 0] > a["list_scores"][0, 1] > a["list_scores"][0, 2]

    # Without requiring a correct sample the third prompt is kept, its duplicate completions tie.
    lists, stats = kit.build_ranked_lists(PROBLEMS, prompts, completions, masks, 3, 0.5, False)
    assert stats["lists"] == 2 and stats["lists_dropped_no_correct_sample"] == 0 and stats["lists_dropped_tied"] == 1
    scores = lists.arrays["list_scores"][1]
    assert scores[0] == scores[2] != scores[1]
    np.testing.assert_array_equal(lists.arrays["list_tokens"][1, 0], lists.arrays["list_tokens"][1, 2])

    # The same prompts as the main job's pairs, whose chosen/rejected are the lists' best/worst.
    pairs, pair_stats = kit.build_pairs(PROBLEMS, prompts, completions, masks, 3, 0.5, False)
    assert pair_stats["pairs"] == stats["lists"]
    rows = np.arange(stats["lists"])
    best, worst = lists.arrays["list_scores"].argmax(1), lists.arrays["list_scores"].argmin(1)
    np.testing.assert_array_equal(pairs.arrays["chosen_tokens"], lists.arrays["list_tokens"][rows, best])
    np.testing.assert_array_equal(pairs.arrays["rejected_tokens"], lists.arrays["list_tokens"][rows, worst])


def test_a_length_bonus_adds_to_the_oracle_score():
    prompts, completions, masks = _samples(PROBLEMS[:1], TEXTS[:1])
    fair, _ = kit.build_ranked_lists(PROBLEMS[:1], prompts, completions, masks, 3, 0.5, True)
    biased, _ = kit.build_ranked_lists(PROBLEMS[:1], prompts, completions, masks, 3, 0.5, True,
                                                length_bonus=0.5)
    lengths = masks.sum(1)
    np.testing.assert_allclose(biased.arrays["list_scores"][0], fair.arrays["list_scores"][0] + 0.5 * lengths)


def test_label_flips_reverse_the_ranking_of_the_same_prompts_the_pairs_flip():
    problems = np.array([[7, 5, 3, 9]] * 300)
    texts = [TEXTS[0]] * 300
    prompts, completions, masks = _samples(problems, texts)
    lists, stats = kit.build_ranked_lists(problems, prompts, completions, masks, 3, 0.5, True,
                                                   label_flip_rate=0.3, seed=5)
    pairs, pair_stats = kit.build_pairs(problems, prompts, completions, masks, 3, 0.5, True,
                                              label_flip_rate=0.3, seed=5)
    true = np.array([_score(problems[0], t) for t in TEXTS[0]])
    flipped = (lists.arrays["list_scores"] != true).any(axis=1)
    assert stats["lists_label_flipped"] == flipped.sum() == pair_stats["pairs_label_flipped"]
    assert 0.2 < flipped.mean() < 0.4
    np.testing.assert_allclose(lists.arrays["list_scores"][flipped], np.broadcast_to(true.max() + true.min() - true,
                                                                                     (flipped.sum(), 3)))
    rows = np.arange(len(flipped))
    top = lists.arrays["list_scores"].argmax(axis=1)
    np.testing.assert_array_equal(pairs.arrays["chosen_tokens"], lists.arrays["list_tokens"][rows, top])
    with pytest.raises(ValueError, match="label_flip_rate"):
        kit.build_ranked_lists(problems, prompts, completions, masks, 3, 0.5, True, label_flip_rate=0.5)
    with pytest.raises(ValueError, match="completion rows"):
        kit.build_ranked_lists(problems, prompts, completions[:-1], masks[:-1], 3, 0.5, True)


def test_on_policy_lists_use_exactly_the_main_jobs_samples_and_are_cached(tmp_path, monkeypatch):
    """The samples `on_policy_pairs` builds its pairs from (captured from its call) are the lists' samples; the
    lists are cached in workdir/lists.npz."""
    model = ModelConfig(vocab_size=16, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, mlp_dim=32,
                        max_len=PL + C)
    cfg = kit.ArithDPOConfig(
        task=arith.ArithConfig(num_operands=3), model=model, eval_batch_size=8,
        pairs=dataclasses.replace(kit.PairConfig(), num_prompts=4, samples_per_prompt=2, min_score_gap=0.0,
                                  require_correct_chosen=False))
    shapes = jax.eval_shape(lambda key: nn.meta.unbox(init_params(model, key)), jax.random.key(0))
    draw = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda x: (0.3 * draw.standard_normal(x.shape)).astype(np.float32), shapes)
    problems = kit.split(dataclasses.replace(cfg, num_val_prompts=8)).train

    captured = {}

    class Captured(Exception):
        pass

    def capture(*args, **kwargs):
        captured["args"] = args
        raise Captured

    monkeypatch.setattr(kit.data, "build_pairs", capture)
    with pytest.raises(Captured):
        kit.on_policy_pairs(cfg, params, problems, str(tmp_path))
    monkeypatch.undo()
    chosen, prompt_tokens, completions, masks = kit.on_policy_samples(cfg, params, problems)
    for mine, theirs in zip((chosen, prompt_tokens, completions, masks), captured["args"][:4]):
        np.testing.assert_array_equal(mine, theirs)

    lists, stats = kit.on_policy_lists(cfg, params, problems, str(tmp_path))
    assert (tmp_path / "lists.npz").exists() and stats["lists"] == 4  # min_score_gap 0: nothing ties
    assert lists.arrays["list_tokens"].shape == (4, 2, PL + C)
    np.testing.assert_array_equal(lists.arrays["list_tokens"][:, :, PL:].reshape(8, C), completions)
    again, stats_again = kit.on_policy_lists(cfg, None, problems, str(tmp_path))  # no sampling: cached
    assert stats_again == stats
    for key, value in lists.arrays.items():
        np.testing.assert_array_equal(again.arrays[key], value)
