# `make demo` and `make test` work on a fresh clone: both install what they need first.
SHELL := /bin/bash
PY := .venv/bin/python
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export NO_ALBUMENTATIONS_UPDATE=1
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export RAY_USAGE_STATS_ENABLED=0
export TOKENIZERS_PARALLELISM=false

.PHONY: install models demo test test-fast clean

install: .venv/.installed

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

models: install
	$(PY) -m common.tiny_models --out models/tiny --missing

demo: install models
	$(PY) -m curation.demo

test: install models
	$(PY) -m pytest -q tests

test-fast: install models
	$(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf runs models .pytest_cache
