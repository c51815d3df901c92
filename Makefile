# fastpath: the two commands a user needs are `make demo` and `make test`.
# Both depend on `make setup`, which is idempotent (see scripts/setup.sh).
PY := .venv/bin/python
PYTEST := $(PY) -m pytest

.PHONY: setup test test-unit test-vm demo bench bench-quick clean

setup:
	@bash scripts/setup.sh

# Everything: unit, BPF_PROG_TEST_RUN and vm-tests (root, netns, real traffic).
test: setup
	$(PYTEST) -q tests vm-tests

test-unit: setup
	$(PYTEST) -q tests

test-vm: setup
	$(PYTEST) -q vm-tests

demo: setup
	$(PY) -m agent.sim.demo

bench: setup
	$(PY) -m bench.run

# The hot-path figures only, fewer and shorter rounds, nothing recorded.
bench-quick: setup
	$(PY) -m bench.run --quick

clean:
	rm -rf .venv bench/build .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
