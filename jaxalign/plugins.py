"""Plugins: the user's own modules, imported before anything is resolved, so their objectives, experiments and agents
work everywhere a built-in one does (`jaxalign run`, `sweep`, `local`, `tpu`, `ssh`, the benchmarks).

A plugin is any importable module (or a .py file) whose import registers things: objectives with
`jaxalign.losses.register`, experiments with `jaxalign.registry.register_experiment`. Three ways to name one, all
loaded in this order:

- an installed package's entry point in the group "jaxalign.plugins" (`[project.entry-points."jaxalign.plugins"]`);
- the environment variable JAXALIGN_PLUGINS, comma-separated;
- `jaxalign --plugin NAME_OR_FILE ...` on the command line (repeatable).

A module name is imported with the current directory on the import path (as `python -m` would); a path ending in
.py is loaded from that file. After loading, JAXALIGN_PLUGINS lists every plugin named on the command line or in
the environment, so child processes (a sweep's points, `jaxalign local`'s processes, remote workers) import the
same ones. Importing this module imports no JAX.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import sys
from typing import Iterable

ENV_VAR = "JAXALIGN_PLUGINS"
ENTRY_POINT_GROUP = "jaxalign.plugins"

_loaded: dict[str, object] = {}


def is_file_plugin(name: str) -> bool:
    return name.endswith(".py")


def _import(name: str):
    """Import one plugin by module name or .py path; a failure is one ValueError naming the plugin and the cause."""
    try:
        if is_file_plugin(name):
            path = os.path.abspath(name)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"no such file {path}")
            module_name = "jaxalign_plugin_" + os.path.splitext(os.path.basename(path))[0]
            spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            spec.loader.exec_module(module)
            return module
        if os.getcwd() not in sys.path:  # a console script, unlike `python -m`, does not put it there
            sys.path.insert(0, os.getcwd())
        return importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - whatever the user's module raised becomes one line naming it
        raise ValueError(f"plugin {name!r} could not be loaded: {type(e).__name__}: {e}") from e


def from_environment() -> list[str]:
    return [n.strip() for n in os.environ.get(ENV_VAR, "").split(",") if n.strip()]


def load_plugins(names: Iterable[str] = ()) -> list[str]:
    """Import the entry-point plugins, then those of JAXALIGN_PLUGINS, then `names` (each once per process), and
    record the named ones in JAXALIGN_PLUGINS for child processes. Returns the plugins loaded by name."""
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if f"entry point {entry_point.name}" not in _loaded:
            try:
                _loaded[f"entry point {entry_point.name}"] = entry_point.load()
            except Exception as e:  # noqa: BLE001
                raise ValueError(f"plugin entry point {entry_point.name!r} ({entry_point.value}) could not be "
                                 f"loaded: {type(e).__name__}: {e}") from e
    named = []
    for name in [*from_environment(), *names]:
        key = os.path.abspath(name) if is_file_plugin(name) else name
        if key not in named:
            named.append(key)
        if key not in _loaded:
            _loaded[key] = _import(key)
    if named:
        os.environ[ENV_VAR] = ",".join(named)
    return named


def split_plugin_arguments(argv: list[str]) -> tuple[list[str], list[str]]:
    """(plugins, the rest): the `--plugin X` / `--plugin=X` options before the subcommand are taken out, so they
    can be loaded before the subcommand (or a launcher parsing its own options) sees its arguments."""
    plugins, rest, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--plugin":
            if i + 1 >= len(argv):
                raise ValueError("--plugin needs a module name or a .py file")
            plugins.append(argv[i + 1])
            i += 2
            continue
        if arg.startswith("--plugin="):
            plugins.append(arg.split("=", 1)[1])
            i += 1
            continue
        if not arg.startswith("-"):  # the subcommand: everything after it is its own
            return plugins, rest + argv[i:]
        rest.append(arg)
        i += 1
    return plugins, rest


__all__ = ["ENTRY_POINT_GROUP", "ENV_VAR", "from_environment", "is_file_plugin", "load_plugins",
           "split_plugin_arguments"]
