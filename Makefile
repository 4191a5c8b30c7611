# The README's commands. Each target sets itself up on a fresh machine: it creates .venv if missing and installs
# the project into it (again only when pyproject.toml or constraints.txt changes), with the tested versions of
# constraints.txt (pyproject.toml itself declares compatible ranges only).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.endoarss-installed
# No model or data hub is reachable here: fail fast instead of retrying.
export HF_HUB_OFFLINE := 1
export PATH := $(CURDIR)/$(BIN):$(PATH)
export PYTHONUNBUFFERED := 1

.PHONY: install demo test test-unit test-notebooks test-browser lab bench executed book tensorboard clean

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

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[notebooks,test]"
	@touch $@

install: $(STAMP)

## make demo: synthetic data -> quickstart notebook (papermill, CPU) -> executed notebook, metrics table, figures
demo: $(STAMP)
	@mkdir -p results/quickstart
	$(BIN)/papermill --cwd notebooks --log-output notebooks/00_quickstart.ipynb results/quickstart/00_quickstart.ipynb
	@echo
	@echo "demo finished (SYNTHETIC data, synthetic-pretrained backbone): outputs in results/quickstart/"
	@ls -1 results/quickstart

## make test: unit tests, every notebook under nbval, and the quickstart in JupyterLab in headless Chromium
test: $(STAMP)
	@$(call browser_status,before)
	$(BIN)/python -m pytest -q tests notebooks --nbval-lax -p no:cacheprovider; \
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
