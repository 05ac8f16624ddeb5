# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=
STAMP := $(VENV)/.installed-$(shell cat setup.py | sha1sum | cut -c1-12)

.PHONY: env test test-fast test-all demo clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, so that a later package cannot pull a CUDA build. Here pip's configuration finds the
	# CPU wheel on local disk; elsewhere PyPI serves the CUDA one: pass
	# TORCH_INDEX=https://download.pytorch.org/whl/cpu for the CPU build.
	$(PIP) install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -q -e ".[test]"
	touch $(STAMP)

env: $(STAMP)

# Two workers, one test file each (module fixtures are built once): most tests wait on subprocesses and
# torchrun ranks, so two run side by side on 2 cores. TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q --durations=25 $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

test: env
	$(PYTEST) -m "not benchmark" tests

test-fast: env
	$(PYTEST) -m "not slow and not benchmark" tests

test-all: env
	$(PYTEST) tests

demo: env
	$(PY) -m maskllm_megatron.demo

clean:
	rm -rf $(VENV) .pytest_cache
