"""Every registered experiment's config keys are documented: `jaxalign run NAME --help` (jaxalign.overrides
`config_help`) shows each key with a one-line description taken from its config dataclass (a "name: text" docstring
entry, a trailing comment or the comments above the field). A new field without one fails here, naming it."""
from __future__ import annotations

import pytest

from jaxalign.overrides import describe_keys
from jaxalign.registry import EXPERIMENTS, get_experiment
from launch.cli import main

CHECKED = sorted(EXPERIMENTS)


@pytest.mark.parametrize("name", CHECKED)
def test_every_key_has_a_description(name):
    rows = describe_keys(get_experiment(name).default_config())
    missing = [key for key, _, _, doc in rows if not doc.strip()]
    assert rows and not missing, f"{name}: keys without a description: {missing}"


@pytest.mark.parametrize("name", CHECKED)
def test_run_name_help_lists_every_key_with_its_description(name, capsys):
    assert main(["run", name, "--help"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    rows = describe_keys(get_experiment(name).default_config())
    absent = [key for key, *_ in rows if key not in lines]
    assert not absent, f"{name} --help does not list {absent}"
    undocumented = [key for key, _, _, doc in rows if not lines[key].endswith(f": {doc}")]
    assert not undocumented, f"{name} --help prints no description for {undocumented}"
    assert f"{len(rows)} keys (type, default: description):" in out
