# Developer entry points: `make demo` runs the tool on the bundled example, `make test` runs
# the suite. Both create .venv (if missing) and install the package editable with its deps.
# Overrides: PYTHON=python3.12, EXTRAS=test,cpu (with TF_BF16_NO_TF_DEPENDENCY=1 to take
# tensorflow-cpu instead of tensorflow), PYTEST_ARGS="-n 2 -x".

SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV ?= .venv
VENV_PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS ?= test,kernels
PYTEST_ARGS ?=
EXAMPLE_MODEL := examples/digits_cnn

export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: demo test install example kernels

demo: $(STAMP) kernels
	$(VENV_PY) -m tf_bf16 inspect --input_model=$(EXAMPLE_MODEL)
	$(VENV_PY) examples/demo.py --input_model=$(EXAMPLE_MODEL)

test: $(STAMP) kernels
	$(VENV_PY) -m pytest -q $(PYTEST_ARGS) tests

install: $(STAMP) kernels

# Compile tf_bf16's optional oneDNN kernels when missing or out of date; a machine that cannot
# (no g++ or oneDNN) prints why and carries on: everything else works without them.
kernels: $(STAMP)
	$(VENV_PY) -m tf_bf16.kernels.build --if-needed || echo "continuing without tf_bf16 kernels"

# Retrain and re-export the bundled example SavedModel (deterministic, a few seconds).
example: $(STAMP)
	$(VENV_PY) examples/make_example_model.py --output_dir=$(EXAMPLE_MODEL)

$(VENV_PY):
	$(PYTHON) -m venv $(VENV)

# Re-run pip only when the packaging files change; the stamp lives in the venv, so a new
# venv always installs.
$(STAMP): setup.py pyproject.toml | $(VENV_PY)
	$(VENV_PY) -m pip install -e '.[$(EXTRAS)]'
	touch $@
