# Every target sets up what it needs: on a fresh machine `make run` and `make test` just work
# (`make test` installs Debian's prometheus package with apt-get when run as root: see `tools`).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: help install services tools run test test-unit test-cluster fuzz lint format bench profile soak schema clean

help:  ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "verloop-worker needs Python >= 3.11 (found $$($(PYTHON) --version))"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)  ## Create .venv and install the project with its dev tools

services: $(STAMP)  ## Check that RabbitMQ and Redis answer (says how to start them if not)
	@$(BIN)/verloop-worker check --services-only

tools:  ## Install prometheus + promtool for the tests (Debian's package, apt-get as root)
	@if command -v promtool >/dev/null && command -v prometheus >/dev/null; then exit 0; fi; \
	if [ "$$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then \
	  echo "make test needs prometheus and promtool, and they are not on PATH."; \
	  echo "make tools installs them only as root with apt-get (Debian, Ubuntu); here, install them by hand:"; \
	  echo "  Debian/Ubuntu:  sudo apt-get install --no-install-recommends prometheus"; \
	  echo "  elsewhere:      the prometheus-*.tar.gz of https://prometheus.io/download/ holds both;"; \
	  echo "                  put its prometheus and promtool on PATH"; \
	  echo "then run make test again."; \
	  exit 1; \
	fi; \
	echo "installing Debian's prometheus package (prometheus, promtool) with apt-get"; \
	{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends prometheus >/dev/null; } || \
	  { echo "apt-get could not install prometheus: install prometheus and promtool by hand"; exit 1; }

run: services  ## Run the worker against the Verloop simulator: a demo campaign and its statuses
	$(BIN)/verloop-worker run --sandbox --demo 10 --processes 1 --threads 4

test: services tools  ## Run every test (real RabbitMQ, Redis and the simulator)
	$(BIN)/pytest

test-unit: $(STAMP)  ## Run the tests that need no services
	$(BIN)/pytest tests/unit

test-cluster: services  ## Rehearsals: a RabbitMQ node, then the Redis primary, killed mid-campaign (~2 min)
	$(BIN)/pytest tests/cluster -s

fuzz: services  ## Hostile jobs through a real worker: FUZZ_EXAMPLES=5000 or FUZZ_MINUTES=30 make fuzz
	FUZZ=1 $(BIN)/pytest tests/property -k test_no_job_hurts_another -q --show-capture=no
	@echo "cases found (if any) are in .hypothesis/found/: move them to tests/property/corpus/"

lint: $(STAMP)  ## ruff (lint and format check) and mypy --strict on worker/ and bench/
	$(BIN)/ruff check worker tests bench
	$(BIN)/ruff format --check worker tests bench
	$(BIN)/mypy

format: $(STAMP)  ## Format the code
	$(BIN)/ruff format worker tests bench
	$(BIN)/ruff check --fix worker tests bench

bench: services  ## Benchmarks: send path vs a naive actor; rate limits (fidelity, 1,000/s, lanes)
	$(BIN)/python -m bench

profile: services  ## Where a send's CPU goes in the worker, by step (py-spy on a real worker)
	$(BIN)/python -m bench.profile

SOAK_MINUTES ?= 25
soak: $(STAMP)  ## Soak: mixed load with RabbitMQ and Redis restarts, SOAK_MINUTES (25) long
	$(BIN)/python -m bench --only soak --soak-minutes $(SOAK_MINUTES)

schema: $(STAMP)  ## Regenerate config/jobs.schema.json from the job models
	$(BIN)/verloop-worker schema --output config/jobs.schema.json

clean:  ## Remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
