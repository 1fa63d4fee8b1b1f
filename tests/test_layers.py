"""The project's layers, checked on its import statements.

Bottom up: (1) jaxalign.sharding / distributed / logprobs / rundir; (2) jaxalign.models, jaxalign.losses; (3)
jaxalign.train, tasks, sampling, data; (4) jaxalign.algorithms, rl; (5) jaxalign.experiments, agents,
jaxalign.bench; (6) launch. `check_layers(root)` reads every module of jaxalign/, rl/, agents/ and launch/ under
`root` with `ast` (module-level and function-level imports alike, relative imports resolved) and returns every
import that breaks a rule, naming the file, the line and the imported module. The rules:

- nothing in jaxalign/, rl/ or agents/ imports `launch`;
- `rl` never imports `agents`;
- objectives (`jaxalign.losses`) import neither `jaxalign.models` nor `jaxalign.train`;
- `jaxalign.data` never imports `jaxalign.train` (the data position belongs to the data);
- layer 1 imports no other project module;
- only launch/ and the registry (`jaxalign/registry.py`) import `jaxalign.experiments`; inside it, and in
  `jaxalign/bench/` (the same layer), modules may import the experiment kits (its subpackages), never an experiment;
- an experiment (a module directly in jaxalign/experiments/) never imports another experiment;
- no import cycle among the project's modules. Every import is an edge, a "late" import inside a function
  included: it only moves the cycle from import time to call time. Importing `a.b.c` also runs package `a.b`'s
  __init__, which counts as an edge unless the importer is itself inside `a.b` (then it is already running).

The tests below check the checker on small fake trees (one case per rule), then the repository, one test per rule.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import os
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("jaxalign", "rl", "agents", "launch")
LAYER_1 = ("jaxalign.sharding", "jaxalign.distributed", "jaxalign.logprobs", "jaxalign.rundir", "jaxalign.validation",
           "jaxalign.paths")
EXPERIMENTS = "jaxalign.experiments"
REGISTRY = "jaxalign.registry"


@dataclasses.dataclass(frozen=True)
class Import:
    """One imported module: `importer` (in file `path`, at `line`) imports `imported` (the deepest project module
    the statement names, else the name as written)."""

    path: str
    line: int
    importer: str
    imported: str


@dataclasses.dataclass(frozen=True)
class Violation:
    rule: str
    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message} [{self.rule}]"


def under(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def project_modules(root: Path) -> dict[str, Path]:
    """{dotted module name: file} of every .py file of the project's packages under `root`."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _resolve(base: str, names: list[str], modules: dict[str, Path]) -> list[str]:
    """`from base import names`: each name that is a module of the tree is imported as such; otherwise it is an
    attribute of `base` and `base` is what is imported."""
    found = [f"{base}.{name}" for name in names if f"{base}.{name}" in modules]
    return found + ([base] if len(found) < len(names) else [])


def module_imports(module: str, path: Path, root: Path, modules: dict[str, Path]) -> list[Import]:
    """Every import in one file, wherever it stands (module level, inside a function, under a condition)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    rel = os.path.relpath(path, root)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module
            targets = _resolve(base, [alias.name for alias in node.names if alias.name != "*"] or ["*"], modules)
        else:
            continue
        for target in dict.fromkeys(targets):
            found.append(Import(rel, node.lineno, module, target))
    return found


def all_imports(root: Path) -> list[Import]:
    modules = project_modules(root)
    return [imp for module, path in modules.items() for imp in module_imports(module, path, root, modules)]


# --- the rules on single imports ---------------------------------------------------------------------------------


def _experiment_kind(module: str, root: Path) -> str | None:
    """'package', 'kit' or 'experiment' for a module of jaxalign.experiments; None outside it."""
    if module == EXPERIMENTS:
        return "package"
    if not under(module, EXPERIMENTS):
        return None
    first = module.split(".")[2]
    if (root / "jaxalign" / "experiments" / first).is_dir():
        return "kit"
    return "experiment"


def _rule_violations(imp: Import, root: Path) -> list[tuple[str, str]]:
    """(rule, why) for each rule this one import breaks."""
    broken = []
    src, dst = imp.importer, imp.imported
    if under(src, "jaxalign", "rl", "agents") and under(dst, "launch"):
        broken.append(("no-launch-below", "nothing in jaxalign/, rl/, agents/ imports the command line"))
    if under(src, "rl") and under(dst, "agents"):
        broken.append(("rl-not-agents", "rl/ is below agents/"))
    if under(src, "jaxalign.losses") and under(dst, "jaxalign.models", "jaxalign.train"):
        broken.append(("losses-pure", "objectives never import models or train"))
    if under(src, "jaxalign.data") and under(dst, "jaxalign.train"):
        broken.append(("data-not-train", "data never imports train"))
    if src in LAYER_1 and under(dst, *PACKAGES) and dst != "jaxalign" and dst not in LAYER_1:
        broken.append(("layer-1", "sharding/distributed/logprobs/rundir import nothing above layer 1"))
    src_kind, dst_kind = _experiment_kind(src, root), _experiment_kind(dst, root)
    if dst_kind is not None and not under(src, "launch") and src != REGISTRY:
        if src_kind == "experiment" and dst_kind == "experiment":
            if src != dst:
                broken.append(("experiments-independent", "an experiment never imports another experiment"))
        elif dst_kind == "experiment" or (src_kind is None
                                          and not (under(src, "jaxalign.bench") and dst_kind == "kit")):
            # bench/ sits beside the experiments (layer 5): it may compose their kits, and runs experiments through
            # the registry only.
            broken.append(("experiments-private", "only launch/ and jaxalign.registry import experiments; inside "
                           "jaxalign/experiments/ and in jaxalign/bench/ only the kits are shared"))
    return broken


# --- cycles ------------------------------------------------------------------------------------------------------


def _packages_run(importer: str, imported: str, is_package: bool) -> list[str]:
    """The packages whose __init__ importing `imported` runs, beyond those already running for `importer` (its own
    enclosing packages, and itself if it is a package's __init__)."""
    running = importer.split(".")
    running = running if is_package else running[:-1]
    parts = imported.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts)) if parts[:i] != running[:i]]


def import_graph(root: Path) -> dict[str, dict[str, Import]]:
    """{module: {module it causes to run: the first import statement that does}} among the project's modules."""
    modules = project_modules(root)
    graph: dict[str, dict[str, Import]] = {module: {} for module in modules}
    for imp in all_imports(root):
        is_package = modules[imp.importer].name == "__init__.py"
        for target in [*_packages_run(imp.importer, imp.imported, is_package), imp.imported]:
            if target in modules and target != imp.importer:
                graph[imp.importer].setdefault(target, imp)
    return graph


def _strongly_connected(graph: dict[str, dict[str, Import]]) -> list[list[str]]:
    """Tarjan's strongly connected components, each sorted; only those with more than one module."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def _shortest_cycle(graph: dict[str, dict[str, Import]], start: str, members: set[str]) -> list[str]:
    """The shortest path start -> ... -> start inside one strongly connected component (breadth first)."""
    previous, frontier = {start: None}, [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node]):
                if nxt == start:
                    path = [node]
                    while previous[path[-1]] is not None:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if nxt in members and nxt not in previous:
                    previous[nxt] = node
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"{start} is on no cycle")


def cycle_violations(root: Path) -> list[Violation]:
    """One violation per import cycle (strongly connected component): its shortest cycle through its first module,
    each step with the file and line of the import that makes it."""
    graph = import_graph(root)
    found = []
    for component in _strongly_connected(graph):
        cycle = _shortest_cycle(graph, component[0], set(component))
        steps = []
        for src, dst in zip(cycle, cycle[1:]):
            imp = graph[src][dst]
            how = f"imports {imp.imported}" + ("" if imp.imported == dst else f", which runs {dst}")
            steps.append(f"{src} ({imp.path}:{imp.line} {how})")
        first = graph[cycle[0]][cycle[1]]
        others = "" if len(component) == len(cycle) - 1 else f"; the cycle's component: {', '.join(component)}"
        found.append(Violation("no-cycles", first.path, first.line,
                               "import cycle: " + " -> ".join(steps) + f" -> {cycle[0]}{others}"))
    return found


def check_layers(root: Path | str) -> list[Violation]:
    """Every import under `root` that breaks a layering rule, and every import cycle."""
    root = Path(root)
    found = []
    for imp in all_imports(root):
        for rule, why in _rule_violations(imp, root):
            found.append(Violation(rule, imp.path, imp.line, f"{imp.importer} imports {imp.imported}: {why}"))
    return found + cycle_violations(root)


RULES = ("no-launch-below", "rl-not-agents", "losses-pure", "data-not-train", "layer-1", "experiments-private",
         "experiments-independent", "no-cycles")


# --- the checker on fake trees -----------------------------------------------------------------------------------

# A small tree that follows every rule, with one import of each allowed kind.
CLEAN = {
    "jaxalign/__init__.py": "",
    "jaxalign/sharding.py": "import numpy as np\nimport jaxalign\n",
    "jaxalign/logprobs.py": "from jaxalign import sharding\n",
    "jaxalign/distributed.py": "",
    "jaxalign/rundir.py": "from jaxalign.distributed import host_local\n",
    "jaxalign/models/__init__.py": "from jaxalign.models.llama import Model\n",
    "jaxalign/models/llama.py": "from jaxalign.sharding import RULES\n",
    "jaxalign/models/hf.py": "from jaxalign.models.llama import Model\nfrom jaxalign.sharding import RULES\n",
    "jaxalign/losses/__init__.py": "from .dpo import dpo\n",
    "jaxalign/losses/dpo.py": "from ..logprobs import token_logprobs\n",
    "jaxalign/data/__init__.py": "",
    "jaxalign/data/position.py": "",
    "jaxalign/data/iterator.py": "from jaxalign.data.position import DataPosition\n",
    "jaxalign/train/__init__.py": "",
    "jaxalign/train/state.py": "from jaxalign.data.position import DataPosition\n",
    "jaxalign/train/loop.py": "from . import state\nfrom jaxalign.models import Model\n",
    "jaxalign/experiments/__init__.py": "",
    "jaxalign/experiments/kit/__init__.py": "from jaxalign.experiments.kit.phases import sft\n",
    "jaxalign/experiments/kit/phases.py": "from jaxalign.train import loop\n",
    "jaxalign/experiments/one.py": "from jaxalign.experiments import kit\n",
    "jaxalign/experiments/two.py": "from .kit.phases import sft\n",
    "jaxalign/registry.py": "def load():\n    from jaxalign.experiments import one\n",
    "jaxalign/bench/__init__.py": "",
    "jaxalign/bench/speed.py": "from jaxalign.registry import load\nfrom jaxalign.train import loop\n",
    "jaxalign/bench/tasks.py": "from jaxalign.experiments.kit import phases\n",
    "rl/__init__.py": "",
    "rl/ppo.py": "from jaxalign.train import state\n",
    "agents/__init__.py": "",
    "agents/dp.py": "from rl import ppo\n",
    "launch/__init__.py": "",
    "launch/cli.py": "from jaxalign.registry import load\n\ndef run():\n    from jaxalign.experiments import two\n",
}

# (rule, {file: source} added to or replacing CLEAN's, what the one reported violation names).
BROKEN = {
    "no-launch-below: a late import in rl": (
        "no-launch-below", {"rl/ppo.py": "import os\n\n\ndef main():\n    from launch.cli import run\n"},
        ["rl/ppo.py:5:", "rl.ppo imports launch.cli"]),
    "no-launch-below: jaxalign": (
        "no-launch-below", {"jaxalign/bench/speed.py": "import launch\n"}, ["jaxalign/bench/speed.py:1:", "launch"]),
    "rl-not-agents": (
        "rl-not-agents", {"agents/envs.py": "", "rl/ppo.py": "import agents.envs as envs\n"},
        ["rl/ppo.py:1:", "rl.ppo imports agents.envs"]),
    "losses-pure: relative import of models": (
        "losses-pure", {"jaxalign/losses/dpo.py": "x = 1\nfrom ..models.llama import Model\n"},
        ["jaxalign/losses/dpo.py:2:", "jaxalign.losses.dpo imports jaxalign.models.llama"]),
    "losses-pure: train": (
        "losses-pure", {"jaxalign/losses/__init__.py": "from jaxalign.train import state\n"},
        ["jaxalign/losses/__init__.py:1:", "jaxalign.losses imports jaxalign.train.state"]),
    "data-not-train": (
        "data-not-train", {"jaxalign/data/iterator.py": "from jaxalign.train.state import DataPosition\n"},
        ["jaxalign/data/iterator.py:1:", "jaxalign.data.iterator imports jaxalign.train.state"]),
    "layer-1: models": (
        "layer-1", {"jaxalign/distributed.py": "def f():\n    from jaxalign.models import llama\n"},
        ["jaxalign/distributed.py:2:", "jaxalign.distributed imports jaxalign.models.llama"]),
    "layer-1: anything above": (
        "layer-1", {"jaxalign/rundir.py": "import jaxalign.data.position\n"},
        ["jaxalign/rundir.py:1:", "jaxalign.rundir imports jaxalign.data.position"]),
    "experiments-private: bench": (
        "experiments-private", {"jaxalign/bench/speed.py": "from jaxalign.experiments import one\n"},
        ["jaxalign/bench/speed.py:1:", "jaxalign.bench.speed imports jaxalign.experiments.one"]),
    "experiments-private: agents, the package itself": (
        "experiments-private", {"agents/dp.py": "import jaxalign.experiments\n"},
        ["agents/dp.py:1:", "agents.dp imports jaxalign.experiments"]),
    "experiments-private: a kit importing an experiment": (
        "experiments-private", {"jaxalign/experiments/three.py": "",
                                "jaxalign/experiments/kit/phases.py": "from jaxalign.experiments.three import run\n"},
        ["jaxalign/experiments/kit/phases.py:1:", "kit.phases imports jaxalign.experiments.three"]),
    "experiments-independent": (
        "experiments-independent", {"jaxalign/experiments/two.py": "from . import one\n"},
        ["jaxalign/experiments/two.py:1:", "jaxalign.experiments.two imports jaxalign.experiments.one"]),
    "no-cycles: a late import closing a cycle": (
        "no-cycles", {"jaxalign/train/state.py": "def f():\n    from jaxalign.train.loop import run\n"},
        ["jaxalign.train.loop (jaxalign/train/loop.py:1 imports jaxalign.train.state)",
         "jaxalign.train.state (jaxalign/train/state.py:2 imports jaxalign.train.loop)"]),
    "no-cycles: through a package's __init__": (
        # losses.dpo -> data.position runs jaxalign.data's __init__, which imports losses.dpo: a cycle although no
        # module names the other directly
        "no-cycles", {"jaxalign/data/__init__.py": "from jaxalign.losses import dpo\n",
                      "jaxalign/losses/dpo.py": "from jaxalign.data.position import P\n"},
        ["jaxalign/losses/dpo.py:1 imports jaxalign.data.position, which runs jaxalign.data",
         "jaxalign.data (jaxalign/data/__init__.py:1 imports jaxalign.losses.dpo)"]),
}


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for name, source in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    return root


def test_the_clean_fake_tree_passes(tmp_path):
    assert check_layers(write_tree(tmp_path, CLEAN)) == []


def test_relative_and_from_imports_resolve_to_modules(tmp_path):
    """`from . import x`, `from ..a import b` and `from pkg import name` resolve to the module they load."""
    root = write_tree(tmp_path, CLEAN)
    found = {(imp.importer, imp.imported) for imp in all_imports(root)}
    assert ("jaxalign.train.loop", "jaxalign.train.state") in found  # from . import state
    assert ("jaxalign.losses.dpo", "jaxalign.logprobs") in found  # from ..logprobs import token_logprobs
    assert ("jaxalign.losses", "jaxalign.losses.dpo") in found  # from .dpo import dpo (in an __init__)
    assert ("jaxalign.train.loop", "jaxalign.models") in found  # from jaxalign.models import Model (an attribute)
    assert ("jaxalign.experiments.two", "jaxalign.experiments.kit.phases") in found
    assert ("launch.cli", "jaxalign.experiments.two") in found  # inside a function


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_each_rule_is_caught_naming_file_line_and_module(case, tmp_path):
    rule, files, fragments = BROKEN[case]
    violations = check_layers(write_tree(tmp_path, {**CLEAN, **files}))
    assert [v.rule for v in violations] == [rule], "\n".join(map(str, violations))
    for fragment in fragments:
        assert fragment in str(violations[0]), f"{fragment!r} not in: {violations[0]}"


def test_every_rule_has_a_case():
    assert {rule for rule, _, _ in BROKEN.values()} == set(RULES)


# --- the repository ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def repository_violations() -> tuple[Violation, ...]:
    return tuple(check_layers(ROOT))


@pytest.mark.parametrize("rule", RULES)
def test_the_repository_keeps_the_rule(rule):
    broken = [str(v) for v in repository_violations() if v.rule == rule]
    assert not broken, f"{len(broken)} import(s) break {rule}:\n" + "\n".join(broken)
