"""The throughput measurement runs and reports consistent numbers (the >= 100x target is measured, not asserted)."""
import pytest

from agents.pdppo.instances import generate
from agents.pdppo.throughput import measure


def test_measure_reports_both_rates_and_their_ratio():
    out = measure(generate("15i5m", 0).replace(horizon=5), num_envs=8, num_steps=5, numpy_steps=20)
    assert out["num_envs"] == 8 and out["instance"] == "15i5m-seed0"
    assert out["jax_steps_per_second"] > 0 and out["numpy_steps_per_second"] > 0
    assert out["ratio"] == pytest.approx(out["jax_steps_per_second"] / out["numpy_steps_per_second"])
