# Two entry points for people (README): `make quickstart` and `make test`.
# Both create .venv on first use; the stamp re-runs setup whenever pyproject.toml changes.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: setup quickstart test test-fast lint bench clean-state

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
	# torch first, exactly this version: it is the CPU build on disk here; anything
	# looser resolves to a multi-GB CUDA build.
	$(PIP) install torch==2.13.0
	# DeepSpeed ships only an sdist whose setup imports torch: build it against the
	# torch just installed instead of an isolated env that would fetch another torch.
	$(PIP) install --no-build-isolation deepspeed==0.19.8
	$(PIP) install -e '.[dev]'
	touch $@

quickstart: setup
	$(PY) -m jobs.quickstart

test: setup
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not ray and not services and not slow"

lint: setup
	$(PY) -m ruff check .

bench: setup
	$(PY) benchmarks/gengram.py

clean-state:
	rm -rf state
