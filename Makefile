# Two commands on a fresh machine: `make demo` and `make test`. Only python3 (3.11+) is assumed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# The demo needs only the runtime dependencies; `make test` adds the test and lint tools.
DEMO_STAMP := $(VENV)/.demo-stamp
# The proxy's port for `make demo PORT=7432` (default 6432).
PORT ?=

.PHONY: install install-demo demo test lint unit bench bench-quick clean

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

$(DEMO_STAMP): pyproject.toml | $(VENV)/bin/python
	@echo "==> installing pgtenant and its runtime dependencies into $(VENV)"
	$(PY) -m pip install --progress-bar on -e .
	$(need_postgres)
	touch $(DEMO_STAMP)

$(STAMP): pyproject.toml | $(VENV)/bin/python
	@echo "==> installing pgtenant with the test and lint tools into $(VENV)"
	$(PY) -m pip install --progress-bar on -e '.[test]'
	$(need_postgres)
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

test: lint
	$(PY) -m pytest -q -p no:cacheprovider

# Benchmarks (issue #6): results in benchmarks/results/. QUICK=1 (or bench-quick): < 2 min.
bench: install
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) -m benchmarks $(if $(QUICK),--quick,)

bench-quick:
	$(MAKE) bench QUICK=1

clean:
	rm -rf $(VENV) .demo .pytest_cache .ruff_cache
