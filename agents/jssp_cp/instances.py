"""Job-shop instances: the `Instance` type, the Taillard and OR-Library text formats, Taillard's 1993 generator and
random training instances.

A job-shop instance has `jobs` jobs, each a chain of operations; operation k of job j runs on machine
`machines[j, k]` (0-based) for `durations[j, k]` time units, after operation k - 1 of the same job has finished,
and a machine runs one operation at a time (Taillard 1993, "Benchmarks for basic scheduling problems", EJOR 64,
Section 4). Every job here has the same number of operations; in the classical instances that number equals the
number of machines and each job visits every machine once.

Formats (`read_instance` detects which one a file uses):

- Taillard: a header line starting "Nb of jobs", a line whose first two integers are jobs and machines (further
  numbers: seeds and bounds, kept as metadata), then a "Times" section (one row of durations per job) and a
  "Machines" section (one row per job, machines numbered 1..m, each job visiting every machine exactly once).
- OR-Library (Beasley 1990): a line "n m", then one row per job of m pairs "machine duration", machines numbered
  0..m-1. Machines may repeat within a job (a recirculating job shop), so the format is read as it stands.

Every malformed file raises one `ValueError` naming the file and the 1-based line.
"""
from __future__ import annotations

import dataclasses
import csv
import functools
from importlib import resources
from pathlib import Path

import numpy as np

DATA = "agents.jssp_cp.data"
TAILLARD_HEADER = "Nb of jobs, Nb of Machines, Time seed, Machine seed, Upper bound, Lower bound"


@dataclasses.dataclass(frozen=True, eq=False)
class Instance:
    """Fields: machines, durations: int arrays [jobs, operations]; name: a label; metadata: extra header numbers."""

    machines: np.ndarray
    durations: np.ndarray
    name: str = ""
    metadata: tuple[int, ...] = ()

    def __post_init__(self):
        machines = np.asarray(self.machines)
        durations = np.asarray(self.durations)
        if machines.ndim != 2 or machines.shape != durations.shape or machines.size == 0:
            raise ValueError(f"Instance {self.name!r}: machines and durations must be non-empty arrays of the same "
                             f"shape [jobs, operations]; got {machines.shape} and {durations.shape}")
        for label, values in (("machines", machines), ("durations", durations)):
            if not np.issubdtype(values.dtype, np.integer):
                raise ValueError(f"Instance {self.name!r}: {label} must be integers; got dtype {values.dtype}")
        if machines.min() < 0:
            raise ValueError(f"Instance {self.name!r}: machine indices must be >= 0; got {machines.min()}")
        if durations.min() < 0:
            raise ValueError(f"Instance {self.name!r}: durations must be >= 0; got {durations.min()}")
        object.__setattr__(self, "machines", machines.astype(np.int32))
        object.__setattr__(self, "durations", durations.astype(np.int32))

    @property
    def jobs(self) -> int:
        return int(self.machines.shape[0])

    @property
    def operations(self) -> int:
        return int(self.machines.shape[1])

    @property
    def num_machines(self) -> int:
        """1 + the largest machine index used."""
        return int(self.machines.max()) + 1

    def visits_every_machine_once(self) -> bool:
        m = self.operations
        return bool(np.all(np.sort(self.machines, axis=1) == np.arange(m)))

    def __eq__(self, other) -> bool:
        return (isinstance(other, Instance) and np.array_equal(self.machines, other.machines)
                and np.array_equal(self.durations, other.durations))

    def __hash__(self) -> int:
        return hash((self.machines.tobytes(), self.durations.tobytes(), self.machines.shape))


# --- parsing ---------------------------------------------------------------------------------------------------


def _lines(text: str) -> list[tuple[int, str]]:
    """(1-based line number, stripped line) of every non-blank line."""
    return [(i, line.strip()) for i, line in enumerate(text.splitlines(), start=1) if line.strip()]


def _integers(source: str, lineno: int, line: str, what: str) -> list[int]:
    values = []
    for token in line.split():
        try:
            values.append(int(token))
        except ValueError:
            raise ValueError(f"{source}, line {lineno}: {what} must be integers; got {token!r}") from None
    return values


def _check_durations(source: str, lineno: int, row: list[int]) -> None:
    negative = [d for d in row if d < 0]
    if negative:
        raise ValueError(f"{source}, line {lineno}: durations must be >= 0; got {negative[0]}")


def parse_taillard(text: str, source: str = "<string>") -> Instance:
    lines = _lines(text)
    if not lines or not lines[0][1].lower().startswith("nb of jobs"):
        where = lines[0][0] if lines else 1
        raise ValueError(f"{source}, line {where}: a Taillard file starts with a header line 'Nb of jobs, Nb of "
                         f"Machines, ...'")
    if len(lines) < 2:
        raise ValueError(f"{source}, line {lines[0][0]}: the line with the numbers of jobs and machines is missing")
    lineno, line = lines[1]
    header = _integers(source, lineno, line, "the header values")
    if len(header) < 2 or header[0] < 1 or header[1] < 1:
        raise ValueError(f"{source}, line {lineno}: expected the number of jobs and of machines (both >= 1); "
                         f"got {line!r}")
    n, m = header[:2]
    body = lines[2:]
    sections = {}
    for title in ("times", "machines"):
        at = [i for i, (_, text_) in enumerate(body) if text_.lower() == title]
        if len(at) != 1:
            last = (body[-1] if body else lines[-1])[0]
            raise ValueError(f"{source}, line {last}: expected exactly one {title.capitalize()!r} section line; "
                             f"found {len(at)}")
        sections[title] = at[0]
    if sections["times"] > sections["machines"]:
        raise ValueError(f"{source}, line {body[sections['machines']][0]}: the 'Machines' section must follow "
                         f"the 'Times' section")
    times_rows = body[sections["times"] + 1:sections["machines"]]
    machine_rows = body[sections["machines"] + 1:]
    title_lines = {"Times": body[sections["times"]][0], "Machines": body[sections["machines"]][0]}
    durations, machines = [], []
    for label, rows, out in (("Times", times_rows, durations), ("Machines", machine_rows, machines)):
        if len(rows) != n:
            where = rows[n][0] if len(rows) > n else (rows[-1][0] if rows else title_lines[label])
            raise ValueError(f"{source}, line {where}: the {label!r} section must have {n} rows (one per job); "
                             f"found {len(rows)}")
        for lineno, line in rows:
            row = _integers(source, lineno, line, "durations" if label == "Times" else "machine numbers")
            if len(row) != m:
                raise ValueError(f"{source}, line {lineno}: expected {m} values (one per machine); got {len(row)}")
            if label == "Times":
                _check_durations(source, lineno, row)
            else:
                bad = [x for x in row if not 1 <= x <= m]
                if bad:
                    raise ValueError(f"{source}, line {lineno}: machine {bad[0]} is out of range 1..{m}")
                if sorted(row) != list(range(1, m + 1)):
                    repeated = sorted({x for x in row if row.count(x) > 1})
                    raise ValueError(f"{source}, line {lineno}: a job must visit every machine exactly once; "
                                     f"machine {repeated[0]} appears {row.count(repeated[0])} times")
                row = [x - 1 for x in row]
            out.append(row)
    return Instance(np.array(machines), np.array(durations), name=Path(source).stem, metadata=tuple(header[2:]))


def parse_orlib(text: str, source: str = "<string>") -> Instance:
    lines = _lines(text)
    if not lines:
        raise ValueError(f"{source}, line 1: the file is empty; expected a line 'jobs machines'")
    lineno, line = lines[0]
    header = _integers(source, lineno, line, "the numbers of jobs and machines")
    if len(header) != 2 or min(header) < 1:
        raise ValueError(f"{source}, line {lineno}: expected 'jobs machines' (two integers >= 1); got {line!r}")
    n, m = header
    rows = lines[1:]
    if len(rows) != n:
        where = rows[n][0] if len(rows) > n else (rows[-1][0] if rows else lineno)
        raise ValueError(f"{source}, line {where}: expected {n} job rows after the header; found {len(rows)}")
    machines, durations = [], []
    for lineno, line in rows:
        row = _integers(source, lineno, line, "machine numbers and durations")
        if len(row) != 2 * m:
            raise ValueError(f"{source}, line {lineno}: expected {m} 'machine duration' pairs ({2 * m} integers); "
                             f"got {len(row)} integers")
        job_machines, job_durations = row[0::2], row[1::2]
        bad = [x for x in job_machines if not 0 <= x < m]
        if bad:
            raise ValueError(f"{source}, line {lineno}: machine {bad[0]} is out of range 0..{m - 1}")
        _check_durations(source, lineno, job_durations)
        machines.append(job_machines)
        durations.append(job_durations)
    return Instance(np.array(machines), np.array(durations), name=Path(source).stem)


def detect_format(text: str) -> str:
    """'taillard' when the first non-blank line is Taillard's header, else 'orlib'."""
    lines = _lines(text)
    return "taillard" if lines and lines[0][1].lower().startswith("nb of jobs") else "orlib"


def parse_instance(text: str, source: str = "<string>", fmt: str = "auto") -> Instance:
    fmt = detect_format(text) if fmt == "auto" else fmt
    if fmt == "taillard":
        return parse_taillard(text, source)
    if fmt == "orlib":
        return parse_orlib(text, source)
    raise ValueError(f"unknown instance format {fmt!r}; expected 'auto', 'taillard' or 'orlib'")


def read_instance(path, fmt: str = "auto") -> Instance:
    path = Path(path)
    return parse_instance(path.read_text(), str(path), fmt)


# --- writing ---------------------------------------------------------------------------------------------------


def _rows(values: np.ndarray) -> list[str]:
    width = max(2, len(str(int(values.max()))))
    return [" ".join(f"{int(x):>{width}}" for x in row) for row in values]


def format_taillard(instance: Instance) -> str:
    if not instance.visits_every_machine_once():
        raise ValueError(f"instance {instance.name!r}: the Taillard format needs every job to visit every machine "
                         f"exactly once")
    header = " ".join(f"{x:>10}" for x in (instance.jobs, instance.operations, *instance.metadata))
    return "\n".join([TAILLARD_HEADER, header, "Times", *_rows(instance.durations), "Machines",
                      *_rows(instance.machines + 1)]) + "\n"


def format_orlib(instance: Instance) -> str:
    m = instance.num_machines
    if m != instance.operations:
        raise ValueError(f"instance {instance.name!r}: the OR-Library format has one pair per machine; this "
                         f"instance has {instance.operations} operations per job and {m} machines")
    pairs = np.stack([instance.machines, instance.durations], axis=-1).reshape(instance.jobs, -1)
    return "\n".join([f"{instance.jobs} {m}", *_rows(pairs)]) + "\n"


def write_instance(instance: Instance, path, fmt: str = "taillard") -> Path:
    path = Path(path)
    text = {"taillard": format_taillard, "orlib": format_orlib}.get(fmt)
    if text is None:
        raise ValueError(f"unknown instance format {fmt!r}; expected 'taillard' or 'orlib'")
    path.write_text(text(instance))
    return path


# --- Taillard's generator --------------------------------------------------------------------------------------

# Taillard 1993 (job-shop section): the published (time seed, machine seed) of ta01..ta80, ten per size group.
TAILLARD_SIZES = ((15, 15), (20, 15), (20, 20), (30, 15), (30, 20), (50, 15), (50, 20), (100, 20))
TAILLARD_SEEDS = (
    (840612802, 398197754), (1314640371, 386720536), (1227221349, 316176388), (342269428, 1806358582),
    (1603221416, 1501949241), (1357584978, 1734077082), (44531661, 1374316395), (302545136, 2092186050),
    (1153780144, 1393392374), (73896786, 1544979948),
    (533484900, 317419073), (1894307698, 1474268163), (874340513, 509669280), (1124986343, 1209573668),
    (1463788335, 529048107), (1056908795, 25321885), (195672285, 1717580117), (961965583, 1353003786),
    (1610169733, 1734469503), (532794656, 998486810),
    (1035939303, 773961798), (5997802, 1872541150), (1357503601, 722225039), (806159563, 1166962073),
    (1902815253, 1879990068), (1503184031, 1850351876), (1032645967, 99711329), (229894219, 1158117804),
    (823349822, 108033225), (1297900341, 489486403),
    (98640593, 1981283465), (1839268120, 248890888), (573875290, 2081512253), (1670898570, 788294565),
    (1118914567, 1074349202), (178750207, 294279708), (1549372605, 596993084), (798174738, 151685779),
    (553410952, 1329272528), (1661531649, 1173386294),
    (1841414609, 1357882888), (2116959593, 1546338557), (796392706, 1230864158), (532496463, 254174057),
    (2020525633, 978943053), (524444252, 185526083), (1569394691, 487269855), (1460267840, 1631446539),
    (198324822, 1937476577), (38071822, 1541985579),
    (17271, 718939), (660481279, 449650254), (352229765, 949737911), (1197518780, 166840558),
    (1376020303, 483922052), (2106639239, 955932362), (1765352082, 1209982549), (1105092880, 1349003108),
    (907248070, 919544535), (2011630757, 1845447001),
    (8493988, 2738939), (1991925010, 709517751), (342093237, 786960785), (1634043183, 973178279),
    (341706507, 286513148), (320167954, 1411193018), (1089696753, 298068750), (433032965, 1589656152),
    (615974477, 331205412), (236150141, 592292984),
    (302034063, 1203569070), (1437643198, 1692025209), (1792475497, 1039908559), (1647273132, 1012841433),
    (696480901, 1689682358), (1785569423, 1092647459), (117806902, 739059626), (1639154709, 1319962509),
    (2007423389, 749368241), (682761130, 262763021),
)


class TaillardRandom:
    """Taillard's portable uniform generator (Section 2 of the paper): the minimal-standard multiplicative
    congruential generator x <- 16807 x mod (2^31 - 1), evaluated with Schrage's decomposition
    (2^31 - 1 = 16807 * 127773 + 2836) so that no intermediate overflows 32 bits."""

    M, A, Q, R = 2147483647, 16807, 127773, 2836

    def __init__(self, seed: int):
        if not 0 < seed < self.M:
            raise ValueError(f"Taillard seeds lie in 1..{self.M - 1}; got {seed}")
        self.seed = seed

    def uniform(self, low: int, high: int) -> int:
        """An integer of low..high: low + floor(x / M * (high - low + 1))."""
        k = self.seed // self.Q
        self.seed = self.A * (self.seed % self.Q) - k * self.R
        if self.seed < 0:
            self.seed += self.M
        return low + int(self.seed / self.M * (high - low + 1))


def taillard_generate(jobs: int, machines: int, time_seed: int, machine_seed: int, name: str = "") -> Instance:
    """Taillard's job-shop generator: all durations U[1, 99] job by job from the time seed; then each job's machine
    order starts as 1..m and, for k = 1..m, swaps position k with position U[k, m] drawn from the machine seed."""
    times = TaillardRandom(time_seed)
    durations = np.array([[times.uniform(1, 99) for _ in range(machines)] for _ in range(jobs)])
    order = TaillardRandom(machine_seed)
    rows = []
    for _ in range(jobs):
        row = list(range(machines))
        for k in range(machines):
            other = order.uniform(k, machines - 1)
            row[k], row[other] = row[other], row[k]
        rows.append(row)
    return Instance(np.array(rows), durations, name=name, metadata=(time_seed, machine_seed))


def taillard_names() -> list[str]:
    return [f"ta{i:02d}" for i in range(1, len(TAILLARD_SEEDS) + 1)]


def _taillard_index(name: str) -> int:
    names = taillard_names()
    if name not in names:
        raise ValueError(f"unknown Taillard instance {name!r}; expected one of ta01..ta{len(names):02d}")
    return names.index(name)


def taillard_from_seeds(name: str) -> Instance:
    """Regenerates a Taillard benchmark instance from its published seeds."""
    index = _taillard_index(name)
    jobs, machines = TAILLARD_SIZES[index // 10]
    return taillard_generate(jobs, machines, *TAILLARD_SEEDS[index], name=name)


# --- the shipped benchmark -------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def taillard_bounds() -> dict[str, tuple[int, int]]:
    """{name: (best-known lower bound, best-known upper bound)} from the shipped taillard_bounds.csv."""
    text = resources.files(DATA).joinpath("taillard_bounds.csv").read_text()
    return {row["instance"]: (int(row["lower_bound"]), int(row["upper_bound"]))
            for row in csv.DictReader(text.splitlines())}


def load_taillard(name: str) -> Instance:
    """The shipped file data/taillard/NAME.txt (generated once by `write_taillard_files`)."""
    _taillard_index(name)
    path = resources.files(DATA).joinpath("taillard", f"{name}.txt")
    return parse_taillard(path.read_text(), f"{name}.txt")


def benchmark(name: str) -> tuple[Instance, int, int]:
    """(instance, best-known lower bound, best-known upper bound) of a Taillard instance ta01..ta80."""
    instance = load_taillard(name)
    lb, ub = taillard_bounds()[name]
    return instance, lb, ub


def write_taillard_files(directory) -> list[Path]:
    """Writes ta01..ta80 from the seeds in the Taillard format (header: jobs, machines, seeds, best-known bounds)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    bounds = taillard_bounds()
    paths = []
    for name in taillard_names():
        inst = taillard_from_seeds(name)
        lb, ub = bounds[name]
        inst = dataclasses.replace(inst, metadata=(*inst.metadata, ub, lb))
        paths.append(write_instance(inst, directory / f"{name}.txt", "taillard"))
    return paths


# --- random training instances ---------------------------------------------------------------------------------

MIN_SIZE, MAX_SIZE = (6, 6), (30, 20)


def random_instance(seed, jobs: int, machines: int, max_duration: int = 99) -> Instance:
    """Taillard-style: durations U[1, max_duration], each job's machine order a uniform random permutation.
    `seed`: an int or a numpy Generator."""
    if jobs < 1 or machines < 1 or max_duration < 1:
        raise ValueError(f"random_instance needs jobs, machines and max_duration >= 1; got {jobs}, {machines}, "
                         f"{max_duration}")
    rng = np.random.default_rng(seed)
    durations = rng.integers(1, max_duration + 1, size=(jobs, machines))
    orders = np.argsort(rng.random((jobs, machines)), axis=1)
    return Instance(orders, durations, name=f"random_{jobs}x{machines}")


def random_size(seed, low: tuple[int, int] = MIN_SIZE, high: tuple[int, int] = MAX_SIZE) -> tuple[int, int]:
    """(jobs, machines) uniform on the grid low..high (inclusive) with machines <= jobs, as in Taillard's sizes."""
    rng = np.random.default_rng(seed)
    while True:
        jobs = int(rng.integers(low[0], high[0] + 1))
        machines = int(rng.integers(low[1], high[1] + 1))
        if machines <= jobs:
            return jobs, machines


def random_instance_arrays(key, jobs: int, machines: int, max_duration: int = 99):
    """The JAX counterpart of `random_instance` (same distribution, different stream): (machines, durations) int32
    arrays [jobs, machines], jittable and vmappable over `key`."""
    import jax
    import jax.numpy as jnp

    k_dur, k_perm = jax.random.split(key)
    durations = jax.random.randint(k_dur, (jobs, machines), 1, max_duration + 1, dtype=jnp.int32)
    orders = jnp.argsort(jax.random.uniform(k_perm, (jobs, machines)), axis=1).astype(jnp.int32)
    return orders, durations


@functools.lru_cache(maxsize=None)
def _benchmarks() -> dict[int, Instance]:
    return {hash(inst): inst for inst in map(taillard_from_seeds, taillard_names())}


def is_benchmark(instance: Instance) -> bool:
    """Whether `instance` is one of Taillard's ta01..ta80 (training must never use one)."""
    return _benchmarks().get(hash(instance)) == instance


def benchmark_name(instance: Instance) -> str | None:
    """The Taillard name (ta01..ta80) whose machines and durations equal `instance`'s, or None."""
    found = _benchmarks().get(hash(instance))
    return found.name if found is not None and found == instance else None
