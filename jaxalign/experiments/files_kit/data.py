"""The checks every files experiment's `data.*` section shares: error handling, held-out share, truncation."""
from __future__ import annotations

from jaxalign.data.formats import ON_ERROR
from jaxalign.data.tokenize import ON_OVERFLOW, PROMPT_TRUNCATION, TokenizeConfig


def tokenize_config(data, **extra) -> TokenizeConfig:
    """The section's `jaxalign.data.tokenize.TokenizeConfig` (lengths, truncation, overflow, plus `extra` fields),
    its errors named data.FIELD."""
    try:
        return TokenizeConfig(max_length=data.max_length, max_prompt_length=data.max_prompt_length,
                              prompt_truncation=data.prompt_truncation, on_overflow=data.on_overflow, **extra)
    except ValueError as e:
        raise ValueError(str(e).replace("TokenizeConfig.", "data.")) from None


def check_data_section(data) -> None:
    """on_error, eval_fraction, prompt_truncation and on_overflow among their choices; one error naming the key."""
    if data.on_error not in ON_ERROR:
        raise ValueError(f"data.on_error must be one of {ON_ERROR}, got {data.on_error!r}")
    if not 0.0 < data.eval_fraction < 1.0:
        raise ValueError(f"data.eval_fraction must lie in (0, 1), got {data.eval_fraction!r}")
    for name, allowed in (("prompt_truncation", PROMPT_TRUNCATION), ("on_overflow", ON_OVERFLOW)):
        if getattr(data, name) not in allowed:
            raise ValueError(f"data.{name} must be one of {allowed}, got {getattr(data, name)!r}")


__all__ = ["check_data_section", "tokenize_config"]
