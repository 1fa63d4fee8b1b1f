"""key=value overrides of frozen config dataclasses, typed and validated against the dataclass fields.

`apply_overrides(cfg, ["dpo.beta=0.2", "model.dtype=bfloat16"])` returns a new config. An unknown key or a value
that does not parse as the field's type is one clear error listing the valid keys; the dataclasses' own
__post_init__ checks then reject values of the right type but the wrong range.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any


class ConfigError(ValueError):
    """A bad override: names the key, the value and what was expected."""


def valid_keys(cfg: Any, prefix: str = "") -> list[str]:
    """Every overridable dotted key of a (nested) config dataclass."""
    keys = []
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if dataclasses.is_dataclass(value):
            keys.extend(valid_keys(value, f"{prefix}{field.name}."))
        else:
            keys.append(f"{prefix}{field.name}")
    return keys


def _parse(raw: str, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        options = [a for a in typing.get_args(annotation)]
        if raw.lower() in ("none", "null") and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _parse(raw, option, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if annotation is bool:
        lowered = raw.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigError(f"{key}={raw!r}: expected a boolean (true/false)")
    if annotation is int:
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"{key}={raw!r}: expected an integer") from None
    if annotation is float:
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"{key}={raw!r}: expected a number") from None
    if annotation is str:
        return raw
    raise ConfigError(f"{key}: fields of type {annotation!r} cannot be set from the command line")


def _set(cfg: Any, path: list[str], raw: str, full_key: str) -> Any:
    hints = typing.get_type_hints(type(cfg))
    names = {f.name for f in dataclasses.fields(cfg)}
    head = path[0]
    if head not in names:
        raise KeyError(head)
    current = getattr(cfg, head)
    if len(path) == 1:
        if dataclasses.is_dataclass(current):
            raise KeyError(head)
        value = _parse(raw, hints[head], full_key)
    else:
        if not dataclasses.is_dataclass(current):
            raise KeyError(head)
        value = _set(current, path[1:], raw, full_key)
    return dataclasses.replace(cfg, **{head: value})


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """Apply key=value strings in order; errors name the key/value and list the valid keys."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        try:
            cfg = _set(cfg, key.strip().split("."), raw.strip(), key.strip())
        except KeyError:
            keys = "\n  ".join(valid_keys(cfg))
            raise ConfigError(f"unknown config key {key!r} for {type(cfg).__name__}; valid keys:\n  {keys}") from None
        except ConfigError:
            raise
        except (ValueError, TypeError) as e:  # a dataclass __post_init__ rejected the value
            raise ConfigError(f"{key}={raw!r}: {e}") from None
    return cfg
