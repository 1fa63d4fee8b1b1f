"""The README's quick start and user-guide walkthroughs run as written in a fresh clone.

Every ```bash block of the sections "Quick start" and "Use it on your model and data" is run line by line, in order,
in a scratch directory that holds what a fresh clone has (tests/data, via a link); the first walkthrough makes the
demo model and files (`python -m launch.demo_files runs/demo`) that stand in for the user's. Lines starting with
`jaxalign` and `python -m` run in this process (the real command line), other `python ...` lines in a child process,
and the line activating .venv is what this process already is; the quick start's `jaxalign run arith_dpo` line is
resolved (experiment, keys, values) but not trained, since the main job trains in its own tests. Each `jaxalign run`
gets a few small overrides appended (later overrides win) so that a walkthrough takes seconds: the commands, files,
keys and values are the README's own. A block cannot hide a placeholder: an upper-case word such as MODEL_DIR fails
the test, so every command in those blocks is one a user can paste.
"""
from __future__ import annotations

import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("## Quick start", "## Use it on your model and data")
# Appended to `jaxalign run NAME ...` so each walkthrough trains for a couple of steps.
FAST = {
    "dpo_files": ["dpo.steps=2", "dpo.eval_every=2", "checkpoint.every_steps=2", "show_progress=false"],
    "oreo_files": ["oreo.steps=2", "oreo.eval_every=2", "checkpoint.every_steps=2", "show_progress=false"],
}
PLACEHOLDER = re.compile(r"\b[A-Z][A-Z_]{2,}\b")


def user_guide_blocks() -> list[list[str]]:
    """The command lines (continuations joined, comments stripped) of each ```bash block of SECTIONS."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    sections = "".join(text.split(name, 1)[1].split("\n## ", 1)[0] for name in SECTIONS)
    blocks = []
    for body in re.findall(r"```bash\n(.*?)```", sections, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", body)
        lines = [line.split(" # ")[0].split("  #")[0].strip() for line in joined.splitlines()]
        blocks.append([line for line in lines if line and not line.startswith("#")])
    return blocks


BLOCKS = user_guide_blocks()


def test_the_quick_start_and_user_guide_have_a_runnable_walkthrough_per_data_format():
    commands = " ".join(" ".join(block) for block in BLOCKS)
    for fragment in ("data.format=stepwise", "data.format=ranked", "data.format=unpaired", "oreo_files",
                     "data.columns=", "jaxalign generate", "jaxalign convert", "jaxalign run arith_dpo --help"):
        assert fragment in commands, fragment
    for block in BLOCKS:
        for line in block:
            assert not PLACEHOLDER.search(line.replace("SFT", "")), f"a placeholder in a README command: {line}"


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """A scratch directory with what a fresh clone has that the guide reads: tests/data's sample files."""
    work = tmp_path_factory.mktemp("readme")
    (work / "tests").mkdir()
    (work / "tests" / "data").symlink_to(ROOT / "tests" / "data")
    return work


def run_line(line: str, cwd: Path, monkeypatch) -> None:
    argv = shlex.split(line)
    if argv[:2] == [".", ".venv/bin/activate"]:
        return
    if argv[:2] == ["python", "-m"]:  # a module of this repository: in this process (no second interpreter start)
        monkeypatch.chdir(cwd)
        monkeypatch.setattr(sys, "argv", argv[2:])
        runpy.run_module(argv[2], run_name="__main__", alter_sys=False)
        return
    if argv[0] == "python":
        proc = subprocess.run([sys.executable, *argv[1:]], cwd=cwd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{line}\n{proc.stderr[-3000:]}"
        return
    assert argv[0] == "jaxalign", f"the README's walkthroughs run jaxalign or python only: {line}"
    from launch.cli import main

    argv = argv[1:]
    monkeypatch.chdir(cwd)
    if argv[:2] == ["run", "arith_dpo"] and "--help" not in argv:
        # The main job trains end to end in tests/jaxalign/experiments/test_arith_dpo*.py; here its command line is
        # resolved exactly as `jaxalign run` resolves it (experiment, keys, values, checks), without the minutes.
        from jaxalign.registry import configure

        rest = argv[2:]
        at = rest.index("--workdir")
        configure("arith_dpo", rest[:at] + rest[at + 2:])
        return
    if argv[:1] == ["run"]:
        argv += FAST.get(argv[1], [])
    assert main(argv) == 0, line


@pytest.mark.slow
def test_the_walkthroughs_run_as_written(clone, monkeypatch):
    """In README order: later walkthroughs may read what earlier ones wrote (generate reads the pairwise run)."""
    for block in BLOCKS:
        for line in block:
            run_line(line, clone, monkeypatch)
