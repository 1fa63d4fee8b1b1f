"""A kill-and-resume harness for experiments that checkpoint with `jaxalign.train.checkpoint.PytreeCheckpointer`
(every run of `rl.harness`).

`run_registered` runs `python -m jaxalign.registry EXPERIMENT --workdir DIR key=value...` (the experiment registry's
entry point; rl/ never imports the CLI in launch/) in a child process whose checkpoint save is wrapped to note every
saved step and, optionally, to SIGKILL the process right after a given step is on disk: a real kill at a
deterministic point, so a test cannot race the run. `run_differences` then compares two work directories (final
checkpoint arrays bit for bit, results.json without timings, metrics.jsonl), which is what "a killed run resumes to
the same result as an uninterrupted one" means. `assert_refused_in_one_line` checks the other half of a run's
contract: bad input is one error line before any directory exists.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

_CHILD = """
import os, signal, sys
from jaxalign.train import checkpoint
save = checkpoint.PytreeCheckpointer.save
def save_then_die(self, step, tree, record=None):
    saved = save(self, step, tree, record)
    with open(os.environ["SAVED_STEPS"], "a") as f:
        f.write(f"{step}\\n")
    if step == int(os.environ["KILL_AFTER_STEP"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return saved
checkpoint.PytreeCheckpointer.save = save_then_die
from jaxalign.registry import main
sys.exit(main())  # what `python -m jaxalign.registry` does, after the wrapping above
"""


def run_registered(experiment: str, workdir: Path, overrides: list[str], compilation_cache: Path,
            kill_after: int | None = None, timeout: float = 180,
            fast_compile: bool = False) -> tuple[subprocess.CompletedProcess, list[int]]:
    """Run the experiment through the registry's entry point in a child process (CPU, a persistent compilation
    cache shared between calls so only the first compiles); returns the finished process and the checkpoint steps it
    saved. fast_compile: LLVM at -O0 in the child, which compiles much faster; the executables differ from -O2's,
    so every run a test compares must use the same setting."""
    saved = workdir.parent / f"{workdir.name}-saved-{time.monotonic_ns()}.txt"
    saved.touch()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if fast_compile:
        env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
    env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(compilation_cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
               KILL_AFTER_STEP=str(-1 if kill_after is None else kill_after), SAVED_STEPS=str(saved))
    proc = subprocess.run([sys.executable, "-c", _CHILD, experiment, "--workdir", str(workdir), *overrides],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return proc, [int(line) for line in saved.read_text().split()]


def checkpoint_arrays(workdir: Path, step: int) -> dict[str, np.ndarray]:
    """The arrays of WORKDIR/checkpoints/STEP/state as NumPy, by tree path."""
    import jax
    import orbax.checkpoint as ocp

    tree = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def comparable_results(workdir: Path, timing_keys: set[str]) -> dict:
    """results.json without timings and without config.show_progress (a presentation field)."""
    results = {k: v for k, v in json.loads((workdir / "results.json").read_text()).items() if k not in timing_keys}
    results["config"].pop("show_progress")
    return results


def run_differences(a: Path, b: Path, final_step: int, timing_keys: set[str]) -> list[str]:
    """How run B differs from run A: final checkpoint arrays (bit for bit), results.json (timings aside) and
    metrics.jsonl. Empty when B reproduced A."""
    found = []
    final_a, final_b = checkpoint_arrays(a, final_step), checkpoint_arrays(b, final_step)
    if sorted(final_a) != sorted(final_b):
        found.append("the final checkpoints hold different leaves")
    found += [f"final checkpoint {k} is not bit-identical" for k in sorted(final_a)
              if k in final_b and final_a[k].tobytes() != final_b[k].tobytes()]
    results_a, results_b = comparable_results(a, timing_keys), comparable_results(b, timing_keys)
    found += [f"results.json {k}: {results_b.get(k)!r} != {results_a.get(k)!r}"
              for k in sorted(set(results_a) | set(results_b)) if results_a.get(k) != results_b.get(k)]
    if (b / "metrics.jsonl").read_text() != (a / "metrics.jsonl").read_text():
        found.append("metrics.jsonl differs")
    return found


def assert_refused_in_one_line(main, argv: list[str], workdir: Path, message: str, capsys) -> None:
    """`main(argv)` (the CLI's entry point) exits with 2 and one stderr line "jaxalign: error: ..." containing
    `message`, no traceback, and `workdir` was never created: bad input is refused before any work."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jaxalign: error:") and len(err.splitlines()) == 1, err
    assert message in err and "Traceback" not in err, err
    assert not Path(workdir).exists()
