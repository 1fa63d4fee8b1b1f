"""CP-SAT on a Taillard instance: a valid schedule, above the best-known lower bound, no worse than its hint."""
import numpy as np
import pytest

from agents.jssp_cp import env, rules
from agents.jssp_cp.cpsat import solve
from agents.jssp_cp.instances import benchmark, random_instance
from agents.jssp_cp.schedule import validate


def test_ta01_with_a_hint_in_two_seconds():
    inst, lb, ub = benchmark("ta01")
    hint, hint_makespan = rules.dispatch(env.pad(inst), "mwkr")
    result = solve(inst, time_limit=2.0, workers=2, hint=np.asarray(hint))
    assert validate(inst, result.start, makespan=result.makespan) == []
    assert lb <= result.makespan <= int(hint_makespan)
    assert result.bound <= lb and result.status in ("OPTIMAL", "FEASIBLE")


def test_bad_arguments_are_refused():
    inst = random_instance(0, 3, 3)
    with pytest.raises(ValueError, match="hint has shape"):
        solve(inst, time_limit=1.0, hint=np.zeros((2, 3), int))
    with pytest.raises(ValueError, match="time_limit > 0"):
        solve(inst, time_limit=0)
