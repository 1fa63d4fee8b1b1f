"""Ranked lists from graded ARITH samples (jaxalign.experiments.ranked_lists): what is kept, dropped and counted,
the label-flip model, the layout of the arrays, and that on-policy lists use exactly the main job's samples."""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxalign.experiments import arith_dpo, ranked_lists
from jaxalign.models.llama import ModelConfig, init_params
from jaxalign.tasks import arith
from jaxalign.tasks.tokenizer import CharTokenizer

TOK = CharTokenizer()
C, PL = arith_dpo.COMPLETION_LEN, arith_dpo.PROMPT_LEN


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


def _score(problem, text):
    return arith.score(arith.grade(problem, text))


def test_lists_keep_every_sample_with_its_judged_score_and_count_what_they_drop():
    prompts, completions, masks = _samples(PROBLEMS, TEXTS)
    lists, stats = ranked_lists.build_ranked_lists(PROBLEMS, prompts, completions, masks, 3, 0.5, True)
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
    lists, stats = ranked_lists.build_ranked_lists(PROBLEMS, prompts, completions, masks, 3, 0.5, False)
    assert stats["lists"] == 2 and stats["lists_dropped_no_correct_sample"] == 0 and stats["lists_dropped_tied"] == 1
    scores = lists.arrays["list_scores"][1]
    assert scores[0] == scores[2] != scores[1]
    np.testing.assert_array_equal(lists.arrays["list_tokens"][1, 0], lists.arrays["list_tokens"][1, 2])

    # The same prompts as the main job's pairs, whose chosen/rejected are the lists' best/worst.
    pairs, pair_stats = arith_dpo.build_pairs(PROBLEMS, prompts, completions, masks, 3, 0.5, False)
    assert pair_stats["pairs"] == stats["lists"]
    rows = np.arange(stats["lists"])
    best, worst = lists.arrays["list_scores"].argmax(1), lists.arrays["list_scores"].argmin(1)
    np.testing.assert_array_equal(pairs.arrays["chosen_tokens"], lists.arrays["list_tokens"][rows, best])
    np.testing.assert_array_equal(pairs.arrays["rejected_tokens"], lists.arrays["list_tokens"][rows, worst])


def test_a_length_bonus_adds_to_the_oracle_score():
    prompts, completions, masks = _samples(PROBLEMS[:1], TEXTS[:1])
    fair, _ = ranked_lists.build_ranked_lists(PROBLEMS[:1], prompts, completions, masks, 3, 0.5, True)
    biased, _ = ranked_lists.build_ranked_lists(PROBLEMS[:1], prompts, completions, masks, 3, 0.5, True,
                                                length_bonus=0.5)
    lengths = masks.sum(1)
    np.testing.assert_allclose(biased.arrays["list_scores"][0], fair.arrays["list_scores"][0] + 0.5 * lengths)


def test_label_flips_reverse_the_ranking_of_the_same_prompts_the_pairs_flip():
    problems = np.array([[7, 5, 3, 9]] * 300)
    texts = [TEXTS[0]] * 300
    prompts, completions, masks = _samples(problems, texts)
    lists, stats = ranked_lists.build_ranked_lists(problems, prompts, completions, masks, 3, 0.5, True,
                                                   label_flip_rate=0.3, seed=5)
    pairs, pair_stats = arith_dpo.build_pairs(problems, prompts, completions, masks, 3, 0.5, True,
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
        ranked_lists.build_ranked_lists(problems, prompts, completions, masks, 3, 0.5, True, label_flip_rate=0.5)
    with pytest.raises(ValueError, match="completion rows"):
        ranked_lists.build_ranked_lists(problems, prompts, completions[:-1], masks[:-1], 3, 0.5, True)


def test_on_policy_lists_use_exactly_the_main_jobs_samples_and_are_cached(tmp_path, monkeypatch):
    """The samples `on_policy_pairs` builds its pairs from (captured from its call) are the lists' samples; the
    lists are cached in workdir/lists.npz."""
    model = ModelConfig(vocab_size=16, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, mlp_dim=32,
                        max_len=PL + C)
    cfg = arith_dpo.ArithDPOConfig(
        task=arith.ArithConfig(num_operands=3), model=model, eval_batch_size=8,
        pairs=dataclasses.replace(arith_dpo.PairConfig(), num_prompts=4, samples_per_prompt=2, min_score_gap=0.0,
                                  require_correct_chosen=False))
    shapes = jax.eval_shape(lambda key: nn.meta.unbox(init_params(model, key)), jax.random.key(0))
    draw = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda x: (0.3 * draw.standard_normal(x.shape)).astype(np.float32), shapes)
    problems = arith_dpo.split(dataclasses.replace(cfg, num_val_prompts=8)).train

    captured = {}

    class Captured(Exception):
        pass

    def capture(*args, **kwargs):
        captured["args"] = args
        raise Captured

    monkeypatch.setattr(arith_dpo, "build_pairs", capture)
    with pytest.raises(Captured):
        arith_dpo.on_policy_pairs(cfg, params, problems, str(tmp_path))
    monkeypatch.undo()
    chosen, prompt_tokens, completions, masks = ranked_lists.on_policy_samples(cfg, params, problems)
    for mine, theirs in zip((chosen, prompt_tokens, completions, masks), captured["args"][:4]):
        np.testing.assert_array_equal(mine, theirs)

    lists, stats = ranked_lists.on_policy_lists(cfg, params, problems, str(tmp_path))
    assert (tmp_path / "lists.npz").exists() and stats["lists"] == 4  # min_score_gap 0: nothing ties
    assert lists.arrays["list_tokens"].shape == (4, 2, PL + C)
    np.testing.assert_array_equal(lists.arrays["list_tokens"][:, :, PL:].reshape(8, C), completions)
    again, stats_again = ranked_lists.on_policy_lists(cfg, None, problems, str(tmp_path))  # no sampling: cached
    assert stats_again == stats
    for key, value in lists.arrays.items():
        np.testing.assert_array_equal(again.arrays[key], value)
