"""The run directory (jaxalign.rundir): one layout, a claim that refuses a resumed run with another config, atomic
writes that never leave a half-written file, and a parameter hash that sees every bit."""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

from jaxalign.rundir import (
    RunDir,
    claim,
    first_json_difference,
    load_arrays,
    load_json,
    params_sha256,
    save_arrays,
    write_json_atomic,
)


@dataclasses.dataclass(frozen=True)
class Inner:
    beta: float = 0.1
    show_progress: bool = True


@dataclasses.dataclass(frozen=True)
class Outer:
    seed: int = 0
    inner: Inner = Inner()
    eval_batch_size: int = 8


def test_layout_is_named_once_and_nests():
    run = RunDir("/w")
    assert (run.config, run.results, run.metrics, run.logs) == ("/w/config.json", "/w/results.json",
                                                                "/w/metrics.jsonl", "/w/logs")
    assert run.checkpoints("dpo") == "/w/checkpoints/dpo"
    assert run.sub("dpo", "iter_0").pairs == "/w/dpo/iter_0/pairs.npz"
    assert run.file("plot.png") == "/w/plot.png"


def test_claim_writes_the_config_then_accepts_presentation_changes_at_any_depth(tmp_path):
    claim(Outer(), str(tmp_path))
    assert load_json(RunDir(str(tmp_path)).config) == {"seed": 0, "inner": {"beta": 0.1, "show_progress": True},
                                                        "eval_batch_size": 8}
    claim(Outer(inner=Inner(show_progress=False), eval_batch_size=64), str(tmp_path))


def test_claim_refuses_another_config_naming_the_first_differing_field(tmp_path):
    claim(Outer(), str(tmp_path))
    before = (tmp_path / "config.json").read_bytes()
    with pytest.raises(ValueError, match=r"inner\.beta=0\.1, but this run has 0\.5; resume with the same overrides"):
        claim(Outer(inner=Inner(beta=0.5)), str(tmp_path))
    assert (tmp_path / "config.json").read_bytes() == before  # the refused run changed nothing


def test_claim_resumes_a_directory_written_before_a_field_was_added_only_at_its_default(tmp_path):
    """A config.json from an older version lacks a field added since (`inner.beta` here): a run that leaves the
    field at its default is that run and resumes; one that sets it is another run and is refused."""
    (tmp_path / "config.json").write_text(json.dumps({"seed": 0, "inner": {"show_progress": True},
                                                      "eval_batch_size": 8}))
    with pytest.raises(ValueError, match=r"inner\.beta=absent, but this run has 0\.5"):
        claim(Outer(inner=Inner(beta=0.5)), str(tmp_path))
    claim(Outer(), str(tmp_path))
    assert load_json(RunDir(str(tmp_path)).config)["inner"] == {"beta": 0.1, "show_progress": True}
    with pytest.raises(ValueError, match=r"seed=0, but this run has 1"):
        claim(Outer(seed=1), str(tmp_path))


def test_first_json_difference_walks_dicts_and_lists_and_equates_int_and_float():
    assert first_json_difference({"a": [1, 2]}, {"a": [1, 2.0]}) is None
    assert first_json_difference({"a": [1, 2]}, {"a": [1, 3]}) == ("a/1", 2, 3)
    assert first_json_difference({"a": True}, {"a": 1}) == ("a", True, 1)
    path, saved, _ = first_json_difference({}, {"b": 1})
    assert path == "b"


def test_atomic_writes_leave_no_temporary_and_round_trip(tmp_path):
    path = str(tmp_path / "r.json")
    write_json_atomic(path, {"x": [1, 2]})
    assert json.loads(open(path).read()) == {"x": [1, 2]} and os.listdir(tmp_path) == ["r.json"]
    arrays = {"a": np.arange(6).reshape(2, 3), "b": np.ones(2, np.float32)}
    save_arrays(str(tmp_path / "sub" / "d.npz"), arrays, {"kept": 2})
    loaded, stats = load_arrays(str(tmp_path / "sub" / "d.npz"))
    assert stats == {"kept": 2} and set(loaded) == {"a", "b"}
    np.testing.assert_array_equal(loaded["a"], arrays["a"])
    assert os.listdir(tmp_path / "sub") == ["d.npz"]
    assert load_arrays(str(tmp_path / "missing.npz")) is None and load_json(str(tmp_path / "missing.json")) is None


def test_params_sha256_sees_one_flipped_bit_and_the_tree_order():
    params = {"a": np.zeros(4, np.float32), "b": np.ones(3, np.float32)}
    flipped = {"a": params["a"].copy(), "b": params["b"]}
    flipped["a"].view(np.uint32)[2] ^= 1
    assert params_sha256(params) == params_sha256({k: v.copy() for k, v in params.items()})
    assert params_sha256(params) != params_sha256(flipped)
    assert params_sha256(params) != params_sha256({"a": params["b"], "b": params["a"]})
