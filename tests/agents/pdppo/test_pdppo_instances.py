"""Lot-sizing instances: the generator's ranges, JSON round trips and one clear error per bad file or config."""
import json
import math

import numpy as np
import pytest

from agents.pdppo.instances import (CONFIGS, binomial_pmf, generate, generate_instance, load_instance,
                                    save_instance)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_generator_draws_the_papers_ranges(config):
    inst = generate(config, 3)
    n_items, n_machines = CONFIGS[config]
    assert (inst.n_items, inst.n_machines) == (n_items, n_machines)
    rate = inst.production_rate
    assert rate.min() == 0 and rate.max() <= 40 and np.all(rate[rate > 0] >= 1)
    assert 0.3 < np.mean(rate == 0) < 0.7  # biased to 0: about half the pairs cannot produce
    assert inst.can_produce.any(axis=0).all() and inst.can_produce.any(axis=1).all()
    assert np.all((inst.setup_cost >= 15) & (inst.setup_cost <= 30))
    assert set(np.unique(inst.setup_loss)) <= {1, 2, 3}
    assert np.all((inst.lost_sales_cost >= 0.1) & (inst.lost_sales_cost <= 1.1))
    np.testing.assert_array_equal(inst.holding_cost, 0.01)
    assert (inst.inventory_cap, inst.demand_n, inst.demand_p, inst.horizon) == (100, 20, 0.4, 100)
    assert np.all((inst.initial_inventory >= 0) & (inst.initial_inventory <= 20))
    np.testing.assert_array_equal(inst.initial_setup, 0)


def test_generator_is_keyed_by_seed():
    a, b, c = generate("20i10m", 7), generate("20i10m", 7), generate("20i10m", 8)
    for field in ("production_rate", "setup_cost", "lost_sales_cost", "initial_inventory"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.setup_cost, c.setup_cost)


def test_json_round_trip_is_exact(tmp_path):
    inst = generate("15i5m", 1).replace(inventory_cap=50, demand_n=6, demand_p=0.25, horizon=12, name="custom")
    save_instance(inst, tmp_path / "i.json")
    back = load_instance(tmp_path / "i.json")
    assert back.to_dict() == inst.to_dict()
    np.testing.assert_array_equal(back.setup_cost, inst.setup_cost)  # bit-exact floats through JSON
    assert back.setup_cost.dtype == np.float64 and back.production_rate.dtype == np.int64


def _write(tmp_path, change):
    data = generate("15i5m", 0).to_dict()
    change(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    return path


def _set(key, value):
    return lambda d: d.__setitem__(key, value)


@pytest.mark.parametrize("change, message", [
    (lambda d: d["lost_sales_cost"].__setitem__(3, -0.5), r"lost_sales_cost\[3\]=-0.5: expected a non-negative value"),
    (lambda d: d["setup_cost"][1].__setitem__(2, -1.0), r"setup_cost\[1, 2\]=-1.0: expected a non-negative value"),
    (_set("n_machines", 0), r"n_machines=0: expected an integer >= 1"),
    (lambda d: d.update(production_rate=[], setup_cost=[], setup_loss=[], initial_setup=[]),
     r"production_rate=\[\]: expected shape \[n_machines, n_items\] = \[5, 15\]"),
    (lambda d: d["holding_cost"].pop(), r"holding_cost=.*: expected length n_items = 15"),
    (lambda d: d["setup_loss"].pop(), r"setup_loss=.*: expected shape \[n_machines, n_items\] = \[5, 15\]"),
    (lambda d: d["initial_setup"].append(0), r"initial_setup=.*: expected length n_machines = 5"),
    (_set("n_items", 14), r"holding_cost=.*: expected length n_items = 14"),
    (_set("inventory_cap", 0), r"inventory_cap=0: expected an integer >= 1"),
    (_set("horizon", 2.5), r"horizon=2.5: expected an integer >= 1"),
    (_set("demand_p", 1.5), r"demand_p=1.5: expected a probability"),
    (_set("initial_inventory", [200] * 15),
     r"initial_inventory\[0\]=200: expected an integer in \[0, inventory_cap = 100\]"),
    (_set("production_rate", [[1.5] * 15] * 5), r"production_rate=.*: expected integers"),
    (_set("holding_cost", ["a"] * 15), r"holding_cost=.*: expected a 1-d array of numbers"),
    (_set("initial_setup", [16, 0, 0, 0, 0]), r"initial_setup\[0\]=16: expected 0 \(no setup\) or an item 1..15"),
    (_set("colour", "red"), r"colour='red': expected no such key"),
    (lambda d: d.pop("setup_loss"), r"setup_loss='\(missing\)': expected a value"),
    (_set("format", "v0"), r"format='v0': expected 'pdppo-lot-sizing-instance/1'"),
])
def test_bad_instance_file_is_one_error_naming_file_key_and_value(tmp_path, change, message):
    path = _write(tmp_path, change)
    with pytest.raises(ValueError, match=message) as err:
        load_instance(path)
    assert str(err.value).startswith(f"{path}: ")


def test_infeasible_initial_setup_names_the_machine(tmp_path):
    inst = generate("15i5m", 0)
    item = int(np.argmin(inst.production_rate[0]))  # an item machine 0 cannot make
    path = _write(tmp_path, lambda d: d["initial_setup"].__setitem__(0, item + 1))
    message = rf"initial_setup\[0\]={item + 1}: expected an item machine 0 can produce \(item {item} has rate 0\)"
    with pytest.raises(ValueError, match=message):
        load_instance(path)


def test_unreadable_files(tmp_path):
    with pytest.raises(ValueError, match="missing.json: no such instance file"):
        load_instance(tmp_path / "missing.json")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(ValueError, match="x.json: not valid JSON"):
        load_instance(tmp_path / "x.json")
    (tmp_path / "y.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"y.json: \(top level\)='list': expected a JSON object"):
        load_instance(tmp_path / "y.json")


def test_impossible_configurations():
    with pytest.raises(ValueError, match=r"generate: config='16i5m': expected one of 15i5m, 20i10m"):
        generate("16i5m", 0)
    with pytest.raises(ValueError, match=r"n_machines=0: expected an integer >= 1"):
        generate_instance(15, 0, 0)
    inst = generate("15i5m", 0)
    with pytest.raises(ValueError, match=r"production_rate=\[\]: expected one row per machine, at least one machine"):
        inst.replace(production_rate=np.zeros((0, 15)), setup_cost=np.zeros((0, 15)), setup_loss=np.zeros((0, 15)),
                     initial_setup=np.zeros(0))
    with pytest.raises(ValueError, match=r"Instance '15i5m-seed0': holding_cost\[0\]=-0.01: expected a non-negative"):
        inst.replace(holding_cost=-inst.holding_cost)


def test_binomial_pmf_is_the_closed_form():
    pmf = binomial_pmf(20, 0.4)
    assert math.isclose(pmf.sum(), 1.0, abs_tol=1e-12)
    assert math.isclose(pmf @ np.arange(21), 8.0, abs_tol=1e-12)
    assert math.isclose(pmf @ np.arange(21) ** 2 - 64.0, 4.8, abs_tol=1e-10)
    np.testing.assert_allclose(binomial_pmf(2, 0.5), [0.25, 0.5, 0.25])
    np.testing.assert_allclose(binomial_pmf(0, 0.3), [1.0])
