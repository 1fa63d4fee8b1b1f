"""`jaxalign bench lm-step`: our LM-loss forward + backward and attention variants next to PyTorch's, one table
each. No timing assertions (machine-dependent); what is checked is what gets run and reported. The test set-up
installs the bench extra (Makefile), so PyTorch and transformers are always there."""
import pytest

from jaxalign.bench import lm_step


def test_a_smoke_run_reports_every_variant_against_torch_and_writes_the_tables(tmp_path, capsys):
    result = lm_step.main(["--size", "tiny", "--batch", "2", "--seq-len", "40", "--repeats", "1", "--threads", "1",
                           "--out", str(tmp_path)])
    assert [r["implementation"] for r in result["model"]] == ["jaxalign DecoderLM", "transformers LlamaForCausalLM"]
    assert [r["implementation"] for r in result["attention"]] == [
        "jaxalign grouped (all keys)", "jaxalign head-major (one block)", "jaxalign head-major, causal blocks",
        "torch SDPA (causal)"]
    for row in result["model"] + result["attention"]:
        assert row["ms"] > 0
    assert result["model"][-1]["ratio_to_torch"] == 1.0 and result["attention"][-1]["ratio_to_torch"] == 1.0
    assert "torch SDPA" in (tmp_path / "lm_step_attention.md").read_text()
    assert "LM loss, forward + backward" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [(["--size", "huge"], "unknown size 'huge'"),
                                           (["--seq-len", "1"], "--seq-len must be >= 2"),
                                           (["--repeats", "0"], "--repeats must be >= 1")])
def test_bad_flags_fail_in_one_line_before_anything_runs(argv, message, tmp_path, capsys):
    with pytest.raises((ValueError, SystemExit)) as error:
        lm_step.main(argv + ["--out", str(tmp_path / "out")])
    assert message in str(error.value) + capsys.readouterr().err
    assert not (tmp_path / "out").exists()
