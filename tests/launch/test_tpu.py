"""Tests for `jaxalign tpu`: pod shapes, the exact gcloud argv per pod shape, validation of every name that reaches
a command line, injection-proof remote commands (round-tripped through shlex and through a real bash), --dry-run,
and the preemption retry loop driven by a fake `gcloud` executable on PATH.

Nothing here needs gcloud or a network: the fakes record their argv in a JSON-lines file.
"""
from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from launch import cli, remote, tpu
from launch.remote import LaunchError

ZONE = "us-central2-b"
HOSTILE_WORKDIR = "gs://bucket/run 1; touch PWNED"
HOSTILE_OVERRIDES = [
    "dpo.beta=0.5",
    "a=$(touch PWNED)",
    "b=`touch PWNED`",
    "c='\"; touch PWNED; echo \"'",
    "d=x && touch PWNED",
    "e=| tee PWNED",
    "2>&1",
    "f=line\ntouch PWNED",
    "g=* ~ $HOME",
]
HOSTILE_ENV = "NOTE=it's; touch PWNED"


# ------------------------------------------------------------------------------------------------ pod shapes


@pytest.mark.parametrize("accelerator, chips, hosts, runtime", [
    ("v4-8", 4, 1, "tpu-ubuntu2204-base"),
    ("v4-16", 8, 2, "tpu-ubuntu2204-base"),
    ("v4-32", 16, 4, "tpu-ubuntu2204-base"),
    ("v4-4096", 2048, 512, "tpu-ubuntu2204-base"),
    ("v5p-8", 4, 1, "v2-alpha-tpuv5"),
    ("v5p-16", 8, 2, "v2-alpha-tpuv5"),
    ("v5p-128", 64, 16, "v2-alpha-tpuv5"),
    ("v5litepod-1", 1, 1, "v2-alpha-tpuv5-lite"),
    ("v5litepod-4", 4, 1, "v2-alpha-tpuv5-lite"),
    ("v5litepod-8", 8, 1, "v2-alpha-tpuv5-lite"),
    ("v5litepod-16", 16, 4, "v2-alpha-tpuv5-lite"),
    ("v5litepod-256", 256, 64, "v2-alpha-tpuv5-lite"),
    ("v6e-8", 8, 1, "v2-alpha-tpuv6e"),
    ("v6e-16", 16, 4, "v2-alpha-tpuv6e"),
    ("v6e-64", 64, 16, "v2-alpha-tpuv6e"),
])
def test_pod_shape(accelerator, chips, hosts, runtime):
    shape = tpu.pod_shape(accelerator)
    assert (shape.chips, shape.hosts, shape.default_runtime) == (chips, hosts, runtime)


@pytest.mark.parametrize("accelerator, fragment", [
    ("v4-30", "multiple of 8"),
    ("v5p-12", "multiple of 8"),
    ("v5litepod-12", "1, 4, 8, 16"),
    ("v6e-512", "1, 4, 8, 16"),
    ("v3-8", "expected v4-N"),
    ("v4-32; rm -rf ~", "expected v4-N"),
    ("V4-32", "expected v4-N"),
    ("", "expected v4-N"),
])
def test_bad_accelerator_type_is_one_clear_error(accelerator, fragment):
    with pytest.raises(LaunchError) as e:
        tpu.pod_shape(accelerator)
    assert str(e.value).startswith(f"invalid --accelerator-type {accelerator!r}") and fragment in str(e.value)


# ------------------------------------------------------------------------------------------------ exact commands


def test_create_commands_for_several_pod_shapes():
    target = tpu.Target("pod-a", ZONE)
    v4 = tpu.SliceSpec(tpu.pod_shape("v4-32"), "tpu-ubuntu2204-base", spot=True)
    assert tpu.create_argv(target, v4) == [
        "gcloud", "compute", "tpus", "tpu-vm", "create", "pod-a", "--zone=us-central2-b",
        "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--spot"]
    v5e = tpu.SliceSpec(tpu.pod_shape("v5litepod-16"), "v2-alpha-tpuv5-lite", queued=True)
    assert tpu.create_argv(tpu.Target("pod-b", "us-west4-a", "my-project"), v5e) == [
        "gcloud", "compute", "tpus", "queued-resources", "create", "pod-b", "--node-id=pod-b", "--zone=us-west4-a",
        "--project=my-project", "--accelerator-type=v5litepod-16", "--runtime-version=v2-alpha-tpuv5-lite"]
    v6e = tpu.SliceSpec(tpu.pod_shape("v6e-256"), "v2-alpha-tpuv6e", spot=True, queued=True)
    assert tpu.create_argv(target, v6e)[-3:] == [
        "--accelerator-type=v6e-256", "--runtime-version=v2-alpha-tpuv6e", "--spot"]
    v5p = tpu.SliceSpec(tpu.pod_shape("v5p-8"), "v2-alpha-tpuv5")
    assert tpu.create_argv(target, v5p)[-2:] == ["--accelerator-type=v5p-8", "--version=v2-alpha-tpuv5"]


def test_delete_status_ssh_scp_commands():
    target = tpu.Target("pod-a", ZONE)
    assert tpu.delete_argv(target, queued=False) == [
        "gcloud", "compute", "tpus", "tpu-vm", "delete", "pod-a", "--zone=us-central2-b", "--quiet"]
    assert tpu.delete_argv(target, queued=True) == [
        "gcloud", "compute", "tpus", "queued-resources", "delete", "pod-a", "--zone=us-central2-b", "--force",
        "--quiet"]
    assert tpu.node_state_argv(target) == [
        "gcloud", "compute", "tpus", "tpu-vm", "describe", "pod-a", "--zone=us-central2-b", "--format=value(state)"]
    assert tpu.scp_argv(target, "/tmp/src.tgz", "jaxalign/src.tar.gz") == [
        "gcloud", "compute", "tpus", "tpu-vm", "scp", "/tmp/src.tgz", "pod-a:jaxalign/src.tar.gz",
        "--zone=us-central2-b", "--worker=all"]
    assert tpu.ssh_argv(target, "ls", "3") == [
        "gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod-a", "--zone=us-central2-b", "--worker=3", "--command", "ls"]


def test_setup_plan_copies_to_every_worker_and_installs_the_pinned_tpu_jax(tmp_path):
    target = tpu.Target("pod-a", ZONE)
    plan = tpu.setup_plan(target, remote.Layout(), tpu.SetupSpec(local_tarball=str(tmp_path / "src.tgz")))
    argvs = [list(step.argv) for step in plan]
    assert argvs[0] == ["git", "-C", str(remote.ROOT), "archive", "--format=tar.gz",
                        f"--output={tmp_path / 'src.tgz'}", "HEAD"]
    assert argvs[1][-3:] == ["--worker=all", "--command", "mkdir -p jaxalign"]
    assert argvs[2][4:7] == ["scp", str(tmp_path / "src.tgz"), "pod-a:jaxalign/src.tar.gz"]
    install = argvs[3][-1]
    assert argvs[3][-3:-1] == ["--worker=all", "--command"]
    assert install.endswith(f"jaxalign/venv/bin/pip install --quiet -e jaxalign/src 'jax[tpu]=={remote.jax_pin()}'")
    assert "tar -xzf jaxalign/src.tar.gz -C jaxalign/src" in install and "python3 -m venv jaxalign/venv" in install


# ------------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize("name", ["a;b", "My-Pod", "-x", "pod a", "pod$(id)", "x" * 64, "pod-", "1pod", ""])
def test_hostile_or_invalid_tpu_names_are_refused(name):
    with pytest.raises(LaunchError, match=r"^invalid TPU name "):
        tpu.Target(name, ZONE)


@pytest.mark.parametrize("zone", ["us-central2-b; ls", "us central2-b", "--zone", "us-central2", "US-CENTRAL2-B"])
def test_invalid_zones_are_refused(zone):
    with pytest.raises(LaunchError) as e:
        tpu.Target("pod", zone)
    assert str(e.value) == f"invalid --zone {zone!r}: expected a zone such as us-central2-b"


@pytest.mark.parametrize("argv, fragment", [
    (["create", "pod", "--zone", ZONE, "--accelerator-type", "v4-32", "--project", "x;y"], "invalid --project 'x;y'"),
    (["create", "pod", "--zone", ZONE, "--accelerator-type", "v4-32", "--version", "a b"], "invalid --version 'a b'"),
    (["create", "pod", "--zone", ZONE], "--accelerator-type is required"),
    (["run", "pod", "--zone", ZONE, "arith_dpo", "--workdir", "w", "--retries", "1"], "--accelerator-type is required"),
    (["run", "pod", "--zone", ZONE, "no_such_experiment", "--workdir", "w"], "unknown experiment 'no_such_experiment'"),
    (["run", "pod", "--zone", ZONE, "arith_dpo", "--workdir", "w", "--env", "A B=1"], "invalid --env key 'A B'"),
    (["run", "pod", "--zone", ZONE, "arith_dpo", "--workdir", "w", "--env", "JAXALIGN_PROCESS_ID=3"],
     "set by the launcher"),
    (["run", "pod", "--zone", ZONE, "arith_dpo", "--workdir", "w", "--remote-dir", "~/x"], "invalid --remote-dir"),
    (["run", "pod", "--zone", ZONE, "arith_dpo", "--workdir", "w", "--remote-dir", "a/../b"], "'..' is not allowed"),
    (["logs", "pod", "--zone", ZONE, "--worker", "0;ls"], "invalid --worker '0;ls'"),
    (["ssh", "pod", "--zone", ZONE, "--", "-oProxyCommand=x"], "must start with a program name"),
])
def test_cli_errors_are_one_line_and_run_nothing(argv, fragment, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no gcloud: anything that tried to run would fail differently
    assert cli.main(["tpu", *argv[:2], "--dry-run", *argv[2:]]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("jaxalign: error: ") and fragment in err, err


# ------------------------------------------------------------------------------------------------ injection


def _run_command_of(argv: list[str]) -> str:
    assert argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"] and argv[-2] == "--command"
    return argv[-1]


def _hostile_run_argv(layout=remote.Layout()) -> list[str]:
    return tpu.run_argv(tpu.Target("pod-a", ZONE), layout, "arith_dpo", HOSTILE_WORKDIR, HOSTILE_OVERRIDES,
                        remote.parse_env([HOSTILE_ENV]))


def test_hostile_values_are_single_words_of_the_remote_command():
    command = _run_command_of(_hostile_run_argv())
    prefix, suffix = "set -o pipefail; mkdir -p jaxalign/logs && ", " 2>&1 | tee -a jaxalign/logs/run.log"
    assert command.startswith(prefix) and command.endswith(suffix)
    assert shlex.split(command[len(prefix):-len(suffix)]) == [
        "env", "JAXALIGN_DISTRIBUTED=auto", HOSTILE_ENV, "jaxalign/venv/bin/jaxalign", "run", "arith_dpo",
        "--workdir", HOSTILE_WORKDIR, *HOSTILE_OVERRIDES]


def _fake_program(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!{sys.executable}\nimport json, os, sys\n{body}")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


FAKE_JAXALIGN = """
with open(os.path.join(os.environ["HOME"], "jaxalign_call.json"), "w") as f:
    json.dump({"argv": sys.argv[1:], "env": {k: v for k, v in os.environ.items()
                                             if k.startswith("JAXALIGN_") or k in ("NOTE", "FAKE_RC")}}, f)
print("training step 1")
sys.exit(int(os.environ.get("FAKE_RC", "0")))
"""


def test_remote_command_run_by_a_real_bash_delivers_exact_argv_and_env(tmp_path):
    """The proof that matters: a POSIX shell (bash, as on TPU VMs) parsing the string gives `jaxalign run` exactly
    the intended argv and environment, no injected command runs, and the job's exit status survives the tee."""
    _fake_program(tmp_path / "jaxalign/venv/bin/jaxalign", FAKE_JAXALIGN)
    command = _run_command_of(_hostile_run_argv())
    env = {"HOME": str(tmp_path), "PATH": os.environ["PATH"]}
    proc = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    call = json.loads((tmp_path / "jaxalign_call.json").read_text())
    assert call["argv"] == ["run", "arith_dpo", "--workdir", HOSTILE_WORKDIR, *HOSTILE_OVERRIDES]
    assert call["env"] == {"JAXALIGN_DISTRIBUTED": "auto", "NOTE": "it's; touch PWNED"}
    assert not list(tmp_path.rglob("PWNED"))
    assert proc.stdout == "training step 1\n" and (tmp_path / "jaxalign/logs/run.log").read_text() == proc.stdout

    failing = tpu.run_argv(tpu.Target("pod-a", ZONE), remote.Layout(), "arith_dpo", "w", [], {"FAKE_RC": "3"})
    proc = subprocess.run(["bash", "-c", _run_command_of(failing)], cwd=tmp_path, env=env, capture_output=True)
    assert proc.returncode == 3  # pipefail: tee's 0 does not hide the job's failure


def test_dry_run_prints_copy_pastable_lines_that_parse_back_to_the_argv(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    argv = ["run", "pod-a", "--zone", ZONE, "arith_dpo", "--workdir", HOSTILE_WORKDIR, *HOSTILE_OVERRIDES,
            "--env", HOSTILE_ENV, "--dry-run", "--skip-override-check"]
    assert tpu.main(argv) == 0
    out = capsys.readouterr().out  # one command; a newline inside a value stays inside its quotes
    assert out == shlex.join(_hostile_run_argv()) + "\n"
    assert shlex.split(out) == _hostile_run_argv()


def test_dry_run_of_a_spot_create():
    out = _dry(["create", "pod-a", "--zone", ZONE, "--accelerator-type", "v4-32", "--spot"])
    assert out == [
        "# v4-32: 16 chips on 4 VMs (workers 0-3, one JAX process each)",
        "gcloud compute tpus tpu-vm create pod-a --zone=us-central2-b --accelerator-type=v4-32 "
        "--version=tpu-ubuntu2204-base --spot"]


def test_dry_run_of_a_queued_create_shows_the_poll():
    out = _dry(["create", "pod-a", "--zone", ZONE, "--accelerator-type", "v6e-16", "--queued"])
    assert out[1:] == [
        "gcloud compute tpus queued-resources create pod-a --node-id=pod-a --zone=us-central2-b "
        "--accelerator-type=v6e-16 --runtime-version=v2-alpha-tpuv6e",
        "# repeat every 30s until it prints ACTIVE:",
        "gcloud compute tpus queued-resources describe pod-a --zone=us-central2-b '--format=value(state.state)'"]


def test_ssh_logs_status_delete_dry_runs():
    assert _dry(["ssh", "pod-a", "--zone", ZONE, "--", "python3", "-c", "print('a; b')"]) == [
        "gcloud compute tpus tpu-vm ssh pod-a --zone=us-central2-b --worker=all --command "
        + shlex.quote("python3 -c " + shlex.quote("print('a; b')"))]
    assert _dry(["ssh", "pod-a", "--zone", ZONE]) == [
        "gcloud compute tpus tpu-vm ssh pod-a --zone=us-central2-b --worker=0"]
    assert _dry(["logs", "pod-a", "--zone", ZONE, "--worker", "2", "--lines", "20", "--follow"]) == [
        "gcloud compute tpus tpu-vm ssh pod-a --zone=us-central2-b --worker=2 --command "
        "'tail -n 20 -F jaxalign/logs/run.log'"]
    assert _dry(["status", "pod-a", "--zone", ZONE, "--project", "my-project"]) == [
        "gcloud compute tpus tpu-vm describe pod-a --zone=us-central2-b --project=my-project"]
    assert _dry(["delete", "pod-a", "--zone", ZONE, "--queued"]) == [
        "gcloud compute tpus queued-resources delete pod-a --zone=us-central2-b --force --quiet"]


def _dry(argv: list[str]) -> list[str]:
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert tpu.main([*argv[:2], "--dry-run", *argv[2:]]) == 0
    return buffer.getvalue().splitlines()


# ------------------------------------------------------------------------------------------------ retry loop

FAKE_GCLOUD = """
state_dir = os.environ["FAKE_STATE"]
with open(os.path.join(state_dir, "calls.jsonl"), "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
node = os.path.join(state_dir, "node")
state = open(node).read() if os.path.exists(node) else "READY"
args = sys.argv[1:]
if args[3:4] == ["ssh"] and "jaxalign/venv/bin/jaxalign run" in args[-1]:
    runs = len([n for n in os.listdir(state_dir) if n.startswith("run")])
    open(os.path.join(state_dir, f"run{runs}"), "w").close()
    mode = os.environ["FAKE_MODE"]
    if mode == "job-error":
        sys.exit(1)
    if mode == "preempt-always" or (mode == "preempt-once" and runs == 0):
        open(node, "w").write("PREEMPTED")
        sys.exit(255)
    sys.exit(0)
if args[3] == "describe":
    if state == "GONE":
        sys.exit(1)
    print(state)
elif args[3] == "delete":
    open(node, "w").write("GONE")
elif args[3] == "create":
    open(node, "w").write("READY")
"""


def _fakes(tmp_path, monkeypatch, mode: str) -> Path:
    bin_dir, state_dir = tmp_path / "bin", tmp_path / "state"
    state_dir.mkdir()
    _fake_program(bin_dir / "gcloud", FAKE_GCLOUD)
    _fake_program(bin_dir / "git", 'open(os.path.join(os.environ["FAKE_STATE"], "calls.jsonl"), "a").write('
                                   'json.dumps(["git", *sys.argv[1:]]) + "\\n")\n')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_STATE", str(state_dir))
    monkeypatch.setenv("FAKE_MODE", mode)
    return state_dir


def _calls(state_dir: Path) -> list[list[str]]:
    return [json.loads(line) for line in (state_dir / "calls.jsonl").read_text().splitlines()]


RUN_ARGS = ["run", "pod-a", "--zone", ZONE, "arith_dpo", "--workdir", "gs://bucket/run", "dpo.beta=0.5",
            "--accelerator-type", "v4-32", "--spot", "--retry-wait-s", "0", "--skip-override-check"]
TPU = ["compute", "tpus", "tpu-vm"]


def test_preempted_slice_is_recreated_set_up_and_the_same_run_resumes(tmp_path, monkeypatch):
    state_dir = _fakes(tmp_path, monkeypatch, "preempt-once")
    tarball = str(tmp_path / "src.tgz")
    sleeps = []
    assert tpu.main([*RUN_ARGS, "--retries", "2", "--local-tarball", tarball], sleep=sleeps.append) == 0
    calls = _calls(state_dir)
    run = calls[0]
    assert run[:10] == [*TPU, "ssh", "pod-a", "--zone=us-central2-b", "--worker=all",
                        "--ssh-flag=-oServerAliveInterval=30", "--ssh-flag=-oServerAliveCountMax=6", "--command"]
    assert "env JAXALIGN_DISTRIBUTED=auto jaxalign/venv/bin/jaxalign run arith_dpo --workdir gs://bucket/run " \
           "dpo.beta=0.5 2>&1" in run[10]
    assert calls[1:] == [
        [*TPU, "describe", "pod-a", "--zone=us-central2-b", "--format=value(state)"],
        [*TPU, "delete", "pod-a", "--zone=us-central2-b", "--quiet"],
        [*TPU, "create", "pod-a", "--zone=us-central2-b", "--accelerator-type=v4-32",
         "--version=tpu-ubuntu2204-base", "--spot"],
        ["git", "-C", str(remote.ROOT), "archive", "--format=tar.gz", f"--output={tarball}", "HEAD"],
        [*TPU, "ssh", "pod-a", "--zone=us-central2-b", "--worker=all", "--command", "mkdir -p jaxalign"],
        [*TPU, "scp", tarball, "pod-a:jaxalign/src.tar.gz", "--zone=us-central2-b", "--worker=all"],
        [*TPU, "ssh", "pod-a", "--zone=us-central2-b", "--worker=all", "--command",
         remote.setup_command(remote.Layout(), "python3", [f"jax[tpu]=={remote.jax_pin()}"])],
        run,  # the very same command: `jaxalign run` resumes from the workdir's checkpoint
    ]
    assert sleeps == []


def test_a_job_error_on_a_ready_slice_is_not_retried(tmp_path, monkeypatch, capsys):
    state_dir = _fakes(tmp_path, monkeypatch, "job-error")
    assert cli.main(["tpu", *RUN_ARGS, "--retries", "3"]) == 2
    assert "a job error, not a preemption; not retrying" in capsys.readouterr().err
    assert [c[3] for c in _calls(state_dir)] == ["ssh", "describe"]


def test_retries_run_out(tmp_path, monkeypatch, capsys):
    state_dir = _fakes(tmp_path, monkeypatch, "preempt-always")
    assert cli.main(["tpu", *RUN_ARGS, "--retries", "1", "--local-tarball", str(tmp_path / "s.tgz")]) == 2
    err = capsys.readouterr().err
    assert "jaxalign: error: jaxalign run failed with exit code 255 and TPU pod-a is PREEMPTED; all 1 retries used" \
           in err and "recreating it and resuming (retry 1/1)" in err
    kinds = [c[0] if c[0] == "git" else c[3] for c in _calls(state_dir)]
    assert kinds == ["ssh", "describe", "delete", "create", "git", "ssh", "scp", "ssh", "ssh", "describe"]


def test_lost_ssh_connection_on_a_ready_slice_reissues_the_run_without_recreating():
    target = tpu.Target("pod-a", ZONE)
    results = iter([(255, ""), (0, "READY\n"), (0, "")])
    calls, sleeps = [], []

    def runner(argv):
        calls.append(list(argv))
        return next(results)

    run = ["gcloud", "run-it"]
    assert tpu.run_with_retries(runner, target, run, [], retries=1, sleep=sleeps.append, wait_s=5,
                                say=lambda msg: None) == 1
    assert calls == [run, tpu.node_state_argv(target), run] and sleeps == [5]


def test_queued_create_polls_until_active_and_stops_on_failure():
    target = tpu.Target("pod-a", ZONE)
    spec = tpu.SliceSpec(tpu.pod_shape("v5litepod-16"), "v2-alpha-tpuv5-lite", queued=True)
    answers = iter([(0, ""), (0, "WAITING_FOR_RESOURCES\n"), (0, "PROVISIONING\n"), (0, "ACTIVE\n")])
    calls, sleeps = [], []

    def runner(argv):
        calls.append(list(argv))
        return next(answers)

    remote.execute(tpu.create_plan(target, spec), runner, sleeps.append)
    assert calls == [tpu.create_argv(target, spec)] + [tpu.queued_state_argv(target)] * 3 and sleeps == [30.0, 30.0]

    answers = iter([(0, ""), (0, "FAILED\n")])
    with pytest.raises(LaunchError, match="^queued resource pod-a: state FAILED$"):
        remote.execute(tpu.create_plan(target, spec), runner, sleeps.append)


def test_dry_run_with_retries_shows_the_recovery_plan(tmp_path):
    out = _dry([*RUN_ARGS, "--retries", "2", "--queued", "--local-tarball", str(tmp_path / "s.tgz")])
    assert out[0] == "# v4-32: 16 chips on 4 VMs (workers 0-3, one JAX process each)"
    assert out[2].startswith("# if that fails and the slice is not READY (at most 2 times)")
    parsed = [shlex.split(line) for line in out if not line.startswith("#")]
    assert [p[3:5] if p[0] == "gcloud" else p[:1] for p in parsed] == [
        ["tpu-vm", "ssh"], ["tpu-vm", "describe"], ["queued-resources", "delete"], ["queued-resources", "create"],
        ["queued-resources", "describe"], ["git"], ["tpu-vm", "ssh"], ["tpu-vm", "scp"], ["tpu-vm", "ssh"],
        ["tpu-vm", "ssh"]]
    assert parsed[0] == parsed[-1]


def test_run_with_setup_ships_the_code_first(tmp_path):
    out = _dry(["run", "pod-a", "--zone", ZONE, "arith_dpo", "--workdir", "gs://b/r", "--skip-override-check",
                "--setup", "--source",
                "worktree", "--pip", "extra-pkg==1.0", "--local-tarball", str(tmp_path / "s.tgz")])
    parsed = [shlex.split(line) for line in out]
    assert [p[0] if p[0] != "gcloud" else p[4] for p in parsed] == ["tar", "ssh", "scp", "ssh", "ssh"]
    assert parsed[3][-1].endswith(f"'jax[tpu]=={remote.jax_pin()}' extra-pkg==1.0")
    assert parsed[4] == _run_argv_plain()


def _run_argv_plain() -> list[str]:
    return tpu.run_argv(tpu.Target("pod-a", ZONE), remote.Layout(), "arith_dpo", "gs://b/r", [], {})


def test_console_script_dry_run_and_error():
    """Through the real `jaxalign` entry point, as a user types it: exact output, exit codes, no traceback."""
    ok = subprocess.run([sys.executable, "-m", "launch.cli", "tpu", "create", "pod-a", "--zone", ZONE,
                         "--accelerator-type", "v5p-16", "--dry-run"], cwd=remote.ROOT, capture_output=True, text=True)
    assert (ok.returncode, ok.stderr) == (0, "")
    assert ok.stdout == ("# v5p-16: 8 chips on 2 VMs (workers 0-1, one JAX process each)\n"
                         "gcloud compute tpus tpu-vm create pod-a --zone=us-central2-b --accelerator-type=v5p-16 "
                         "--version=v2-alpha-tpuv5\n")
    bad = subprocess.run([sys.executable, "-m", "launch.cli", "tpu", "delete", "pod;reboot", "--zone", ZONE],
                         cwd=remote.ROOT, capture_output=True, text=True)
    assert (bad.returncode, bad.stdout) == (2, "")
    assert bad.stderr == ("jaxalign: error: invalid TPU name 'pod;reboot': expected lowercase letters, digits and "
                          "'-', starting with a letter, at most 63 characters\n")


def test_overrides_are_checked_here_before_anything_runs(capsys, tmp_path, monkeypatch):
    """A typo fails locally, with the same message `jaxalign run` gives, instead of on every worker of a slice."""
    monkeypatch.setenv("PATH", str(tmp_path))
    argv = ["tpu", "run", "pod-a", "--zone", ZONE, "arith_dpo", "--workdir", "gs://b/r", "--dry-run"]
    assert cli.main([*argv, "dpo.bta=0.5"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("jaxalign: error: unknown config key 'dpo.bta'")
    assert cli.main([*argv, "dpo.beta=0.5", "mesh.data=64"]) == 0  # device counts are the workers' business
    assert capsys.readouterr().out.count("dpo.beta=0.5 mesh.data=64 2>&1") == 1
