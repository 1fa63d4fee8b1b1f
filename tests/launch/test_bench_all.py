"""`jaxalign bench all --out DIR`: every performance benchmark in one run, one report. What is checked here is the
pipeline (each benchmark's numbers become checks against the issue's targets, perf.json and perf.md are written,
a failing benchmark does not lose the others), never a speed: `--quick` runs toy sizes whose ratios mean nothing."""
import json

import pytest

from launch import bench_all


def test_every_benchmarks_numbers_become_checks_against_their_targets():
    dpo = bench_all.dpo_checks([
        {"size": "small", "speedup": 0.8, "jax_tokens_per_second": 8.0, "trl_tokens_per_second": 10.0,
         "peak_fraction": 0.3, "achieved_gflops": 90.0, "matmul_peak_gflops": 300.0},
        {"size": "large", "speedup": 1.6, "jax_tokens_per_second": 16.0, "trl_tokens_per_second": 10.0,
         "peak_fraction": 0.69, "achieved_gflops": 207.0, "matmul_peak_gflops": 300.0}])
    assert [(c.metric, c.target, c.met) for c in dpo] == [
        ("small: tokens/s vs TRL", 1.5, False), ("large: tokens/s vs TRL", 1.5, True),
        ("large: share of the matmul ceiling", 0.7, False)]  # the ceiling share is checked for medium and large only
    memory = bench_all.memory_checks({"vocab": 128_256, "temp_ratio": 6.4, "grad_max_abs_diff": 2e-5, "variants": {
        "materialised": {"temp_bytes": 64 * 2**20}, "chunked (128)": {"temp_bytes": 10 * 2**20}}})
    assert memory[0].met and "64 vs 10 MiB" in memory[0].note
    assert bench_all.Check("x", "y", None, 2.0).met is False  # a number that was not measured fails its target
    assert bench_all.Check("x", "y", 0.5).met is None  # no target: shown for information


def test_a_quick_run_writes_perf_json_and_md_with_the_machine_and_load(tmp_path, capsys):
    report = bench_all.main(["--out", str(tmp_path), "--quick", "--only", "logprob-memory,packing"])
    on_disk = json.loads((tmp_path / "perf.json").read_text())
    assert on_disk["checks"] == report["checks"]
    assert [c["benchmark"] for c in report["checks"]] == ["packing", "logprob-memory"]
    assert all(isinstance(c["value"], float) and c["target"] for c in report["checks"])
    machine = report["machine"]
    assert machine["usable_cores"] >= 1 and machine["versions"]["jax"] != "not installed"
    for record in report["benchmarks"]:
        assert record["error"] is None and record["load_before"] >= 0 and record["argv"]
    md = (tmp_path / "perf.md").read_text()
    assert "| logprob-memory |" in md and "| packing |" in md and "load before / after each benchmark" in md
    assert (tmp_path / "logprob-memory" / "logprob_memory.json").exists()
    assert "[bench all] 1/2 packing" in capsys.readouterr().out


def test_a_failing_benchmark_is_reported_and_the_others_still_run(tmp_path, monkeypatch):
    broken = bench_all.Bench("broken", "json", lambda out, quick: [], lambda result: [], 1.0)  # json has no main()
    memory = next(b for b in bench_all.BENCHES if b.name == "logprob-memory")
    monkeypatch.setattr(bench_all, "BENCHES", [broken, memory])
    with pytest.raises(SystemExit, match="1 benchmark.*failed: broken"):
        bench_all.main(["--out", str(tmp_path), "--quick"])
    report = json.loads((tmp_path / "perf.json").read_text())
    assert report["benchmarks"][0]["error"].startswith("AttributeError")
    assert [c["benchmark"] for c in report["checks"]] == ["logprob-memory"]
    assert "Failed:\n- broken: AttributeError" in (tmp_path / "perf.md").read_text()


@pytest.mark.parametrize("argv, message", [(["--only", "dpo,packing"], "unknown benchmark dpo"),
                                           (["--only", ","], "unknown benchmark (none given)")])
def test_bad_flags_fail_in_one_line_before_any_directory(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench_all.main(["--out", str(tmp_path / "out")] + argv)
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_an_earlier_report_is_never_overwritten_without_the_flag(tmp_path, capsys):
    (tmp_path / "perf.json").write_text("{}")
    with pytest.raises(SystemExit):
        bench_all.main(["--out", str(tmp_path), "--only", "packing"])
    assert "already holds perf.json (pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "perf.json").read_text() == "{}"
