# `make demo` and `make test` work on a fresh clone: each creates .venv when missing.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.gradlane-installed

.PHONY: install demo test lint horovod

install: $(STAMP)

# torch first (the CPU build on this disk; a plain `torch` would pull a CUDA build),
# then gradlane with its extras. timm is a test-only oracle installed without its
# dependencies: it asks for torchvision, whose wheels would replace the torch build.
$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation -e ".[dev,deepspeed]"
	$(PY) -m pip install -q --no-deps "timm==1.0.31"
	@touch $(STAMP)

demo: install
	$(VENV)/bin/gradlane run lm

# Horovod 0.28.1 built against this torch (minutes once, then a cached wheel: seconds).
horovod: install
	$(PY) -m gradlane.horovod_build

# A failed Horovod build does not stop the suite: the Horovod tests fail with its log.
test: install
	-$(PY) -m gradlane.horovod_build
	$(VENV)/bin/pytest

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
