# make demo: create .venv, install, run the main job on the bundled data.
# make test: create .venv if needed, install with test extras, lint, run the whole suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint format clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(PY)
	$(PY) -m pip install -e ".[test]"
	touch $@ $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/swinkit demo

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

# Two worker processes of one thread each (tests/conftest.py): most of the suite's time is tracing
# and exporting, which runs on one core. An idle worker takes tests queued for the other.
test: lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q --timeout=900 -n 2 --dist worksteal

format: $(VENV)/.installed-test
	$(VENV)/bin/ruff format src tests
	$(VENV)/bin/ruff check --fix src tests

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
