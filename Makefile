# `make serve` and `make test` each set everything up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
SERVE_STAMP := $(VENV)/.installed-serve
ARGS ?=

.PHONY: install serve test lint format bench gpu-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# What `make serve` needs, and no more (a first serve should not wait for the test, load-test and Ray
# packages or the compiler): torch, first and pinned (a bare `torch` requirement would pull a
# multi-GB CUDA build), then rnnserve with its clients (rnnserve chat, complete, bench serve).
$(SERVE_STAMP): $(PY) pyproject.toml
	$(PIP) install -q torch==2.13.0
# setuptools warns on every editable install that a ./rnnserve folder may shadow the package:
# true of any editable install, and alarming on a first `make serve`.
	PYTHONWARNINGS=ignore $(PIP) install -q -e ".[clients]"
	touch $(SERVE_STAMP)

# Everything else `make test` needs.
$(STAMP): $(SERVE_STAMP)
	PYTHONWARNINGS=ignore $(PIP) install -q -e ".[dev,loadtest,ray]"
# Reference-only packages whose own pins (old timm/fairscale deps) we do not want.
	$(PIP) install -q --no-deps torchscale==0.3.0 fairscale==0.4.0
# The fused CPU decode kernels (--cpu-decode auto / fused) and the CPU prefill conv, scans and GEMM are built
# now, into torch's extension cache, so the tests do not wait for the compiler (a serve that finds no
# current build makes one on a background thread and uses the torch path meanwhile); a failed build
# only logs a warning.
	$(PY) -c "from rnnserve.kernels import cpu_decode; cpu_decode.load()"
	$(PY) -c "from rnnserve.kernels.cpu_decode import families; families.load()"
	$(PY) -c "from rnnserve.kernels.cpu_decode import transformer; transformer.load()"
	$(PY) -c "from rnnserve.kernels.selective_scan import cpu; cpu.load()"
	$(PY) -c "from rnnserve.kernels.causal_conv1d import cpu; cpu.load()"
	$(PY) -c "from rnnserve.kernels.linear_recurrence import cpu; cpu.load()"
	$(PY) -c "from rnnserve.kernels.prefill_linear import cpu; cpu.load()"
	touch $(STAMP)

install: $(STAMP)

serve: $(SERVE_STAMP)
	$(VENV)/bin/rnnserve serve $(ARGS)

test: $(STAMP)
	$(VENV)/bin/ruff check rnnserve tests scripts
	$(VENV)/bin/ruff format --check rnnserve tests scripts
	$(PY) -m pytest -q -ra $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check rnnserve tests scripts

format: $(STAMP)
	$(VENV)/bin/ruff format rnnserve tests scripts
	$(VENV)/bin/ruff check --fix rnnserve tests scripts

bench: $(STAMP)
	$(VENV)/bin/rnnserve bench throughput $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
