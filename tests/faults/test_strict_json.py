"""Every JSON the project writes is strict: a non-finite float becomes null and the record lists it under
"nonfinite" (`jaxalign.rundir`, module docstring), so readers that reject NaN/Infinity parse every file."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from jaxalign.rundir import RunDir, claim, load_arrays, save_arrays, strict_json_line, write_json_atomic
from jaxalign.train.checkpoint import PytreeCheckpointer
from jaxalign.train.loop import MetricsLog
from rl import harness


def _reject(constant: str):
    raise ValueError(f"non-strict JSON constant {constant}")


def strict_loads(text: str):
    return json.loads(text, parse_constant=_reject)


NAN_RESULTS = {"dpo_accuracy": 0.5, "dpo_accuracy_on_sft_correct": float("nan"), "n": 3,
               "nested": {"loss": float("inf"), "curve": [1.0, float("-inf")]}, "f32": np.float32("nan")}


def test_parse_constant_rejects_what_plain_json_writes():
    with pytest.raises(ValueError, match="NaN"):
        strict_loads(json.dumps({"x": float("nan")}))


def test_results_json_is_strict_and_flags_the_nonfinite_keys(tmp_path):
    # What arith_dpo's results.json holds when no test problem was solved by the SFT policy: a NaN accuracy.
    path = RunDir(str(tmp_path)).results
    write_json_atomic(path, NAN_RESULTS)
    results = strict_loads(open(path).read())
    assert results["dpo_accuracy_on_sft_correct"] is None and results["dpo_accuracy"] == 0.5
    assert results["nested"] == {"loss": None, "curve": [1.0, None]} and results["f32"] is None
    assert results["nonfinite"] == ["dpo_accuracy_on_sft_correct", "f32", "nested.curve.1", "nested.loss"]


def test_finite_payloads_are_written_as_before(tmp_path):
    payload = {"b": [1, 2.5, None], "a": {"c": "x"}, "n": np.float32(0.25)}
    path = str(tmp_path / "x.json")
    write_json_atomic(path, payload)
    assert open(path).read() == json.dumps(payload, indent=2, sort_keys=True, default=str)
    assert strict_json_line({"b": 1.5, "a": 2}) == json.dumps({"b": 1.5, "a": 2}, sort_keys=True)


def test_metrics_log_lines_are_strict_before_and_after_truncation(tmp_path):
    log = MetricsLog(str(tmp_path / "metrics.jsonl"), 0)
    log.write({"phase": "sft", "step": 1, "loss": 1.0})
    log.write({"phase": "sft", "step": 2, "loss": float("nan"), "eval/loss": float("inf")})
    log.write({"phase": "sft", "step": 3, "loss": float("nan")})
    log.truncate("sft", 2)
    records = [strict_loads(line) for line in open(log.path)]
    assert records[1] == {"phase": "sft", "step": 2, "loss": None, "eval/loss": None,
                          "nonfinite": ["eval/loss", "loss"]}
    assert len(records) == 2


def test_rl_harness_metrics_and_results_are_strict(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    harness.write_metrics(path, [{"update": 1, "mean_return": float("nan")}])
    harness.append_metrics(path, [{"update": 2, "mean_return": float("inf")}])
    records = [strict_loads(line) for line in open(path)]
    assert [r["mean_return"] for r in records] == [None, None]
    harness.write_results(str(tmp_path), {"final_return": float("nan")})
    assert strict_loads(open(RunDir(str(tmp_path)).results).read())["final_return"] is None


def test_claim_checkpoint_record_and_array_stats_are_strict(tmp_path):
    claim({"lr": 0.1, "clip": float("inf")}, str(tmp_path))
    assert strict_loads(open(RunDir(str(tmp_path)).config).read())["clip"] is None
    with PytreeCheckpointer(tmp_path / "ckpt", {"run": 1}) as ckpt:
        ckpt.save(1, {"w": jax.numpy.ones(2)}, record=[{"mean_return": float("nan")}])
        assert ckpt.restore_latest({"w": jax.numpy.ones(2)})[2] == [{"mean_return": None}]
    meta = next((tmp_path / "ckpt" / "1" / "meta").glob("metadata"))
    strict_loads(meta.read_text())
    save_arrays(str(tmp_path / "a.npz"), {"x": np.zeros(2)}, {"mean": float("nan")})
    with np.load(tmp_path / "a.npz") as f:
        assert strict_loads(str(f["stats"]))["mean"] is None
    assert load_arrays(str(tmp_path / "a.npz"))[1]["nonfinite"] == ["mean"]
