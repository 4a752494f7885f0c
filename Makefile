# The two README commands are `make run` (set-up + webhook server) and `make test` (set-up + all tests).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup run test test-unprivileged bench demo clean

setup:
	./scripts/install-system-deps.sh
	./scripts/install-python-deps.sh

run: setup
	$(VENV)/bin/bpfinit-webhook serve

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-unprivileged: setup
	$(PY) -m pytest -q -m 'not kernel' $(PYTEST_ARGS)

bench: setup
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[test,bench]'
	$(PY) bench/run_all.py

demo: setup
	$(PY) -m demo.run

clean:
	rm -rf $(VENV) .pytest_cache
