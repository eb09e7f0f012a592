# weaveipam: `make run` starts one daemon with embedded defaults; `make test` runs everything.
PY ?= python3

.PHONY: install run test lint sim bench shim clean

install:
	$(PY) -m pip install -q -e '.[test]'

run: install
	$(PY) -m weaveipam daemon --data-dir .weaveipam --socket .weaveipam/ipam.sock

test: install shim
	$(PY) -m ruff check weaveipam tests benchmarks
	$(PY) -m mypy weaveipam/core weaveipam/sim weaveipam/cni
	$(PY) -m pytest -q -p no:cacheprovider

shim:
	$(MAKE) -C cni-shim

sim:
	$(PY) -m weaveipam.sim --nodes 25 --seed 1 --faults

bench: install
	$(PY) benchmarks/bench_engine.py
	$(PY) benchmarks/bench_sim.py

clean:
	rm -rf .weaveipam build *.egg-info .pytest_cache .mypy_cache .ruff_cache
