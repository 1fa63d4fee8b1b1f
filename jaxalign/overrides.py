"""key=value overrides of frozen config dataclasses, typed and validated against the dataclass fields.

`apply_overrides(cfg, ["dpo.beta=0.2", "model.dtype=bfloat16"])` returns a new config. A config class may declare
short names in a class attribute `OVERRIDE_ALIASES` (e.g. {"loss": "dpo.objective"}); "name=value,..." string fields
it lists in `ARGUMENT_FIELDS` can also be set one argument at a time (`dpo.objective_args.gamma=0.5`, so a sweep can
vary one argument: `dpo.objective_args.gamma=0,1`); and fields whose values were chosen for another field's value
(`RESET_WITH`, e.g. {"objective": ("beta", "sft_weight", ...)}: the main job's beta is tuned for its objective) go
back to their class defaults when an override changes that field, unless they are overridden too. Every mistake is
one line:
an unknown key names the closest valid keys ("did you mean"), a value that does not parse names the key, the value
and the type; the dataclasses' own __post_init__ checks (`jaxalign.validation`) then reject values of the right
type but the wrong range, re-worded here with the key's full dotted path (sft.optim.learning_rate, not optim.).
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import json
import os
import re
import textwrap
import typing
from typing import Any

from jaxalign.validation import FieldError


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


class _Arguments(dict):
    """Arguments set one at a time (`section.FIELD.name=value`) into an `ARGUMENT_FIELDS` string, merged in
    `_resolve` onto the field's value (or onto its default when `RESET_WITH` resets it)."""


def parse_arguments(text: str) -> dict[str, str]:
    """"name=value,name=value" -> {name: value} (the values as written; empty items skipped)."""
    items = [(item.split("=", 1) + [""])[:2] for item in (part.strip() for part in text.split(",")) if item]
    return {name.strip(): value.strip() for name, value in items}


def _field_default(cfg: Any, name: str) -> Any:
    field = next(f for f in dataclasses.fields(cfg) if f.name == name)
    return field.default_factory() if field.default is dataclasses.MISSING else field.default


def _parse_into(cfg: Any, path: list[str], raw: str, full_key: str, changes: dict) -> None:
    """Parse one override against the field it names and record it in the nested `changes` dict."""
    names = {f.name for f in dataclasses.fields(cfg)}
    head = path[0]
    if head not in names:
        raise KeyError(head)
    current = getattr(cfg, head)
    if len(path) == 2 and head in getattr(cfg, "ARGUMENT_FIELDS", ()):
        if "," in raw or not path[1]:
            raise ConfigError(f"{full_key}={raw!r}: one value per argument (a sweep varies it: {full_key}=0,1)")
        pending = changes.get(head)
        if not isinstance(pending, _Arguments):  # a whole-string override before it is replaced: start from it
            pending = changes[head] = _Arguments(parse_arguments(pending) if isinstance(pending, str) else {})
        pending[path[1]] = raw
        return
    if len(path) == 1:
        if dataclasses.is_dataclass(current):
            raise KeyError("is a config section, not a value: set its fields")
        changes[head] = _parse(raw, typing.get_type_hints(type(cfg))[head], full_key)
    else:
        if not dataclasses.is_dataclass(current):
            raise KeyError(head)
        _parse_into(current, path[1:], raw, full_key, changes.setdefault(head, {}))


def _resolve(cfg: Any, changes: dict) -> dict:
    """`changes` with `RESET_WITH` resets and one-at-a-time arguments applied, at every level of the config."""
    resolved = {k: _resolve(getattr(cfg, k), v) if type(v) is dict else v for k, v in changes.items()}
    reset: set[str] = set()
    for trigger, bound in getattr(cfg, "RESET_WITH", {}).items():
        if trigger in resolved and resolved[trigger] != getattr(cfg, trigger):
            reset.update(name for name in bound if not (name in resolved and type(resolved[name]) is not _Arguments))
    for name in reset:
        if name not in resolved:
            resolved[name] = _field_default(cfg, name)
    for name, value in list(resolved.items()):
        if isinstance(value, _Arguments):
            base = _field_default(cfg, name) if name in reset else getattr(cfg, name)
            merged = {**parse_arguments(base), **value}
            resolved[name] = ",".join(f"{k}={v}" for k, v in merged.items())
    return resolved


def _build(cfg: Any, changes: dict, path: str = "") -> Any:
    """Rebuild each changed dataclass ONCE with all its new values, so related fields may change together. A field
    check's error is re-worded with `path`, where this config sits in the whole one."""
    values = {k: _build(getattr(cfg, k), v, f"{path}.{k}" if path else k) if isinstance(v, dict) else v
              for k, v in changes.items()}
    if not values:
        return cfg
    try:
        return dataclasses.replace(cfg, **values)
    except FieldError as e:
        raise ConfigError(e.message(path)) from None


def unknown_key_message(cfg: Any, key: str) -> str:
    """One line for an unknown `key`: the closest valid dotted keys, or else the valid names at its deepest
    existing section (a full list of every key is ~90 lines that hide the mistake)."""
    keys = valid_keys(cfg)
    section, names = _deepest_section(cfg, key.split("."))
    rest = key[len(section) + 1:] if section else key
    prefix = f"{section}." if section else ""
    # A typo in the field's name, matched among its section's names only: the shared section prefix would make
    # every key of the section look close. Then a typo in a section's name ('dpp.beta'), then the same field name
    # in another section.
    close = [prefix + name for name in difflib.get_close_matches(rest, names, n=3, cutoff=0.6)]
    if not close:
        elsewhere = [k for k in keys if not k.startswith(prefix)] if prefix else keys
        close = difflib.get_close_matches(key, elsewhere, n=3, cutoff=0.8)
    if not close:
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in keys if k.rsplit(".", 1)[-1] == leaf][:3]
    head = f"unknown config key {key!r}"
    if close:
        return f"{head}; did you mean {' or '.join(repr(k) for k in close)}?"
    where = f"{section} has" if section else "valid top-level keys are"
    return f"{head}; {where}: {', '.join(names)}"


def _deepest_section(cfg: Any, path: list[str]) -> tuple[str, list[str]]:
    """The longest prefix of `path` that names a nested config, and the field names of that config."""
    done: list[str] = []
    for name in path[:-1]:
        value = getattr(cfg, name, None)
        if not dataclasses.is_dataclass(value):
            break
        cfg, done = value, done + [name]
    return ".".join(done), [f.name for f in dataclasses.fields(cfg)]


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """Apply key=value strings (later ones win); each error is one line naming the key and the value."""
    changes: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = (part.strip() for part in item.split("=", 1))
        key = getattr(cfg, "OVERRIDE_ALIASES", {}).get(key, key)
        try:
            _parse_into(cfg, key.split("."), raw, key, changes)
        except KeyError as e:
            if " " in str(e.args[0]):  # a whole section: say so and name its keys
                section = [k for k in valid_keys(cfg) if k.startswith(key + ".")]
                raise ConfigError(f"{key!r} {e.args[0]}: {', '.join(section)}") from None
            raise ConfigError(unknown_key_message(cfg, key)) from None
    try:
        return _build(cfg, _resolve(cfg, changes))
    except ConfigError:  # already worded with the key's full path
        raise
    except (ValueError, TypeError) as e:  # a dataclass __post_init__ rejected a value
        raise ConfigError(f"{' '.join(overrides)}: {e}") from None


# ---------------------------------------------------------------------------------------------------------------
# What the keys are: `jaxalign run NAME --help`.


def field_docs(cls: type) -> dict[str, str]:
    """One line per documented field of a config dataclass, from where the code documents it: a "name: text" entry
    of the class docstring, else a comment at the end of the field's line, else the comment lines right above it."""
    names = {f.name for f in dataclasses.fields(cls)}
    docs: dict[str, str] = {}
    current = None
    for line in (inspect.getdoc(cls) or "").splitlines():
        entry = re.match(r"^([A-Za-z_]\w*)(?:\s*\([^)]*\))?\s*:\s+(\S.*)$", line)
        if entry and entry.group(1) in names:
            current = entry.group(1)
            docs[current] = entry.group(2).strip()
        elif current and line[:1].isspace() and line.strip():
            docs[current] += " " + line.strip()
        else:
            current = None
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return docs
    lines = source.splitlines()
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        name = node.target.id
        if name not in names or name in docs:
            continue
        trailing = re.search(r"#\s*(.+)$", lines[node.end_lineno - 1])
        above, i = [], node.lineno - 2
        while i >= 0 and lines[i].strip().startswith("#"):
            above.insert(0, lines[i].strip().lstrip("#").strip())
            i -= 1
        if trailing:
            docs[name] = trailing.group(1).strip()
        elif above:
            docs[name] = " ".join(above)
    return docs


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if not typing.get_args(annotation) else None
    return text or str(annotation).replace("typing.", "")


def describe_keys(cfg: Any, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted key, type, default, one-line description) for every overridable key of a config dataclass."""
    rows = []
    hints, docs = typing.get_type_hints(type(cfg)), field_docs(type(cfg))
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if dataclasses.is_dataclass(value):
            rows += describe_keys(value, f"{prefix}{field.name}.")
        else:
            rows.append((prefix + field.name, _type_name(hints[field.name]), value, docs.get(field.name, "")))
    return rows


def config_help(name: str, description: str, cfg: Any) -> str:
    """The text of `jaxalign run NAME --help`: what the experiment does, then every key with its type, default and
    description, and the aliases."""
    rows = describe_keys(cfg)
    width = min(40, max(len(key) for key, *_ in rows))
    out = [f"usage: jaxalign run {name} --workdir DIR [--config FILE] [--on-nonfinite stop|skip-batch] "
           "[key=value ...]", "", textwrap.fill(description, 116), "",
           f"{len(rows)} keys (type, default: description):"]
    for key, type_name, default, doc in rows:
        line = f"  {key:<{width}}  {type_name} = {default!r}"
        out.append(line + (f": {doc}" if doc else ""))
    out += ["", "run options (not part of config.json): tracking=tensorboard|wandb|tensorboard,wandb|none mirrors "
                "metrics.jsonl, the config and the plots to TensorBoard (WORKDIR/tensorboard) and/or Weights & Biases"]
    aliases = getattr(cfg, "OVERRIDE_ALIASES", {})
    if aliases:
        out += ["", "aliases: " + ", ".join(f"{short} = {key}" for short, key in aliases.items())]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------------
# A config file as overrides: `--config FILE.json|yaml` (any run's config.json fed back).


def _load_config_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"--config {path}: no such file")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} line {e.lineno} column {e.colno}: not valid JSON: {e.msg}") from None
    except Exception as e:  # noqa: BLE001 - yaml's errors carry their own line and column
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return data


def _flatten(data: dict, prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for key, value in data.items():
        if isinstance(value, dict):
            items += _flatten(value, f"{prefix}{key}.")
        else:
            items.append((f"{prefix}{key}", value))
    return items


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "none" if value is None else str(value)


def _reset_groups(cfg: Any, prefix: str = "") -> list[tuple[str, str, tuple[str, ...]]]:
    """(section prefix, trigger field, reset fields) of every `RESET_WITH` in a (nested) config."""
    groups = [(prefix, trigger, bound) for trigger, bound in getattr(cfg, "RESET_WITH", {}).items()]
    for f in dataclasses.fields(cfg):
        if dataclasses.is_dataclass(getattr(cfg, f.name)):
            groups += _reset_groups(getattr(cfg, f.name), f"{prefix}{f.name}.")
    return groups


def file_overrides(cfg: Any, path: str) -> list[str]:
    """The key=value overrides that turn `cfg` into the config written in `path` (nested JSON or YAML, e.g. a run's
    config.json): only the keys whose value differs, so fields that cannot be set from the command line may appear
    at their current value. A key that does not exist, or a value of the wrong type, is one error naming the file.
    When the file changes a `RESET_WITH` field (dpo.objective), the fields it resets are written out too, so the
    file's values of them hold rather than the defaults."""
    current = {key: value for key, _, value, _ in describe_keys(cfg)}
    items = _flatten(_load_config_file(path))
    changed = {key for key, value in items
               if not (key in current and json.dumps(current[key], default=list) == json.dumps(value, default=list))}
    keep = {f"{section}{name}" for section, trigger, bound in _reset_groups(cfg) if f"{section}{trigger}" in changed
            for name in bound}
    overrides = []
    for key, value in items:
        if key not in changed and key not in keep:
            continue
        if isinstance(value, list) or isinstance(current.get(key), (tuple, list)):
            raise ConfigError(f"{path}: {key}={value!r}: list values cannot be set from a config file; "
                              f"its current value is {current.get(key)!r}")
        overrides.append(f"{key}={_as_text(value)}")
    try:
        apply_overrides(cfg, overrides)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return overrides
