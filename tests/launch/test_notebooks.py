"""Every notebook under launch/notebooks executes top to bottom without a cell error, so the examples cannot rot.

The notebooks run in a Jupyter kernel started from THIS interpreter (a kernel spec written to a temporary
JUPYTER_PATH with argv [sys.executable, -m, ipykernel_launcher, ...]), so they see exactly the packages the tests
see: in a fresh clone that is the .venv `make test` creates, whatever kernels the machine has registered elsewhere.
The kernel's working directory is a temporary directory. Notebooks are stored without outputs, so the repository
stays small and a diff shows only code.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "launch" / "notebooks").glob("*.ipynb"))
KERNEL_NAME = "jaxalign-tests"
CELL_TIMEOUT_S = 600


def test_there_are_notebooks_to_execute():
    """Guards the parametrised test below against silently running nothing (a moved folder, a renamed suffix)."""
    assert {"new_objective.ipynb", "new_return_objective.ipynb"} <= {p.name for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, cell in enumerate(nb.cells)
             if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs; clear them before committing"


def write_kernel_spec(jupyter_path: Path) -> None:
    """A kernel spec named KERNEL_NAME that starts ipykernel with the running interpreter."""
    spec_dir = jupyter_path / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"jaxalign tests ({sys.executable})",
        "language": "python",
    }))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes_without_errors(path, tmp_path, monkeypatch):
    jupyter_path = tmp_path / "jupyter"
    write_kernel_spec(jupyter_path)
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter_path))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebook writes only under tempfile's directory
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, kernel_name=KERNEL_NAME, timeout=CELL_TIMEOUT_S,
                            resources={"metadata": {"path": str(workdir)}})
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError, naming the cell and its traceback, on any error
    seconds = time.perf_counter() - start
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert not list(workdir.iterdir()), f"{path.name} wrote into its working directory, not a temporary one"
    if path.name in ("new_objective.ipynb", "new_return_objective.ipynb"):
        assert any("image/png" in o.get("data", {}) for o in outputs), f"{path.name} shows no plot"
    print(f"{path.name}: executed in {seconds:.0f} s")
