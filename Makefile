# convlens: the two commands a fresh machine needs.
#   make demo   set up .venv and run the whole pipeline on the embedded default; prints the report path
#   make test   set up .venv (+ test extras, chromium) and run the test suite
.PHONY: setup setup-test demo test bench clean

export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
STORE ?= convlens-store

setup:
	@scripts/setup.sh

setup-test:
	@scripts/setup.sh test

demo: setup
	.venv/bin/convlens demo --store $(STORE)

test: setup-test
	.venv/bin/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

bench: setup-test
	.venv/bin/python benchmarks/extract.py

clean:
	rm -rf $(STORE) demo-data test-artifacts
