# The README's commands. Each target sets itself up on a fresh machine: it creates .venv if missing and installs
# the project into it (again only when pyproject.toml changes).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.endoarss-installed
# No model or data hub is reachable here: fail fast instead of retrying.
export HF_HUB_OFFLINE := 1
export PATH := $(CURDIR)/$(BIN):$(PATH)
export PYTHONUNBUFFERED := 1

.PHONY: install demo test test-unit test-notebooks lab bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[notebooks,test]"
	@touch $@

install: $(STAMP)

## make demo: synthetic data -> quickstart notebook (papermill, CPU) -> executed notebook, metrics table, figures
demo: $(STAMP)
	@mkdir -p results/quickstart
	$(BIN)/papermill --cwd notebooks --log-output notebooks/00_quickstart.ipynb results/quickstart/00_quickstart.ipynb
	@echo
	@echo "demo finished (SYNTHETIC data, random-init tiny model): outputs in results/quickstart/"
	@ls -1 results/quickstart

## make test: unit tests and every notebook under nbval
test: $(STAMP)
	$(BIN)/python -m pytest -q tests notebooks --nbval-lax -p no:cacheprovider

test-unit: $(STAMP)
	$(BIN)/python -m pytest -q tests

test-notebooks: $(STAMP)
	$(BIN)/python -m pytest -q notebooks --nbval-lax

lab: $(STAMP)
	$(BIN)/jupyter lab notebooks

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf results/quickstart data/synthetic_* .pytest_cache
