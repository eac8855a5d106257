# Two commands on a fresh machine: `make demo` runs the pipeline end to end, `make test` runs the tests.
# Each creates the project's virtual environment (.venv) and installs what it needs on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test check bench

$(STAMP): requirements.txt requirements-test.txt pyproject.toml
	@echo "Installing the environment into $(VENV) (once; several minutes, also with a warm pip cache)..."
	$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required (mindspore 2.9 wheels), found " + sys.version'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-test.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

# extra options of the demo through ARGS, e.g. `make demo ARGS=--keep-running` (Airflow stays up for the UI)
ARGS ?=
demo: $(STAMP)
	$(PY) -m distilled_plugins.devtools.demo $(ARGS)

# every test on two pytest-xdist workers: the ones that start Airflow (marked `airflow`) in turn on one of them, the
# others file by file (a file's tests share its fixtures) on either; see pytest_collection_modifyitems in
# tests/conftest.py
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q -p no:cacheprovider -n 2 --dist loadgroup --no-loadscope-reorder --durations=15 --doctest-modules distilled_plugins operators tests

# the development loop: lint and every test not marked slow (no msrun, Airflow or browser), doctests included
check: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q -p no:cacheprovider -n 2 --dist loadgroup -m "not slow" --durations=5 --doctest-modules distilled_plugins operators tests

bench: $(STAMP)
	$(PY) bench/bench_generate.py
