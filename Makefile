# weaveipam: `make run` starts one daemon with embedded defaults; `make test` runs everything.
PY ?= python3

.PHONY: install install-test run test lint sim bench shim clean chaos

# Installs happen only when pyproject.toml changed since the last one (a stamp in build/):
# `make run` never reinstalls, and `make test` never removes the `weaveipam` script under
# a running CLI. `run` needs only the daemon's dependencies; `test` adds the test extra.
STAMP_RUN := build/.installed-run
STAMP_TEST := build/.installed-test

# an editable install is not byte-compiled: without compileall every daemon a test starts
# compiles the package again (and PYTHONDONTWRITEBYTECODE machines never cache it); it
# runs every time but only compiles what changed
install: $(STAMP_RUN)
	@$(PY) -m compileall -q weaveipam
install-test: $(STAMP_TEST)
	@$(PY) -m compileall -q weaveipam

$(STAMP_RUN): pyproject.toml
	$(PY) -m pip install -q -e .
	@mkdir -p build && touch $@

$(STAMP_TEST): pyproject.toml
	$(PY) -m pip install -q -e '.[test]'
	@mkdir -p build && touch $@ $(STAMP_RUN)

# a try-out on one machine: the peer port on loopback, so no other daemon can join it
run: install
	$(PY) -m weaveipam daemon --host 127.0.0.1 --data-dir .weaveipam \
		--socket .weaveipam/ipam.sock

test: install-test shim
	$(PY) -m ruff check weaveipam tests benchmarks
	$(PY) -m mypy weaveipam/core weaveipam/sim weaveipam/cni weaveipam/routes.py
	$(PY) -m pytest -q -p no:cacheprovider

shim:
	$(MAKE) -C cni-shim

sim:
	$(PY) -m weaveipam.sim --nodes 25 --seed 1 --faults

# fault-injection cluster in network namespaces (root): CHAOS_SECONDS of faults, output kept
CHAOS_SECONDS ?= 900
CHAOS_SEED ?= 1
CHAOS_OUT ?= /tmp/weaveipam-chaos
CHAOS_FAULTS ?=
chaos: install-test
	WEAVEIPAM_CHAOS_SECONDS=$(CHAOS_SECONDS) WEAVEIPAM_CHAOS_SEED=$(CHAOS_SEED) \
	WEAVEIPAM_CHAOS_OUT=$(CHAOS_OUT) WEAVEIPAM_CHAOS_FAULTS=$(CHAOS_FAULTS) \
	$(PY) -m pytest -q -s -p no:cacheprovider tests/test_chaos.py
	@echo "summary: $(CHAOS_OUT)/summary.json  timeline: $(CHAOS_OUT)/timeline.png"

bench: install-test
	$(PY) benchmarks/bench_engine.py
	$(PY) benchmarks/bench_sim.py

clean:
	rm -rf .weaveipam build *.egg-info .pytest_cache .mypy_cache .ruff_cache
