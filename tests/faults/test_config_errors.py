"""Bad configurations are refused before any work: one `jaxalign: error:` line naming the key and the value, exit
code 2, and the work directory is neither created nor touched (issue 14). The CLI runs in-process
(`launch.cli.main`), which is what the console script calls; every case fails while configuring, so each takes well
under a second."""
from __future__ import annotations


import pytest

from fault_checks import tree_digest
from launch.cli import main


def refuse(argv: list[str], capsys) -> str:
    """Run the CLI; assert exit code 2, nothing on stdout, at most two stderr lines the first of which is the
    error; return that line."""
    rc = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert rc == 2, captured
    assert captured.out == "" and 1 <= len(lines) <= 2, captured.err
    assert lines[0].startswith("jaxalign: error: "), lines
    return lines[0]




BAD_VALUES = [
    # override, fragments the error line must contain
    ("dpo.steps=-1", ["dpo.steps", "-1", "positive integer"]),
    ("dpo.batch_size=0", ["dpo.batch_size", "got 0", "positive integer"]),
    ("dpo.sft_weight=-1", ["dpo.sft_weight", "-1", ">= 0"]),
    ("dpo.beta=inf", ["dpo.beta", "inf", "finite"]),
    ("dpo.beta=nan", ["dpo.beta", "nan"]),
    ("dpo.optim.learning_rate=-1", ["dpo.optim.learning_rate", "-1"]),
    ("sft.steps=-5", ["sft.steps", "-5", "positive integer"]),
    ("sft.batch_size=0", ["sft.batch_size", "got 0", "positive integer"]),
    ("sft.optim.learning_rate=inf", ["sft.optim.learning_rate must be a finite number > 0, got inf"]),
    ("sft.optim.b2=1", ["sft.optim.b2", "1.0"]),
    ("sft.grad_accum_steps=3", ["sft.batch_size", "grad_accum_steps=3", "64"]),
    ("dpo.grad_accum_steps=5", ["dpo.batch_size", "grad_accum_steps=5", "64"]),
    ("pairs.label_flip_rate=nan", ["pairs.label_flip_rate", "nan"]),
    ("task.num_operands=1", ["task.num_operands", "got 1"]),
    ("checkpoint.keep_last=0", ["checkpoint.keep_last", "got 0"]),
    ("eval_fraction=1", ["eval_fraction", "1.0", "(0, 1)"]),
    ("dpo.bata=1", ["unknown config key 'dpo.bata'; did you mean 'dpo.beta'"]),
    ("dpp.beta=1", ["unknown config key 'dpp.beta'; did you mean 'dpo.beta'?"]),
    ("mesh.data=3", ["mesh", "data=3"]),  # fits no machine this suite runs on: 3 devices of 1 (or 8)
]


@pytest.mark.parametrize("override, fragments", BAD_VALUES, ids=[case[0] for case in BAD_VALUES])
def test_a_bad_value_is_one_line_and_no_work_directory(override, fragments, tmp_path, capsys):
    workdir = tmp_path / "w"
    line = refuse(["run", "arith_dpo", "--workdir", str(workdir), override], capsys)
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in: {line}"
    assert not workdir.exists(), "a refused configuration must not create the work directory"


@pytest.mark.parametrize("override", ["sft.batch_size=0", "mesh.data=3", "dpo.bata=1"])
def test_an_existing_work_directory_is_left_byte_identical(override, tmp_path, capsys):
    workdir = tmp_path / "w"
    (workdir / "notes").mkdir(parents=True)
    (workdir / "notes" / "mine.txt").write_text("the user's own file\n")
    before = tree_digest(workdir)
    refuse(["run", "arith_dpo", "--workdir", str(workdir), override], capsys)
    assert tree_digest(workdir) == before


def test_dpo_files_mesh_is_refused_before_the_work_directory(tmp_path, capsys):
    line = refuse(["run", "dpo_files", "--workdir", str(tmp_path / "w"), "mesh.data=3"], capsys)
    assert "data=3" in line and not (tmp_path / "w").exists()


def test_an_unknown_key_without_a_close_match_names_its_section(tmp_path, capsys):
    line = refuse(["run", "arith_dpo", "--workdir", str(tmp_path / "w"), "dpo.zzzzzz=1"], capsys)
    assert "unknown config key 'dpo.zzzzzz'; dpo has: steps, batch_size" in line


def test_debug_puts_the_traceback_on_the_terminal(tmp_path, capsys):
    """`jaxalign --debug run ...`: the traceback, then the same one error line last."""
    rc = main(["--debug", "run", "arith_dpo", "--workdir", str(tmp_path / "w"), "sft.batch_size=0"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("Traceback")
    assert err.splitlines()[-1] == "jaxalign: error: sft.batch_size must be a positive integer, got 0"
    assert not (tmp_path / "w").exists()
