"""A truncated file in the newest checkpoint step is one short refusal naming that step and the older step a re-run
could resume from, not orbax's pages of tracebacks; nothing on disk is changed (README, "Reliability")."""
from __future__ import annotations

from fault_checks import TINY_ARITH, run_arith, tree_digest

# SFT (4 steps, checkpoints at 2 and 4) is all this test needs; whatever later phases do, both steps exist.
TINY = [*TINY_ARITH, "sft.steps=4", "checkpoint.every_steps=2"]






def test_a_truncated_newest_step_is_one_line_naming_the_older_step(tmp_path):
    run_arith(tmp_path, *TINY)
    sft_dir = tmp_path / "checkpoints" / "sft"
    assert sorted(p.name for p in sft_dir.iterdir() if p.name.isdigit()) == ["2", "4"]
    # The largest data files hold the parameters: cut them short, as a full disk or a killed copy would.
    data = sorted((p for p in (sft_dir / "4" / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    for path in data[-2:]:
        path.write_bytes(path.read_bytes()[:1000])
    before = tree_digest(tmp_path / "checkpoints")

    proc = run_arith(tmp_path, *TINY)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) <= 3, f"rc {proc.returncode}\n{proc.stderr[-4000:]}"
    error = next(line for line in lines if line.startswith("jaxalign: error:"))
    assert f"checkpoint {sft_dir} step 4 could not be read" in error, error
    assert f"the older step 2 exists: move or delete {sft_dir / '4'} to resume from step 2" in error, error
    assert tree_digest(tmp_path / "checkpoints") == before
