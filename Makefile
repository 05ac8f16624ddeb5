# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed-$(shell cat setup.py | sha1sum | cut -c1-12)

.PHONY: env test test-fast demo clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, the CPU wheel on local disk: a later package must not pull a CUDA build.
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -e ".[test]"
	touch $(STAMP)

env: $(STAMP)

test: env
	$(PY) -m pytest -q tests

test-fast: env
	$(PY) -m pytest -q -m "not slow" tests

demo: env
	$(PY) -m maskllm_megatron.demo

clean:
	rm -rf $(VENV) .pytest_cache
