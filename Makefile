# The two commands of the README. Each one sets everything up in a fresh clone (a virtual environment in .venv
# with the pinned dependencies) and then does its job; later calls reuse the environment.
PYTHON ?= python3
VENV ?= .venv
WORKDIR ?= runs/arith_dpo

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test,bench]'
	$(VENV)/bin/pip check
	touch $@

.PHONY: run test
run: $(VENV)/.installed  ## the main job: SFT then DPO on ARITH, results in $(WORKDIR)/results.json
	$(VENV)/bin/jaxalign run arith_dpo --workdir $(WORKDIR)

test: $(VENV)/.installed  ## the whole test suite (what CI runs)
	$(VENV)/bin/pytest -q -n 2 --dist worksteal
