# The README's two commands: `make run` (set up, run the model on the sample audio) and `make test`.
# Both are idempotent: the virtual environment is rebuilt only when pyproject.toml changes.
SHELL := bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
PY := $(VENV)/bin/python
SAMPLES := $${NOTA_CACHE:-$$HOME/.cache/nota}/samples

.PHONY: setup samples run test clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $@

samples: setup
	$(PY) -m jobs.samples

run: samples
	$(PY) -m jobs.packs whisper-base
	$(PY) -m jobs.infer --manifest manifests/librivox-sample.yaml --model whisper-base --output out/predictions
	$(PY) -m jobs.infer --manifest manifests/animals-sample.yaml --model tiny --output out/predictions
	$(PY) -m jobs.score --predictions out/predictions --output out/scores

test: samples
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV)
