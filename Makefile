# The two commands of the README: `make demo` and `make test`. Each sets itself up (idempotent).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo demo-cifar10 demo-imagenet test train-example train-cifar10 imagenet-example imagenet-victim clean

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

# The ImageNet example (docs/imagenet.md): the pretrained EfficientNet-Lite0 archived with the built-in
# image_classifier handler, its detector trained (examples/imagenet/detector-config.yaml), the archive
# protected; artifacts in examples/imagenet/artifacts. DETECTOR=DIR protects with an existing artifact
# instead of training (INPUT_FIT=area for one trained below 224 px, e.g. examples.imagenet.standin's).
imagenet-example: setup
	$(BIN)/python -m examples.imagenet.build $(if $(DETECTOR),--detector $(DETECTOR),) $(if $(INPUT_FIT),--input-fit $(INPUT_FIT),)

# Only the victim's files the detector config reads (artifacts/victim.pt, artifacts/foolbox-imagenet): under a minute.
imagenet-victim: setup
	$(BIN)/python -m examples.imagenet.build --victim-only

# Both ImageNet archives served by TorchServe, natural photos and synthetic images sent (same options).
demo-imagenet: setup
	$(BIN)/python -m examples.imagenet.demo $(if $(DETECTOR),--detector $(DETECTOR),) $(if $(INPUT_FIT),--input-fit $(INPUT_FIT),)

clean:
	rm -rf $(VENV) .pytest_cache
