# weaveipam: `make run` starts one daemon with embedded defaults; `make test` runs everything.
PY ?= python3

.PHONY: install run test lint sim bench shim clean chaos

install:
	$(PY) -m pip install -q -e '.[test]'
	@# an editable install is not byte-compiled: without this every daemon a test starts
	@# compiles the package again (and PYTHONDONTWRITEBYTECODE machines never cache it)
	$(PY) -m compileall -q weaveipam

run: install
	$(PY) -m weaveipam daemon --data-dir .weaveipam --socket .weaveipam/ipam.sock

test: install shim
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
chaos: install
	WEAVEIPAM_CHAOS_SECONDS=$(CHAOS_SECONDS) WEAVEIPAM_CHAOS_SEED=$(CHAOS_SEED) \
	WEAVEIPAM_CHAOS_OUT=$(CHAOS_OUT) WEAVEIPAM_CHAOS_FAULTS=$(CHAOS_FAULTS) \
	$(PY) -m pytest -q -s -p no:cacheprovider tests/test_chaos.py
	@echo "summary: $(CHAOS_OUT)/summary.json  timeline: $(CHAOS_OUT)/timeline.png"

bench: install
	$(PY) benchmarks/bench_engine.py
	$(PY) benchmarks/bench_sim.py

clean:
	rm -rf .weaveipam build *.egg-info .pytest_cache .mypy_cache .ruff_cache
