"""`jaxalign tpu create|setup|run|logs|ssh|status|delete`: Cloud TPU VM slices driven through `gcloud`.

    jaxalign tpu create NAME --zone Z --accelerator-type v4-32 [--version V] [--spot] [--queued] [--project P]
    jaxalign tpu setup  NAME --zone Z [--source head|worktree] [--pip REQ ...] [--remote-dir DIR]
    jaxalign tpu run    NAME --zone Z EXPERIMENT --workdir gs://BUCKET/DIR [key=value ...] [--env K=V ...]
                        [--retries K --accelerator-type T [--spot] [--queued]]
    jaxalign tpu logs   NAME --zone Z [--worker N|all] [--lines N] [--follow]
    jaxalign tpu ssh    NAME --zone Z [--worker N|all] [-- COMMAND ARG ...]
    jaxalign tpu status NAME --zone Z [--queued]
    jaxalign tpu delete NAME --zone Z [--queued]

Every subcommand takes `--dry-run` (print the commands, one copy-pastable line each, and run nothing) and
`--project P`. `run` first checks the experiment name and the overrides against this checkout's config (a typo is
one local error, not one per worker after the slice is up; `--skip-override-check` to skip), then starts
`jaxalign run` on every worker (`--worker=all`) with JAXALIGN_DISTRIBUTED=auto, so that each process calls
`jax.distributed.initialize()` with no arguments (TPU VMs discover their peers themselves). Its output streams
here and is appended to REMOTE_DIR/logs/run.log on each worker (`logs` tails it, e.g. after a disconnect).

Preemption (`run --retries K`): when the ssh command fails, the node's state is queried; if the slice is
PREEMPTED, TERMINATED or gone, it is deleted, recreated (same accelerator type, version, spot/queued choice), set
up again, and the same `jaxalign run` command is issued, which resumes from the last checkpoint in the workdir.
The workdir must therefore be on storage that outlives the VMs (gs://..., or a mounted persistent disk or
filestore). A failure on a READY slice is the job's own error and is not retried (except ssh's exit code 255, a
lost connection, which re-issues the command without recreating anything).
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import time
from typing import Callable, Sequence

from launch.remote import (Command, DryRunRunner, Layout, LaunchError, Runner, WaitFor, check, check_overrides,
                           default_local_tarball, execute, jax_pin, jaxalign_run_argv, logs_command, parse_env,
                           run_command, setup_command, shell_and, source_tarball_argv, subprocess_runner,
                           with_plugins)

# GCP resource names: lowercase letters, digits and hyphens, starting with a letter, at most 63 characters.
_NAME = re.compile(r"[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?")
_ZONE = re.compile(r"[a-z]+-[a-z]+[0-9]+-[a-z]")
_PROJECT = re.compile(r"[a-z][-a-z0-9]{4,28}[a-z0-9]")
_VERSION = re.compile(r"[a-z0-9][-a-z0-9._]{0,62}")
_WORKER = re.compile(r"all|0|[1-9][0-9]{0,4}")
_ACCELERATOR = re.compile(r"(v4|v5p|v5litepod|v6e)-([1-9][0-9]{0,4})")

# Sizes gcloud accepts for the generations sized in chips (v5e, v6e), from the Cloud TPU docs' slice tables.
_CHIP_SIZES = (1, 4, 8, 16, 32, 64, 128, 256)

# Default `--version` (TPU software image) per generation, from the Cloud TPU docs' runtime version table.
DEFAULT_RUNTIME = {
    "v4": "tpu-ubuntu2204-base",
    "v5p": "v2-alpha-tpuv5",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v6e": "v2-alpha-tpuv6e",
}


@dataclasses.dataclass(frozen=True)
class PodShape:
    """What an accelerator type means in machines: `hosts` TPU VMs (gcloud workers 0..hosts-1), one JAX process
    each, with `chips // hosts` chips per VM.

    | accelerator type | N counts     | chips | VMs (workers)                  | chips per VM |
    |------------------|--------------|-------|--------------------------------|--------------|
    | v4-N             | TensorCores  | N/2   | N/8 (v4-8: 1, v4-32: 4)        | 4            |
    | v5p-N            | TensorCores  | N/2   | N/8 (v5p-8: 1, v5p-16: 2)      | 4            |
    | v5litepod-N      | chips        | N     | 1 for N <= 8, else N/4         | N (<= 8), 4  |
    | v6e-N            | chips        | N     | 1 for N <= 8, else N/4         | N (<= 8), 4  |

    v4 and v5p have 2 TensorCores per chip and 4 chips per VM, so N must be a multiple of 8. v5e (v5litepod) and
    v6e have 1 TensorCore per chip; slices of 1, 4 or 8 chips are one VM (the 8-chip VM type), larger slices are
    built from 4-chip VMs (v5litepod-16: 4 VMs, v6e-256: 64 VMs). Assumption: this follows the public Cloud TPU
    docs' per-generation slice tables as of 2025; a custom `--topology` is not supported.
    """

    accelerator_type: str
    generation: str
    chips: int
    hosts: int

    @property
    def default_runtime(self) -> str:
        return DEFAULT_RUNTIME[self.generation]


def pod_shape(accelerator_type: str) -> PodShape:
    """The slice an accelerator type names, or one error saying which types and sizes exist."""
    expected = ("v4-N or v5p-N (N TensorCores, a multiple of 8), or v5litepod-N or v6e-N (N chips: "
                f"{', '.join(map(str, _CHIP_SIZES))})")
    match = _ACCELERATOR.fullmatch(accelerator_type or "")
    if not match:
        raise LaunchError(f"invalid --accelerator-type {accelerator_type!r}: expected {expected}")
    generation, n = match.group(1), int(match.group(2))
    if generation in ("v4", "v5p"):
        if n % 8:
            raise LaunchError(f"invalid --accelerator-type {accelerator_type!r}: {generation} sizes count "
                              f"TensorCores, a multiple of 8 (4 chips of 2 cores per VM)")
        return PodShape(accelerator_type, generation, chips=n // 2, hosts=n // 8)
    if n not in _CHIP_SIZES:
        raise LaunchError(f"invalid --accelerator-type {accelerator_type!r}: {generation} slices have "
                          f"{', '.join(map(str, _CHIP_SIZES))} chips")
    return PodShape(accelerator_type, generation, chips=n, hosts=1 if n <= 8 else n // 4)


@dataclasses.dataclass(frozen=True)
class Target:
    """An existing (or to-be) slice: the TPU name is also the queued-resource id when `--queued` is used."""

    name: str
    zone: str
    project: str | None = None

    def __post_init__(self):
        check("TPU name", self.name, _NAME, "lowercase letters, digits and '-', starting with a letter, "
                                            "at most 63 characters")
        check("--zone", self.zone, _ZONE, "a zone such as us-central2-b")
        if self.project is not None:
            check("--project", self.project, _PROJECT, "a project id (6-30 lowercase letters, digits and '-')")

    def flags(self) -> list[str]:
        """`--flag=value` form throughout: a value can never be mistaken for another flag."""
        return [f"--zone={self.zone}"] + ([f"--project={self.project}"] if self.project else [])


@dataclasses.dataclass(frozen=True)
class SliceSpec:
    """How to (re)create a slice: what `create` and the retry loop both need."""

    shape: PodShape
    version: str
    spot: bool = False
    queued: bool = False
    queue_timeout_s: float = 6 * 3600.0

    def __post_init__(self):
        check("--version", self.version, _VERSION, "a TPU runtime version such as tpu-ubuntu2204-base")


GCLOUD_TPU = ("gcloud", "compute", "tpus")


def create_argv(target: Target, spec: SliceSpec) -> list[str]:
    """`tpu-vm create` (blocks until the VMs exist) or `queued-resources create` (returns at once; the request
    waits for capacity, see `create_plan`)."""
    spot = ["--spot"] if spec.spot else []
    if spec.queued:
        return [*GCLOUD_TPU, "queued-resources", "create", target.name, f"--node-id={target.name}", *target.flags(),
                f"--accelerator-type={spec.shape.accelerator_type}", f"--runtime-version={spec.version}", *spot]
    return [*GCLOUD_TPU, "tpu-vm", "create", target.name, *target.flags(),
            f"--accelerator-type={spec.shape.accelerator_type}", f"--version={spec.version}", *spot]


def queued_state_argv(target: Target) -> list[str]:
    return [*GCLOUD_TPU, "queued-resources", "describe", target.name, *target.flags(), "--format=value(state.state)"]


def node_state_argv(target: Target) -> list[str]:
    return [*GCLOUD_TPU, "tpu-vm", "describe", target.name, *target.flags(), "--format=value(state)"]


def describe_argv(target: Target, queued: bool) -> list[str]:
    kind = "queued-resources" if queued else "tpu-vm"
    return [*GCLOUD_TPU, kind, "describe", target.name, *target.flags()]


def delete_argv(target: Target, queued: bool) -> list[str]:
    """A queued resource is deleted with --force, which deletes its node too; --quiet skips the prompt."""
    if queued:
        return [*GCLOUD_TPU, "queued-resources", "delete", target.name, *target.flags(), "--force", "--quiet"]
    return [*GCLOUD_TPU, "tpu-vm", "delete", target.name, *target.flags(), "--quiet"]


def ssh_argv(target: Target, command: str | None, worker: str = "all", keepalive: bool = False) -> list[str]:
    """`tpu-vm ssh` on `worker` (an index or all); `command` is one remote-shell string from launch.remote, or
    None for an interactive login. `keepalive` makes ssh give up on a VM that stopped answering (preempted) after
    about 3 minutes instead of waiting for TCP to time out, so the retry loop notices a preemption quickly; a
    quiet but healthy job is not affected, since sshd answers the probes."""
    check("--worker", worker, _WORKER, "a worker index or 'all'")
    cmd = [] if command is None else ["--command", command]
    alive = ["--ssh-flag=-oServerAliveInterval=30", "--ssh-flag=-oServerAliveCountMax=6"] if keepalive else []
    return [*GCLOUD_TPU, "tpu-vm", "ssh", target.name, *target.flags(), f"--worker={worker}", *alive, *cmd]


def scp_argv(target: Target, local: str, remote: str) -> list[str]:
    """Copy one local file to the same path on every worker."""
    return [*GCLOUD_TPU, "tpu-vm", "scp", local, f"{target.name}:{remote}", *target.flags(), "--worker=all"]


def create_plan(target: Target, spec: SliceSpec) -> list:
    """Create the slice; for a queued resource also wait until it is ACTIVE (its nodes exist)."""
    plan: list = [Command(tuple(create_argv(target, spec)), f"creating TPU {target.name}")]
    if spec.queued:
        plan.append(WaitFor(tuple(queued_state_argv(target)), f"queued resource {target.name}", ready=("ACTIVE",),
                            failed=("FAILED", "SUSPENDED"), timeout_s=spec.queue_timeout_s))
    return plan


@dataclasses.dataclass(frozen=True)
class SetupSpec:
    source: str = "head"
    pip: tuple[str, ...] = ()
    python: str = "python3"
    local_tarball: str | None = None


def setup_plan(target: Target, layout: Layout, setup: SetupSpec) -> list:
    """Build the source tarball here, copy it to every worker, unpack and install it there in a venv with the
    pinned jax's TPU build."""
    tarball = setup.local_tarball or default_local_tarball(target.name)
    pip = [f"jax[tpu]=={jax_pin()}", *setup.pip]
    return [
        Command(tuple(source_tarball_argv(setup.source, tarball)), "building the source tarball"),
        Command(tuple(ssh_argv(target, shell_and(["mkdir", "-p", layout.base]))), "creating the remote directory"),
        Command(tuple(scp_argv(target, tarball, layout.tarball)), "copying the source tarball"),
        Command(tuple(ssh_argv(target, setup_command(layout, setup.python, pip))), "installing jaxalign"),
    ]


def run_argv(target: Target, layout: Layout, experiment: str, workdir: str, overrides: Sequence[str],
             env: dict[str, str]) -> list[str]:
    """`jaxalign run` on every worker at once, with JAXALIGN_DISTRIBUTED=auto (jax.distributed.initialize())."""
    argv = jaxalign_run_argv(layout, experiment, workdir, overrides)
    return ssh_argv(target, run_command(layout, argv, {"JAXALIGN_DISTRIBUTED": "auto", **env}), keepalive=True)


GONE = "NOT_FOUND"
SSH_CONNECTION_FAILED = 255


def node_state(runner: Runner, target: Target) -> str:
    """The node's state (READY, PREEMPTED, TERMINATED, ...), or NOT_FOUND when describe fails (deleted node)."""
    rc, out = runner(node_state_argv(target))
    return out.strip() if rc == 0 and out.strip() else GONE


def run_with_retries(runner: Runner, target: Target, run: Sequence[str], recover: Sequence, retries: int,
                     sleep: Callable[[float], None] = time.sleep, wait_s: float = 30.0,
                     say: Callable[[str], None] = lambda msg: print(f"jaxalign tpu: {msg}", file=sys.stderr)) -> int:
    """Issue `run` until it succeeds; after a failure, recreate the slice (`recover`) if it is no longer READY, at
    most `retries` times. Returns the number of retries used; raises LaunchError when the job itself fails or the
    retries run out."""
    if retries < 0:
        raise LaunchError(f"invalid --retries {retries}: expected a number >= 0")
    used = 0
    while True:
        rc, _ = runner(run)
        if rc == 0:
            return used
        state = node_state(runner, target)
        if state == "READY" and rc != SSH_CONNECTION_FAILED:
            raise LaunchError(f"jaxalign run failed with exit code {rc} on TPU {target.name}, which is READY: "
                              "a job error, not a preemption; not retrying (see `jaxalign tpu logs`)")
        if used >= retries:
            raise LaunchError(f"jaxalign run failed with exit code {rc} and TPU {target.name} is {state}; "
                              f"all {retries} retries used")
        used += 1
        if state == "READY":
            say(f"ssh connection lost, TPU {target.name} is READY: re-issuing the run (retry {used}/{retries})")
            sleep(wait_s)
            continue
        say(f"TPU {target.name} is {state}: recreating it and resuming (retry {used}/{retries})")
        execute(recover, runner, sleep)


# ----------------------------------------------------------------------------------------------------------------
# Command line


def _slice_spec(args, required: bool) -> SliceSpec | None:
    if args.accelerator_type is None:
        if required:
            raise LaunchError("--accelerator-type is required here (to create or recreate the slice)")
        return None
    shape = pod_shape(args.accelerator_type)
    return SliceSpec(shape, args.version or shape.default_runtime, spot=args.spot, queued=args.queued,
                     queue_timeout_s=args.queue_timeout_s)


def _describe_shape(shape: PodShape) -> str:
    workers = "worker 0" if shape.hosts == 1 else f"workers 0-{shape.hosts - 1}"
    return (f"{shape.accelerator_type}: {shape.chips} chips on {shape.hosts} VM{'s' if shape.hosts > 1 else ''} "
            f"({workers}, one JAX process each)")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("name", help="TPU name (also the queued-resource id with --queued)")
    common.add_argument("--zone", required=True)
    common.add_argument("--project")
    common.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    layout = argparse.ArgumentParser(add_help=False)
    layout.add_argument("--remote-dir", default="jaxalign", help="on every worker, relative to the home directory")
    create = argparse.ArgumentParser(add_help=False)
    create.add_argument("--accelerator-type", help="v4-N, v5p-N, v5litepod-N or v6e-N")
    create.add_argument("--version", help="TPU runtime version (default: the generation's base image)")
    create.add_argument("--spot", action="store_true", help="Spot VMs (cheaper, preemptible)")
    create.add_argument("--queued", action="store_true", help="request through a queued resource")
    create.add_argument("--queue-timeout-s", type=float, default=6 * 3600.0)
    setup = argparse.ArgumentParser(add_help=False)
    setup.add_argument("--source", choices=("head", "worktree"), default="head",
                       help="ship `git archive HEAD` (default) or the working tree as it is")
    setup.add_argument("--pip", action="append", default=[], help="extra requirement to install (repeatable)")
    setup.add_argument("--python", default="python3", help="remote interpreter that creates the venv")
    setup.add_argument("--local-tarball", help="where to write the source tarball here (default: temp dir)")

    parser = argparse.ArgumentParser(prog="jaxalign tpu", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("create", parents=[common, create], help="create the slice (and wait for a queued one)")
    sub.add_parser("setup", parents=[common, layout, setup], help="copy the code to every worker and install it")
    run = sub.add_parser("run", parents=[common, layout, create, setup],
                         help="run an experiment on every worker, optionally recreating a preempted slice")
    run.add_argument("experiment")
    run.add_argument("--workdir", required=True, help="on persistent storage (gs://...) to resume after preemption")
    run.add_argument("overrides", nargs="*", help="config overrides, key=value")
    run.add_argument("--env", action="append", default=[], help="KEY=VALUE for the job (repeatable)")
    run.add_argument("--retries", type=int, default=0, help="recreate a preempted slice at most this many times")
    run.add_argument("--retry-wait-s", type=float, default=30.0)
    run.add_argument("--setup", action="store_true", help="run `setup` first")
    run.add_argument("--skip-override-check", action="store_true",
                     help="do not check the overrides against this checkout's config first")
    logs = sub.add_parser("logs", parents=[common, layout], help="print (or follow) the run log of a worker")
    logs.add_argument("--worker", default="0")
    logs.add_argument("--lines", type=int, default=100)
    logs.add_argument("--follow", action="store_true")
    ssh = sub.add_parser("ssh", parents=[common], help="log in to a worker, or run `-- COMMAND ARG ...` on workers")
    ssh.add_argument("--worker", default=None, help="index or all (default: 0 to log in, all with a command)")
    for action in ("status", "delete"):
        p = sub.add_parser(action, parents=[common], help=f"{action} the slice")
        p.add_argument("--queued", action="store_true", help="the slice was created with --queued")
    return parser


def main(argv: Sequence[str] | None = None, runner: Runner | None = None,
         sleep: Callable[[float], None] = time.sleep) -> int:
    """Entry point of `jaxalign tpu`; errors are raised as LaunchError for the CLI to print as one line."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[argv.index("--") + 1:] if "--" in argv else []
    args, extra = parser.parse_known_args(argv[:argv.index("--")] if "--" in argv else argv)
    if "--" in argv and args.action != "ssh":
        parser.error("only `jaxalign tpu ssh` takes `-- COMMAND ARG ...`")
    # argparse gives `run` only the overrides before the first option; the ones after come back as extras.
    if args.action == "run" and not any(e.startswith("-") for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    runner = DryRunRunner() if args.dry_run else (runner or subprocess_runner)
    target = Target(args.name, args.zone, args.project)
    say = (runner.note if isinstance(runner, DryRunRunner)
           else lambda msg: print(f"jaxalign tpu: {msg}", file=sys.stderr))

    if args.action == "create":
        spec = _slice_spec(args, required=True)
        say(_describe_shape(spec.shape))
        execute(create_plan(target, spec), runner, sleep)
        return 0
    if args.action == "setup":
        execute(setup_plan(target, Layout(args.remote_dir), _setup_spec(args)), runner, sleep)
        return 0
    if args.action == "run":
        return _run(args, target, runner, sleep, say)
    if args.action == "logs":
        rc, _ = runner(ssh_argv(target, logs_command(Layout(args.remote_dir), args.lines, args.follow), args.worker))
        return rc
    if args.action == "ssh":
        if command and command[0].startswith("-"):
            raise LaunchError(f"invalid remote command {command[0]!r}: it must start with a program name")
        remote = shell_and(command) if command else None
        rc, _ = runner(ssh_argv(target, remote, args.worker or ("all" if command else "0")))
        return rc
    if args.action == "status":
        rc, _ = runner(describe_argv(target, args.queued))
        return rc
    rc, _ = runner(delete_argv(target, args.queued))
    return rc


def _setup_spec(args) -> SetupSpec:
    return SetupSpec(args.source, tuple(args.pip), args.python, args.local_tarball)


def _run(args, target: Target, runner: Runner, sleep, say) -> int:
    layout = Layout(args.remote_dir)
    spec = _slice_spec(args, required=args.retries > 0)
    env = with_plugins(parse_env(args.env))
    if not args.skip_override_check:
        check_overrides(args.experiment, args.overrides)
    run = run_argv(target, layout, args.experiment, args.workdir, args.overrides, env)
    if spec is not None:
        say(_describe_shape(spec.shape))
    if args.retries < 0:
        raise LaunchError(f"invalid --retries {args.retries}: expected a number >= 0")
    if args.retries > 0 and not args.workdir.startswith("gs://"):
        say(f"--retries: the workdir {args.workdir!r} must survive the VMs being recreated (gs://... or a "
            "persistent mount), or a recreated slice starts from scratch")
    if args.setup:
        execute(setup_plan(target, layout, _setup_spec(args)), runner, sleep)
    recover = ([Command(tuple(delete_argv(target, spec.queued)), f"deleting TPU {target.name}", check=False),
                *create_plan(target, spec), *setup_plan(target, layout, _setup_spec(args))] if spec else [])
    if isinstance(runner, DryRunRunner):
        runner(run)
        if args.retries > 0:
            runner.note(f"if that fails and the slice is not READY (at most {args.retries} times): query the "
                        "state, recreate the slice, set it up and run again:")
            runner(node_state_argv(target))
            execute(recover, runner, sleep)
            runner(run)
        return 0
    if args.retries == 0:
        rc, _ = runner(run)
        if rc != 0:
            raise LaunchError(f"jaxalign run failed on TPU {target.name} with exit code {rc} "
                              "(see `jaxalign tpu logs`)")
        return 0
    run_with_retries(runner, target, run, recover, args.retries, sleep, args.retry_wait_s, say)
    return 0


if __name__ == "__main__":
    sys.exit(main())
