"""`jaxalign sweep NAME --workdir DIR key=v1,v2 other=a,b`: run a grid of `jaxalign run` points, then aggregate.

Every `key=values` argument is an axis; the grid is their Cartesian product (the last axis varies fastest). A key
with a single value is a fixed override shared by every point. Each point is one ordinary `jaxalign run NAME
--workdir DIR/POINT k=v ...`, so a sweep adds nothing a single run does not already do: the same typed overrides,
the same resumption, the same results.json.

Value lists (`split_values`):
    key=a,b,c                 three values, split on commas
    key=[x=1,y=2],[y=3],[]    a value written inside [...] is taken verbatim, commas included; [] is the empty
                              string (e.g. dpo.objective_args="[ld_alpha=0.5,wpo=true],[]")
    key=sigmoid[a=1,b=2],ipo  commas inside brackets never split, so bracketed names keep their brackets
    key=a\\,b                 a backslash escapes the next character (a literal comma, bracket or backslash)
Remember the shell: quote arguments that contain brackets, backslashes or spaces.

Before anything runs every point's overrides are validated against the experiment's config dataclass
(`jaxalign.overrides.apply_overrides`), so a typo fails in a second, not after the first point's hours. Each point
gets its own directory DIR/POINT, named from the values of the axes that vary (`point_name`, e.g.
`dpo.beta-0.1__seed-1`). Locally the points run one after another in fresh processes; a point whose results.json
exists is skipped, and an interrupted one is started again with the same command, which resumes it from its last
checkpoint (for the experiments that checkpoint, e.g. arith_dpo). A failed point is reported (its
name and the last line of its error) and the sweep goes on; the command exits non-zero at the end if any failed.
`--print` prints the exact command lines instead of running them: `jaxalign run ...`, or with `--launcher tpu
--launcher-args 'TPU_NAME --zone ZONE'` / `--launcher ssh --launcher-args='--hosts FILE'` the same runs through
`jaxalign tpu run` / `jaxalign ssh ... run` (launch/tpu.py, launch/ssh.py), to start on remote machines; those
launchers are only printed for, never driven from here. The results are aggregated into DIR/sweep.csv (every
point: its name, its axes' values, status, error and every scalar of its results.json, nested ones with dotted
keys) and DIR/sweep.md (the same as a markdown table, the fixed overrides in a line above it).

A later sweep in the same DIR adds to these files instead of replacing them: DIR/sweep.json lists every point the
directory's sweeps have had (name and overrides), and the rows of points this sweep does not have are kept (re-read
from their results.json where it still exists). A point of this sweep that has the name of an earlier point with
other overrides is refused before anything runs.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import shlex
import subprocess
import sys
from typing import Any, Callable

from jaxalign.overrides import ConfigError, apply_overrides
from jaxalign.registry import get_experiment

POINT_FILE = "sweep_point.json"  # in each point's directory: what the point was launched with
LOG_FILE = "sweep.log"  # in each point's directory: the point's stdout and stderr
MAX_NAME_LEN = 120
# How each launcher starts one point (`launch_argv`): `jaxalign run` here, or the TPU / ssh launchers' run
# sub-commands (launch/tpu.py, launch/ssh.py) with the launcher's own arguments (`--launcher-args`) where they go.
LAUNCHERS = ("local", "tpu", "ssh")
LAUNCHER_ARGS_EXAMPLE = {"tpu": "TPU_NAME --zone ZONE [--retries K ...]", "ssh": "--hosts HOSTS_FILE"}


@dataclasses.dataclass(frozen=True)
class Axis:
    """One `key=v1,v2,...` argument: a config key and the values it takes."""

    key: str
    values: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Point:
    """One grid point: its directory name and its (key, value) per axis, in axis order."""

    name: str
    assignment: tuple[tuple[str, str], ...]

    @property
    def overrides(self) -> list[str]:
        return [f"{key}={value}" for key, value in self.assignment]


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What happened to a point: status 'ran', 'skipped' (its results.json already existed) or 'failed'."""

    point: Point
    status: str
    error: str = ""


# ---------------------------------------------------------------------------------------------------------------
# Parsing the axes.


def _top_level_split(key: str, text: str) -> list[list[tuple[str, bool]]]:
    """Split on commas outside brackets; every character is kept with whether it was backslash-escaped, so an
    escaped bracket or comma is literal text. Unbalanced brackets and a dangling backslash are errors."""
    items: list[list[tuple[str, bool]]] = [[]]
    depth, escaped = 0, False
    for ch in text:
        if escaped:
            items[-1].append((ch, True))
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == "," and depth == 0:
            items.append([])
        else:
            if ch == "[":
                depth += 1
            elif ch == "]":
                depth -= 1
                if depth < 0:
                    raise ConfigError(f"sweep axis {key}={text!r}: a ']' closes no '['; write \\] for a literal one")
            items[-1].append((ch, False))
    if escaped:
        raise ConfigError(f"sweep axis {key}={text!r}: ends with a lone backslash; write \\\\ for a literal one")
    if depth:
        raise ConfigError(f"sweep axis {key}={text!r}: a '[' is never closed; write \\[ for a literal one")
    return items


def _unwrap(chars: list[tuple[str, bool]]) -> str:
    """The value's text; a value that is one [...] group (the opening bracket closing at the very end) loses
    its outer brackets, so `[a,b]` is the value `a,b` and `[]` the empty string."""
    if len(chars) >= 2 and chars[0] == ("[", False) and chars[-1] == ("]", False):
        depth = 0
        for i, (ch, escaped) in enumerate(chars):
            if not escaped:
                depth += {"[": 1, "]": -1}.get(ch, 0)
            if depth == 0:
                if i == len(chars) - 1:
                    chars = chars[1:-1]
                break
    return "".join(ch for ch, _ in chars)


def split_values(key: str, text: str) -> tuple[str, ...]:
    """The values of one axis (module docstring: commas split, [...] groups verbatim, backslash escapes).

    An empty item (`a,,b`, a trailing comma, or nothing at all) is refused rather than guessed at: the empty string
    is written `[]`. A repeated value would run the same point twice, so it is refused too."""
    values = []
    for position, chars in enumerate(_top_level_split(key, text), start=1):
        if not chars:
            raise ConfigError(f"sweep axis {key}={text!r}: value {position} is empty; write [] for an empty string")
        values.append(_unwrap(chars))
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise ConfigError(f"sweep axis {key}={text!r}: repeats the value {repeated[0]!r}")
    return tuple(values)


def parse_axes(arguments: list[str], aliases: dict[str, str] | None = None) -> list[Axis]:
    """`key=values` arguments -> axes. A key given twice (also via an alias, e.g. `loss` and `dpo.objective`)
    is an error: which of the two would win is not what the user meant."""
    axes, seen = [], {}
    aliases = aliases or {}
    for argument in arguments:
        if "=" not in argument:
            raise ConfigError(f"sweep axis {argument!r} is not of the form key=v1,v2,...")
        key, text = argument.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"sweep axis {argument!r} has an empty key")
        field = aliases.get(key, key)
        if field in seen:
            raise ConfigError(f"sweep axes {seen[field]!r} and {key!r} both set {field}; give each key once")
        seen[field] = key
        axes.append(Axis(key, split_values(key, text)))
    return axes


# ---------------------------------------------------------------------------------------------------------------
# The grid.


def _safe(text: str) -> str:
    """A filesystem- and shell-safe rendering of an override value: '=' -> '-', ',' -> '+', anything outside
    [A-Za-z0-9._+-] -> '_'; the empty string -> 'empty'."""
    text = text.replace("=", "-").replace(",", "+")
    return re.sub(r"[^A-Za-z0-9._+-]", "_", text) or "empty"


def _digest(assignment: tuple[tuple[str, str], ...]) -> str:
    return hashlib.sha256(json.dumps(assignment).encode()).hexdigest()[:8]


def point_name(assignment: tuple[tuple[str, str], ...], varying: set[str]) -> str:
    """`key-value` for every axis that varies, joined by '__' (e.g. `dpo.beta-0.1__seed-1`), so a directory
    listing reads like the grid; 'run' for a one-point grid. Over-long names are cut and end in a hash."""
    parts = [f"{_safe(key)}-{_safe(value)}" for key, value in assignment if key in varying]
    name = "__".join(parts) or "run"
    if len(name) > MAX_NAME_LEN:
        name = f"{name[:MAX_NAME_LEN - 9]}-{_digest(assignment)}"
    return name


def expand(axes: list[Axis]) -> list[Point]:
    """The Cartesian product of the axes, last axis fastest. Two points whose values differ only in characters
    the directory name cannot hold (e.g. 'a=b' and 'a-b') would share a directory: both get a hash suffix."""
    varying = {axis.key for axis in axes if len(axis.values) > 1}
    assignments = [tuple(zip([a.key for a in axes], values)) for values in itertools.product(*[a.values for a in axes])]
    names = [point_name(a, varying) for a in assignments]
    clashing = {n for n in names if names.count(n) > 1}
    return [Point(f"{n}-{_digest(a)}" if n in clashing else n, a) for n, a in zip(names, assignments)]


def validate(experiment_name: str, points: list[Point]) -> list[Any]:
    """Every point's config, built with `apply_overrides` before anything runs. The first invalid point is one
    ConfigError naming the point, its overrides and the reason (and how many others are invalid); two points that
    resolve to the same config (e.g. dpo.beta=0.1 and dpo.beta=1e-1) are refused as duplicate runs."""
    experiment = get_experiment(experiment_name)
    configs, errors = [], []
    for index, point in enumerate(points, start=1):
        try:
            configs.append(apply_overrides(experiment.default_config(), point.overrides))
        except ConfigError as e:
            errors.append(f"grid point {index}/{len(points)} {point.name} ({' '.join(point.overrides)}): {e}")
    if errors:
        others = f" ({len(errors) - 1} more of the {len(points)} points are invalid)" if len(errors) > 1 else ""
        raise ConfigError(errors[0] + others)
    for i, j in itertools.combinations(range(len(points)), 2):
        if configs[i] == configs[j]:
            raise ConfigError(f"grid points {points[i].name} and {points[j].name} resolve to the same {experiment_name}"
                              f" config ({' '.join(points[i].overrides)} vs {' '.join(points[j].overrides)})")
    return configs


def point_record(experiment_name: str, point: Point) -> dict:
    return {"experiment": experiment_name, "overrides": point.overrides}


def check_point_dirs(experiment_name: str, points: list[Point], workdir: str) -> None:
    """Refuse, before anything runs, a point directory left by a different sweep (another experiment or other
    overrides under the same name): skipping it on its results.json would report another run's numbers."""
    for point in points:
        path = os.path.join(workdir, point.name, POINT_FILE)
        if not os.path.exists(path):
            continue
        with open(path) as f:
            recorded = json.load(f)
        if recorded != point_record(experiment_name, point):
            raise ConfigError(
                f"{path} records {recorded.get('experiment')} with {' '.join(recorded.get('overrides', []))}, but this "
                f"sweep's point {point.name} is {experiment_name} with {' '.join(point.overrides)}; use a new --workdir"
            )


# ---------------------------------------------------------------------------------------------------------------
# Commands and local execution.


def run_argv(experiment_name: str, point: Point, workdir: str) -> list[str]:
    """The point's `jaxalign run` command line as an argument list."""
    return ["jaxalign", "run", experiment_name, "--workdir", os.path.join(workdir, point.name), *point.overrides]


def launch_argv(launcher: str, launcher_args: list[str], experiment_name: str, point: Point, workdir: str) -> list[str]:
    """The point's command line for a launcher: `jaxalign run ...` (local), `jaxalign tpu run TPU_NAME --zone Z ...
    EXPERIMENT --workdir ...` (tpu: its launcher arguments name the slice) or `jaxalign ssh --hosts FILE run
    EXPERIMENT --workdir ...` (ssh: its arguments come before `run`)."""
    run = run_argv(experiment_name, point, workdir)
    if launcher == "local":
        return run
    if not launcher_args:
        raise ConfigError(f"--launcher {launcher} needs --launcher-args '{LAUNCHER_ARGS_EXAMPLE[launcher]}'")
    if launcher == "tpu":
        return ["jaxalign", "tpu", "run", *launcher_args, *run[2:]]
    if launcher == "ssh":
        return ["jaxalign", "ssh", *launcher_args, *run[1:]]
    raise ConfigError(f"unknown launcher {launcher!r}; expected one of {', '.join(LAUNCHERS)}")


def command_lines(experiment_name: str, points: list[Point], workdir: str, launcher: str = "local",
                  launcher_args: list[str] | None = None) -> list[str]:
    """What `--print` prints: one shell-quoted command line per point, ready to paste or to hand to a queue."""
    return [shlex.join(launch_argv(launcher, launcher_args or [], experiment_name, p, workdir)) for p in points]


def _error_line(log_tail: str, returncode: int) -> str:
    """The line that says why a run failed: the CLI's 'jaxalign: error: ...' line, else the last line of the
    output (a traceback's exception line), else the exit code."""
    lines = [line.strip() for line in log_tail.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("jaxalign: error:"):
            return line[len("jaxalign: error:"):].strip()
    return lines[-1] if lines else f"exit code {returncode}"


def run_subprocess(experiment_name: str, point: Point, workdir: str) -> str:
    """Run one point as a fresh `jaxalign run` process (a crash, a leak or an OOM in one point cannot take the
    others down), its output appended to the point's sweep.log. Returns '' on success, else the error line."""
    run_dir = os.path.join(workdir, point.name)
    argv = [sys.executable, "-m", "launch.cli", *run_argv(experiment_name, point, workdir)[1:]]
    log_path = os.path.join(run_dir, LOG_FILE)
    with open(log_path, "a") as log:
        log.write(f"$ {shlex.join(run_argv(experiment_name, point, workdir))}\n")
        log.flush()
        returncode = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
    if returncode == 0 and os.path.exists(os.path.join(run_dir, "results.json")):
        return ""
    with open(log_path) as f:
        tail = f.read()[-20_000:]
    return _error_line(tail, returncode) if returncode else "the run exited 0 but wrote no results.json"


Runner = Callable[[str, Point, str], str]


def run_points(experiment_name: str, points: list[Point], workdir: str, runner: Runner = run_subprocess,
               show_progress: bool = True) -> list[Outcome]:
    """Run the points one after another with `runner`, skipping those whose results.json exists; a failure
    (an error line from the runner, or any exception it raises) is reported at once and the sweep goes on."""
    from tqdm.auto import tqdm

    outcomes = []
    with tqdm(total=len(points), desc=f"sweep {experiment_name}", unit="point", disable=not show_progress,
              file=sys.stderr, dynamic_ncols=True) as bar:
        for point in points:
            run_dir = os.path.join(workdir, point.name)
            bar.set_postfix_str(point.name)
            if os.path.exists(os.path.join(run_dir, "results.json")):
                outcomes.append(Outcome(point, "skipped"))
            else:
                os.makedirs(run_dir, exist_ok=True)
                with open(os.path.join(run_dir, POINT_FILE), "w") as f:
                    json.dump(point_record(experiment_name, point), f, indent=2)
                try:
                    error = runner(experiment_name, point, workdir)
                except Exception as e:  # noqa: BLE001 - one point's failure must not end the sweep
                    error = f"{type(e).__name__}: {e}"
                outcomes.append(Outcome(point, "failed", error) if error else Outcome(point, "ran"))
                if error:
                    bar.write(f"[sweep] {point.name} failed: {error}", file=sys.stderr)
            bar.update(1)
    return outcomes


# ---------------------------------------------------------------------------------------------------------------
# Aggregation.


def scalars(results: dict, prefix: str = "") -> dict[str, Any]:
    """Every scalar (number, string, bool, null) of a results dict, nested dicts flattened with dotted keys.
    Lists (curves, histories) are left out, and so is the resolved `config`: the axes already say what varied."""
    out: dict[str, Any] = {}
    for key, value in results.items():
        if not prefix and key == "config":
            continue
        if isinstance(value, dict):
            out.update(scalars(value, f"{prefix}{key}."))
        elif value is None or isinstance(value, (bool, int, float, str)):
            out[f"{prefix}{key}"] = value
    return out


def collect_rows(outcomes: list[Outcome], workdir: str) -> list[dict]:
    """One row per point: point, the axes' values, status, error, then the scalars of its results.json."""
    rows = []
    for outcome in outcomes:
        row: dict[str, Any] = {"point": outcome.point.name, **dict(outcome.point.assignment),
                               "status": outcome.status, "error": outcome.error}
        path = os.path.join(workdir, outcome.point.name, "results.json")
        if outcome.status != "failed" and os.path.exists(path):
            with open(path) as f:
                row.update(scalars(json.load(f)))
        rows.append(row)
    return rows


def read_csv_rows(path: str) -> dict[str, dict]:
    """The rows of an earlier sweep.csv by point name ({} when there is none)."""
    if not os.path.exists(path):
        return {}
    with open(path, newline="") as f:
        return {row["point"]: row for row in csv.DictReader(f) if row.get("point")}


def earlier_row(name: str, overrides: list[str], row: dict | None, workdir: str) -> dict | None:
    """The row of a point an earlier sweep had and this one does not: rebuilt like `collect_rows` from its
    results.json (so numbers keep their types) with its earlier status and error, else the earlier CSV row as
    it was; None for a point that has neither (a sweep stopped before writing it)."""
    path = os.path.join(workdir, name, "results.json")
    status = (row or {}).get("status") or "done"
    if status != "failed" and overrides and os.path.exists(path):
        rebuilt: dict[str, Any] = {"point": name, **dict(o.split("=", 1) for o in overrides), "status": status,
                                   "error": (row or {}).get("error", "")}
        with open(path) as f:
            rebuilt.update(scalars(json.load(f)))
        return rebuilt
    return row


def merge_order(old: list, new: list, key: Callable[[Any], str], earlier) -> list:
    """Earlier entries in their earlier order, each replaced by this sweep's entry of the same name, then this
    sweep's other entries in grid order: re-running a sweep leaves its rows where they were."""
    fresh = {key(item): item for item in new}
    by_name = {key(item): item for item in old}
    ordered = [fresh.get(name, by_name.get(name)) for name in dict.fromkeys(earlier)]
    ordered = [item for item in ordered if item is not None]
    seen = {key(item) for item in ordered}
    return ordered + [item for item in new if key(item) not in seen]


def columns(rows: list[dict]) -> list[str]:
    """The union of the rows' keys, in order of first appearance."""
    return list(dict.fromkeys(key for row in rows for key in row))


def write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns(rows), restval="")
        writer.writeheader()
        writer.writerows(rows)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return "" if value is None else str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: list[dict], axes: list[Axis], title: str, earlier: int = 0) -> str:
    """The same rows as the CSV, minus what does not vary: the fixed overrides go into a line above the table,
    the point name (the varying axes already say it) and the error column (kept only if a point failed)."""
    # A key fixed in this sweep is shown as a column if rows kept from earlier sweeps have other values for it.
    same = {a.key for a in axes if len(a.values) == 1 and all(str(r.get(a.key, "")) == a.values[0] for r in rows)}
    fixed = [f"{a.key}={a.values[0]}" for a in axes if a.key in same]
    hidden = {"point"} | same
    if not any(row.get("error") for row in rows):
        hidden.add("error")
    shown = [c for c in columns(rows) if c not in hidden]
    lines = [f"# {title}", ""]
    if fixed:
        lines += [f"fixed overrides: `{' '.join(fixed)}`", ""]
    if earlier:
        lines += [f"{earlier} of the {len(rows)} rows are from earlier sweeps in this directory "
                  f"(their overrides: {SWEEP_FILE})", ""]
    lines += ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in shown) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# The command.


def add_arguments(parser) -> None:
    """The `jaxalign sweep` arguments (launch/cli.py adds them to its sub-command)."""
    parser.add_argument("name", help="a registered experiment (jaxalign list)")
    parser.add_argument("--workdir", required=True, help="one sub-directory per grid point, plus sweep.csv/.md")
    parser.add_argument("--print", dest="print_only", action="store_true",
                        help="print the points' `jaxalign run` command lines instead of running them")
    parser.add_argument("--launcher", choices=LAUNCHERS, default="local",
                        help="local: run the points here one after another; tpu, ssh: print `jaxalign tpu run` / "
                             "`jaxalign ssh ... run` commands (with --print)")
    parser.add_argument("--launcher-args", default="",
                        help="the launcher's own arguments, one shell-quoted string: tpu: "
                             f"'{LAUNCHER_ARGS_EXAMPLE['tpu']}', ssh: '{LAUNCHER_ARGS_EXAMPLE['ssh']}'")
    parser.add_argument("--no-progress", dest="show_progress", action="store_false",
                        help="no progress bar over the points")
    parser.add_argument("overrides", nargs="*",
                        help="axes key=v1,v2,... (a single value is a fixed override); [a,b] keeps a comma-containing "
                             "value whole, [] is the empty string, \\, a literal comma")


SWEEP_FILE = "sweep.json"


def previous_points(workdir: str) -> tuple[str | None, dict[str, list[str]]]:
    """(experiment, {point name: overrides}) of the earlier sweeps in `workdir`, from its sweep.json."""
    path = os.path.join(workdir, SWEEP_FILE)
    if not os.path.exists(path):
        return None, {}
    try:
        with open(path) as f:
            recorded = json.load(f)
        return recorded["experiment"], {p["name"]: list(p["overrides"]) for p in recorded["points"]}
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"{path}: not a sweep record ({e}); move it away or use a new --workdir") from None


def check_previous(experiment_name: str, points: list[Point], workdir: str) -> None:
    """Refuse merging into the rows of another experiment, and a point named like an earlier one with other
    overrides: its row would replace that point's row under the same name."""
    recorded, earlier = previous_points(workdir)
    path = os.path.join(workdir, SWEEP_FILE)
    if recorded is not None and recorded != experiment_name:
        raise ConfigError(f"{path} records a sweep of {recorded}, not {experiment_name}; use a new --workdir")
    for point in points:
        if point.name in earlier and earlier[point.name] != point.overrides:
            raise ConfigError(f"{path} has point {point.name} with {' '.join(earlier[point.name])}, but this sweep's "
                              f"point {point.name} is {' '.join(point.overrides)}; use a new --workdir")


def plan(experiment_name: str, arguments: list[str], workdir: str) -> tuple[list[Axis], list[Point]]:
    """Parse and expand the axes and validate every point (and the existing point directories); raises
    ConfigError before anything has run or been written."""
    config = get_experiment(experiment_name).default_config()
    axes = parse_axes(arguments, getattr(config, "OVERRIDE_ALIASES", {}))
    points = expand(axes)
    validate(experiment_name, points)
    check_point_dirs(experiment_name, points, workdir)
    check_previous(experiment_name, points, workdir)
    return axes, points


def sweep(experiment_name: str, arguments: list[str], workdir: str, runner: Runner = run_subprocess,
          show_progress: bool = True) -> list[Outcome]:
    """Validate, run (skipping finished points), and write WORKDIR/sweep.json, sweep.csv and sweep.md."""
    axes, points = plan(experiment_name, arguments, workdir)
    os.makedirs(workdir, exist_ok=True)
    _, earlier = previous_points(workdir)
    earlier_rows = read_csv_rows(os.path.join(workdir, "sweep.csv"))
    names = {p.name for p in points}
    kept = {name: overrides for name, overrides in earlier.items() if name not in names}
    kept.update({name: [] for name in earlier_rows if name not in names and name not in kept})
    with open(os.path.join(workdir, SWEEP_FILE), "w") as f:
        json.dump({"experiment": experiment_name, "axes": {a.key: list(a.values) for a in axes},
                   "points": merge_order([{"name": n, "overrides": o} for n, o in earlier.items() if n in kept],
                                         [{"name": p.name, "overrides": p.overrides} for p in points],
                                         key=lambda p: p["name"], earlier=earlier)}, f, indent=2)
    outcomes = run_points(experiment_name, points, workdir, runner, show_progress)
    new_rows = collect_rows(outcomes, workdir)
    old_rows = [row for row in (earlier_row(name, overrides, earlier_rows.get(name), workdir)
                                for name, overrides in kept.items()) if row is not None]
    rows = merge_order(old_rows, new_rows, key=lambda row: row["point"],
                       earlier=list(earlier) + [n for n in earlier_rows if n not in earlier])
    write_csv(rows, os.path.join(workdir, "sweep.csv"))
    title = f"Sweep: {shlex.join(['jaxalign', 'sweep', experiment_name, '--workdir', workdir, *arguments])}"
    with open(os.path.join(workdir, "sweep.md"), "w") as f:
        f.write(markdown_table(rows, axes, title, earlier=len(old_rows)))
    return outcomes


def command(args, runner: Runner = run_subprocess) -> int:
    """`jaxalign sweep`: 0 when every point succeeded (or --print), 1 when any point failed."""
    launcher_args = shlex.split(args.launcher_args)
    if args.launcher != "local" and not args.print_only:
        raise ConfigError(f"--launcher {args.launcher} only prints the points' commands here; add --print and run "
                          f"them with the {args.launcher} launcher")
    if args.launcher == "local" and launcher_args:
        raise ConfigError(f"--launcher-args {args.launcher_args!r} is for --launcher tpu or ssh; local runs take none")
    if args.print_only:
        _, points = plan(args.name, args.overrides, args.workdir)
        print("\n".join(command_lines(args.name, points, args.workdir, args.launcher, launcher_args)))
        return 0
    outcomes = sweep(args.name, args.overrides, args.workdir, runner, args.show_progress)
    with open(os.path.join(args.workdir, "sweep.md")) as f:
        print(f.read())
    counts = {s: sum(o.status == s for o in outcomes) for s in ("ran", "skipped", "failed")}
    print(f"wrote {os.path.join(args.workdir, 'sweep.csv')} and sweep.md: {len(outcomes)} points, {counts['ran']} "
          f"ran, {counts['skipped']} skipped (results.json existed), {counts['failed']} failed")
    for outcome in outcomes:
        if outcome.status == "failed":
            print(f"failed: {outcome.point.name}: {outcome.error}", file=sys.stderr)
    return 1 if counts["failed"] else 0
