"""A fixed character-level tokenizer for the built-in synthetic tasks.

The vocabulary is tiny and fixed, so token ids are stable across runs and checkpoints without any vocabulary
file: PAD=0, EOS=1, then the characters "0123456789+=;" as ids 2..14.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Iterable


@dataclasses.dataclass(frozen=True)
class CharTokenizer:
    """Maps text over "0123456789+=;" to ids and back; PAD and EOS are ids 0 and 1.

    `encode` never adds EOS (callers that build training sequences append `EOS_ID` themselves); `decode` stops at
    the first EOS and skips PAD, so it turns a padded, sampled sequence straight into its text.
    """

    PAD_ID: ClassVar[int] = 0
    EOS_ID: ClassVar[int] = 1
    CHARS: ClassVar[str] = "0123456789+=;"
    _FIRST_CHAR_ID: ClassVar[int] = 2

    @property
    def vocab_size(self) -> int:
        """Number of ids, PAD and EOS included (15)."""
        return self._FIRST_CHAR_ID + len(self.CHARS)

    def encode(self, text: str) -> list[int]:
        """Ids of the characters of `text` (no EOS). Raises ValueError on a character outside the vocabulary."""
        ids = []
        for position, char in enumerate(text):
            index = self.CHARS.find(char)
            if index < 0:
                raise ValueError(
                    f"CharTokenizer.encode: character {char!r} at position {position} of {text!r} is not in the "
                    f"vocabulary {self.CHARS!r}"
                )
            ids.append(self._FIRST_CHAR_ID + index)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` up to (not including) the first EOS, PAD skipped.

        Raises ValueError on an id outside [0, vocab_size) before the first EOS; ids after the EOS are not read.
        Accepts any iterable of integers (a list, a 1-D NumPy or JAX array).
        """
        chars = []
        for position, raw in enumerate(ids):
            token = int(raw)
            if token == self.EOS_ID:
                break
            if token == self.PAD_ID:
                continue
            if not self._FIRST_CHAR_ID <= token < self.vocab_size:
                raise ValueError(
                    f"CharTokenizer.decode: id {token} at position {position} is outside the vocabulary "
                    f"[0, {self.vocab_size})"
                )
            chars.append(self.CHARS[token - self._FIRST_CHAR_ID])
        return "".join(chars)
