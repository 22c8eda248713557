# Two entry points for people (README): `make quickstart` and `make test`.
# Both create .venv on first use; the stamp re-runs setup whenever pyproject.toml changes.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

DS_AOT := DS_ACCELERATOR=cpu DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1
DS_HAS_SHM_OP := from deepspeed.git_version_info import installed_ops as ops; assert ops['deepspeed_shm_comm'], 'DeepSpeed was built without its shm comm op'

.PHONY: setup browser quickstart test test-fast lint bench clean-state

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
	# torch first, exactly this version: it is the CPU build on disk here; anything
	# looser resolves to a multi-GB CUDA build.
	$(PIP) install torch==2.13.0
	# DeepSpeed ships only an sdist whose setup imports torch: build it against the
	# torch just installed instead of an isolated env that would fetch another torch.
	# Its CPU shared-memory comm op is compiled here, ahead of time, rather than by the
	# first training worker: a JIT build holds a lock file in ~/.cache/torch_extensions,
	# and a build killed half-way (a stopped job) leaves it behind for every later worker
	# to wait on forever. No pip cache: a cached wheel would be one built without the op;
	# a venv that has DeepSpeed without it (made before this rule) gets it rebuilt.
	$(DS_AOT) $(PIP) install --no-build-isolation --no-cache-dir deepspeed==0.19.8
	$(PY) -c "$(DS_HAS_SHM_OP)" 2>/dev/null || \
		$(DS_AOT) $(PIP) install --no-build-isolation --no-cache-dir --force-reinstall --no-deps deepspeed==0.19.8
	$(PY) -c "$(DS_HAS_SHM_OP)"
	$(PIP) install -e '.[dev]'
	touch $@

# The end-to-end tests drive the MLflow UI in Debian's headless Chromium, through the chromedriver of
# the same Debian version (tests/test_e2e.py). Installed only when missing, and only where apt-get can
# run (root, as in CI); elsewhere the browser test skips, except under CI where it fails.
BROWSER_PACKAGES := chromium chromium-driver

browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing $(BROWSER_PACKAGES) with apt-get (for tests/test_e2e.py)"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(BROWSER_PACKAGES) >/dev/null; \
		else \
			echo "note: chromium/chromedriver missing and apt-get unavailable: the MLflow UI test will skip"; \
		fi; \
	fi

quickstart: setup
	$(PY) -m jobs.quickstart

test: setup browser
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not ray and not services and not slow"

lint: setup
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports

bench: setup
	$(PY) benchmarks/gengram_module.py

clean-state:
	rm -rf state
