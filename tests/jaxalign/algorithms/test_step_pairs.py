"""Step-DPO's step pairs: the first wrong step of a graded sample (including the wrongly closed steps), the chosen
step among sampled continuations (dropped and counted, or the gold fallback), the pair arrays' step-only masks, and
sigmoid DPO on those arrays being exactly `step_dpo` on the same per-token log-probs."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.algorithms import step_pairs
from jaxalign.algorithms.step_pairs import (
    WrongStep,
    build_step_pairs,
    choose_steps,
    correct_step_ids,
    locate_first_wrong_step,
    rejected_steps,
    sample_steps,
    step_pair_arrays,
)
from jaxalign.logprobs import token_logprobs
from jaxalign.losses import compute_objective
from jaxalign.losses.iterative import step_dpo, step_mask
from jaxalign.losses.registry import PairwiseInputs
from jaxalign.models.llama import DecoderLM, ModelConfig, init_params
from jaxalign.tasks import arith, judges
from jaxalign.tasks.tokenizer import CharTokenizer
from jaxalign.train.step import dpo_loss_fn, logits_fn
from jaxalign.experiments import arith_kit as kit

TOK = CharTokenizer()
EOS, SEP = TOK.EOS_ID, TOK.encode(";")[0]
OPS = [7, 5, 3, 9]  # 7+5=12;12+3=15;15+9=24


def ids(text: str, end: str = "eos") -> list[int]:
    return TOK.encode(text) + ([EOS] if end == "eos" else [])


# ---------------------------------------------------------------------------------------------------------------
# The first wrong step.


def test_a_correct_completion_has_no_wrong_step():
    assert locate_first_wrong_step(OPS, ids("7+5=12;12+3=15;15+9=24")) is None
    assert locate_first_wrong_step(OPS, ids("7+5=12;12+3=15;15+9=24;24")) is None  # a recap: the oracle accepts it


@pytest.mark.parametrize("text, end, index, kind, prefix, rejected", [
    # a wrong first step (the dropped carry): no prefix, the step with its ';'
    ("7+5=2;2+3=5;5+9=14", "eos", 0, "wrong_step", "", "7+5=2;"),
    # a wrong middle step after a correct one
    ("7+5=12;12+3=16;16+9=25", "eos", 1, "wrong_step", "7+5=12;", "12+3=16;"),
    # a wrong last step: closed by EOS
    ("7+5=12;12+3=15;15+9=14", "eos", 2, "wrong_step", "7+5=12;12+3=15;", "15+9=14<EOS>"),
    # the sampler's budget ran out inside a step: no terminator
    ("7+5=12;12+3", "none", 1, "wrong_step", "7+5=12;", "12+3"),
    # an empty first step ending the answer at once
    ("", "eos", 0, "wrong_step", "", "<EOS>"),
    # the budget ran out right after a correct step's ';': nothing written at step 1
    ("7+5=12;", "none", 1, "cut_off", "7+5=12;", ""),
    # stopped early: step 0 is right but closed by EOS where ';' belonged
    ("7+5=12;12+3=15", "eos", 1, "wrong_terminator", "7+5=12;", "12+3=15<EOS>"),
    # ran on after the last step: ';' where EOS belonged
    ("7+5=12;12+3=15;15+9=24;3", "eos", 2, "wrong_terminator", "7+5=12;12+3=15;", "15+9=24;"),
])
def test_first_wrong_step_cases(text, end, index, kind, prefix, rejected):
    wrong = locate_first_wrong_step(OPS, ids(text, end))
    expected = TOK.encode(rejected.replace("<EOS>", "")) + ([EOS] if rejected.endswith("<EOS>") else [])
    assert wrong == WrongStep(index=index, kind=kind, prefix=prefix, rejected=tuple(expected))
    assert (kind == "cut_off") == (not wrong.rejected)
    assert correct_step_ids(OPS, index) != wrong.rejected  # the rejected step is never the correct one


def test_first_wrong_step_is_a_prefix_of_the_sample_and_agrees_with_the_judge():
    """On random completions: prefix + rejected step are the sample's own first tokens, the prefix holds exactly the
    true steps before the wrong one, and a wrong-text step is `judges.first_wrong_step` of the oracle's grade."""
    rng = np.random.default_rng(0)
    true = arith.solution_steps(OPS)
    kinds = set()
    for _ in range(400):
        # mostly right answers with a random corruption, so every branch is visited
        text = ";".join(true)
        cut = rng.integers(0, len(text) + 1)
        tail = "".join(rng.choice(list("0123456789+=;"), size=rng.integers(0, 4)))
        completion = ids(text[:cut] + tail, "eos" if rng.random() < 0.8 else "none")
        if not completion:  # no sampler returns nothing at all
            with pytest.raises(ValueError, match="is empty; pass its ids"):
                locate_first_wrong_step(OPS, completion)
            continue
        wrong = locate_first_wrong_step(OPS, completion)
        grade = arith.grade(OPS, TOK.decode(completion))
        if wrong is None:
            assert grade.correct and EOS in completion
            continue
        kinds.add(wrong.kind)
        head = TOK.encode(wrong.prefix) + list(wrong.rejected)
        assert completion[:len(head)] == head
        if wrong.kind == "cut_off":  # the sample stops right after the prefix, without EOS: nothing to reject
            assert completion == head and not wrong.rejected and wrong.prefix
            continue
        assert wrong.prefix == "".join(s + ";" for s in true[:wrong.index])
        assert wrong.rejected != correct_step_ids(OPS, wrong.index)
        if wrong.kind == "wrong_step":
            assert wrong.index == judges.first_wrong_step(grade)
        else:  # the text is right, the terminator is not
            assert TOK.decode(wrong.rejected).split(";")[0] == true[wrong.index]
    assert kinds == {"wrong_step", "wrong_terminator", "cut_off"}


def test_correct_step_ids_close_with_the_separator_then_eos():
    assert correct_step_ids(OPS, 0) == tuple(ids("7+5=12;", "none"))
    assert correct_step_ids(OPS, 2) == tuple(ids("15+9=24"))
    with pytest.raises(ValueError, match="index must be a step of the 3-step chain"):
        correct_step_ids(OPS, 3)


def _padded(rows: list[list[int]], width: int) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        tokens[i, :len(row)], mask[i, :len(row)] = row, 1
    return tokens, mask


def test_rejected_steps_take_the_first_incorrect_sample_and_count_the_prompts_without_one():
    problems = np.array([OPS, OPS, OPS], np.int32)
    right, cut = ids("7+5=12;12+3=15;15+9=24"), ids("7+5=12;", "none")
    samples = [[right, cut, ids("7+5=12;12+3=16;16+9=25"), ids("7+5=2;2+3=5;5+9=14")], [right] * 4,
               [right, cut, cut, right]]
    tokens, mask = _padded([r for rows in samples for r in rows], 30)
    found, stats = rejected_steps(problems, tokens.reshape(3, 4, -1), mask.reshape(3, 4, -1))
    assert found[0].index == 1 and found[1] is None and found[2] is None  # sample 2 (1 is cut off), not sample 3
    assert stats == {"prompts": 3, "dropped_all_correct": 1, "dropped_only_cut_off": 1, "rejected_wrong_step": 1,
                     "rejected_wrong_terminator": 0}
    with pytest.raises(ValueError, match=r"must both be \[prompts=3, K, C\]"):
        rejected_steps(problems, tokens, mask)


# ---------------------------------------------------------------------------------------------------------------
# The chosen step.


def test_choose_steps_keeps_a_correct_continuation_and_counts_the_prefixes_without_one():
    problems = np.array([OPS, OPS, OPS], np.int32)
    wrong = [locate_first_wrong_step(OPS, ids("7+5=2;2+3=5;5+9=14")),
             locate_first_wrong_step(OPS, ids("7+5=12;12+3=15;15+9=14")),
             None]
    continuations = [[ids("7+5=2;", "none"), ids("7+5=12;", "none")],   # the second is right
                     [ids("15+9=24;", "none"), ids("15+9=14")],         # ';' after the last step is wrong
                     [[SEP], [SEP]]]                                    # no rejected step: ignored
    tokens, mask = _padded([c for rows in continuations for c in rows], 9)
    tokens, mask = tokens.reshape(3, 2, -1), mask.reshape(3, 2, -1)
    chosen, stats = choose_steps(problems, wrong, tokens, mask)
    assert chosen == [correct_step_ids(OPS, 0), None, None]
    assert stats == {"prefixes": 2, "continuations_correct_rate": 0.25, "dropped_no_correct_step": 1,
                     "chosen_gold_fallback": 0}
    chosen, stats = choose_steps(problems, wrong, tokens, mask, gold_fallback=True)
    assert chosen == [correct_step_ids(OPS, 0), correct_step_ids(OPS, 2), None]
    assert stats["dropped_no_correct_step"] == 0 and stats["chosen_gold_fallback"] == 1


# ---------------------------------------------------------------------------------------------------------------
# The pair arrays and the loss.


def _pairs():
    """Three step pairs of different prefix and step lengths."""
    samples = ["7+5=2;2+3=5;5+9=14", "7+5=12;12+3=16;16+9=25", "7+5=12;12+3=15"]
    wrong = [locate_first_wrong_step(OPS, ids(s)) for s in samples]
    prompts = [arith.prompt_text(OPS) + w.prefix for w in wrong]
    return prompts, [w.rejected for w in wrong], [correct_step_ids(OPS, w.index) for w in wrong]


def test_pair_arrays_mask_the_step_tokens_only():
    prompts, rejected, chosen = _pairs()
    a = step_pair_arrays(prompts, rejected, chosen, width=32)
    np.testing.assert_array_equal(a["prefix_lengths"], [8, 15, 15])
    np.testing.assert_array_equal(a["chosen_step_lengths"], [7, 8, 8])
    np.testing.assert_array_equal(a["rejected_step_lengths"], [6, 8, 8])
    for side, steps in (("chosen", chosen), ("rejected", rejected)):
        tokens, completion = a[f"{side}_tokens"], a[f"{side}_completion_mask"]
        assert tokens.shape == completion.shape == (3, 32)
        for b in range(3):
            assert TOK.decode(tokens[b][a[f"{side}_attention_mask"][b] > 0]) == TOK.decode(
                TOK.encode(prompts[b]) + list(steps[b]))
            assert tuple(tokens[b][completion[b] > 0]) == tuple(steps[b])  # the step tokens, nothing else
            assert np.all(tokens[b][a[f"{side}_attention_mask"][b] == 0] == TOK.PAD_ID)
        np.testing.assert_array_equal(completion, step_mask(a["prefix_lengths"], a[f"{side}_step_lengths"], 32))
    assert step_pair_arrays(prompts, rejected, chosen)["chosen_tokens"].shape == (3, 23)  # the longest row
    with pytest.raises(ValueError, match="width=20 is shorter than the longest"):
        step_pair_arrays(prompts, rejected, chosen, width=20)
    with pytest.raises(ValueError, match="rejected step 1 is empty"):
        step_pair_arrays(prompts, [rejected[0], (), rejected[2]], chosen)
    with pytest.raises(ValueError, match="they must be as many"):
        step_pair_arrays(prompts, rejected[:2], chosen)


def test_sigmoid_dpo_on_step_pairs_is_step_dpo_on_the_same_logprobs():
    """The registered sigmoid objective on the pair arrays' completion masks equals `step_dpo` on the prefix and step
    lengths for arbitrary per-token log-probs, loss and gradient; the log-probs outside the step get no gradient."""
    prompts, rejected, chosen = _pairs()
    a = step_pair_arrays(prompts, rejected, chosen, width=32)
    rng = np.random.default_rng(1)
    names = ("policy_chosen", "policy_rejected", "reference_chosen", "reference_rejected")
    logps = {k: jnp.asarray(rng.normal(-1.0, 3.0, (3, 32)), jnp.float32) for k in names}

    def sigmoid(logps, beta=0.4):
        inputs = PairwiseInputs(**logps, chosen_mask=jnp.asarray(a["chosen_completion_mask"]),
                                rejected_mask=jnp.asarray(a["rejected_completion_mask"]), extras={})
        return compute_objective("sigmoid", inputs, beta=beta)[0]

    def stepwise(logps):
        return step_dpo(**logps, prefix_lengths=a["prefix_lengths"], chosen_step_lengths=a["chosen_step_lengths"],
                        rejected_step_lengths=a["rejected_step_lengths"], beta=0.4)[0]

    (got, got_grad), (want, want_grad) = (jax.value_and_grad(f)(logps) for f in (sigmoid, stepwise))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for name in names:
        np.testing.assert_allclose(got_grad[name], want_grad[name], rtol=1e-5, atol=1e-8)
        side = name.split("_")[1]
        outside = a[f"{side}_completion_mask"] == 0
        assert np.all(np.asarray(want_grad[name])[outside] == 0) and np.any(np.asarray(want_grad[name]) != 0)
    assert abs(float(want) - float(sigmoid(logps, beta=2.0))) > 1e-3  # beta matters: 0.4 really reached both


def test_the_dpo_trainers_loss_on_step_pairs_is_step_dpo():
    """What `kit.train_dpo` trains with dpo.objective=sigmoid, beta 0.4, sft_weight 0 (`dpo_loss_fn`, the
    reference log-probs precomputed in the batch) is `step_dpo` on the model's per-token log-probs (and with the
    previous test, whose gradients agree in the log-probs, the parameter gradients agree by the chain rule)."""
    cfg = ModelConfig(vocab_size=16, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, mlp_dim=64,
                      max_len=32)
    model, apply = DecoderLM(cfg), logits_fn(DecoderLM(cfg))
    params = nn.meta.unbox(init_params(cfg, jax.random.key(0)))
    reference = nn.meta.unbox(init_params(cfg, jax.random.key(1)))
    prompts, rejected, chosen = _pairs()
    a = step_pair_arrays(prompts, rejected, chosen, width=32)
    batch = {k: jnp.asarray(v) for k, v in a.items()}

    @jax.jit
    def both(params, reference, batch):
        def logps(p, side):
            return token_logprobs(apply(p, batch[f"{side}_tokens"], batch[f"{side}_attention_mask"]),
                                  batch[f"{side}_tokens"])

        batch = dict(batch, reference_chosen=logps(reference, "chosen"),
                     reference_rejected=logps(reference, "rejected"))
        total, (pairs, _) = dpo_loss_fn(model, "sigmoid", sft_weight=0.0, beta=0.4)(params, None, batch)
        expected = step_dpo(logps(params, "chosen"), logps(params, "rejected"), batch["reference_chosen"],
                            batch["reference_rejected"], batch["prefix_lengths"], batch["chosen_step_lengths"],
                            batch["rejected_step_lengths"], beta=0.4)[0]
        return total / pairs, expected

    got, want = both(params, reference, batch)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert abs(float(want) - np.log(2.0)) > 1e-4  # policy != reference: a non-trivial loss


# ---------------------------------------------------------------------------------------------------------------
# Sampling and the whole construction.


def test_sampled_steps_stop_at_the_separator_or_eos():
    cfg = ModelConfig(vocab_size=16, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, mlp_dim=64,
                      max_len=32)
    params = nn.meta.unbox(init_params(cfg, jax.random.key(0)))
    prompts = ["7+5+3+9=", "7+5+3+9=7+5=12;"]
    tokens, mask = sample_steps(params, cfg, prompts, 16, jax.random.key(2), max_tokens=9, batch_size=8)
    assert tokens.shape == mask.shape == (2, 16, 9)
    ended = 0
    for row, m in zip(tokens.reshape(-1, 9), mask.reshape(-1, 9)):
        step = list(row[m > 0])
        assert step and TOK.PAD_ID not in step
        assert all(t not in (SEP, EOS) for t in step[:-1])  # nothing after the first ';' or EOS
        ended += step[-1] in (SEP, EOS)
        assert step[-1] in (SEP, EOS) or len(step) == 9
    assert ended > 0
    with pytest.raises(ValueError, match="samples must be an integer >= 1"):
        sample_steps(params, cfg, prompts, 0, jax.random.key(2), max_tokens=9, batch_size=8)


def test_build_step_pairs_counts_every_prompt(monkeypatch):
    """With a scripted sampler: pairs + prompts with only correct samples + prefixes without a correct step = all
    prompts; the chosen steps and prefixes land in the arrays, with each pair's prompt and step index."""
    problems = np.array([OPS, [1, 2, 3, 4], [9, 9, 9, 9]], np.int32)
    samples = [["7+5=2;2+3=5;5+9=14"], ["1+2=3;3+3=6;6+4=10"], ["9+9=18;18+9=17;17+9=26"]]
    tokens, mask = _padded([ids(s) for rows in samples for s in rows], 30)
    seen = {}

    def scripted(params, model_cfg, prompts, samples, rng, **kwargs):
        seen["prompts"], seen["max_tokens"] = list(prompts), kwargs["max_tokens"]
        rows = [[ids("7+5=12;", "none"), ids("7+5=2;", "none")],  # OPS: a correct step
                [ids("18+9=17;", "none"), ids("18+9=17;", "none")]]  # 9999: none correct
        out, out_mask = _padded([r for pair in rows for r in pair], kwargs["max_tokens"])
        return out.reshape(2, 2, -1), out_mask.reshape(2, 2, -1)

    monkeypatch.setattr(step_pairs, "sample_steps", scripted)
    arrays, stats = build_step_pairs(None, None, problems, tokens.reshape(3, 1, -1), mask.reshape(3, 1, -1),
                                     samples_per_prefix=2, rng=jax.random.key(0), batch_size=4)
    assert seen == {"prompts": ["7+5+3+9=", "9+9+9+9=9+9=18;"], "max_tokens": 9}  # "27+9=36" + ';' + 1
    assert stats["pairs"] == 1 and stats["dropped_all_correct"] == 1 and stats["dropped_no_correct_step"] == 1
    assert stats["pairs"] + stats["dropped_all_correct"] + stats["dropped_no_correct_step"] == stats["prompts"] == 3
    assert stats["pairs_per_step_index"] == [1, 0, 0]
    np.testing.assert_array_equal(arrays["prompt_index"], [0])
    np.testing.assert_array_equal(arrays["step_index"], [0])
    row = arrays["chosen_tokens"][0][arrays["chosen_attention_mask"][0] > 0]
    assert TOK.decode(row) == "7+5+3+9=7+5=12;"
    assert TOK.decode(arrays["rejected_tokens"][0][arrays["rejected_completion_mask"][0] > 0]) == "7+5=2;"
