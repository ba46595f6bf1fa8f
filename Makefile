# Two commands do all the set-up: `make run` (the whole project on the embedded sample) and
# `make test`. Both create or reuse .venv; an install is redone only when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export KEDRO_DISABLE_TELEMETRY := 1
export DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
export HF_HUB_OFFLINE := 1

.PHONY: run test lint viz clean-data

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install -e '.[dev]'
	touch $@

run: $(VENV)/.installed
	$(BIN)/kedro run

test: $(VENV)/.installed-dev
	$(BIN)/pytest

viz: $(VENV)/.installed
	$(BIN)/kedro viz run --host 127.0.0.1 --port 4141 --no-browser

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests bench

clean-data:
	find data -mindepth 2 -not -name .gitkeep -delete
