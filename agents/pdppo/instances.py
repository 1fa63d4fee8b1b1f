"""Stochastic multi-item, multi-machine lot-sizing instances (the SimplePlant setting of Felizardo et al. 2025,
"Post-Decision Proximal Policy Optimization with Dual Critic Networks"), their generator and their JSON files.

An instance fixes, for I items and M machines:

  holding_cost[i]        per unit left in stock at the end of a period (0.01 in the paper)
  lost_sales_cost[i]     per unit of demand that could not be served
  production_rate[m, i]  units machine m makes of item i in one period; 0 means m cannot make i
  setup_cost[m, i]       paid when m switches to item i (from another item or from no setup)
  setup_loss[m, i]       units of that period's production lost to the switch
  initial_inventory[i], initial_setup[m]   the state at t = 0 (setup 0 = none, i + 1 = item i)
  inventory_cap          stock above it is discarded at the end of a period (100 in the paper)
  demand_n, demand_p     demand per item and period is Binomial(demand_n, demand_p) (20 and 0.4 in the paper)
  horizon                periods per episode (100 in the paper)

The generator draws the paper's ranges: production rate 0-40 biased to 0, setup cost 15-30, setup loss 1-3,
lost-sales cost 0.1-1.1, holding cost 0.01. Where the paper is silent we choose, and say so here:
  - "biased to 0": each (machine, item) pair is unable to produce (rate 0) with probability 1/2; otherwise its
    rate is uniform on the integers 1..40. Every item gets at least one machine and every machine at least one
    item, so no item is a pure lost-sales sink and no machine is useless.
  - setup cost is uniform on the reals [15, 30], setup loss uniform on the integers {1, 2, 3}, lost-sales cost
    uniform on [0.1, 1.1]; they are drawn for every pair, including pairs that cannot produce (never used there).
  - initial inventory is uniform on the integers 0..20 (about two periods of mean demand); no initial setup.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
from pathlib import Path
from typing import Any

import numpy as np

CONFIGS: dict[str, tuple[int, int]] = {
    "15i5m": (15, 5), "20i10m": (20, 10), "25i10m": (25, 10), "25i15m": (25, 15), "30i10m": (30, 10),
    "30i15m": (30, 15),
}

FORMAT = "pdppo-lot-sizing-instance/1"
ITEM_ARRAYS = ("holding_cost", "lost_sales_cost", "initial_inventory")
MACHINE_ITEM_ARRAYS = ("production_rate", "setup_cost", "setup_loss")
INTEGER_ARRAYS = ("production_rate", "setup_loss", "initial_inventory", "initial_setup")
SCALARS = ("inventory_cap", "demand_n", "demand_p", "horizon")

# Generator ranges (see the module docstring).
PRODUCTION_RATE_MAX = 40
CANNOT_PRODUCE_PROBABILITY = 0.5
SETUP_COST_RANGE = (15.0, 30.0)
SETUP_LOSS_RANGE = (1, 3)
LOST_SALES_COST_RANGE = (0.1, 1.1)
HOLDING_COST = 0.01
INITIAL_INVENTORY_MAX = 20


def _fail(source: str, key: str, value: Any, expected: str) -> None:
    raise ValueError(f"{source}: {key}={_short(value)}: expected {expected}")


def _short(value: Any) -> str:
    text = repr(value.tolist() if isinstance(value, np.ndarray) else value)
    return text if len(text) <= 120 else text[:117] + "..."


def _as_array(source: str, key: str, value: Any, ndim: int, integer: bool) -> np.ndarray:
    kind = "integers" if integer else "numbers"
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError):
        arr = None
    if arr is not None and arr.size == 0 and ndim == 2:  # JSON writes an empty matrix as [], a 1-d list
        arr = arr.reshape(0, 0)
    if arr is None or arr.ndim != ndim or (arr.size and arr.dtype.kind not in "iuf") or arr.dtype.kind == "b":
        _fail(source, key, value, f"a {ndim}-d array of {kind}")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        _fail(source, key, value, f"finite {kind}")
    if integer:
        if not np.all(arr == np.round(arr)):
            _fail(source, key, value, "integers")
        return arr.astype(np.int64)
    return arr


def _check_int(source: str, key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        _fail(source, key, value, f"an integer >= {minimum}")
    return int(value)


@dataclasses.dataclass(frozen=True, eq=False)
class Instance:
    """One lot-sizing instance (see the module docstring for the fields); validated on construction, so every
    `Instance` is one the environment can run. Arrays are stored as float64 / int64 NumPy arrays."""

    holding_cost: np.ndarray
    lost_sales_cost: np.ndarray
    production_rate: np.ndarray
    setup_cost: np.ndarray
    setup_loss: np.ndarray
    initial_inventory: np.ndarray
    initial_setup: np.ndarray
    inventory_cap: int = 100
    demand_n: int = 20
    demand_p: float = 0.4
    horizon: int = 100
    name: str = "instance"

    def __post_init__(self):
        for key, value in validated_fields(dataclasses.asdict(self), f"Instance {self.name!r}").items():
            object.__setattr__(self, key, value)

    @property
    def n_items(self) -> int:
        return int(self.holding_cost.shape[0])

    @property
    def n_machines(self) -> int:
        return int(self.production_rate.shape[0])

    @property
    def can_produce(self) -> np.ndarray:
        """bool [M, I]: machine m can make item i."""
        return self.production_rate > 0

    def to_dict(self) -> dict:
        out = {"format": FORMAT, "name": self.name, "n_items": self.n_items, "n_machines": self.n_machines}
        for f in dataclasses.fields(self):
            if f.name != "name":
                value = getattr(self, f.name)
                out[f.name] = value.tolist() if isinstance(value, np.ndarray) else value
        return out

    def replace(self, **changes) -> "Instance":
        return dataclasses.replace(self, **changes)


def _first_bad(source: str, key: str, arr: np.ndarray, bad: np.ndarray, expected: str) -> None:
    """Fail naming the first offending entry, key[index]=value (whole arrays can be long)."""
    if np.any(bad):
        index = tuple(int(j) for j in np.argwhere(bad)[0])
        value = arr[index].item()
        _fail(source, f"{key}[{', '.join(map(str, index))}]", value, expected)


def validated_fields(fields: dict, source: str, n_items: int | None = None, n_machines: int | None = None) -> dict:
    """The instance fields converted to arrays and checked; a ValueError naming `source`, the key and the value
    for the first problem found. The sizes come from holding_cost and production_rate unless given (a file
    states them)."""
    out = dict(fields)
    for key in ITEM_ARRAYS + ("initial_setup",):
        out[key] = _as_array(source, key, fields[key], 1, key in INTEGER_ARRAYS)
    for key in MACHINE_ITEM_ARRAYS:
        out[key] = _as_array(source, key, fields[key], 2, key in INTEGER_ARRAYS)
    n_items = out["holding_cost"].shape[0] if n_items is None else n_items
    if n_items < 1:
        _fail(source, "holding_cost", fields["holding_cost"], "one entry per item, at least one item")
    n_machines = out["production_rate"].shape[0] if n_machines is None else n_machines
    if n_machines < 1:
        _fail(source, "production_rate", fields["production_rate"], "one row per machine, at least one machine")
    for key in ITEM_ARRAYS:
        if out[key].shape != (n_items,):
            _fail(source, key, fields[key], f"length n_items = {n_items}")
    for key in MACHINE_ITEM_ARRAYS:
        if out[key].shape != (n_machines, n_items):
            _fail(source, key, fields[key], f"shape [n_machines, n_items] = [{n_machines}, {n_items}]")
    if out["initial_setup"].shape != (n_machines,):
        _fail(source, "initial_setup", fields["initial_setup"], f"length n_machines = {n_machines}")
    for key in ("holding_cost", "lost_sales_cost", "setup_cost", "production_rate", "setup_loss"):
        _first_bad(source, key, out[key], out[key] < 0, "a non-negative value")
    out["inventory_cap"] = _check_int(source, "inventory_cap", fields["inventory_cap"], 1)
    out["demand_n"] = _check_int(source, "demand_n", fields["demand_n"], 0)
    out["horizon"] = _check_int(source, "horizon", fields["horizon"], 1)
    p = fields["demand_p"]
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not (0.0 <= float(p) <= 1.0):
        _fail(source, "demand_p", p, "a probability in [0, 1]")
    out["demand_p"] = float(p)
    inv = out["initial_inventory"]
    _first_bad(source, "initial_inventory", inv, (inv < 0) | (inv > out["inventory_cap"]),
               f"an integer in [0, inventory_cap = {out['inventory_cap']}]")
    setup = out["initial_setup"]
    _first_bad(source, "initial_setup", setup, (setup < 0) | (setup > n_items), f"0 (no setup) or an item 1..{n_items}")
    for m, s in enumerate(setup):
        if s > 0 and out["production_rate"][m, s - 1] == 0:
            _fail(source, f"initial_setup[{m}]", int(s), f"an item machine {m} can produce (item {s - 1} has rate 0)")
    if not isinstance(fields["name"], str):
        _fail(source, "name", fields["name"], "a string")
    return out


def from_dict(data: Any, source: str) -> Instance:
    """An instance from its JSON object (`Instance.to_dict`); `source` (the file) is named in every error."""
    if not isinstance(data, dict):
        _fail(source, "(top level)", type(data).__name__, "a JSON object")
    if data.get("format") != FORMAT:
        _fail(source, "format", data.get("format"), repr(FORMAT))
    names = [f.name for f in dataclasses.fields(Instance)]
    known = set(names) | {"format", "n_items", "n_machines"}
    for key in data:
        if key not in known:
            _fail(source, key, data[key], f"no such key (known keys: {', '.join(sorted(known))})")
    for key in names + ["n_items", "n_machines"]:
        if key not in data:
            _fail(source, key, "(missing)", "a value")
    sizes = {key: _check_int(source, key, data[key], 1) for key in ("n_items", "n_machines")}
    return Instance(**validated_fields({k: data[k] for k in names}, source, **sizes))


def save_instance(instance: Instance, path: str | Path) -> None:
    Path(path).write_text(json.dumps(instance.to_dict(), indent=1) + "\n")


def load_instance(path: str | Path) -> Instance:
    """Read an instance file; a missing file, bad JSON or a bad field is one ValueError naming the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no such instance file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return from_dict(data, str(path))


def _ensure_coverage(can: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Give every item a machine and every machine an item (random picks), so the instance has no dead parts."""
    can = can.copy()
    n_machines, n_items = can.shape
    for i in range(n_items):
        if not can[:, i].any():
            can[rng.integers(n_machines), i] = True
    for m in range(n_machines):
        if not can[m].any():
            can[m, rng.integers(n_items)] = True
    return can


def generate_instance(n_items: int, n_machines: int, seed: int, name: str | None = None) -> Instance:
    """A random instance with the paper's parameter ranges (module docstring); equal seeds give equal instances."""
    _check_int("generate_instance", "n_items", n_items, 1)
    _check_int("generate_instance", "n_machines", n_machines, 1)
    _check_int("generate_instance", "seed", seed, 0)
    rng = np.random.default_rng(seed)
    shape = (n_machines, n_items)
    can = _ensure_coverage(rng.random(shape) >= CANNOT_PRODUCE_PROBABILITY, rng)
    rate = np.where(can, rng.integers(1, PRODUCTION_RATE_MAX + 1, shape), 0)
    return Instance(
        holding_cost=np.full(n_items, HOLDING_COST),
        lost_sales_cost=rng.uniform(*LOST_SALES_COST_RANGE, n_items),
        production_rate=rate,
        setup_cost=rng.uniform(*SETUP_COST_RANGE, shape),
        setup_loss=rng.integers(SETUP_LOSS_RANGE[0], SETUP_LOSS_RANGE[1] + 1, shape),
        initial_inventory=rng.integers(0, INITIAL_INVENTORY_MAX + 1, n_items),
        initial_setup=np.zeros(n_machines, np.int64),
        name=name or f"{n_items}i{n_machines}m-seed{seed}",
    )


def generate(config: str, seed: int) -> Instance:
    """The instance of a named configuration ("15i5m", "20i10m", ...: items x machines) for `seed`."""
    if config not in CONFIGS:
        _fail("generate", "config", config, f"one of {', '.join(CONFIGS)}")
    n_items, n_machines = CONFIGS[config]
    return generate_instance(n_items, n_machines, seed, name=f"{config}-seed{seed}")


def binomial_pmf(n: int, p: float) -> np.ndarray:
    """float64 [n + 1]: P(D = k) for D ~ Binomial(n, p), from the closed form."""
    k = np.arange(n + 1)
    return np.array([math.comb(n, int(j)) * p ** int(j) * (1 - p) ** (n - int(j)) for j in k])
