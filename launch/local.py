"""`jaxalign local`: a multi-process run on one machine, the same code path as a pod.

    jaxalign local --processes N [--devices-per-process M] [--port P] run NAME --workdir DIR [key=value ...]

starts N `jaxalign run` processes on localhost. They find each other through the JAXALIGN_* environment
(`jaxalign.distributed`) and JAX's coordination service on 127.0.0.1:P (a free port unless --port is given), each
with M CPU devices and gloo collectives, so a laptop runs the global arrays, per-process data loading and
multi-process checkpoints a TPU pod runs. Every output line of process i is printed as "[pi] ..." and written
to DIR/logs/process_i.log.

Failure handling, so a dead process never leaves the others hanging: when one process exits with a non-zero code
(or is killed), the survivors get `GRACE_SECONDS` to stop on their own (JAX's coordination service aborts them
once the dead peer misses its heartbeats), then SIGTERM, then SIGKILL (JAX's preemption handler catches SIGTERM in
a process that joined jax.distributed, so SIGKILL is what stops a stuck one); the launcher exits 1 naming the
first process that failed and its exit code. SIGTERM or Ctrl-C to the launcher stops every child the same way.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence, TextIO

from jaxalign import distributed

# How long survivors may take to notice a dead peer themselves (the heartbeat timeout plus slack) before the
# launcher terminates them; then how long SIGTERM may take before SIGKILL.
GRACE_SECONDS = distributed.HEARTBEAT_TIMEOUT_SECONDS + 10
TERMINATE_SECONDS = 5
POLL_SECONDS = 0.1
ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Failure:
    """The first process that failed and how."""

    process: int
    returncode: int

    def describe(self) -> str:
        if self.returncode < 0:
            try:
                name = signal.Signals(-self.returncode).name
            except ValueError:
                name = f"signal {-self.returncode}"
            return f"process {self.process} was killed by {name} (exit code {self.returncode})"
        return f"process {self.process} exited with code {self.returncode}"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it), for the coordination service."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_positive(name: str, value: int) -> int:
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def child_env(base: Mapping[str, str], address: str, processes: int, process_id: int,
              devices_per_process: int) -> dict[str, str]:
    """The environment of process `process_id`: the JAXALIGN_* contract of `jaxalign.distributed`, unbuffered
    output (lines reach the launcher as they are printed) and CPU devices unless JAX_PLATFORMS says otherwise."""
    env = dict(base)
    env.update({
        distributed.COORDINATOR_ADDRESS: address,
        distributed.NUM_PROCESSES: str(processes),
        distributed.PROCESS_ID: str(process_id),
        distributed.LOCAL_DEVICE_COUNT: str(devices_per_process),
        "PYTHONUNBUFFERED": "1",
    })
    env.pop(distributed.DISTRIBUTED, None)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), base.get("PYTHONPATH", "")]))
    return env


def child_command(run_argv: Sequence[str]) -> list[str]:
    """`python -m launch.cli run ...` with this interpreter, so children use the launcher's environment."""
    return [sys.executable, "-m", "launch.cli", *run_argv]


def _pump(stream: TextIO, prefix: str, log_path: Path, out: TextIO, lock: threading.Lock) -> None:
    """Copy a child's output line by line to its log file and, prefixed, to the launcher's stdout."""
    with open(log_path, "a", buffering=1) as log:
        for line in iter(stream.readline, ""):
            log.write(line)
            with lock:
                out.write(f"{prefix} {line}" if line.endswith("\n") else f"{prefix} {line}\n")
                out.flush()
    stream.close()


def _stop(procs: Sequence[subprocess.Popen], sig: int) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                p.send_signal(sig)
            except ProcessLookupError:
                pass


def supervise(procs: Sequence[subprocess.Popen], grace_seconds: float = GRACE_SECONDS,
              terminate_seconds: float = TERMINATE_SECONDS, clock: Callable[[], float] = time.monotonic,
              say: Callable[[str], None] = print) -> Failure | None:
    """Wait for every process; after the first failure give the rest `grace_seconds`, then SIGTERM, then SIGKILL.
    Returns the first failure (None when all exited 0)."""
    failure, failed_at, terminated_at = None, None, None
    while True:
        codes = [p.poll() for p in procs]
        if failure is None:
            for i, code in enumerate(codes):
                if code not in (None, 0):
                    failure, failed_at = Failure(i, code), clock()
                    say(f"jaxalign local: {failure.describe()}; stopping the other processes "
                        f"(within {grace_seconds + terminate_seconds:.0f} s)")
                    break
        if all(code is not None for code in codes):
            return failure
        if failure is not None:
            if terminated_at is None and clock() - failed_at >= grace_seconds:
                _stop(procs, signal.SIGTERM)
                terminated_at = clock()
            elif terminated_at is not None and clock() - terminated_at >= terminate_seconds:
                _stop(procs, signal.SIGKILL)
        time.sleep(POLL_SECONDS)


def _exit_on_sigterm():
    """Make SIGTERM to the launcher raise SystemExit, so its cleanup stops the children instead of orphaning
    them; returns the previous handler (None when not in the main thread, where handlers cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, handler)


def launch(run_argv: Sequence[str], workdir: str, processes: int, devices_per_process: int = 1,
           port: int | None = None, out: TextIO | None = None,
           grace_seconds: float = GRACE_SECONDS) -> int:
    """Start `processes` copies of `jaxalign <run_argv>` (run_argv starts with "run"), wait for them; the exit
    code: 0 when all succeeded, 1 (with one message naming the process) when any failed."""
    check_positive("--processes", processes)
    check_positive("--devices-per-process", devices_per_process)
    if port is not None and not 0 < port < 65536:
        raise ValueError(f"--port must be in 1-65535, got {port!r}")
    out = out or sys.stdout
    address = f"127.0.0.1:{port or free_port()}"
    logs = Path(workdir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    lock, procs, pumps = threading.Lock(), [], []

    def say(message: str, stream: TextIO = out) -> None:
        with lock:
            print(message, file=stream, flush=True)

    say(f"jaxalign local: {processes} processes x {devices_per_process} CPU devices, coordinator {address}, "
        f"logs in {logs}")
    previous = _exit_on_sigterm()
    try:
        for i in range(processes):
            (logs / f"process_{i}.log").unlink(missing_ok=True)
            proc = subprocess.Popen(child_command(run_argv), env=child_env(os.environ, address, processes, i,
                                                                            devices_per_process),
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
            procs.append(proc)
            say(f"jaxalign local: started process {i} (pid {proc.pid})")
            pump = threading.Thread(target=_pump, args=(proc.stdout, f"[p{i}]", logs / f"process_{i}.log", out, lock),
                                    daemon=True)
            pump.start()
            pumps.append(pump)
        failure = supervise(procs, grace_seconds=grace_seconds, say=say)
    except BaseException:  # Ctrl-C or an error here: never leave children behind
        _stop(procs, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(TERMINATE_SECONDS)
            except subprocess.TimeoutExpired:
                p.kill()
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    for pump in pumps:
        pump.join(timeout=5)
    if failure is None:
        say(f"jaxalign local: all {processes} processes finished")
        return 0
    codes = ", ".join(f"p{i}={p.returncode}" for i, p in enumerate(procs))
    say(f"jaxalign local: error: {failure.describe()} (exit codes: {codes}); see {logs}/process_{failure.process}.log",
        sys.stderr)
    return 1
