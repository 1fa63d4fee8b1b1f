"""The throughput measurement runs and reports consistent numbers (the >= 100x target is measured, not asserted),
on one device and, where the process has several, sharded over all of them."""
import jax
import pytest

from agents.pdppo.instances import generate
from agents.pdppo.throughput import jax_steps_per_second, main, measure


def test_measure_reports_both_rates_and_their_ratio():
    out = measure(generate("15i5m", 0).replace(horizon=5), num_envs=8, num_steps=5, numpy_steps=20)
    assert out["num_envs"] == 8 and out["instance"] == "15i5m-seed0" and out["jax_devices"] == jax.device_count()
    assert out["jax_steps_per_second"] > 0 and out["numpy_steps_per_second"] > 0
    assert out["ratio"] == pytest.approx(out["jax_steps_per_second"] / out["numpy_steps_per_second"])
    if jax.device_count() > 1:
        assert out["ratio_all_devices"] == pytest.approx(
            out["jax_all_devices_steps_per_second"] / out["numpy_steps_per_second"])


def test_an_env_batch_that_does_not_split_over_the_devices_is_refused():
    devices = jax.devices()[:1] * 3  # three shards of one device: enough to check the divisibility rule
    with pytest.raises(ValueError, match="num_envs=8 must be divisible by the 3 devices"):
        jax_steps_per_second(generate("15i5m", 0), num_envs=8, num_steps=2, devices=devices)


def test_bad_arguments_are_one_error_line(capsys, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "")  # main sets the device-count flag for its process; keep this one's
    with pytest.raises(SystemExit) as exit_info:
        main(["--cpu-devices", "0"])
    assert exit_info.value.code == 2 and "--cpu-devices must be at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["99i1m"])
    assert "99i1m" in capsys.readouterr().err
