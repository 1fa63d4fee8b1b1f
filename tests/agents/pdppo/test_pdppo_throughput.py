"""The throughput measurement runs and reports consistent numbers (the >= 100x target is measured, not asserted);
the pre-drawn demand of the fast path has the instance's Binomial law."""
import jax
import numpy as np
import pytest

from agents.pdppo.env import params_from_instance
from agents.pdppo.instances import binomial_pmf, generate
from agents.pdppo.throughput import measure, predrawn_demand


def test_measure_reports_both_rates_and_their_ratio():
    out = measure(generate("15i5m", 0).replace(horizon=5), num_envs=8, num_steps=5, numpy_steps=20)
    assert out["num_envs"] == 8 and out["instance"] == "15i5m-seed0"
    assert out["jax_steps_per_second"] > 0 and out["numpy_steps_per_second"] > 0
    assert out["ratio"] == pytest.approx(out["jax_steps_per_second"] / out["numpy_steps_per_second"])
    assert out["ratio_predrawn"] == pytest.approx(out["jax_predrawn_steps_per_second"] / out["numpy_steps_per_second"])


def test_predrawn_demand_has_the_binomial_law():
    instance = generate("15i5m", 0)
    demand = np.asarray(predrawn_demand(params_from_instance(instance), jax.random.key(3), (4000,)))
    assert demand.shape == (4000, 15)
    freq = np.bincount(demand.ravel(), minlength=21) / demand.size
    pmf = binomial_pmf(20, 0.4)
    # 60,000 draws: each frequency within 5 standard errors of its probability.
    assert np.all(np.abs(freq - pmf) <= 5 * np.sqrt(pmf * (1 - pmf) / demand.size) + 1e-12)
