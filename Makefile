VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
STORAGE_PATH ?= ./anvil-data
API_LISTEN_ADDR ?= 127.0.0.1:9000

.PHONY: install run test lint bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/anvil serve --storage-path $(STORAGE_PATH) --listen $(API_LISTEN_ADDR)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	ANVIL_VALIDATE_RESPONSES=1 $(PY) -m pytest -n 2 -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

bench: $(STAMP)
	$(PY) bench/objects.py

clean:
	rm -rf $(VENV) .pytest_cache
