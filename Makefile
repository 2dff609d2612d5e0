# Two commands from a fresh clone on a CPU-only machine: `make demo` and `make test`.
# Both need `make setup`, which only creates/updates .venv (the one step that uses the network).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SETUP_STAMP := $(VENV)/.setup-done
# Tests and demos start Ray: they run in a loopback-only network namespace where the OS allows.
LOOPBACK := scripts/loopback.sh
PYTEST_ARGS ?=

.PHONY: setup demo test test-reliability bench demo-model clean help

help:
	@echo "make demo   - set up, start a local Ray + the demo model on CPU, show it answering"
	@echo "make test   - set up and run the test suite (real vLLM CPU engine + Ray Serve)"
	@echo "make setup  - create/update .venv only (requirements-cpu.txt)"
	@echo "make test-reliability - only the fault/overload/fuzz tests"
	@echo "make bench  - CPU benchmarks (serving-path overhead, router hop, load_test capacity)"

setup: $(SETUP_STAMP)

$(SETUP_STAMP): requirements-cpu.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-cpu.txt 2>&1 \
	  | grep -v "^WARNING: Location\|^WARNING: Running pip as" || true
	@$(PY) -c "import vllm, ray.serve" >/dev/null 2>&1 || { echo "setup failed: vllm/ray do not import"; exit 1; }
	@# PyPI's torchvision/torchaudio/torchcodec are CUDA builds: beside torch+cpu they fail to
	@# import and break transformers' model imports. vLLM's CPU path does not need them.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec 2>&1 | grep -v "^WARNING" || true
	@# This environment may set PYTHONDONTWRITEBYTECODE: compile once so `import vllm` stays fast.
	$(PY) -m compileall -q -j 0 $(VENV)/lib >/dev/null 2>&1 || true
	@touch $@

demo-model: setup
	$(PY) -m common.demo_model

# DEMO_ISOLATE=1 (default): run in a loopback-only namespace and stop at the end (shared or CI
# machines). DEMO_ISOLATE=0: leave the service running on 127.0.0.1:8000.
DEMO_ISOLATE ?= 1
demo: setup
	@if [ "$(DEMO_ISOLATE)" = 1 ]; then $(LOOPBACK) $(PY) -m common.demo --isolated; \
	else $(PY) -m common.demo; fi

test: setup
	$(LOOPBACK) $(PY) -m pytest tests $(PYTEST_ARGS)

# Faults, overload and fuzzing only (also part of `make test`).
test-reliability: setup
	$(LOOPBACK) $(PY) -m pytest tests -m reliability $(PYTEST_ARGS)

# CPU benchmarks (about 10 minutes): serving path vs engine and vllm serve, 1-token overhead and
# router hop, load_test.py's own capacity. GPU runs: bench/README.md.
bench: setup
	$(LOOPBACK) $(PY) bench/serving_benchmark.py --device cpu
	$(LOOPBACK) $(PY) bench/serving_overhead.py
	$(LOOPBACK) $(PY) bench/client_capacity.py --tokenizer bench/model7b

clean:
	rm -rf .cache .pytest_cache
