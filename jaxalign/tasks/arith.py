"""ARITH: a built-in synthetic task where imitation learns a systematic error that preference learning can fix.

A prompt is a sum of single digits, "a+b+c+d=" (`num_operands` digits, default 4). The answer is the chain of
partial sums, "a+b=s1;s1+c=s2;s2+d=s3", followed by an EOS token (EOS is a token, not part of the text).

Demonstrations are noisy in one specific way: on a step x+y that needs a carry ((x % 10) + y >= 10), the
demonstrator drops the carry with probability `carry_drop_prob` (writing e.g. 7+5=2, 12+9=11) and carries on from
the value it wrote, so every demonstration is consistent arithmetic except for the dropped carries. Dropping a carry
never changes the units digit, so the steps that need a carry are the same in a noisy chain as in the correct one.

Why this design: with carry_drop_prob > 0.5 the most likely demonstration of every carry step drops the carry, so
an SFT policy that imitates the demonstrations and decodes greedily drops carries, and its final answer is wrong on
exactly the prompts that need at least one carry, a known share `carry_share(num_operands)` of all prompts. Yet
sampling from that policy still produces the correct carry about (1 - carry_drop_prob) of the time, so the oracle
`grade` can rank samples into preference pairs whose preferred side carries correctly, and preference learning can
remove the error that imitation baked in.

Verbosity (the length-bias task): a demonstration may end with `recaps`, restatements of its final answer
(";24" after "...;15+9=24"), as many as `max_recaps`, each further one with probability `recap_prob`. A recap
never changes correctness (the oracle accepts any number of recaps that repeat the written answer), so response length
and quality are decoupled: a judge that rewards length prefers verbose answers whether or not they are right.

Everything here is pure Python + NumPy; randomness comes only from explicitly passed `np.random.Generator`s.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import numpy as np

from jaxalign.tasks.tokenizer import CharTokenizer
from jaxalign.validation import check_int, check_probability

_STEP_RE = re.compile(r"[0-9]+\+[0-9]+=[0-9]+")
_DIGITS_RE = re.compile(r"[0-9]+")

# `score` weights (see `score`).
CORRECT_BONUS = 1.0
MALFORMED_PENALTY = 0.5


@dataclasses.dataclass(frozen=True)
class ArithConfig:
    """The ARITH task: `num_operands` single digits per prompt (>= 2); demonstrations drop each needed carry with
    probability `carry_drop_prob` (in [0, 1]) and end with up to `max_recaps` recaps of the answer, each further one
    with probability `recap_prob` (max_recaps=0: never, the main job)."""

    num_operands: int = 4  # single digits per prompt (>= 2): 10**num_operands distinct problems
    carry_drop_prob: float = 0.8  # a demonstration drops each carry it needs with this probability (the noise)
    max_recaps: int = 0  # at most this many recaps of the answer end a demonstration (0: none)
    recap_prob: float = 0.4  # each recap after the first is added with this probability

    def __post_init__(self):
        check_int("task", "num_operands", self.num_operands, minimum=2)
        check_probability("task", "carry_drop_prob", self.carry_drop_prob)
        check_probability("task", "recap_prob", self.recap_prob)
        check_int("task", "max_recaps", self.max_recaps, minimum=0)


@dataclasses.dataclass(frozen=True)
class Grade:
    """The oracle's verdict on one completion.

    A completion is a chain of `num_steps` ';'-separated steps, then any number of recaps: ';' + the chain's written
    answer (the text after its last '='). Recaps are neutral: they change none of the fields but `recaps`.

    correct: the chain is exactly the correct chain (`solution_text(operands)`) and every part after it is a recap.
    final_correct: the chain's written answer is exactly the decimal true total, and every part after it is a recap.
    correct_steps: number of leading ';'-separated steps equal to the true step strings (stops at the first mismatch).
    num_steps: num_operands - 1.
    well_formed: exactly `num_steps` ';'-separated steps, each of the form "x+y=z" with decimal x, y, z, followed
        only by recaps (syntax only: a well-formed chain may be wrong arithmetic).
    recaps: the number of recaps after the chain (0 when anything after the chain is not a recap).
    """

    correct: bool
    final_correct: bool
    correct_steps: int
    num_steps: int
    well_formed: bool
    recaps: int = 0


# --------------------------------------------------------------------------------------------------------------
# Validation helpers.


def _check_num_operands(num_operands, name: str) -> None:
    if isinstance(num_operands, bool) or not isinstance(num_operands, (int, np.integer)) or num_operands < 2:
        raise ValueError(f"{name} must be an integer >= 2, got {num_operands!r}")


def _check_prob(prob, name: str) -> None:
    if isinstance(prob, bool) or not isinstance(prob, (int, float, np.floating, np.integer)) or not 0.0 <= prob <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {prob!r}")


def _as_digits(operands) -> tuple[int, ...]:
    """The operands as a tuple of Python ints, checked to be >= 2 single digits."""
    array = np.asarray(operands)
    if (
        array.ndim != 1
        or len(array) < 2
        or not np.issubdtype(array.dtype, np.integer)
        or np.any((array < 0) | (array > 9))
    ):
        raise ValueError(f"operands must be a 1-D sequence of >= 2 integer digits in 0..9, got {operands!r}")
    return tuple(int(d) for d in array)


# --------------------------------------------------------------------------------------------------------------
# Problems and splits.


def all_problems(num_operands: int) -> np.ndarray:
    """Every problem, int32 [10**num_operands, num_operands]; row i holds the digits of i, most significant first."""
    _check_num_operands(num_operands, "num_operands")
    index = np.arange(10**num_operands, dtype=np.int64)[:, None]
    place = 10 ** np.arange(num_operands - 1, -1, -1, dtype=np.int64)[None, :]
    return ((index // place) % 10).astype(np.int32)


def split_problems(num_operands: int, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint (train, eval) problem sets; eval holds round(eval_fraction * 10**num_operands) problems.

    Which problems go to eval depends only on `seed`; both sets come back in `all_problems` order (shuffling for
    training is the data iterator's job). Raises ValueError if either side would be empty.
    """
    problems = all_problems(num_operands)
    if isinstance(eval_fraction, bool) or not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction!r}")
    total = len(problems)
    num_eval = int(round(eval_fraction * total))
    if not 0 < num_eval < total:
        raise ValueError(
            f"eval_fraction={eval_fraction!r} of {total} problems gives {num_eval} eval problems; both splits must "
            f"be non-empty"
        )
    is_eval = np.zeros(total, dtype=bool)
    is_eval[np.random.default_rng(seed).permutation(total)[:num_eval]] = True
    return problems[~is_eval], problems[is_eval]


# --------------------------------------------------------------------------------------------------------------
# Arithmetic and carry semantics.


def step_needs_carry(x: int, y: int) -> bool:
    """Whether adding the digit y to x carries into the tens: (x % 10) + y >= 10."""
    return (x % 10) + y >= 10


def add_step(x: int, y: int, drop_carry: bool = False) -> int:
    """x + y, or with `drop_carry` the sum written without the carry: (x // 10) * 10 + ((x % 10) + y) % 10.

    Dropping is a no-op on steps that need no carry.
    """
    if drop_carry:
        return (x // 10) * 10 + ((x % 10) + y) % 10
    return x + y


def _chain(digits: Sequence[int], drops: Sequence[bool]) -> list[str]:
    """Step strings of the chain over `digits`, dropping the carry on step k when drops[k] (and it needs one)."""
    steps = []
    total = digits[0]
    for y, drop in zip(digits[1:], drops):
        written = add_step(total, y, drop_carry=drop)
        steps.append(f"{total}+{y}={written}")
        total = written
    return steps


def prompt_text(operands) -> str:
    """The prompt, e.g. "7+5+3+9="."""
    return "+".join(str(d) for d in _as_digits(operands)) + "="


def solution_steps(operands) -> list[str]:
    """The correct chain's steps, e.g. [7, 5, 3, 9] -> ["7+5=12", "12+3=15", "15+9=24"]."""
    digits = _as_digits(operands)
    return _chain(digits, [False] * (len(digits) - 1))


def solution_text(operands) -> str:
    """The correct completion text (without EOS): the steps joined by ';'."""
    return ";".join(solution_steps(operands))


def carry_steps(operands) -> list[bool]:
    """For each step of the chain, whether it needs a carry (the same for the correct and any noisy chain)."""
    digits = _as_digits(operands)
    flags = []
    total = digits[0]
    for y in digits[1:]:
        flags.append(step_needs_carry(total, y))
        total += y
    return flags


def needs_carry(operands) -> bool:
    """Whether the correct chain has at least one carry step."""
    return any(carry_steps(operands))


def noisy_solution_text(operands, rng: np.random.Generator, carry_drop_prob: float, max_recaps: int = 0,
                        recap_prob: float = 0.4) -> str:
    """A demonstration: the chain with each needed carry dropped independently with prob. `carry_drop_prob`, then
    `num_recaps(rng, max_recaps, recap_prob)` recaps of its written answer.

    Draws one uniform number from `rng` per carry step (none on the other steps), then the recap draws (none when
    max_recaps is 0, so the main job's demonstrations do not depend on the recap settings).
    """
    _check_prob(carry_drop_prob, "carry_drop_prob")
    digits = _as_digits(operands)
    drops = [needed and bool(rng.random() < carry_drop_prob) for needed in carry_steps(digits)]
    steps = _chain(digits, drops)
    answer = steps[-1].rsplit("=", 1)[1]
    return ";".join(steps + [answer] * num_recaps(rng, max_recaps, recap_prob))


def num_recaps(rng: np.random.Generator, max_recaps: int, recap_prob: float) -> int:
    """How many recaps a demonstration ends with: each of up to `max_recaps` is added with probability `recap_prob`
    given the previous one was (a truncated geometric law). With recap_prob < 0.5 greedy decoding of a policy that
    imitates the demonstrations stops after the chain, while its samples still vary in length; a policy taught to be
    verbose starts writing recaps under greedy decoding too."""
    _check_prob(recap_prob, "recap_prob")
    count = 0
    while count < max_recaps and rng.random() < recap_prob:
        count += 1
    return count


def dropped_carry_solution_text(operands) -> str:
    """The demonstration with every carry dropped: what a greedy SFT policy writes when carry_drop_prob > 0.5."""
    digits = _as_digits(operands)
    return ";".join(_chain(digits, [True] * (len(digits) - 1)))


def carry_share(num_operands: int) -> float:
    """The fraction of all 10**num_operands problems whose correct chain has at least one carry (by enumeration).

    This is the share of prompts on which a policy that always drops carries gets the final answer wrong.
    """
    problems = all_problems(num_operands).astype(np.int64)
    before = np.cumsum(problems, axis=1)[:, :-1]  # running total before each step
    carries = (before % 10) + problems[:, 1:] >= 10
    return float(np.count_nonzero(carries.any(axis=1))) / len(problems)


# --------------------------------------------------------------------------------------------------------------
# The oracle.


def grade(operands, completion_text: str) -> Grade:
    """Grade a completion (decoded text, EOS excluded) against the true chain; never raises on garbage text.

    Matching is exact on strings: no whitespace, no leading zeros, nothing after the last step but recaps.
    """
    true_steps = solution_steps(operands)
    total = sum(_as_digits(operands))
    text = completion_text if isinstance(completion_text, str) else ""
    parts = text.split(";")
    chain, tail = parts[: len(true_steps)], parts[len(true_steps) :]
    correct_steps = 0
    for part, true_step in zip(chain, true_steps):
        if part != true_step:
            break
        correct_steps += 1
    chain_text = ";".join(chain)
    answer = chain_text.rsplit("=", 1)[1] if "=" in chain_text else None
    only_recaps = answer is not None and all(part == answer for part in tail)
    well_formed = (len(chain) == len(true_steps) and all(_STEP_RE.fullmatch(p) is not None for p in chain)
                   and only_recaps)
    return Grade(
        correct=chain == true_steps and only_recaps,
        final_correct=answer == str(total) and only_recaps,
        correct_steps=correct_steps,
        num_steps=len(true_steps),
        well_formed=well_formed,
        recaps=len(tail) if only_recaps else 0,
    )


def score(g: Grade) -> float:
    """A scalar for ranking samples of one prompt: correct_steps + CORRECT_BONUS * correct - MALFORMED_PENALTY * (not
    well_formed).

    Range [-0.5, num_steps + 1]. A correct completion scores num_steps + 1, strictly above anything else; among
    the rest, more correct leading steps rank higher, and a malformed completion ranks below a well-formed one with
    the same number of correct steps.
    """
    return float(g.correct_steps) + CORRECT_BONUS * g.correct - MALFORMED_PENALTY * (not g.well_formed)


# --------------------------------------------------------------------------------------------------------------
# Datasets and encoding.


def make_sft_examples(problems, rng: np.random.Generator, carry_drop_prob: float, max_recaps: int = 0,
                      recap_prob: float = 0.4) -> list[tuple[str, str]]:
    """(prompt, noisy demonstration) pairs, one per row of `problems`, in row order."""
    return [(prompt_text(row), noisy_solution_text(row, rng, carry_drop_prob, max_recaps, recap_prob))
            for row in np.asarray(problems)]


def max_completion_chars(config: ArithConfig) -> int:
    """The longest completion text a demonstration of `config` can have: the longest chain (every operand 9, carries
    kept) plus its recaps."""
    longest = solution_text([9] * config.num_operands)
    return len(longest) + config.max_recaps * (1 + len(longest.rsplit("=", 1)[1]))


def _check_fits(length: int, limit: int, limit_name: str, what: str, index: int | None = None) -> None:
    if length > limit:
        where = "" if index is None else f"example {index}: "
        raise ValueError(f"{where}{what} has {length} tokens, more than {limit_name}={limit} (no truncation)")


def encode_example(
    tokenizer: CharTokenizer, prompt: str, completion: str, max_len: int, pad_side: str = "right"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One training sequence: (tokens, attention_mask, completion_mask), each int32 [max_len].

    tokens = prompt, completion, EOS, padded with PAD on `pad_side`; attention_mask is 1 on every non-pad position;
    completion_mask is 1 on the completion tokens and the EOS (the positions a loss should score).
    Raises ValueError if the sequence does not fit in max_len (never truncates).
    """
    if pad_side not in ("right", "left"):
        raise ValueError(f"pad_side must be 'right' or 'left', got {pad_side!r}")
    prompt_ids = tokenizer.encode(prompt)
    completion_ids = tokenizer.encode(completion) + [tokenizer.EOS_ID]
    length = len(prompt_ids) + len(completion_ids)
    _check_fits(length, max_len, "max_len", "prompt + completion + EOS")
    start = 0 if pad_side == "right" else max_len - length
    tokens = np.full(max_len, tokenizer.PAD_ID, dtype=np.int32)
    attention_mask = np.zeros(max_len, dtype=np.int32)
    completion_mask = np.zeros(max_len, dtype=np.int32)
    tokens[start : start + length] = prompt_ids + completion_ids
    attention_mask[start : start + length] = 1
    completion_mask[start + len(prompt_ids) : start + length] = 1
    return tokens, attention_mask, completion_mask


def encode_batch(
    tokenizer: CharTokenizer,
    prompts: Sequence[str],
    completions: Sequence[str],
    max_len: int,
    pad_side: str = "right",
) -> dict[str, np.ndarray]:
    """A batch of training sequences: {"tokens", "attention_mask", "completion_mask"}, each int32 [B, max_len].

    Row b is `encode_example(tokenizer, prompts[b], completions[b], max_len, pad_side)`. Raises ValueError naming
    the example index if a sequence is longer than max_len.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions")
    rows = []
    for index, (prompt, completion) in enumerate(zip(prompts, completions)):
        length = len(prompt) + len(completion) + 1  # one token per character, plus EOS
        _check_fits(length, max_len, "max_len", "prompt + completion + EOS", index)
        rows.append(encode_example(tokenizer, prompt, completion, max_len, pad_side))
    if not rows:
        empty = np.zeros((0, max_len), dtype=np.int32)
        return {"tokens": empty, "attention_mask": empty.copy(), "completion_mask": empty.copy()}
    tokens, attention_mask, completion_mask = (np.stack(column) for column in zip(*rows))
    return {"tokens": tokens, "attention_mask": attention_mask, "completion_mask": completion_mask}


def encode_prompts(tokenizer: CharTokenizer, prompts: Sequence[str], pad_to: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded prompts for the sampler: (tokens, attention_mask), each int32 [B, pad_to], no EOS.

    Left padding puts every prompt's last token in the last column, so sampling appends at the same position for
    the whole batch. Raises ValueError naming the example index if a prompt is longer than pad_to.
    """
    tokens = np.full((len(prompts), pad_to), tokenizer.PAD_ID, dtype=np.int32)
    attention_mask = np.zeros((len(prompts), pad_to), dtype=np.int32)
    for index, prompt in enumerate(prompts):
        ids = tokenizer.encode(prompt)
        _check_fits(len(ids), pad_to, "pad_to", "prompt", index)
        if ids:
            tokens[index, pad_to - len(ids) :] = ids
            attention_mask[index, pad_to - len(ids) :] = 1
    return tokens, attention_mask
