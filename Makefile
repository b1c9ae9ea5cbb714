# The two commands of the README: `make demo` and `make test`. Each sets itself up (idempotent).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo demo-cifar10 test train-example train-cifar10 clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $@

demo: setup
	$(BIN)/python -m examples.mnist.demo

# The CIFAR-10 ResNet-56 behind TorchServe's built-in image_classifier handler (docs/cifar10.md);
# needs ../shared/data and the detector artifact of `make train-cifar10`.
demo-cifar10: setup
	$(BIN)/python -m examples.cifar10.demo

test: setup
	bash scripts/test.sh

# Regenerates the committed example artifacts: the victim, then the sources and the detector.
train-example: setup
	$(BIN)/python -m examples.mnist.train_victim
	$(BIN)/guardian train-detector --config examples/mnist/detector-config.yaml --out examples/mnist/artifacts/detector --threads 1

# The CIFAR-10 pipeline (docs/cifar10.md): victim, detector sources, detector; times each stage.
# Needs ../shared/data (or GUARDIAN_DATA). SKIP_VICTIM=1 keeps the committed victim.
train-cifar10: setup
	$(BIN)/python -m examples.cifar10.train_all $(if $(SKIP_VICTIM),--skip-victim,)

clean:
	rm -rf $(VENV) .pytest_cache
