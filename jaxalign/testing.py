"""Small synthetic inputs for tests and notebooks: random preference pairs with unequal completion lengths, and a
float64 NumPy computation of a model's summed completion log-probs to check the jitted code against."""
from __future__ import annotations

import numpy as np

from jaxalign.models.llama import DecoderLM, ModelConfig

PAIR_SIDES = ("chosen", "rejected")


def random_sequences(rng: np.random.Generator, lengths, width: int, prompt_len: int, vocab_size: int,
                     first_token: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, attention_mask, completion_mask) [len(lengths), width] int32: a random prompt of `prompt_len` tokens,
    then a completion of lengths[i] tokens, PAD (0) after it; tokens are drawn from [first_token, vocab_size)."""
    lengths = np.asarray(lengths)
    tokens = rng.integers(first_token, vocab_size, (len(lengths), width)).astype(np.int32)
    attention = (np.arange(width)[None] < prompt_len + lengths[:, None]).astype(np.int32)
    completion = attention * (np.arange(width)[None] >= prompt_len)
    return np.where(attention, tokens, 0).astype(np.int32), attention, completion.astype(np.int32)


def random_pairs(rng: np.random.Generator, chosen_lengths, rejected_lengths, width: int, prompt_len: int,
                 vocab_size: int) -> dict[str, np.ndarray]:
    """Preference pairs in the trainer's layout ({side}_tokens / _attention_mask / _completion_mask) with the
    given completion lengths per side."""
    out = {}
    for side, lengths in zip(PAIR_SIDES, (chosen_lengths, rejected_lengths)):
        arrays = random_sequences(rng, lengths, width, prompt_len, vocab_size)
        out[f"{side}_tokens"], out[f"{side}_attention_mask"], out[f"{side}_completion_mask"] = arrays
    return out


def float64_sequence_logprobs(cfg: ModelConfig, params, tokens, attention, completion) -> np.ndarray:
    """L(y) per row in float64 from the model's logits: the sum over completion tokens t of
    log softmax(logits[t - 1])[x_t]."""
    logits = np.asarray(DecoderLM(cfg).apply({"params": params}, tokens, attention)[0], np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp[:, :-1], np.asarray(tokens)[:, 1:, None], axis=-1)[..., 0]
    return (picked * np.asarray(completion)[:, 1:]).sum(-1)
