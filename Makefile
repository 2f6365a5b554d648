# Two commands on a fresh machine: `make demo` (no server needed) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: help venv redis-server chromium demo lint test reliability bench bench-full bench-instructions clean

help:
	@echo "make demo         run the per-key FIFO demo on the embedded default (no server)"
	@echo "make test         set everything up (virtualenv, redis-server and redis-sentinel), lint, type-check and run the suite"
	@echo "make lint         ruff and mypy over sharded_broker/ and integrations/ (zero findings expected)"
	@echo "make reliability  fault, bad-input and security tests, with the long soak runs and the"
	@echo "                  fault campaign (SB_CAMPAIGN_SECONDS per target, default 180; SB_CAMPAIGN_SEED)"
	@echo "make bench        benchmarks side by side, quick mode (bench-full: the full sizes)"
	@echo "make bench-instructions  Redis server instructions per message under callgrind (load-independent)"

$(STAMP): pyproject.toml setup.py integrations/kombu_alias.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,celery,dramatiq]"
	touch $(STAMP)

venv: $(STAMP)

redis-server:
	@scripts/ensure-redis-server
	@scripts/ensure-redis-sentinel

# Debian's chromium and chromium-driver, for the dashboard's browser tests.
chromium:
	@scripts/ensure-chromium

demo: venv
	$(PY) examples/demo.py

lint: venv
	$(VENV)/bin/ruff check sharded_broker integrations
	$(VENV)/bin/mypy sharded_broker integrations

# Two pytest processes (pytest-xdist): most of the suite waits on workers, servers and
# timeouts rather than the CPU. A file's tests stay on one process, so a module's fixtures
# start once. PYTEST_WORKERS=0 runs it in one process.
PYTEST_WORKERS ?= 2

test: venv redis-server chromium lint
	$(VENV)/bin/pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

reliability: venv redis-server
	$(VENV)/bin/pytest tests/reliability -m "" $(PYTEST_ARGS)

bench: venv redis-server
	$(PY) -m benchmarks.run --quick

bench-full: venv redis-server
	$(PY) -m benchmarks.run --full

bench-instructions: venv redis-server
	@command -v valgrind >/dev/null || apt-get install -y valgrind
	$(PY) -m benchmarks.instructions

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis .mypy_cache .ruff_cache
