"""Tests for `jaxalign ssh`: the hosts file, per-host coordinator environment, exact ssh/rsync argv, hostile values,
and an end-to-end run through a fake `ssh` on PATH that executes each remote command with a real bash in a
per-host fake home directory (so the test sees what `jaxalign run` would receive on every host).
"""
from __future__ import annotations

import json
import os
import shlex
import stat
import sys
from pathlib import Path

import pytest

from launch import cli, remote, ssh
from launch.remote import LaunchError

HOSTS = """\
# the cluster
gpu-a
alice@gpu-b:2222   # second node

10.0.0.3
[fe80::1]:23
"""
HOSTILE_WORKDIR = "/shared/run 1; touch PWNED"
HOSTILE_OVERRIDES = ["dpo.beta=0.5", "a=$(touch PWNED)", "b='; touch PWNED; '", "c=x | tee PWNED"]


def test_hosts_file_parses_users_ports_comments_and_ipv6():
    assert ssh.parse_hosts(HOSTS) == [
        ssh.Host("gpu-a"), ssh.Host("gpu-b", "alice", 2222), ssh.Host("10.0.0.3"), ssh.Host("[fe80::1]", None, 23)]


@pytest.mark.parametrize("line", [
    "gpu a", "gpu-a:99999", "gpu-a:0", "alice@", "@gpu-a", "gpu-a;rm -rf ~", "-oProxyCommand=touch", "gpu-a:ssh",
    "gpu-a:22:33", "al ice@gpu-a", "$(id)", "gpu-a\\", "fe80::1",
])
def test_malformed_line_is_one_error_with_file_and_line_number(line, tmp_path):
    path = tmp_path / "hosts.txt"
    path.write_text(f"# header\ngpu-a\n\n{line}\ngpu-c\n")
    with pytest.raises(LaunchError) as e:
        ssh.load_hosts(str(path))
    assert str(e.value) == f"{path}, line 4: {line.strip()!r} is not [user@]host[:port] (port 1-65535)"


def test_duplicate_empty_and_missing_hosts_files(tmp_path):
    with pytest.raises(LaunchError, match=r"^f, line 3: 'GPU-A' repeats line 1 \(one process per host\)$"):
        ssh.parse_hosts("gpu-a\ngpu-b\nGPU-A\n", "f")
    with pytest.raises(LaunchError, match=r"^f: no hosts"):
        ssh.parse_hosts("# nothing\n\n", "f")
    with pytest.raises(LaunchError, match=r"^cannot read hosts file .*nope\.txt: No such file"):
        ssh.load_hosts(str(tmp_path / "nope.txt"))


def test_every_host_gets_its_process_id_the_count_and_the_first_host_as_coordinator():
    hosts = ssh.parse_hosts(HOSTS)
    argvs = ssh.run_argvs(hosts, remote.Layout(), "arith_dpo", HOSTILE_WORKDIR, HOSTILE_OVERRIDES,
                          {"NOTE": "a b"}, port=1234, local_device_count=8)
    assert [a[:-1] for a in argvs] == [
        ["ssh", "-o", "BatchMode=yes", "--", "gpu-a"],
        ["ssh", "-o", "BatchMode=yes", "-p", "2222", "--", "alice@gpu-b"],
        ["ssh", "-o", "BatchMode=yes", "--", "10.0.0.3"],
        ["ssh", "-o", "BatchMode=yes", "-p", "23", "--", "fe80::1"],
    ]
    prefix, suffix = "set -o pipefail; mkdir -p jaxalign/logs && ", " 2>&1 | tee -a jaxalign/logs/run.log"
    for index, argv in enumerate(argvs):
        command = argv[-1]
        assert command.startswith(prefix) and command.endswith(suffix)
        assert shlex.split(command[len(prefix):-len(suffix)]) == [
            "env", "JAXALIGN_COORDINATOR_ADDRESS=gpu-a:1234", "JAXALIGN_NUM_PROCESSES=4",
            f"JAXALIGN_PROCESS_ID={index}", "JAXALIGN_LOCAL_DEVICE_COUNT=8", "NOTE=a b",
            "jaxalign/venv/bin/jaxalign", "run", "arith_dpo", "--workdir", HOSTILE_WORKDIR, *HOSTILE_OVERRIDES]


def test_ipv6_coordinator_keeps_its_brackets():
    hosts = ssh.parse_hosts("[fe80::1]\ngpu-b\n")
    assert ssh.distributed_env(hosts, 1, 99, None) == {
        "JAXALIGN_COORDINATOR_ADDRESS": "[fe80::1]:99", "JAXALIGN_NUM_PROCESSES": "2", "JAXALIGN_PROCESS_ID": "1"}


def test_setup_shares_the_tpu_remote_commands(tmp_path):
    hosts = ssh.parse_hosts("gpu-a\nalice@gpu-b:2222\n")
    stages = ssh.setup_argvs(hosts, remote.Layout("/scratch/ja"), "/tmp/src.tgz", ["jax[cuda12]==1.0"])
    assert stages[0][1] == ["ssh", "-o", "BatchMode=yes", "-p", "2222", "--", "alice@gpu-b", "mkdir -p /scratch/ja"]
    assert stages[1] == [
        ["rsync", "-az", "-e", "ssh -o BatchMode=yes", "--", "/tmp/src.tgz", "gpu-a:/scratch/ja/src.tar.gz"],
        ["rsync", "-az", "-e", "ssh -o BatchMode=yes -p 2222", "--", "/tmp/src.tgz",
         "alice@gpu-b:/scratch/ja/src.tar.gz"]]
    assert stages[2][0][-1] == remote.setup_command(remote.Layout("/scratch/ja"), "python3", ["jax[cuda12]==1.0"])


def _fake_program(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!{sys.executable}\nimport json, os, subprocess, sys\n{body}")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


# A fake ssh: records its argv, then runs the remote command with bash in $FAKE_HOMES/<destination>.
FAKE_SSH = """
args = sys.argv[1:]
with open(os.environ["FAKE_CALLS"], "a") as f:
    f.write(json.dumps(["ssh", *args]) + "\\n")
dest, command = args[args.index("--") + 1], args[-1]
home = os.path.join(os.environ["FAKE_HOMES"], dest)
if os.environ.get("FAKE_EXEC") != "1":
    sys.exit(0)
env = {"HOME": home, "PATH": os.environ["PATH"], "FAIL_ID": os.environ.get("FAIL_ID", "-")}
sys.exit(subprocess.run(["bash", "-c", command], cwd=home, env=env).returncode)
"""
FAKE_JAXALIGN = """
json.dump({"argv": sys.argv[1:], "env": {k: v for k, v in os.environ.items() if k.startswith("JAXALIGN_")}},
          open(os.path.join(os.environ["HOME"], "call.json"), "w"))
sys.exit(1 if os.environ["JAXALIGN_PROCESS_ID"] == os.environ.get("FAIL_ID", "-") else 0)
"""
RECORD = ('open(os.environ["FAKE_CALLS"], "a").write('
          'json.dumps([os.path.basename(sys.argv[0]), *sys.argv[1:]]) + "\\n")\n')


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    """Three fake hosts with a fake installed jaxalign, and fake ssh, rsync and git on PATH."""
    bin_dir, homes = tmp_path / "bin", tmp_path / "homes"
    _fake_program(bin_dir / "ssh", FAKE_SSH)
    _fake_program(bin_dir / "rsync", RECORD)
    _fake_program(bin_dir / "git", RECORD)
    _fake_program(bin_dir / "tar", RECORD)
    for dest in ("gpu-a", "alice@gpu-b", "10.0.0.3"):
        _fake_program(homes / dest / "jaxalign/venv/bin/jaxalign", FAKE_JAXALIGN)
    hosts_file = tmp_path / "hosts.txt"
    hosts_file.write_text("gpu-a\nalice@gpu-b:2222\n10.0.0.3  # third\n")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_HOMES", str(homes))
    monkeypatch.setenv("FAKE_CALLS", str(tmp_path / "calls.jsonl"))
    return tmp_path


def _calls(root: Path) -> list[list[str]]:
    return [json.loads(line) for line in (root / "calls.jsonl").read_text().splitlines()]


def test_run_end_to_end_through_ssh_and_bash_on_every_host(cluster, monkeypatch):
    monkeypatch.setenv("FAKE_EXEC", "1")
    assert ssh.main(["--hosts", str(cluster / "hosts.txt"), "run", "arith_dpo", "--workdir", HOSTILE_WORKDIR,
                     *HOSTILE_OVERRIDES, "--coordinator-port", "4000", "--skip-override-check"]) == 0
    for index, dest in enumerate(("gpu-a", "alice@gpu-b", "10.0.0.3")):
        call = json.loads((cluster / "homes" / dest / "call.json").read_text())
        assert call == {"argv": ["run", "arith_dpo", "--workdir", HOSTILE_WORKDIR, *HOSTILE_OVERRIDES],
                        "env": {"JAXALIGN_COORDINATOR_ADDRESS": "gpu-a:4000", "JAXALIGN_NUM_PROCESSES": "3",
                                "JAXALIGN_PROCESS_ID": str(index)}}
    assert not list(cluster.rglob("PWNED"))
    assert sorted(c[-2] for c in _calls(cluster)) == ["10.0.0.3", "alice@gpu-b", "gpu-a"]


def test_a_failing_host_is_named(cluster, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_EXEC", "1")
    monkeypatch.setenv("FAIL_ID", "1")
    assert cli.main(["ssh", "--hosts", str(cluster / "hosts.txt"), "run", "arith_dpo", "--workdir", "w",
                     "--skip-override-check"]) == 2
    assert capsys.readouterr().err.endswith(
        "jaxalign: error: jaxalign run failed on 1 of 3 hosts: alice@gpu-b (exit code 1)\n")


def test_setup_runs_tarball_mkdir_copy_install_in_that_order(cluster):
    tarball = str(cluster / "src.tgz")
    assert ssh.main(["--hosts", str(cluster / "hosts.txt"), "setup", "--source", "worktree",
                     "--local-tarball", tarball, "--pip", "jax[cuda12]==0.10.2"]) == 0
    calls = _calls(cluster)
    assert calls[0] == ["tar", "-czf", tarball, "--exclude=./.git", "--exclude=./.venv", "--exclude=./runs",
                        "--exclude=*.egg-info", "--exclude=__pycache__", "-C", str(remote.ROOT), "."]
    assert [c[0] for c in calls] == ["tar"] + ["ssh"] * 3 + ["rsync"] * 3 + ["ssh"] * 3
    assert sorted(c[-1] for c in calls[4:7]) == [
        "10.0.0.3:jaxalign/src.tar.gz", "alice@gpu-b:jaxalign/src.tar.gz", "gpu-a:jaxalign/src.tar.gz"]
    assert {c[-1] for c in calls[7:]} == {remote.setup_command(remote.Layout(), "python3", ["jax[cuda12]==0.10.2"])}


def test_dry_run_prints_every_host_and_runs_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing runnable
    hosts_file = tmp_path / "hosts.txt"
    hosts_file.write_text("gpu-a\nalice@gpu-b:2222\n")
    assert cli.main(["ssh", "--hosts", str(hosts_file), "--dry-run", "run", "arith_dpo", "--workdir", "/shared/r",
                     "mesh.data=2", "--skip-override-check"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "# 2 processes, coordinator gpu-a:12355; all at once:",
        "ssh -o BatchMode=yes -- gpu-a 'set -o pipefail; mkdir -p jaxalign/logs && env "
        "JAXALIGN_COORDINATOR_ADDRESS=gpu-a:12355 JAXALIGN_NUM_PROCESSES=2 JAXALIGN_PROCESS_ID=0 "
        "jaxalign/venv/bin/jaxalign run arith_dpo --workdir /shared/r mesh.data=2 2>&1 | tee -a jaxalign/logs/run.log'",
        "ssh -o BatchMode=yes -p 2222 -- alice@gpu-b 'set -o pipefail; mkdir -p jaxalign/logs && env "
        "JAXALIGN_COORDINATOR_ADDRESS=gpu-a:12355 JAXALIGN_NUM_PROCESSES=2 JAXALIGN_PROCESS_ID=1 "
        "jaxalign/venv/bin/jaxalign run arith_dpo --workdir /shared/r mesh.data=2 2>&1 | tee -a jaxalign/logs/run.log'",
    ]
    assert cli.main(["ssh", "--hosts", str(hosts_file), "--dry-run", "logs", "--host", "1", "--follow"]) == 0
    assert capsys.readouterr().out == \
        "ssh -o BatchMode=yes -p 2222 -- alice@gpu-b 'tail -n 100 -F jaxalign/logs/run.log'\n"


@pytest.mark.parametrize("args, fragment", [
    (["logs", "--host", "2"], "invalid --host '2': expected an index 0-1 or 'all'"),
    (["run", "arith_dpo", "--workdir", "w", "--coordinator-port", "0"], "invalid --coordinator-port 0"),
    (["run", "arith_dpo", "--workdir", "w", "--local-device-count", "0"], "invalid --local-device-count 0"),
    (["run", "arith_dpo", "--workdir", "w", "--env", "JAXALIGN_NUM_PROCESSES=9"], "set by the launcher"),
    (["run", "arith_dpo", "--workdir", "w", "--remote-dir", "a b"], "invalid --remote-dir 'a b'"),
    (["run", "nope", "--workdir", "w"], "unknown experiment 'nope'"),
])
def test_bad_values_are_one_line_errors(args, fragment, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    hosts_file = tmp_path / "hosts.txt"
    hosts_file.write_text("gpu-a\ngpu-b\n")
    assert cli.main(["ssh", "--hosts", str(hosts_file), "--dry-run", *args]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("jaxalign: error: ") and fragment in err, err


def test_the_environment_is_what_jaxalign_distributed_reads():
    """Contract with `jaxalign.distributed.parse_env` (what `jaxalign run` calls): every host's variables parse to
    its own process id, the host count and the coordinator; the TPU launcher's auto mode too."""
    from jaxalign.distributed import parse_env

    hosts = ssh.parse_hosts("gpu-a\n[fe80::1]:22\nalice@gpu-c\n")
    parsed = [parse_env(ssh.distributed_env(hosts, i, 4000, 2)) for i in range(3)]
    assert [(p.coordinator_address, p.num_processes, p.process_id, p.local_device_count) for p in parsed] == [
        ("gpu-a:4000", 3, i, 2) for i in range(3)]
    assert parse_env({"JAXALIGN_DISTRIBUTED": "auto"}).auto
