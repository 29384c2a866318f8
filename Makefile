# d2ct: every target builds the virtual environment first if it is missing or out of date
# (python3 -m d2ct.installer: a no-op in well under a second when nothing changed).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test test-all bench clean-demo

setup:
	@python3 -m d2ct.installer --venv $(VENV)

## Quick start 1: the whole method on the embedded CT phantom, on the CPU.
demo: setup
	$(VENV)/bin/d2ct-pipeline --config configs/demo/pipeline.yaml

## Quick start 2: the test suite (slow tests excluded; `make test-all` runs them too).
test: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: setup
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	$(PY) bench/run_all.py

clean-demo:
	rm -rf output/demo
