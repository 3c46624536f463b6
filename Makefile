VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
STORAGE_PATH ?= ./anvil-data
API_LISTEN_ADDR ?= 127.0.0.1:9000
# JSON-lines access log of `make run`: - (stdout), a file, or off (docs/operations.md).
ANVIL_ACCESS_LOG ?= -

.PHONY: install run run-cluster test lint bench clean pg-bin

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/anvil serve --storage-path $(STORAGE_PATH) --listen $(API_LISTEN_ADDR) --access-log $(ANVIL_ACCESS_LOG)

# The PostgreSQL record-store tests need a real server's binaries (tests/pg.py): install Debian's
# where they are missing and we may (root with apt-get); otherwise those tests are skipped loudly.
pg-bin:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    (apt-get install -y -q postgresql >/dev/null 2>&1 || \
	     (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q postgresql >/dev/null 2>&1)); } || \
	  echo "!!! PostgreSQL binaries could not be installed: the PostgreSQL record-store tests will be SKIPPED"

test: $(STAMP) pg-bin
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	@# Compiled once here, not on every start: each test starts hundreds of `anvil` processes, and
	@# where PYTHONDONTWRITEBYTECODE is set (as in many images) each would compile the package from
	@# source again (~0.4 s of CPU a process).
	$(PY) -m compileall -q src
	PYTHONDONTWRITEBYTECODE= ANVIL_VALIDATE_RESPONSES=1 $(PY) -m pytest -n 2 -q --durations=20

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

bench: $(STAMP)
	$(PY) bench/objects.py

clean:
	rm -rf $(VENV) .pytest_cache

# A local cluster: PostgreSQL (Debian's binaries, initdb in a temporary folder) and two nodes on
# loopback ports sharing one database and one secrets folder; prints endpoints and credentials;
# Ctrl-C stops everything (docs/scale-out.md). NODES=3 for more.
NODES ?= 2
run-cluster: $(STAMP) pg-bin
	$(PY) -m anvil.devcluster --nodes $(NODES)
