"""What every fault-injection test checks, written once: the user's files are unchanged (checksums before and
after), stderr is one `jaxalign: error:` line naming what went wrong, and the command line as a user runs it."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# A tiny ARITH main job: three operands, a one-layer model, small SFT batches.
TINY_ARITH = [
    "task.num_operands=3", "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1",
    "model.head_dim=16", "model.mlp_dim=64", "sft.batch_size=8", "show_progress=false",
]


def tree_digest(path: Path) -> dict[str, str]:
    """sha256 of every file under `path`, by relative path: what the user had, to compare before and after."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def assert_one_error(err: str, *fragments: str) -> None:
    """stderr is a few lines at most, with exactly one 'jaxalign: error:' line holding every fragment."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) <= 3, err
    errors = [line for line in lines if line.startswith("jaxalign: error:")]
    assert len(errors) == 1, err
    for fragment in fragments:
        assert fragment in errors[0], f"{fragment!r} not in {errors[0]}"


def run_arith(workdir: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`jaxalign run arith_dpo --workdir WORKDIR OVERRIDES...` in a child process, as a user runs it."""
    script = Path(sys.executable).with_name("jaxalign")
    entry = [str(script)] if script.exists() else [sys.executable, "-m", "launch.cli"]
    return subprocess.run(entry + ["run", "arith_dpo", "--workdir", str(workdir), *overrides], cwd=ROOT,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=240)


# A child process whose writes under WORKDIR fail as a read-only file system or a full disk would fail them: Python's
# `open` for writing and `os.makedirs` raise OSError(ERRNO) for paths under WORKDIR containing PATTERN. Then
# `jaxalign ARGS...` runs in it exactly as from the shell.
_FAILING_WRITES = """
import builtins, io, os, sys
workdir, code, pattern = os.path.abspath(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
real_open, real_makedirs = builtins.open, os.makedirs

def refused(path):
    path = os.path.abspath(os.fsdecode(path))
    return path.startswith(workdir) and pattern in path

def fail(path):
    raise OSError(code, os.strerror(code), os.fsdecode(path))

def open_(file, mode="r", *args, **kwargs):
    if isinstance(file, (str, bytes, os.PathLike)) and set(mode) & set("wax+") and refused(file):
        fail(file)
    return real_open(file, mode, *args, **kwargs)

def makedirs(name, *args, **kwargs):
    if refused(name) and not os.path.isdir(name):
        fail(name)
    return real_makedirs(name, *args, **kwargs)

builtins.open = io.open = open_
os.makedirs = makedirs
from launch.cli import main
sys.exit(main(sys.argv[4:]))
"""


def run_with_failing_writes(workdir: Path, code: int, pattern: str, *args: str) -> subprocess.CompletedProcess:
    """`jaxalign ARGS...` in a child process whose writes under `workdir` matching `pattern` fail with errno `code`."""
    return subprocess.run([sys.executable, "-c", _FAILING_WRITES, str(workdir), str(code), pattern, *args],
                          cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                          timeout=240)
