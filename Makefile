# poller: `make run` and `make test` do all set-up on a fresh machine that has
# Python 3.11+, make and a C compiler.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export POLLER_STATE_DIR ?= $(CURDIR)/var

.PHONY: install run test lint bench clean stack-down help install-service

help:
	@echo "make run      start the embedded stack and poller serve"
	@echo "make test     run the whole test suite against real servers"
	@echo "make lint     ruff and mypy --strict on src/"
	@echo "make bench    throughput, lateness, CPU and memory per device"
	@echo "make install-service   install the systemd unit (DRY_RUN=1 to preview)"
	@echo "make clean    stop the embedded stack, remove the venv and state"

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[embedded,dev]'
	@touch $@

install: $(STAMP)

run: $(STAMP)
	exec scripts/run.sh

test: $(STAMP)
	sh scripts/sysdeps.sh
	$(BIN)/python -m pytest

bench: $(STAMP)
	sh scripts/sysdeps.sh bench
	$(BIN)/poller bench $(BENCH_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/mypy --strict src/poller

# Installs scripts/poller.service (and the poller@ template) into systemd,
# creates the poller user and /var/lib/poller; DRY_RUN=1 prints the steps.
install-service:
	sh scripts/install-service.sh $(if $(DRY_RUN),--dry-run,)

stack-down:
	@if [ -x $(BIN)/poller ]; then $(BIN)/poller stack down; fi

clean: stack-down
	rm -rf $(VENV) var build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
