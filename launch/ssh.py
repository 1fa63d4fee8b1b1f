"""`jaxalign ssh --hosts FILE setup|run|logs`: the same launcher on any machines reachable by `ssh` (GPU clusters).

    jaxalign ssh --hosts hosts.txt setup [--source head|worktree] [--pip 'jax[cuda12]==VERSION'] [--remote-dir DIR]
    jaxalign ssh --hosts hosts.txt run EXPERIMENT --workdir DIR [key=value ...] [--env K=V ...]
                 [--coordinator-port 12355] [--local-device-count N]
    jaxalign ssh --hosts hosts.txt logs [--host N|all] [--lines N] [--follow]

The hosts file has one host per line, `[user@]host[:port]` (`[v6addr]` in brackets), with `#` comments and blank
lines ignored. Host i runs process i of N = number of hosts, and the first host is the coordinator: every process
gets JAXALIGN_COORDINATOR_ADDRESS=host0:PORT, JAXALIGN_NUM_PROCESSES=N and JAXALIGN_PROCESS_ID=i (read by
`jaxalign.distributed.initialize_from_env()`). The host names must therefore also resolve from the other hosts.
The remote commands (setup, run, logs) are the TPU launcher's, from launch.remote; only the transport differs:
`rsync` for the tarball and one `ssh` per host, all hosts at once. Options for ssh itself (keys, jump hosts) go in
~/.ssh/config; ssh runs with BatchMode=yes, so a missing key fails instead of prompting N times in parallel.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path
from typing import Sequence

from launch.remote import (DryRunRunner, Layout, LaunchError, Runner, check_overrides, default_local_tarball,
                           jaxalign_run_argv, logs_command, parse_env, run_command, run_parallel, setup_command,
                           shell_and, source_tarball_argv, subprocess_runner, with_plugins)

_HOST_LINE = re.compile(
    r"(?:(?P<user>[A-Za-z_][A-Za-z0-9_.-]{0,31})@)?"
    r"(?P<host>[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])"
    r"(?::(?P<port>[0-9]{1,5}))?"
)
SSH_OPTIONS = ("-o", "BatchMode=yes")


@dataclasses.dataclass(frozen=True)
class Host:
    """One line of the hosts file. `host` is what the other hosts use to reach the coordinator too."""

    host: str
    user: str | None = None
    port: int | None = None

    @property
    def destination(self) -> str:
        """ssh's destination; an IPv6 address goes without its brackets (the port is passed with -p)."""
        host = self.host[1:-1] if self.host.startswith("[") else self.host
        return f"{self.user}@{host}" if self.user else host

    @property
    def rsync_destination(self) -> str:
        """rsync's `[user@]host:` prefix, where an IPv6 address keeps its brackets."""
        return f"{self.user}@{self.host}" if self.user else self.host


def parse_hosts(text: str, source: str = "hosts file") -> list[Host]:
    """Hosts in file order. Any malformed or duplicate line is one error with the file and line number, since a
    wrong host list means a wrong process count and a job that hangs at start-up on every host."""
    hosts: list[Host] = []
    seen: dict[tuple, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _HOST_LINE.fullmatch(line)
        port = int(match.group("port")) if match and match.group("port") else None
        if not match or (port is not None and not 1 <= port <= 65535):
            raise LaunchError(f"{source}, line {number}: {line!r} is not [user@]host[:port] (port 1-65535)")
        host = Host(match.group("host"), match.group("user"), port)
        key = (host.host.lower(), host.port)
        if key in seen:
            raise LaunchError(f"{source}, line {number}: {line!r} repeats line {seen[key]} "
                              "(one process per host)")
        seen[key] = number
        hosts.append(host)
    if not hosts:
        raise LaunchError(f"{source}: no hosts (one [user@]host[:port] per line)")
    return hosts


def load_hosts(path: str) -> list[Host]:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise LaunchError(f"cannot read hosts file {path}: {e.strerror or e}") from None
    return parse_hosts(text, path)


def ssh_argv(host: Host, command: str) -> list[str]:
    """`ssh [-p PORT] -- DEST COMMAND`: `--` ends ssh's options, and DEST was validated not to start with '-'."""
    port = ["-p", str(host.port)] if host.port else []
    return ["ssh", *SSH_OPTIONS, *port, "--", host.destination, command]


def rsync_argv(host: Host, local: str, remote: str) -> list[str]:
    """Copy one file to `remote` on `host` (rsync splits -e on spaces; it holds only fixed words and a port)."""
    transport = " ".join(["ssh", *SSH_OPTIONS, *(["-p", str(host.port)] if host.port else [])])
    return ["rsync", "-az", "-e", transport, "--", local, f"{host.rsync_destination}:{remote}"]


def distributed_env(hosts: Sequence[Host], index: int, port: int, local_device_count: int | None) -> dict[str, str]:
    """The environment of process `index`: the first host coordinates, process ids follow the file order."""
    if not 1 <= port <= 65535:
        raise LaunchError(f"invalid --coordinator-port {port}: expected 1-65535")
    env = {
        "JAXALIGN_COORDINATOR_ADDRESS": f"{hosts[0].host}:{port}",
        "JAXALIGN_NUM_PROCESSES": str(len(hosts)),
        "JAXALIGN_PROCESS_ID": str(index),
    }
    if local_device_count is not None:
        if local_device_count < 1:
            raise LaunchError(f"invalid --local-device-count {local_device_count}: expected a number >= 1")
        env["JAXALIGN_LOCAL_DEVICE_COUNT"] = str(local_device_count)
    return env


def run_argvs(hosts: Sequence[Host], layout: Layout, experiment: str, workdir: str, overrides: Sequence[str],
              env: dict[str, str], port: int = 12355, local_device_count: int | None = None) -> list[list[str]]:
    """One ssh command per host: the same `jaxalign run`, each with its own process id."""
    argv = jaxalign_run_argv(layout, experiment, workdir, overrides)
    return [ssh_argv(host, run_command(layout, argv, {**distributed_env(hosts, i, port, local_device_count), **env}))
            for i, host in enumerate(hosts)]


def setup_argvs(hosts: Sequence[Host], layout: Layout, tarball: str, pip: Sequence[str] = (),
                python: str = "python3") -> list[list[list[str]]]:
    """Per stage (make the directory, copy, install), one command per host."""
    return [
        [ssh_argv(h, shell_and(["mkdir", "-p", layout.base])) for h in hosts],
        [rsync_argv(h, tarball, layout.tarball) for h in hosts],
        [ssh_argv(h, setup_command(layout, python, pip)) for h in hosts],
    ]


def _check_all(rcs: Sequence[int], hosts: Sequence[Host], what: str) -> None:
    failed = [f"{hosts[i].destination} (exit code {rc})" for i, rc in enumerate(rcs) if rc != 0]
    if failed:
        raise LaunchError(f"{what} failed on {len(failed)} of {len(hosts)} hosts: {', '.join(failed)}")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--remote-dir", default="jaxalign", help="on every host, relative to the home directory")
    parser = argparse.ArgumentParser(prog="jaxalign ssh", description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", required=True, help="file: one [user@]host[:port] per line, # comments")
    parser.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    sub = parser.add_subparsers(dest="action", required=True)
    setup = sub.add_parser("setup", parents=[common], help="copy the code to every host and install it")
    setup.add_argument("--source", choices=("head", "worktree"), default="head")
    setup.add_argument("--pip", action="append", default=[], help="extra requirement, e.g. 'jax[cuda12]==V'")
    setup.add_argument("--python", default="python3")
    setup.add_argument("--local-tarball")
    run = sub.add_parser("run", parents=[common], help="run an experiment on every host, one process each")
    run.add_argument("experiment")
    run.add_argument("--workdir", required=True, help="shared by all hosts (a network filesystem or gs://)")
    run.add_argument("overrides", nargs="*")
    run.add_argument("--env", action="append", default=[], help="KEY=VALUE for the job (repeatable)")
    run.add_argument("--coordinator-port", type=int, default=12355)
    run.add_argument("--skip-override-check", action="store_true",
                     help="do not check the overrides against this checkout's config first")
    run.add_argument("--local-device-count", type=int,
                     help="forced CPU devices per process, for trying multi-host on CPU-only machines (GPUs and "
                          "TPUs are found by JAX itself)")
    logs = sub.add_parser("logs", parents=[common], help="print (or follow) the run log of a host")
    logs.add_argument("--host", default="0", help="index in the hosts file, or all")
    logs.add_argument("--lines", type=int, default=100)
    logs.add_argument("--follow", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None, runner: Runner | None = None) -> int:
    """Entry point of `jaxalign ssh`; errors are raised as LaunchError for the CLI to print as one line."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.action == "run" and not any(e.startswith("-") for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    runner = DryRunRunner() if args.dry_run else (runner or subprocess_runner)
    hosts = load_hosts(args.hosts)
    layout = Layout(args.remote_dir)

    if args.action == "setup":
        tarball = args.local_tarball or default_local_tarball("ssh")
        rc, _ = runner(source_tarball_argv(args.source, tarball))
        if rc != 0:
            raise LaunchError(f"building the source tarball failed (exit code {rc})")
        for stage, what in zip(setup_argvs(hosts, layout, tarball, args.pip, args.python),
                               ("creating the remote directory", "copying the source tarball", "installing jaxalign")):
            _check_all(run_parallel(runner, stage), hosts, what)
        return 0
    if args.action == "run":
        env = with_plugins(parse_env(args.env))
        argvs = run_argvs(hosts, layout, args.experiment, args.workdir, args.overrides, env, args.coordinator_port,
                          args.local_device_count)
        if not args.skip_override_check:
            check_overrides(args.experiment, args.overrides)
        if isinstance(runner, DryRunRunner):
            runner.note(f"{len(hosts)} processes, coordinator {hosts[0].host}:{args.coordinator_port}; "
                        "all at once:")
        _check_all(run_parallel(runner, argvs), hosts, "jaxalign run")
        return 0
    if args.host == "all":
        chosen = list(hosts)
    elif args.host.isdigit() and int(args.host) < len(hosts):
        chosen = [hosts[int(args.host)]]
    else:
        raise LaunchError(f"invalid --host {args.host!r}: expected an index 0-{len(hosts) - 1} or 'all'")
    command = logs_command(layout, args.lines, args.follow)
    rcs = run_parallel(runner, [ssh_argv(h, command) for h in chosen])
    return max(rcs)


if __name__ == "__main__":
    sys.exit(main())
