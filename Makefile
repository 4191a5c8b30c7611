# The README's commands. Each target sets itself up on a fresh machine: it creates .venv if missing and installs
# the project into it (again only when pyproject.toml, constraints.txt, requirements-lock.txt or the torch build
# changes), with the pins of constraints.txt and the tested environment of requirements-lock.txt (make lock) as
# constraints (pyproject.toml itself declares compatible ranges only).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.endoarss-installed
PIP := $(BIN)/python -m pip --disable-pip-version-check

# make install TORCH=cpu|cu126|cu130: torch / torchvision (at constraints.txt's versions) from the PyTorch index of
# that build (https://download.pytorch.org/whl/<build>); TORCH=default (the default): from PyPI, as pip resolves
# them (torch 2.14.1 on PyPI is a CUDA 13.0 build on Linux x86-64). The choice is remembered in .venv, so later
# targets keep it; a different TORCH reinstalls torch and torchvision. Drivers, OS, disk: docs/install.md.
TORCH_BUILDS := default cpu cu126 cu130
TORCH_FILE := $(VENV)/.endoarss-torch
TORCH ?= $(shell cat $(TORCH_FILE) 2>/dev/null || echo default)
ifeq ($(filter $(TORCH),$(TORCH_BUILDS)),)
$(error TORCH=$(TORCH): expected one of $(TORCH_BUILDS) (e.g. make install TORCH=cpu))
endif
TORCH_INDEX := $(if $(filter-out default,$(TORCH)),https://download.pytorch.org/whl/$(TORCH))
TORCH_PINS := $(shell grep -E '^(torch|torchvision)==' constraints.txt)
# The lock file of the tested environment, used as a second constraints file so that a fresh install reproduces it
# (make install LOCK= : constraints.txt only, e.g. after changing a pin, before make lock).
LOCK ?= requirements-lock.txt
# No model or data hub is reachable here: fail fast instead of retrying.
export HF_HUB_OFFLINE := 1
export PATH := $(CURDIR)/$(BIN):$(PATH)
export PYTHONUNBUFFERED := 1

.PHONY: install lock demo test test-unit test-notebooks test-browser lab bench executed book tensorboard clean FORCE

# The JupyterLab browser test (tests/test_browser.py) needs headless Chromium: Debian's chromium + chromium-driver.
BROWSER_TEST := tests/test_browser.py
# $(call browser_status,after) says only the skip (after the run, where it is easy to see).
define browser_status
if { [ -n "$$CHROMIUM" ] || command -v chromium || command -v chromium-browser || command -v google-chrome; } >/dev/null \
	&& { [ -n "$$CHROMEDRIVER" ] || command -v chromedriver; } >/dev/null; then \
	[ "$(1)" = after ] || echo "browser test: headless Chromium found: $(BROWSER_TEST) runs 00_quickstart in JupyterLab"; \
else \
	echo "browser test: SKIPPED: chromium/chromedriver not installed (apt-get install -y chromium chromium-driver)"; \
fi
endef

# The torch build of .venv: rewritten (hence newer than the stamp) only when TORCH changes; a .venv installed before
# this file existed had the PyPI build, recorded as "default" with the stamp's time.
$(TORCH_FILE): FORCE
	@mkdir -p $(VENV)
	@if [ ! -f $@ ] && [ -f $(STAMP) ]; then echo default > $@; touch -r $(STAMP) $@; fi
	@[ "$$(cat $@ 2>/dev/null)" = "$(TORCH)" ] || echo "$(TORCH)" > $@

$(STAMP): pyproject.toml constraints.txt $(LOCK) $(TORCH_FILE)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(if $(and $(wildcard $(STAMP)),$(filter $(TORCH_FILE),$?)),$(PIP) uninstall -q -y torch torchvision)
	$(if $(TORCH_INDEX),$(PIP) install -q --index-url $(TORCH_INDEX) $(TORCH_PINS))
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt $(if $(LOCK),-c $(LOCK)) -e ".[notebooks,test]"
	@touch $@

install: $(STAMP)

## make lock: requirements-lock.txt, every package make install put in .venv, at its version (the tested environment)
lock: $(STAMP)
	$(BIN)/python scripts/lock.py > requirements-lock.txt.tmp && mv requirements-lock.txt.tmp requirements-lock.txt
	@touch $(STAMP)

## make demo: synthetic data -> quickstart notebook (papermill, CPU) -> executed notebook, metrics table, figures
demo: $(STAMP)
	@mkdir -p results/quickstart
	$(BIN)/papermill --cwd notebooks --log-output notebooks/00_quickstart.ipynb results/quickstart/00_quickstart.ipynb
	@echo
	@echo "demo finished (SYNTHETIC data, synthetic-pretrained backbone): outputs in results/quickstart/"
	@ls -1 results/quickstart

## make test: unit tests, every notebook under nbval, and the quickstart in JupyterLab in headless Chromium, in
## TEST_JOBS pytest-xdist workers (default: one per CPU core; --dist loadscope keeps a notebook's cells and a module's
## fixtures on one worker), each with one OpenMP thread: two 2-thread processes on 2 cores oversubscribe them, and
## OpenMP's spinning barriers then make small operations several times slower (benchmarks/bench_training.py).
## The notebooks come first: the longest scopes start early and the many short test modules fill the workers' tails
TEST_JOBS ?= auto
test: $(STAMP)
	@$(call browser_status,before)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q notebooks tests --nbval-lax -p no:cacheprovider --durations=25 \
	  -n $(TEST_JOBS) --dist loadscope; \
	status=$$?; $(call browser_status,after); exit $$status

test-unit: $(STAMP)
	$(BIN)/python -m pytest -q tests --ignore=$(BROWSER_TEST)

## make test-browser: only the JupyterLab browser test, with its progress (-s)
test-browser: $(STAMP)
	@$(call browser_status,before)
	$(BIN)/python -m pytest -q -s $(BROWSER_TEST) -p no:cacheprovider

test-notebooks: $(STAMP)
	$(BIN)/python -m pytest -q notebooks --nbval-lax

## make lab: JupyterLab on the notebooks folder, from .venv (its python3 kernel), on 127.0.0.1 only
## (extra options: make lab LAB_ARGS="--port 8899 --no-browser"; in a root container it adds --allow-root)
LAB_ARGS ?=
lab: $(STAMP)
	$(BIN)/jupyter lab --ServerApp.ip=127.0.0.1 $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS) notebooks

## make executed: every notebook on its default parameters -> results/executed/ (committed, stamped with the commit)
## (one notebook: make executed NB=00_quickstart)
NB ?=
executed: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(BIN)/python scripts/notebook_outputs.py execute $(NB)

## make book: the executed notebooks (not executed again) and docs/ as a static HTML book (Sphinx + myst-nb: titles,
## navigation, offline search; no network needed to read it) -> results/book/index.html
book: $(STAMP)
	$(BIN)/python scripts/notebook_outputs.py book

## make tensorboard: live curves (losses, task weights, validation metrics, conflict) of the runs under results/runs
## trained with tensorboard=true, on 127.0.0.1:6006 (installs the optional tensorboard package on first use;
## extra options: make tensorboard TB_ARGS="--port 6007")
TB_ARGS ?=
tensorboard: $(STAMP)
	@$(BIN)/python -c "import tensorboard" 2>/dev/null || \
		$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[tensorboard]"
	$(BIN)/tensorboard --logdir results/runs --host 127.0.0.1 $(TB_ARGS)

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf results/quickstart results/book data/synthetic_* .pytest_cache
