"""key=value overrides of frozen config dataclasses, typed and validated against the dataclass fields.

`apply_overrides(cfg, ["dpo.beta=0.2", "model.dtype=bfloat16"])` returns a new config. A config class may declare
short names in a class attribute `OVERRIDE_ALIASES` (e.g. {"loss": "dpo.objective"}). An unknown key or a value
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


def _parse_into(cfg: Any, path: list[str], raw: str, full_key: str, changes: dict) -> None:
    """Parse one override against the field it names and record it in the nested `changes` dict."""
    names = {f.name for f in dataclasses.fields(cfg)}
    head = path[0]
    if head not in names:
        raise KeyError(head)
    current = getattr(cfg, head)
    if len(path) == 1:
        if dataclasses.is_dataclass(current):
            raise KeyError("is a config section, not a value: set its fields")
        changes[head] = _parse(raw, typing.get_type_hints(type(cfg))[head], full_key)
    else:
        if not dataclasses.is_dataclass(current):
            raise KeyError(head)
        _parse_into(current, path[1:], raw, full_key, changes.setdefault(head, {}))


def _build(cfg: Any, changes: dict) -> Any:
    """Rebuild each changed dataclass ONCE with all its new values, so related fields may change together."""
    values = {k: _build(getattr(cfg, k), v) if isinstance(v, dict) else v for k, v in changes.items()}
    return dataclasses.replace(cfg, **values) if values else cfg


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """Apply key=value strings (later ones win); errors name the key/value and list the valid keys."""
    changes: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = (part.strip() for part in item.split("=", 1))
        key = getattr(cfg, "OVERRIDE_ALIASES", {}).get(key, key)
        try:
            _parse_into(cfg, key.split("."), raw, key, changes)
        except KeyError as e:
            keys = "\n  ".join(valid_keys(cfg))
            why = e.args[0] if " " in str(e.args[0]) else f"is not a config key of {type(cfg).__name__}"
            raise ConfigError(f"unknown config key {key!r}: {key} {why}; valid keys:\n  {keys}") from None
    try:
        return _build(cfg, changes)
    except (ValueError, TypeError) as e:  # a dataclass __post_init__ rejected a value
        raise ConfigError(f"{' '.join(overrides)}: {e}") from None
