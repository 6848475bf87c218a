# Two commands on a fresh machine: `make demo` and `make test`. Only python3 (3.11+) is assumed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: install demo test lint unit bench bench-quick clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@# No system Postgres? Use the embedded one from the pgserver wheel.
	@command -v pg_config >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 \
	  || $(PY) -m pip install --quiet -e '.[embedded]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m proxy demo

lint: install
	$(PY) -m ruff check proxy tests benchmarks
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
