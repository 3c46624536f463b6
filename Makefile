VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
STORAGE_PATH ?= ./anvil-data
API_LISTEN_ADDR ?= 127.0.0.1:9000
# JSON-lines access log of `make run`: - (stdout), a file, or off (docs/operations.md).
ANVIL_ACCESS_LOG ?= -

.PHONY: install run test lint bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/anvil serve --storage-path $(STORAGE_PATH) --listen $(API_LISTEN_ADDR) --access-log $(ANVIL_ACCESS_LOG)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -n 2 -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

bench: $(STAMP)
	$(PY) bench/objects.py

clean:
	rm -rf $(VENV) .pytest_cache
