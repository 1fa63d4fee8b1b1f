"""Checks that config dataclasses run on their own fields in `__post_init__`, so a bad value is refused when the
config is built (before any work or any file), with one message naming the key, the value and what is expected.

A check raises `FieldError(section, name, value, expected)`. `section` is the config's usual place (e.g. "optim");
the same class may sit under several override paths (sft.optim, dpo.optim), so `jaxalign.overrides` re-words the
error with the real dotted path (`FieldError.message(path)`). Floats must be finite everywhere: an inf or nan
learning rate, beta or weight trains to nan rather than failing, so these checks refuse them up front.
"""
from __future__ import annotations

import math
import numbers
from typing import Any


class FieldError(ValueError):
    """A config field holds a value outside what it accepts."""

    def __init__(self, section: str, name: str, value: Any, expected: str):
        self.section, self.name, self.value, self.expected = section, name, value, expected
        super().__init__(self.message(section))

    def message(self, section: str) -> str:
        """The error worded for the config found at dotted path `section` ('' for the top level)."""
        key = f"{section}.{self.name}" if section else self.name
        return f"{key} must be {self.expected}, got {self.value!r}"


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_int(section: str, name: str, value: Any, minimum: int | None = None) -> None:
    """An integer, at least `minimum` when given."""
    if not _is_int(value) or (minimum is not None and value < minimum):
        expected = "an integer" if minimum is None else ("a positive integer" if minimum == 1 else
                                                         f"an integer >= {minimum}")
        raise FieldError(section, name, value, expected)


def check_positive_int(section: str, name: str, value: Any) -> None:
    check_int(section, name, value, minimum=1)


def check_number(section: str, name: str, value: Any, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> None:
    """A finite real number in the interval [low, high] (either end open or absent)."""
    ok = _is_number(value) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise FieldError(section, name, value, "a finite number" + _interval(low, high, low_open, high_open))


def _interval(low, high, low_open, high_open) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f" {'<' if high_open else '<='} {high:g}"
    return ""


def check_positive(section: str, name: str, value: Any) -> None:
    check_number(section, name, value, low=0, low_open=True)


def check_non_negative(section: str, name: str, value: Any) -> None:
    check_number(section, name, value, low=0)


def check_probability(section: str, name: str, value: Any) -> None:
    check_number(section, name, value, low=0, high=1)


def check_choice(section: str, name: str, value: Any, choices) -> None:
    if value not in choices:
        raise FieldError(section, name, value, f"one of {', '.join(map(str, choices))}")


def check_divides(section: str, name: str, value: int, divisor_name: str, divisor: int) -> None:
    """`value` (already a positive int) is a multiple of `divisor` (another field of the same section)."""
    if value % divisor:
        raise FieldError(section, name, value, f"a multiple of {divisor_name}={divisor}")
