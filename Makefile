# The README's two commands: `make run` (set up, run the model on the sample audio) and `make test`.
# Both are idempotent: the virtual environment is rebuilt only when pyproject.toml changes.
SHELL := bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
PY := $(VENV)/bin/python
SAMPLES := $${NOTA_CACHE:-$$HOME/.cache/nota}/samples

# Debian packages: speech synthesis and texts for the synthetic training corpus (jobs.synthesize); the tests
# synthesise with espeak-ng alone.
SPEECH_TOOLS := espeak-ng wordnet-base wamerican
CORPUS_TOOLS := $(SPEECH_TOOLS) flite festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts
apt_install = dpkg -s $(1) >/dev/null 2>&1 || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(1); }

.PHONY: setup samples speech-tools corpus run test clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $@

samples: setup
	$(PY) -m jobs.samples

run: samples
	$(PY) -m jobs.packs whisper-base smollm2-135m-instruct
	$(PY) -m jobs.infer --manifest manifests/librivox-sample.yaml --model whisper-base --output out/predictions
	$(PY) -m jobs.infer --manifest manifests/librivox-sample.yaml --model nota-small --output out/predictions/nota-small
	$(PY) -m jobs.infer --manifest manifests/animals-sample.yaml --model tiny --output out/predictions
	$(PY) -m jobs.score --predictions out/predictions --output out/scores

speech-tools:
	$(call apt_install,$(SPEECH_TOOLS))

# The synthetic speech corpus NOTA-small trains on (configs/nota-small-*.yaml), built once into the cache.
corpus: samples
	$(call apt_install,$(CORPUS_TOOLS))
	$(PY) -m jobs.packs whisper-base smollm2-135m-instruct
	$(PY) -m jobs.synthesize

test: samples speech-tools
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV)

# A local Ray head and `ray job submit`, as on a cluster (cluster/local.sh says how; `cluster/local.sh --help`).
#   make cluster-up; make cluster-submit [MANIFEST=... MODEL=... OUTPUT=... JOB_ARGS="--set ..."]; make cluster-down
# Paths are made absolute (the job runs in an uploaded copy of this directory); URLs pass as they are.
# PACKS: the model packs to build first (default: those the preset names as pack://).
CLUSTER := cluster/local.sh
MANIFEST ?= manifests/librivox-sample.yaml
MODEL ?= whisper-base
OUTPUT ?= out/cluster/predictions
JOB_ARGS ?=
SUBMIT_ARGS ?=
PACKS ?= $(shell sed -n 's|.*pack://\([A-Za-z0-9._-]*\).*|\1|p' $(wildcard nota_model/presets/$(MODEL).yaml $(MODEL)) /dev/null | sort -u)
cluster_path = $(if $(findstring ://,$(1)),$(1),$(abspath $(1)))

.PHONY: cluster-up cluster-submit cluster-status cluster-down

cluster-up: setup
	$(CLUSTER) up

cluster-submit: samples
	$(if $(strip $(PACKS)),$(PY) -m jobs.packs $(PACKS))
	$(CLUSTER) submit $(SUBMIT_ARGS) -- python -m jobs.infer --manifest $(call cluster_path,$(MANIFEST)) \
		--model $(if $(wildcard $(MODEL)),$(abspath $(MODEL)),$(MODEL)) --output $(call cluster_path,$(OUTPUT)) $(JOB_ARGS)

cluster-status:
	$(CLUSTER) list

cluster-down:
	$(CLUSTER) down
