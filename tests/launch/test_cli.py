"""Tests for the `jaxalign` command line: listing, and one clear line (exit code 2, no traceback) per user error.

Most cases run the real console script in a subprocess, because what is pinned is what a user sees: the exit
code and stderr. Cases that fail while parsing overrides also run in-process (fast) through `launch.cli.main`.
What `jaxalign run` shares with `python -m jaxalign.registry` (the run log, the error handling) is tested in
tests/jaxalign/test_registry.py.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.cli import main

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 240

# A tiny model, for the cases that have to get as far as creating a checkpoint.
TINY = [
    "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1", "model.head_dim=16",
    "model.mlp_dim=64", "sft.batch_size=8", "sft.steps=4", "checkpoint.every_steps=2", "show_progress=false",
]


def _entry() -> list[str]:
    script = Path(sys.executable).with_name("jaxalign")
    return [str(script)] if script.exists() else [sys.executable, "-m", "launch.cli"]


def _env(num_devices: int = 1) -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    if num_devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
    return env


def jaxalign(*args: str, num_devices: int = 1) -> subprocess.CompletedProcess:
    """Run the console script with `args` on `num_devices` simulated CPU devices."""
    return subprocess.run(_entry() + list(args), cwd=ROOT, env=_env(num_devices), capture_output=True, text=True,
                          timeout=TIMEOUT_S)


def assert_clean_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit code 2, no traceback, and a first stderr line 'jaxalign: error: ...' containing every fragment."""
    assert proc.returncode == 2, f"rc {proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [i for i, line in enumerate(lines) if line.startswith("jaxalign: error:")]
    assert len(errors) == 1, f"expected one 'jaxalign: error:' line in stderr:\n{proc.stderr[-4000:]}"
    first = lines[errors[0]]
    for fragment in fragments:
        assert fragment in first, f"{fragment!r} not in the error line: {first}"
    return first


# --- list ---------------------------------------------------------------------------------------------------------


def test_list_prints_each_experiment_with_its_description():
    """`jaxalign list` prints one line per experiment: its name, then its description."""
    proc = jaxalign("list")
    assert proc.returncode == 0, proc.stderr
    from jaxalign.registry import EXPERIMENTS

    printed = dict(line.split(None, 1) for line in proc.stdout.splitlines())
    assert printed == {name: description for name, (description, _) in EXPERIMENTS.items()}
    assert printed["arith_dpo"] == ("SFT on noisy ARITH demonstrations, then DPO on on-policy oracle-labelled pairs "
                                    "(the main job)")


def test_objectives_lists_every_registered_objective_with_what_it_reads():
    """`jaxalign objectives` prints one line per registered objective, sorted: family, reference use, extras, state
    and hyper-parameters; `--names` the names alone, one per line."""
    from jaxalign.losses import OBJECTIVES, SPECS

    proc = jaxalign("objectives", "--names")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == sorted(OBJECTIVES)
    table = jaxalign("objectives").stdout.splitlines()
    assert table[0].split()[:5] == ["objective", "family", "reference", "extras", "state"]
    rows = {line.split()[0]: line.split() for line in table[1:]}
    assert sorted(rows) == sorted(OBJECTIVES)
    assert rows["sigmoid"][1:3] == ["pairwise", "yes"] and "beta" in rows["sigmoid"][5].split(",")
    assert rows["simpo"][2] == "no"  # reference-free
    stateful = [name for name, spec in SPECS.items() if spec.state is not None]
    assert stateful and all(rows[name][4] == "yes" for name in stateful)


def test_list_does_not_import_jax():
    """Listing stays cheap: it imports no JAX, Flax or orbax module, and of jaxalign only the registry, the plugin
    loader, the overrides and the field checks they re-word (no experiment, model or training module)."""
    code = ("import sys; from launch.cli import main; rc = main(['list']); "
            "light = {'jaxalign', 'jaxalign.overrides', 'jaxalign.plugins', 'jaxalign.registry', "
            "'jaxalign.validation'}; "
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax', 'orbax', 'jaxalign') "
            "and m not in light); "
            "print(rc, heavy)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.stdout.splitlines()[-1] == "0 []", proc.stdout + proc.stderr


# --- bad command lines (argument and override parsing) ------------------------------------------------------------


def test_unknown_key_names_the_key_and_the_closest_valid_one(tmp_path):
    """An unknown override key: exit 2, one line naming the key and the closest valid key."""
    proc = jaxalign("run", "arith_dpo", "--workdir", str(tmp_path / "w"), "dpo.bata=1")
    assert_clean_error(proc, "unknown config key 'dpo.bata'; did you mean 'dpo.beta'?")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "w").exists(), "a rejected command line must not create the work directory"


@pytest.mark.parametrize("override, fragments", [
    ("nosuch=1", ["unknown config key 'nosuch'"]),
    ("model=3", ["'model'"]),  # a nested config cannot be set as a whole
    ("dpo.steps=abc", ["dpo.steps", "'abc'", "expected an integer"]),
    ("show_progress=maybe", ["show_progress", "'maybe'", "boolean"]),
    ("dpo.beta=-0.1", ["dpo.beta", "-0.1", "positive"]),
    ("dpo.beta=0", ["dpo.beta", "got 0"]),
    ("model.dtype=float16", ["model.dtype", "float16"]),
    ("pairs.samples_per_prompt=1", ["pairs.samples_per_prompt", "1"]),
    ("mesh.tensor=0", ["mesh.tensor", "0"]),
    ("sft.steps", ["'sft.steps' is not of the form key=value"]),
])
def test_bad_overrides_are_one_clear_error(override, fragments, tmp_path, capsys):
    """Each bad override returns exit code 2 with one 'jaxalign: error:' line naming the key and the value."""
    rc = main(["run", "arith_dpo", "--workdir", str(tmp_path / "w"), override])
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == ""
    first = captured.err.splitlines()[0]
    assert first.startswith("jaxalign: error:")
    for fragment in fragments:
        assert fragment in first, f"{fragment!r} not in: {first}"


@pytest.mark.parametrize("override, fragments", [
    ("dpo.steps=abc", ["dpo.steps", "'abc'", "expected an integer"]),
    ("dpo.beta=-0.1", ["dpo.beta", "-0.1"]),
])
def test_bad_override_from_the_console_script(override, fragments, tmp_path):
    """The same errors seen from a shell: exit code 2, stderr has no traceback and names key and value."""
    assert_clean_error(jaxalign("run", "arith_dpo", "--workdir", str(tmp_path / "w"), override), *fragments)


def test_unknown_experiment_lists_the_available_ones(tmp_path, capsys):
    """`jaxalign run NAME` with an unregistered name: exit 2, naming it and the available experiments."""
    assert main(["run", "nosuch", "--workdir", str(tmp_path)]) == 2
    from jaxalign.registry import EXPERIMENTS

    assert capsys.readouterr().err.strip() == (f"jaxalign: error: unknown experiment 'nosuch'; available: "
                                               f"{', '.join(sorted(EXPERIMENTS))}")


def test_unknown_benchmark_is_a_clear_error(capsys):
    """`jaxalign bench NAME` with an unknown benchmark: exit 2, naming the available ones."""
    assert main(["bench", "nosuch"]) == 2
    assert "unknown benchmark 'nosuch'; available: dpo-throughput" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [[], ["run", "arith_dpo"], ["list", "extra"], ["frobnicate"]])
def test_malformed_command_lines_are_usage_errors(argv, capsys):
    """Missing command, missing --workdir, stray arguments, unknown command: argparse's usage error, exit 2."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "usage: jaxalign" in capsys.readouterr().err


# --- configurations that only fail against the machine or the work directory --------------------------------------


def test_mesh_that_does_not_match_the_device_count(tmp_path):
    """mesh.data=3 on one device: exit 2, naming the mesh sizes and the available device count."""
    first = assert_clean_error(jaxalign("run", "arith_dpo", "--workdir", str(tmp_path / "w"), "mesh.data=3"),
                               "mesh", "data=3", "1 are available")
    assert "3 devices" in first


@pytest.mark.parametrize("model_overrides", [
    ["model.n_heads=3", "model.n_kv_heads=3"],
    # The same target reached through valid intermediate configs (independent of how overrides are validated).
    ["model.n_kv_heads=1", "model.n_heads=3", "model.n_kv_heads=3"],
])
def test_heads_not_divisible_by_the_tensor_axis(model_overrides, tmp_path):
    """Two devices, mesh.tensor=2, 3 heads: exit 2, naming model.n_heads=3 and the tensor axis size 2."""
    proc = jaxalign("run", "arith_dpo", "--workdir", str(tmp_path / "w"), "mesh.tensor=2", *model_overrides,
                    num_devices=2)
    assert_clean_error(proc, "model.n_heads=3", "tensor axis of size 2")


def test_batch_not_divisible_by_the_data_axis(tmp_path):
    """Two data-parallel devices and an odd batch: exit 2, naming the batch key and the shard count, and no work
    directory."""
    proc = jaxalign("run", "arith_dpo", "--workdir", str(tmp_path / "w"), "sft.batch_size=7", num_devices=2)
    assert_clean_error(proc, "sft.batch_size", "7", "2 batch shards")
    assert not (tmp_path / "w").exists()  # refused before the claim: no work directory is left behind


def _steps(directory: Path) -> list[int]:
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


def test_resuming_a_checkpoint_of_a_different_model(tmp_path):
    """Re-running a work directory with another model.d_model: exit 2, naming what differs.

    The work directory's config.json catches it first; without that file (say, checkpoints copied elsewhere) the
    checkpoint's own metadata does, naming the checkpoint.
    """
    workdir = tmp_path / "w"
    sft_dir = workdir / "checkpoints" / "sft"
    # Create a checkpoint with the tiny model, and stop the run there (it would go on to sample pairs).
    with open(tmp_path / "first-run.stderr", "w") as stderr:  # a file: a chatty child never blocks on a pipe
        proc = subprocess.Popen(_entry() + ["run", "arith_dpo", "--workdir", str(workdir), *TINY], cwd=ROOT,
                                env=_env(), stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            deadline = time.monotonic() + TIMEOUT_S
            while not _steps(sft_dir) and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            proc.kill()
            proc.wait()
    assert _steps(sft_dir), f"no SFT checkpoint appeared:\n{(tmp_path / 'first-run.stderr').read_text()[-4000:]}"
    # a run starts by saying what its preference phase optimises, every hyper-parameter resolved
    assert ("objective of dpo: sigmoid(beta=2.0, f_alpha=0.5, f_divergence=reverse_kl, label_smoothing=0.0) + 1 x "
            "chosen NLL (RPO); reference: cached") in (tmp_path / "first-run.stderr").read_text()

    proc = jaxalign("run", "arith_dpo", "--workdir", str(workdir), *TINY, "model.d_model=48")
    assert_clean_error(proc, str(workdir / "config.json"), "model.d_model", "32", "48")

    (workdir / "config.json").unlink()
    proc = jaxalign("run", "arith_dpo", "--workdir", str(workdir), *TINY, "model.d_model=48")
    first = assert_clean_error(proc, str(sft_dir), "d_model", "32", "48")
    assert "different" in first

    # The run directory keeps its own log: one header per attempt, and the refused attempts' tracebacks (which the
    # terminal does not show).
    log = (workdir / "logs" / "run.log").read_text()
    assert log.count("=== ") == 3 and log.count("model.d_model=48") == 2
    assert log.count("Traceback") == 2 and "d_model" in log.split("Traceback")[-1]


# --- discoverable configuration: NAME --help and --config FILE ---------------------------------------------------


def test_run_name_help_lists_every_key_with_type_default_and_description(capsys):
    """`jaxalign run NAME --help` prints the experiment's description and one line per config key (type, default,
    and the field's description where the code documents it), instead of argparse's generic usage."""
    from jaxalign.overrides import valid_keys
    from jaxalign.registry import get_experiment

    assert main(["run", "arith_dpo", "--help"]) == 0
    out = capsys.readouterr().out
    cfg = get_experiment("arith_dpo").default_config()
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert set(valid_keys(cfg)) <= set(lines), set(valid_keys(cfg)) - set(lines)
    assert lines["dpo.beta"].split()[1:6] == ["float", "|", "None", "=", "2.0:"] and "KL strength" in lines["dpo.beta"]
    assert "on-policy oracle-labelled pairs" in out and "aliases: loss = dpo.objective" in out
    assert main(["run", "no_such_experiment", "--help"]) == 2


def test_a_runs_config_json_fed_back_with_config_is_the_same_config(tmp_path):
    """Any run's config.json is a --config file: it reproduces the config, and key=value overrides win over it."""
    from jaxalign.overrides import apply_overrides
    from jaxalign.registry import get_experiment, run_overrides
    from jaxalign.rundir import claim

    changed = ["dpo.beta=0.5", "loss=ipo", "sft.steps=7", "lora.rank=4", "seed=3"]
    cfg = apply_overrides(get_experiment("arith_dpo").default_config(), changed)
    claim(cfg, str(tmp_path))
    fed_back = run_overrides("arith_dpo", [], config_file=str(tmp_path / "config.json"))
    assert apply_overrides(get_experiment("arith_dpo").default_config(), fed_back) == cfg
    on_top = run_overrides("arith_dpo", ["seed=9"], config_file=str(tmp_path / "config.json"))
    assert apply_overrides(get_experiment("arith_dpo").default_config(), on_top).seed == 9

    (tmp_path / "partial.yaml").write_text("dpo:\n  beta: 0.3\n  bata: 1\n")
    with pytest.raises(ValueError, match=r"partial\.yaml: unknown config key 'dpo\.bata'; did you mean 'dpo\.beta'"):
        run_overrides("arith_dpo", [], config_file=str(tmp_path / "partial.yaml"))
    (tmp_path / "broken.json").write_text('{"seed": 1,\n "dpo": {"beta": }}')
    with pytest.raises(ValueError, match=r"broken\.json line 2 column \d+: not valid JSON"):
        run_overrides("arith_dpo", [], config_file=str(tmp_path / "broken.json"))


def test_bench_help_lists_the_benchmarks():
    from launch.cli import BENCHMARKS

    proc = jaxalign("bench", "--help")
    assert proc.returncode == 0 and all(name in " ".join(proc.stdout.split()) for name in BENCHMARKS), proc.stdout
