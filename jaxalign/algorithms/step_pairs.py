"""Step-DPO's step-level preference pairs on ARITH (Lai et al., 2024, "Step-DPO: Step-wise Preference Optimization
for Long-chain Reasoning"; docs/algorithms.md, from the authors' code). Host-side NumPy, plus one sampling call.

A pair is built from a graded sample of the policy that goes wrong somewhere in its chain:

- the prompt is x + the correct prefix steps: the problem's prompt, then the steps before the first wrong one, each
  with the ';' that closes it (the text up to and including the ';' after the last correct step);
- rejected is the first wrong step as the sample wrote it: its text plus what closed it (';', or EOS when the sample
  ended there, or nothing when the sampler's budget ran out inside it);
- chosen is a correct step for the same prefix, sampled from the policy: `samples_per_prefix` continuations of the
  prefix, each decoded until ';' or EOS, and the first correct one is kept. A prefix without a correct continuation
  gives no pair and is counted (`dropped_no_correct_step`); with `gold_fallback` the gold step takes its place
  instead (counted as `chosen_gold_fallback`). Off by default: the paper's chosen steps are the policy's own.

Steps are token spans that include their terminator, because on ARITH the terminator is part of what a step gets
right or wrong: step j is correct iff its text is the true step j and it is closed by ';' (j < n - 1) or EOS (the last
step). So the first wrong step is `judges.first_wrong_step` of the oracle's grade (the first step whose text is wrong)
except in two cases where every written step is right but one is closed wrongly ("wrong_terminator"): the sample
stopped early (EOS after step j - 1 < n - 1, where ';' belonged) or ran on after the last step (';' instead of EOS).
Then the rejected step is that correctly written but wrongly closed step, and the chosen one is the same text with
the right terminator. A sample that the sampler's budget cut off right after a correct ';' wrote nothing at its wrong
step ("cut_off"): it has nothing to reject, and the next incorrect sample of the prompt is used. A completion the
oracle grades correct has no wrong step (recaps of the right answer included); otherwise anything written after the
last step counts against that step's terminator, so these pairs assume demonstrations without recaps
(`arith.ArithConfig.max_recaps` = 0), where a correct answer ends right after its last step.

The trainer's pair arrays (`step_pair_arrays`) lay every sequence out right-padded, prompt + prefix + step, so the
step of pair b occupies positions prefix_lengths[b] .. prefix_lengths[b] + step_length - 1 and the completion mask is
`jaxalign.losses.iterative.step_mask` of those lengths: the step tokens only. The registered sigmoid DPO objective on
these arrays (the main job's DPO phase, `dpo.objective=sigmoid`, `dpo.sft_weight=0`) is then exactly the `step_dpo`
loss on the same per-token log-probs (tested).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from jaxalign.losses.iterative import step_mask
from jaxalign.models.llama import ModelConfig
from jaxalign.sampling import SamplingConfig, generate
from jaxalign.tasks import arith, judges
from jaxalign.tasks.tokenizer import CharTokenizer

SEPARATOR = ";"
WRONG_KINDS = ("wrong_step", "wrong_terminator")  # the kinds that give a rejected step; "cut_off" gives none

_TOK = CharTokenizer()
_SEPARATOR_ID = _TOK.encode(SEPARATOR)[0]


@dataclasses.dataclass(frozen=True)
class WrongStep:
    """Where a sample first goes wrong, in Step-DPO's terms (module docstring).

    index: the chain step j (0-based) that is wrong. kind: "wrong_step" (its text is wrong), "wrong_terminator"
    (its text is right, its terminator is not) or "cut_off" (the sample ended, without EOS, right after the ';' of
    step j - 1: it wrote nothing at step j). prefix: the correct steps 0 .. j-1, each followed by ';' ("" for
    j = 0). rejected: the sample's token ids of step j, terminator included (at least one id; none for "cut_off")."""

    index: int
    kind: str
    prefix: str
    rejected: tuple[int, ...]


def correct_step_ids(operands: Any, index: int) -> tuple[int, ...]:
    """The token ids of the one correct step `index` of `operands`' chain: the true step text and its terminator,
    ';' before the last step and EOS after it (the gold step)."""
    steps = arith.solution_steps(operands)
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < len(steps):
        raise ValueError(f"correct_step_ids: index must be a step of the {len(steps)}-step chain of "
                         f"{arith.prompt_text(operands)!r}, got {index!r}")
    terminator = _SEPARATOR_ID if index < len(steps) - 1 else _TOK.EOS_ID
    return tuple(_TOK.encode(steps[index])) + (terminator,)


def locate_first_wrong_step(operands: Any, completion_ids: Sequence[int]) -> WrongStep | None:
    """The first wrong step of a sampled completion (its token ids, EOS included when it ended with one, no
    padding), or None when the oracle grades it correct and it ended with EOS (module docstring)."""
    ids = [int(t) for t in completion_ids]
    if not ids:
        raise ValueError(f"locate_first_wrong_step: the completion of {arith.prompt_text(operands)!r} is empty; pass "
                         f"its ids up to the end of its mask (a sample has at least one token)")
    text = _TOK.decode(ids)
    ended = _TOK.EOS_ID in ids
    grade = arith.grade(operands, text)
    if grade.correct and ended:
        return None
    parts = text.split(SEPARATOR)
    first = judges.first_wrong_step(grade)
    if first is not None and len(parts) > first:
        index, kind = first, "wrong_step"  # the sample wrote step `first` after a correct, ';'-closed prefix
    else:
        # Every written step is right, but the sample closed one wrongly: it stopped where ';' belonged (then
        # len(parts) == first), or it went on after the last step (first is None).
        index, kind = (first - 1 if first is not None else grade.num_steps - 1), "wrong_terminator"
    if index + 1 < len(parts):
        terminator = [_SEPARATOR_ID]
    else:
        terminator = [_TOK.EOS_ID] if ended else []
    rejected = tuple(_TOK.encode(parts[index])) + tuple(terminator)
    return WrongStep(index=index, kind=kind if rejected else "cut_off",
                     prefix="".join(p + SEPARATOR for p in parts[:index]), rejected=rejected)


def masked_ids(tokens: np.ndarray, mask: np.ndarray) -> list[int]:
    """The ids of one sampled row where its mask is 1 (the sampler's output is PAD after the end)."""
    return [int(t) for t in np.asarray(tokens)[np.asarray(mask) > 0]]


def rejected_steps(problems: np.ndarray, completions: np.ndarray, masks: np.ndarray
                   ) -> tuple[list[WrongStep | None], dict[str, int]]:
    """One rejected step per prompt: the first wrong step of its first incorrect sample (samples in index order)
    that has one (not "cut_off").

    problems [P, ops]; completions / masks [P, K, C] (K samples per prompt, as `arith_dpo.on_policy_samples` draws
    them, reshaped). Returns (per prompt a `WrongStep` or None, stats: prompts, dropped_all_correct (all K samples
    correct), dropped_only_cut_off (the incorrect samples were all cut off), and per kind of WRONG_KINDS how many
    rejected steps are of it)."""
    completions, masks = np.asarray(completions), np.asarray(masks)
    if completions.ndim != 3 or completions.shape != masks.shape or len(completions) != len(problems):
        raise ValueError(f"rejected_steps: completions and masks must both be [prompts={len(problems)}, K, C], got "
                         f"{completions.shape} and {masks.shape}")
    found: list[WrongStep | None] = []
    all_correct = only_cut_off = 0
    for operands, rows, row_masks in zip(np.asarray(problems), completions, masks):
        located = [locate_first_wrong_step(operands, masked_ids(tokens, mask)) for tokens, mask in zip(rows, row_masks)]
        usable = [w for w in located if w is not None and w.kind != "cut_off"]
        found.append(usable[0] if usable else None)
        all_correct += all(w is None for w in located)
        only_cut_off += not usable and any(w is not None for w in located)
    stats = {"prompts": len(found), "dropped_all_correct": all_correct, "dropped_only_cut_off": only_cut_off}
    stats.update({f"rejected_{kind}": sum(w is not None and w.kind == kind for w in found) for kind in WRONG_KINDS})
    return found, stats


def max_step_tokens(num_operands: int) -> int:
    """Tokens a sampled step may take: the longest true step of any chain (all operands 9), its terminator, and one
    token of slack (a continuation still running past the longest correct step is wrong, and is seen to be)."""
    return max(len(s) for s in arith.solution_steps([9] * num_operands)) + 2


def sample_steps(params: Any, model_cfg: ModelConfig, prompts: Sequence[str], samples: int, rng: jax.Array, *,
                 temperature: float = 1.0, top_k: int = 0, max_tokens: int, batch_size: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """`samples` continuations of every prompt text (x + prefix) from the policy, each one step: decoded with the
    KV-cached sampler until ';' (kept) or EOS or `max_tokens`. Returns (tokens, masks), each [len(prompts), samples,
    max_tokens], PAD / 0 after the end."""
    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 1:
        raise ValueError(f"sample_steps: samples must be an integer >= 1, got {samples!r}")
    if not prompts:
        empty = np.zeros((0, samples, max_tokens), np.int32)
        return empty, empty.copy()
    sampling = SamplingConfig(max_new_tokens=max_tokens, temperature=temperature, top_k=top_k,
                              stop=((_SEPARATOR_ID,),), keep_stop=True)
    width = max(len(p) for p in prompts)
    prompt_tokens, prompt_mask = arith.encode_prompts(_TOK, list(prompts), pad_to=width)
    prompt_tokens, prompt_mask = (np.repeat(a, samples, axis=0) for a in (prompt_tokens, prompt_mask))
    out_tokens, out_masks = [], []
    for start in range(0, len(prompt_tokens), batch_size):
        rng, sub = jax.random.split(rng)
        tokens, mask = generate(params, prompt_tokens[start:start + batch_size], prompt_mask[start:start + batch_size],
                                sub, cfg=model_cfg, sampling=sampling, eos_id=_TOK.EOS_ID, pad_id=_TOK.PAD_ID,
                                num_tokens=_TOK.vocab_size)
        out_tokens.append(np.asarray(tokens))
        out_masks.append(np.asarray(mask))
    shape = (len(prompts), samples, max_tokens)
    return np.concatenate(out_tokens).reshape(shape), np.concatenate(out_masks).reshape(shape)


def choose_steps(problems: np.ndarray, wrong: Sequence[WrongStep | None], continuations: np.ndarray,
                 masks: np.ndarray, gold_fallback: bool = False) -> tuple[list[tuple[int, ...] | None], dict]:
    """The chosen step of every prompt with a rejected step: the first of its sampled continuations [P, K, S] that is
    the correct step (`correct_step_ids`), or with `gold_fallback` the gold step when none is; None otherwise.

    `continuations[p]` are the samples for prompt p's prefix (rows of prompts without a rejected step are ignored).
    stats: prefixes, continuations_correct_rate (over all sampled continuations), dropped_no_correct_step (prefixes
    without a correct continuation and no fallback), chosen_gold_fallback."""
    continuations, masks = np.asarray(continuations), np.asarray(masks)
    if continuations.ndim != 3 or continuations.shape != masks.shape or len(continuations) != len(wrong):
        raise ValueError(f"choose_steps: continuations and masks must both be [prompts={len(wrong)}, K, S], got "
                         f"{continuations.shape} and {masks.shape}")
    chosen: list[tuple[int, ...] | None] = []
    correct_count = sampled = no_correct = fallback = 0
    for operands, w, rows, row_masks in zip(np.asarray(problems), wrong, continuations, masks):
        if w is None:
            chosen.append(None)
            continue
        target = correct_step_ids(operands, w.index)
        hits = [tuple(masked_ids(t, m)) == target for t, m in zip(rows, row_masks)]
        correct_count += sum(hits)
        sampled += len(hits)
        if any(hits):
            chosen.append(target)
        elif gold_fallback:
            chosen.append(target)
            fallback += 1
        else:
            chosen.append(None)
            no_correct += 1
    stats = {"prefixes": sum(w is not None for w in wrong),
             "continuations_correct_rate": correct_count / sampled if sampled else 0.0,
             "dropped_no_correct_step": no_correct, "chosen_gold_fallback": fallback}
    return chosen, stats


def step_pair_arrays(prompts: Sequence[str], rejected: Sequence[Sequence[int]], chosen: Sequence[Sequence[int]],
                     width: int | None = None) -> dict[str, np.ndarray]:
    """The trainer's pair arrays for step pairs: for each side chosen_/rejected_ tokens, attention_mask and
    completion_mask [pairs, width] int32 (prompt + prefix + step, right-padded with PAD; the completion mask is
    `step_mask`: 1 on the step tokens only), plus prefix_lengths, chosen_step_lengths and rejected_step_lengths
    [pairs] int32, the arguments of `jaxalign.losses.iterative.step_dpo`.

    prompts[b] is pair b's x + prefix text; chosen[b] / rejected[b] its steps' token ids (terminator included).
    width defaults to the longest sequence."""
    if not len(prompts) == len(rejected) == len(chosen):
        raise ValueError(f"step_pair_arrays: got {len(prompts)} prompts, {len(rejected)} rejected and {len(chosen)} "
                         f"chosen steps; they must be as many")
    prefix = [_TOK.encode(p) for p in prompts]
    lengths = {side: np.array([len(s) for s in steps], np.int32) for side, steps in (("chosen", chosen),
                                                                                      ("rejected", rejected))}
    for side, steps in lengths.items():
        if np.any(steps < 1):
            raise ValueError(f"step_pair_arrays: {side} step {int(np.argmin(steps))} is empty; a step has >= 1 token")
    prefix_lengths = np.array([len(p) for p in prefix], np.int32)
    longest = int(max((prefix_lengths + np.maximum(lengths["chosen"], lengths["rejected"])).max(initial=0), 1))
    width = longest if width is None else width
    if width < longest:
        raise ValueError(f"step_pair_arrays: width={width} is shorter than the longest prompt + prefix + step "
                         f"({longest} tokens)")
    arrays = {"prefix_lengths": prefix_lengths}
    for side, steps in (("chosen", chosen), ("rejected", rejected)):
        tokens = np.full((len(prefix), width), _TOK.PAD_ID, np.int32)
        for b, (p, s) in enumerate(zip(prefix, steps)):
            row = list(p) + [int(t) for t in s]
            tokens[b, :len(row)] = row
        arrays[f"{side}_tokens"] = tokens
        arrays[f"{side}_attention_mask"] = (np.arange(width)[None, :] <
                                            (prefix_lengths + lengths[side])[:, None]).astype(np.int32)
        arrays[f"{side}_completion_mask"] = np.asarray(step_mask(prefix_lengths, lengths[side], width), np.int32)
        arrays[f"{side}_step_lengths"] = lengths[side]
    return arrays


def build_step_pairs(params: Any, model_cfg: ModelConfig, problems: np.ndarray, completions: np.ndarray,
                     masks: np.ndarray, *, samples_per_prefix: int, rng: jax.Array, batch_size: int,
                     temperature: float = 1.0, top_k: int = 0, gold_fallback: bool = False
                     ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Step-DPO pairs (module docstring) from graded policy samples: completions / masks [P, K, C] for problems
    [P, ops]; the chosen steps are sampled from `params` (the same policy). Returns (`step_pair_arrays` of the kept
    pairs plus their `prompt_index` into `problems` and `step_index` (the chain step of the pair), stats).

    stats: prompts, pairs, dropped_all_correct (no incorrect sample), dropped_no_correct_step (no correct sampled
    continuation, no fallback), chosen_gold_fallback, rejected_wrong_step / rejected_wrong_terminator,
    continuations_correct_rate, pairs_per_step_index (how many pairs' first wrong step is step j, j = 0 .. n-1)."""
    problems = np.asarray(problems)
    wrong, stats = rejected_steps(problems, completions, masks)
    todo = [p for p, w in enumerate(wrong) if w is not None]
    prompts = [arith.prompt_text(problems[p]) + wrong[p].prefix for p in todo]
    num_operands = problems.shape[1]
    sampled, sampled_masks = sample_steps(params, model_cfg, prompts, samples_per_prefix, rng,
                                          temperature=temperature, top_k=top_k,
                                          max_tokens=max_step_tokens(num_operands), batch_size=batch_size)
    chosen, choice_stats = choose_steps(problems[todo], [wrong[p] for p in todo], sampled, sampled_masks,
                                        gold_fallback)
    keep = [i for i, c in enumerate(chosen) if c is not None]
    arrays = step_pair_arrays([prompts[i] for i in keep], [wrong[todo[i]].rejected for i in keep],
                              [chosen[i] for i in keep])
    arrays["prompt_index"] = np.array([todo[i] for i in keep], np.int32)
    arrays["step_index"] = np.array([wrong[todo[i]].index for i in keep], np.int32)
    stats.update(choice_stats, pairs=len(keep),
                 pairs_per_step_index=np.bincount(arrays["step_index"], minlength=num_operands - 1).tolist())
    return arrays, stats
