"""A killed `jaxalign run arith_dpo` resumes to the same result as an uninterrupted run (project non-negotiable).

The run under test is the real command line in a subprocess, with a tiny configuration passed as overrides. Run A
goes through uninterrupted. Run B is SIGKILLed once during SFT and once during DPO (each time right after a
mid-phase checkpoint appeared, so the resumed process has to restore and redo work), then re-run to completion, and
re-run once more after it finished (which must change nothing). Every re-run is the *same* command; nothing tells
it that it is resuming.

The subprocesses share a persistent XLA compilation cache, so only run A pays for compilation (it compiles to the
same executables, so this does not change the numbers).
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxalign.experiments.arith_kit import PairConfig

SFT_STEPS, DPO_STEPS, EVERY = 80, 30, 10

# Small enough for a few seconds of compute after compile, large enough that SFT learns the format, so sampled
# completions score differently, pairs carry signal and DPO moves the parameters (with an untrained model every
# sample is malformed, all pairs tie, and DPO's gradient is ~0, which would make the DPO half of the test vacuous).
OVERRIDES = [
    "task.num_operands=3",  # 1000 problems instead of 10000
    "model.d_model=64", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1", "model.head_dim=16",
    "model.mlp_dim=128",
    f"sft.steps={SFT_STEPS}", "sft.batch_size=32", "sft.optim.learning_rate=1e-2", "sft.optim.warmup_steps=5",
    "pairs.num_prompts=128", "pairs.samples_per_prompt=4",
    f"dpo.steps={DPO_STEPS}", "dpo.batch_size=16", f"dpo.eval_every={EVERY}", "dpo.optim.learning_rate=1e-3",
    "dpo.optim.warmup_steps=5",
    # The returned policy is the last DPO step, so params_sha256 checks the resumed DPO phase itself (with
    # selection it may be the SFT policy); the selection record (`guard`) is still compared in full below.
    "dpo.select_best=false",
    "num_val_prompts=64", "eval_fraction=0.064", "eval_batch_size=64",  # 64 test prompts; one sampler shape
    f"checkpoint.every_steps={EVERY}",
    "show_progress=false",
]
if "require_correct_chosen" in {f.name for f in dataclasses.fields(PairConfig)}:
    # A tiny SFT policy is almost never exactly right; keep pairs whose chosen side is merely better.
    OVERRIDES.append("pairs.require_correct_chosen=false")

RUN_TIMEOUT_S = 240
ROOT = Path(__file__).resolve().parents[3]


def _command(workdir: Path) -> list[str]:
    script = Path(sys.executable).with_name("jaxalign")
    entry = [str(script)] if script.exists() else [sys.executable, "-m", "launch.cli"]
    return entry + ["run", "arith_dpo", "--workdir", str(workdir), *OVERRIDES]


def _env(cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        # One CPU device, whatever the parent process simulates; LLVM at -O0, which compiles run A's programs much
        # faster (every run compared here uses it, so the comparison is unchanged).
        XLA_FLAGS="--xla_backend_optimization_level=0",
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    return env


def _run_to_completion(workdir: Path, cache: Path) -> None:
    proc = subprocess.run(_command(workdir), cwd=ROOT, env=_env(cache), capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, f"run in {workdir} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"


def _steps(directory: Path) -> list[int]:
    """Complete checkpoint steps in an orbax directory (temporaries of interrupted saves are not digits)."""
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


def _kill_when(workdir: Path, cache: Path, ready, what: str) -> None:
    """Start the command, SIGKILL it as soon as `ready()` holds; fail if it exits on its own first."""
    log = workdir.parent / f"{workdir.name}-killed-{time.monotonic_ns()}.stderr"
    with open(log, "w") as stderr:  # a file, not a pipe: a chatty child can never block on a full pipe
        proc = subprocess.Popen(_command(workdir), cwd=ROOT, env=_env(cache), stdout=subprocess.DEVNULL,
                                stderr=stderr)
        deadline = time.monotonic() + RUN_TIMEOUT_S
        try:
            while not ready():
                if proc.poll() is not None:
                    pytest.fail(f"run exited (rc {proc.returncode}) before {what}:\n{log.read_text()[-4000:]}")
                if time.monotonic() > deadline:
                    pytest.fail(f"timed out waiting for {what}")
                time.sleep(0.005)
            proc.kill()  # SIGKILL: no cleanup handlers, no flushing, exactly a crash
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert proc.returncode == -9, f"expected the run to die of SIGKILL, got rc {proc.returncode}"


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _comparable_results(workdir: Path) -> dict:
    results = json.loads((workdir / "results.json").read_text())
    results.pop("wall_seconds")
    return results


def _comparable_metrics(workdir: Path) -> list[dict]:
    # Throughput is timing, not result; everything else (loss, rewards, validation accuracy...) must match.
    return [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in _read_jsonl(workdir / "metrics.jsonl")]


def _checkpoint_arrays(step_dir: Path) -> dict[str, np.ndarray]:
    """Every array of a saved TrainState (params, optimizer state, step, rng, data position), by tree path."""
    import jax
    import orbax.checkpoint as ocp

    tree = ocp.StandardCheckpointer().restore(step_dir / "state")
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat}


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(tmp_path):
    """SIGKILL during SFT and again during DPO, re-run the same command: results, checkpoints and metrics match."""
    # pytest's tmp_path, so the XLA cache starts empty: the uninterrupted run compiles for real.
    cache, a, b = tmp_path / "xla_cache", tmp_path / "A", tmp_path / "B"
    _run_to_completion(a, cache)
    # Not vacuous: DPO moved the parameters away from the SFT policy it started from.
    sft_final = _checkpoint_arrays(a / "checkpoints" / "sft" / str(SFT_STEPS))
    dpo_final = _checkpoint_arrays(a / "checkpoints" / "dpo" / str(DPO_STEPS))
    params = [k for k in sft_final if k.startswith("['params']")]
    assert params and any(sft_final[k].tobytes() != dpo_final[k].tobytes() for k in params)

    sft_dir, dpo_dir = b / "checkpoints" / "sft", b / "checkpoints" / "dpo"
    # 1. Killed during SFT, after the first mid-phase checkpoint beyond step 10 exists.
    _kill_when(b, cache, lambda: any(s >= 2 * EVERY for s in _steps(sft_dir)), "a mid-SFT checkpoint")
    assert _steps(sft_dir)[-1] < SFT_STEPS, f"the kill came too late: SFT already finished ({_steps(sft_dir)})"
    assert not dpo_dir.exists() and not (b / "results.json").exists()

    # 2. Resumed, and killed again during DPO, after the first DPO checkpoint (and its validation) exists.
    _kill_when(b, cache, lambda: bool(_steps(dpo_dir)), "a mid-DPO checkpoint")
    assert _steps(sft_dir)[-1] == SFT_STEPS
    assert _steps(dpo_dir)[-1] < DPO_STEPS, f"the kill came too late: DPO already finished ({_steps(dpo_dir)})"
    assert not (b / "results.json").exists()

    # 3. Resumed to completion.
    _run_to_completion(b, cache)
    failures = _differences(a, b)

    # 4. Re-running the command of a finished run changes nothing (it restores the final checkpoints).
    _run_to_completion(b, cache)
    failures += [f"after re-running the finished run: {f}" for f in _differences(a, b)]

    assert not failures, "the resumed run differs from the uninterrupted one:\n- " + "\n- ".join(failures)


def _differences(a: Path, b: Path) -> list[str]:
    """Everything in which run B differs from run A (empty when B reproduces A), most fundamental first."""
    found = []
    results_a, results_b = _comparable_results(a), _comparable_results(b)
    if results_b["params_sha256"] != results_a["params_sha256"]:
        found.append(f"params_sha256 {results_b['params_sha256']} != {results_a['params_sha256']}")

    # The final SFT state (the DPO reference and pair sampler) and the final DPO state are bit-identical.
    for phase, final in (("sft", SFT_STEPS), ("dpo", DPO_STEPS)):
        arrays_a = _checkpoint_arrays(a / "checkpoints" / phase / str(final))
        arrays_b = _checkpoint_arrays(b / "checkpoints" / phase / str(final))
        if sorted(arrays_a) != sorted(arrays_b):
            found.append(f"{phase} step {final}: different state trees")
            continue
        for key in arrays_a:
            x, y = arrays_a[key], arrays_b[key]
            if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
                found.append(f"{phase} checkpoint step {final}: {key} is not bit-identical")

    with np.load(a / "pairs.npz") as pa, np.load(b / "pairs.npz") as pb:
        if sorted(pa.files) != sorted(pb.files) or not all(np.array_equal(pa[k], pb[k]) for k in pa.files):
            found.append("pairs.npz differs")

    # metrics.jsonl: each (phase, step) logged once, and the same records as the uninterrupted run.
    keys_a = [(r.get("phase"), r["step"]) for r in _read_jsonl(a / "metrics.jsonl")]
    keys_b = [(r.get("phase"), r["step"]) for r in _read_jsonl(b / "metrics.jsonl")]
    duplicated = sorted({k for k in keys_b if keys_b.count(k) > 1})
    if duplicated:
        found.append(f"metrics.jsonl logs these (phase, step) more than once: {duplicated}")
    if keys_b != keys_a:
        found.append(f"metrics.jsonl logs (phase, step) {keys_b}, the uninterrupted run {keys_a}")
    elif _comparable_metrics(b) != _comparable_metrics(a):
        found.append("metrics.jsonl records have different values")

    if results_b["guard"] != results_a["guard"]:
        found.append(f"guard (validation history / selected checkpoint) {results_b['guard']} != {results_a['guard']}")
    others = sorted(k for k in set(results_a) | set(results_b)
                    if k not in ("params_sha256", "guard") and results_a.get(k, "absent") != results_b.get(k, "absent")
                    and not _both_nan(results_a.get(k), results_b.get(k)))
    if others:
        found.append(f"results.json differs in {others}")
    return found


def _both_nan(x, y) -> bool:
    return isinstance(x, float) and isinstance(y, float) and np.isnan(x) and np.isnan(y)
