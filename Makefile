# `make test` and `make bench` set themselves up: a .venv holding torch==2.13.0 (the CPU wheel, never a
# multi-GB CUDA build) and tiercache in editable mode. On a machine whose Python already has everything
# (an offline GPU machine, once `bash bench/gpu_session.sh` has installed the wheels of `make gpu-wheels` there)
# pass it instead: `make test-gpu PY=python3`.
PYTHON ?= python3
VENV := .venv
ifdef PY
  RUN := $(PY)
  SETUP :=
  LINT :=
else
  RUN := $(VENV)/bin/python
  SETUP := $(VENV)/.installed
  LINT := lint
endif
PYTEST := $(RUN) -m pytest -rs

.PHONY: test test-gpu bench lint clean gpu-wheels

$(VENV)/.installed: pyproject.toml
	@# Mooncake (the remote tier's tests) needs libibverbs1 even for TCP: installed where we are root, else those
	@# tests skip, naming the command
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! ldconfig -p | grep -q libibverbs.so.1; then \
		(apt-get install -y -q libibverbs1 || (apt-get update -q && apt-get install -y -q libibverbs1)) >/dev/null \
		|| echo "make: apt-get install libibverbs1 failed; the remote tier's tests will skip"; fi
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

## lint and types, then the whole suite on this machine; GPU tests are skipped, with the reason shown, where
## CUDA is absent
test: $(SETUP) $(LINT)
	$(PYTEST) -q

lint: $(SETUP)
	$(RUN) -m ruff check tiercache bench tests examples
	$(RUN) -m ruff format --check tiercache bench tests examples
	$(RUN) -m mypy

## only the tests that need CUDA
test-gpu: $(SETUP)
	$(PYTEST) -v -m gpu

## every pathway beside its raw limit and the peers, workloads, overlap; BENCH_SIZES=16MiB,... (see README)
bench: $(SETUP)
	$(RUN) -m bench

## the wheels a CUDA machine without network needs (kvikio, zarr, the CRC32C libraries; see the script), into
## .whl/. Then, with a lent GPU machine: run `bash bench/gpu_session.sh` there, carrying .whl
gpu-wheels:
	PYTHON=$(PYTHON) bash bench/gpu_wheels.sh .whl

clean:
	rm -rf $(VENV) bench/out .pytest_cache .hypothesis
