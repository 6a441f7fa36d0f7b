# Two entry points for a fresh clone: `make demo` (the whole pipeline on the embedded sample) and
# `make test`. Both create .venv and install into it. TORCH_SPEC picks the torch build: the default is
# the CPU wheel; GPU users pass e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128".
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
OUT ?= runs/gpu-check
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-fast lint demo bench gpu-check clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[hf,plot,dev,track,eval,bench]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q; rc=$$?; [ $$rc -ne 5 ] || echo 'make test: pytest collected no tests' >&2; exit $$rc

# The unit tests: no torchrun, no programs run as subprocesses (under a minute on 2 cores).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

demo: $(STAMP)
	PY=$(PY) bash scripts/demo.sh

bench: $(STAMP)
	$(PY) bench/bench_loader.py
	$(PY) bench/bench_prepare.py
	$(PY) bench/bench_train.py
	$(PY) bench/bench_hellaswag.py
	$(PY) bench/bench_evals.py
	$(PY) bench/bench_val.py

# One CUDA GPU, about 8 minutes: training, HellaSwag and prepare figures into $(OUT) (see scripts/gpu_check.sh).
gpu-check: $(STAMP)
	PY=$(PY) OUT=$(OUT) bash scripts/gpu_check.sh

clean:
	rm -rf runs/demo data/demo
