# Two commands on a fresh machine: `make demo` and `make test`. Only python3 (3.11+) is assumed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# The demo needs only the runtime dependencies; `make test` adds the test and lint tools.
DEMO_STAMP := $(VENV)/.demo-stamp
# The proxy's port for `make demo PORT=7432` (default 6432).
PORT ?=

.PHONY: install install-demo demo test lint unit unit-pure bench bench-quick clean

# No system Postgres? Use the embedded one from the pgserver wheel.
define need_postgres
	@command -v pg_config >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 \
	  || { echo "==> no system PostgreSQL: installing the embedded one (pgserver)"; \
	       $(PY) -m pip install --progress-bar on -e '.[embedded]'; }
endef

$(VENV)/bin/python:
	@echo "==> creating the virtualenv $(VENV)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# setup.py compiles the protocol core and the data path with mypyc when a C compiler works
# (pure Python when not): an edited compiled module is compiled again by the next make
# install / make test (the list is setup.py's DATA_PATH).
DATA_PATH := session server pool pool_state guard stats holds
BUILD_INPUTS := pyproject.toml setup.py $(wildcard pgtenant/protocol/*.py) \
	$(DATA_PATH:%=pgtenant/%.py)

$(DEMO_STAMP): $(BUILD_INPUTS) | $(VENV)/bin/python
	@echo "==> installing pgtenant and its runtime dependencies into $(VENV)"
	$(PY) -m pip install --progress-bar on -e .
	$(need_postgres)
	touch $(DEMO_STAMP)

$(STAMP): $(BUILD_INPUTS) | $(VENV)/bin/python
	@echo "==> installing pgtenant with the test and lint tools into $(VENV)"
	$(PY) -m pip install --progress-bar on -e '.[test]'
	$(need_postgres)
	@$(PY) -c 'import pgtenant; print("==> protocol core:", pgtenant.build_kind())'
	touch $(STAMP) $(DEMO_STAMP)

install: $(STAMP)

install-demo: $(DEMO_STAMP)

demo: install-demo
	$(PY) -m pgtenant demo $(if $(PORT),--port $(PORT),)

lint: install
	$(PY) -m ruff check pgtenant tests benchmarks
	$(PY) -m mypy

unit: install
	$(PY) -m pytest -q tests/unit

# The unit tests once more on the pure-Python protocol core (PGTENANT_PURE=1 makes the
# process import the .py modules even where compiled ones exist): the fallback build for
# machines without a compiler must keep working.
unit-pure: install
	PGTENANT_PURE=1 $(PY) -m pytest -q -p no:cacheprovider tests/unit

# The whole suite on what install built (compiled when a compiler worked), then unit-pure.
# With a C compiler on the machine the build must have compiled: a silent fallback to pure
# Python would test the wrong build (PGTENANT_PURE=1 make test tests the pure one on purpose).
test: lint
	@$(PY) -c 'import pgtenant; print("==> protocol core:", pgtenant.build_kind())'
	@if [ -z "$$PGTENANT_PURE" ] && command -v cc >/dev/null 2>&1; then \
	  $(PY) -c 'import sys, pgtenant; sys.exit(0 if pgtenant.build_kind().startswith("compiled") else "a C compiler is here but the build is pure Python: pip install -v -e . says why")'; \
	fi
	$(PY) -m pytest -q -p no:cacheprovider --durations=20
	$(MAKE) --no-print-directory unit-pure

# Benchmarks (issue #6): results in benchmarks/results/. QUICK=1 (or bench-quick): < 2 min.
bench: install
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) -m benchmarks $(if $(QUICK),--quick,)

bench-quick:
	$(MAKE) bench QUICK=1

clean:
	rm -rf $(VENV) .demo .pytest_cache .ruff_cache build
	find pgtenant -name '*.so' -delete
