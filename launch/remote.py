"""What the TPU and SSH launchers share: validated values, the remote shell commands, the runner.

Both backends do the same three things on every host: unpack a source tarball and install it in a venv (setup),
run `jaxalign run NAME --workdir DIR key=value ...` with some environment variables, and tail its log. They differ
only in how a command reaches a host (`gcloud compute tpus tpu-vm ssh --worker=all` vs one `ssh` per host) and in
the environment (`JAXALIGN_DISTRIBUTED=auto` on a TPU pod vs an explicit coordinator, process id and count).

Safety rule: a remote command is ONE string that a remote shell parses, so it is only ever assembled here, with
`shlex.join` from argv lists (user values become single quoted words) and fixed operators (`&&`, `|`, `2>&1`)
that never come from user input. Names that end up outside such quoting (TPU names in `NAME:PATH` scp targets,
hosts, the remote directory) are checked against strict patterns first.

Every command, local or remote, is an argv list handed to a *runner*: `runner(argv) -> (returncode, stdout)`.
`subprocess_runner` runs it without a shell; `DryRunRunner` prints it instead (`--dry-run`); tests pass fakes.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

Runner = Callable[[Sequence[str]], tuple[int, str]]

ROOT = Path(__file__).resolve().parents[1]

# Environment variables read by `jaxalign.distributed.initialize_from_env()`; set by the launchers only.
RESERVED_ENV = ("JAXALIGN_DISTRIBUTED", "JAXALIGN_COORDINATOR_ADDRESS", "JAXALIGN_NUM_PROCESSES",
                "JAXALIGN_PROCESS_ID", "JAXALIGN_LOCAL_DEVICE_COUNT")

_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# A remote path: relative to the remote home directory or absolute; no spaces, quotes, `~`, `$` or leading `-`,
# because it also appears unquoted inside scp/rsync `HOST:PATH` targets that the remote side may expand.
_REMOTE_DIR = re.compile(r"(?!-)[A-Za-z0-9._/+-]+")
_EXPERIMENT = re.compile(r"[A-Za-z0-9_.-]+")


class LaunchError(ValueError):
    """A bad launcher input or a failed remote step: one line, printed by the CLI as `jaxalign: error: ...`."""


def check(field: str, value: str, pattern: re.Pattern, expected: str) -> str:
    """`value` if it fully matches `pattern`, else one error naming the field, the value and what was expected."""
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise LaunchError(f"invalid {field} {value!r}: expected {expected}")
    return value


def parse_env(items: Sequence[str]) -> dict[str, str]:
    """`--env KEY=VALUE` items as a dict. Keys are checked (they are written unquoted as `KEY=`); values may be
    anything because they are quoted. The launcher's own JAXALIGN_* variables cannot be overridden, since a wrong
    process id or count would hang every host at start-up instead of failing."""
    env: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise LaunchError(f"invalid --env {item!r}: expected KEY=VALUE")
        check("--env key", key, _ENV_KEY, "a shell variable name ([A-Za-z_][A-Za-z0-9_]*)")
        if key in RESERVED_ENV:
            raise LaunchError(f"invalid --env {key}: set by the launcher itself ({', '.join(RESERVED_ENV)})")
        env[key] = value
    return env


def with_plugins(env: dict[str, str]) -> dict[str, str]:
    """`env` plus this process's plugins (`jaxalign.plugins`), so remote workers import the same ones. They must be
    importable there by module name: a .py file on this machine is refused rather than failing on every host."""
    from jaxalign.plugins import ENV_VAR, from_environment, is_file_plugin

    names = from_environment()
    files = [name for name in names if is_file_plugin(name)]
    if files:
        raise LaunchError(f"plugin {files[0]} is a file on this machine; remote workers import plugins by module "
                          "name: put the module in the source tree (or install it with --pip) and pass --plugin MODULE")
    return {ENV_VAR: ",".join(names), **env} if names else env


def check_experiment(name: str) -> str:
    """The experiment must be registered here, so a typo fails before any machine is created or paid for."""
    from jaxalign.registry import EXPERIMENTS

    check("experiment", name, _EXPERIMENT, "an experiment name")
    if name not in EXPERIMENTS:
        raise LaunchError(f"unknown experiment {name!r}; available: {', '.join(sorted(EXPERIMENTS))}")
    return name


def check_overrides(experiment: str, overrides: Sequence[str]) -> None:
    """Apply the overrides to the experiment's default config here, as `jaxalign run` will on every host, so that
    a typo or a bad value is one local error before any machine is created, paid for or kept waiting."""
    from jaxalign.overrides import apply_overrides
    from jaxalign.registry import get_experiment

    apply_overrides(get_experiment(check_experiment(experiment)).default_config(), list(overrides))


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where things live on every remote host, under `base` (relative paths are relative to the login directory,
    which is where ssh starts; `~` is not used because quoting would stop the shell from expanding it)."""

    base: str = "jaxalign"

    def __post_init__(self):
        check("--remote-dir", self.base, _REMOTE_DIR, "a path of letters, digits and . _ / + - (no spaces or ~)")
        if ".." in self.base.split("/"):
            raise LaunchError(f"invalid --remote-dir {self.base!r}: '..' is not allowed")

    @property
    def tarball(self) -> str:
        return f"{self.base}/src.tar.gz"

    @property
    def src(self) -> str:
        return f"{self.base}/src"

    @property
    def venv(self) -> str:
        return f"{self.base}/venv"

    @property
    def jaxalign(self) -> str:
        return f"{self.base}/venv/bin/jaxalign"

    @property
    def log(self) -> str:
        return f"{self.base}/logs/run.log"


def jax_pin(pyproject: Path = ROOT / "pyproject.toml") -> str:
    """The jax version pinned in pyproject.toml, so that `jax[tpu]` on the workers matches the pinned jaxlib."""
    match = re.search(r'"jax==([^"]+)"', pyproject.read_text())
    if not match:
        raise LaunchError(f"no 'jax==VERSION' pin found in {pyproject}")
    return match.group(1)


def source_tarball_argv(mode: str, out: str, root: Path = ROOT) -> list[str]:
    """The local command that writes the code to ship. `head` (git archive of HEAD) is reproducible and ships only
    committed files; `worktree` ships the working tree as it is (uncommitted edits included, .git, .venv and runs/
    left out) for trying a change before committing it."""
    if mode == "head":
        return ["git", "-C", str(root), "archive", "--format=tar.gz", f"--output={out}", "HEAD"]
    if mode == "worktree":
        return ["tar", "-czf", out, "--exclude=./.git", "--exclude=./.venv", "--exclude=./runs",
                "--exclude=*.egg-info", "--exclude=__pycache__", "-C", str(root), "."]
    raise LaunchError(f"invalid --source {mode!r}: expected head or worktree")


def default_local_tarball(tag: str) -> str:
    """A fixed local path per target (so `--dry-run` output is reproducible) in the system temp directory."""
    return os.path.join(tempfile.gettempdir(), f"jaxalign-src-{tag}.tar.gz")


def shell_and(*argvs: Sequence[str]) -> str:
    """Commands joined with `&&`, each one quoted word by word: stops at the first failure."""
    return " && ".join(shlex.join(list(argv)) for argv in argvs)


def setup_command(layout: Layout, python: str = "python3", pip: Sequence[str] = ()) -> str:
    """Remote shell command: replace the source tree with the uploaded tarball and install it, editable, in a venv
    (kept between setups, so re-running setup after a code change only reinstalls jaxalign). `pip` are extra
    requirements installed alongside, e.g. `jax[tpu]==VERSION` on TPU VMs or `jax[cuda12]==VERSION` on GPUs."""
    return shell_and(
        ["rm", "-rf", layout.src],
        ["mkdir", "-p", layout.src, os.path.dirname(layout.log)],
        ["tar", "-xzf", layout.tarball, "-C", layout.src],
        [python, "-m", "venv", layout.venv],
        [f"{layout.venv}/bin/pip", "install", "--quiet", "--upgrade", "pip"],
        [f"{layout.venv}/bin/pip", "install", "--quiet", "-e", layout.src, *pip],
    )


def jaxalign_run_argv(layout: Layout, experiment: str, workdir: str, overrides: Sequence[str]) -> list[str]:
    """The argv of `jaxalign run` on a host. Re-running it with the same workdir resumes from its checkpoints,
    which is all the retry loop relies on."""
    return [layout.jaxalign, "run", check_experiment(experiment), "--workdir", workdir, *overrides]


def env_argv(env: dict[str, str]) -> list[str]:
    """`env K=V ...` as argv: the variables reach the program whatever the remote login shell is."""
    for key in env:
        check("environment variable", key, _ENV_KEY, "a shell variable name")
    return ["env", *(f"{k}={v}" for k, v in env.items())]


def run_command(layout: Layout, argv: Sequence[str], env: dict[str, str]) -> str:
    """Remote shell command: run `argv` with `env`, its output both streamed back and appended to the log file
    (`logs` tails it after a disconnect). pipefail keeps the program's exit status, not tee's."""
    return (f"set -o pipefail; {shlex.join(['mkdir', '-p', os.path.dirname(layout.log)])} && "
            f"{shlex.join(env_argv(env) + list(argv))} 2>&1 | {shlex.join(['tee', '-a', layout.log])}")


def logs_command(layout: Layout, lines: int, follow: bool) -> str:
    """Remote shell command: the last `lines` lines of the run log, then (with `follow`) everything appended."""
    if lines < 0:
        raise LaunchError(f"invalid --lines {lines}: expected a number >= 0")
    return shlex.join(["tail", "-n", str(lines), *(["-F"] if follow else []), layout.log])


# ----------------------------------------------------------------------------------------------------------------
# Runners and plans


def subprocess_runner(argv: Sequence[str]) -> tuple[int, str]:
    """Run argv (never through a shell), echoing it to stderr and its stdout to ours line by line while keeping a
    copy, so a long remote job streams its log and a status query can still be parsed."""
    argv = [str(a) for a in argv]
    print(f"+ {shlex.join(argv)}", file=sys.stderr, flush=True)
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, errors="replace")
    except FileNotFoundError:
        raise LaunchError(f"{argv[0]!r} not found on PATH") from None
    captured = []
    assert proc.stdout is not None
    for line in proc.stdout:
        captured.append(line)
        sys.stdout.write(line)
        sys.stdout.flush()
    return proc.wait(), "".join(captured)


class DryRunRunner:
    """Prints each command as a copy-pastable shell line instead of running it, and reports success."""

    def __init__(self, out=None):
        self.out = out

    def __call__(self, argv: Sequence[str]) -> tuple[int, str]:
        print(shlex.join([str(a) for a in argv]), file=self.out or sys.stdout, flush=True)
        return 0, ""

    def note(self, text: str) -> None:
        print(f"# {text}", file=self.out or sys.stdout, flush=True)


@dataclasses.dataclass(frozen=True)
class Command:
    """One step of a plan: run argv; unless `check` is false, a non-zero exit stops the plan with `what` failed."""

    argv: tuple[str, ...]
    what: str
    check: bool = True


@dataclasses.dataclass(frozen=True)
class WaitFor:
    """One step of a plan: run `argv` (a status query) every `interval_s` until its stdout is one of `ready`;
    a state in `failed`, or `timeout_s` without `ready`, stops the plan. Dry runs print the query once."""

    argv: tuple[str, ...]
    what: str
    ready: tuple[str, ...]
    failed: tuple[str, ...] = ()
    interval_s: float = 30.0
    timeout_s: float = 3600.0



def execute(plan: Sequence, runner: Runner, sleep: Callable[[float], None] = time.sleep) -> None:
    """Run a plan's steps in order with `runner`; raise LaunchError naming the first step that fails."""
    dry = isinstance(runner, DryRunRunner)
    for step in plan:
        if isinstance(step, Command):
            rc, _ = runner(step.argv)
            if rc != 0 and step.check:
                raise LaunchError(f"{step.what} failed (exit code {rc}): {shlex.join(step.argv)}")
            continue
        if dry:
            runner.note(f"repeat every {step.interval_s:g}s until it prints {' or '.join(step.ready)}:")
            runner(step.argv)
            continue
        waited = 0.0
        while True:
            rc, out = runner(step.argv)
            state = out.strip()
            if rc == 0 and state in step.ready:
                break
            if state in step.failed:
                raise LaunchError(f"{step.what}: state {state}")
            if waited >= step.timeout_s:
                raise LaunchError(f"{step.what}: still {state or 'unknown'} after {step.timeout_s:g}s")
            sleep(step.interval_s)
            waited += step.interval_s


def run_parallel(runner: Runner, argvs: Sequence[Sequence[str]]) -> list[int]:
    """Run one command per host at the same time (a multi-host job only starts once every process has joined);
    return the exit codes in host order. Dry runs print them in order instead."""
    if isinstance(runner, DryRunRunner) or len(argvs) <= 1:
        return [runner(argv)[0] for argv in argvs]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=len(argvs)) as pool:
        return [rc for rc, _ in pool.map(runner, argvs)]
