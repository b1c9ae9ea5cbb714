# The two commands of the README: `make demo` and `make test`. Each sets itself up (idempotent).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test train-example clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $@

demo: setup
	$(BIN)/python -m examples.mnist.demo

test: setup
	bash scripts/test.sh

train-example: setup
	$(BIN)/guardian train-detector --config examples/mnist/detector-config.yaml --out examples/mnist/artifacts/detector

clean:
	rm -rf $(VENV) .pytest_cache
