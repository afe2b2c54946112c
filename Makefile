# ClawForge: the two set-up commands are `make demo` and `make test` (see README.md).
# Both run scripts/setup.sh first, which is idempotent: a second run only checks.

VENV   := .venv
PY     := $(VENV)/bin/python
CLAW   := $(VENV)/bin/claw
PYTEST_ARGS ?=

.PHONY: setup demo test test-unit lint wheel-test clean

setup:
	@bash scripts/setup.sh

demo: setup
	@bash scripts/demo.sh

lint: setup
	$(VENV)/bin/ruff check .

test: setup lint
	bash scripts/run-tests.sh $(PYTEST_ARGS)

test-unit: setup
	$(PY) -m pytest -m unit -q $(PYTEST_ARGS)

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
