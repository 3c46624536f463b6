"""The embedded server does not load what only optional parts need (issue 20: memory flat and low).

faiss + numpy (~35 MiB resident) load with the first vector index, psycopg (~25 MiB) with a
PostgreSQL record store, awscrt (~0.1 s CPU) with the first CRC checksum; `import anvil.api.app`
(what `anvil serve` loads) must not pull them in.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(120)


def test_serving_code_does_not_import_optional_heavy_libraries() -> None:
    code = ("import sys, anvil.api.app, anvil.cli.main\n"
            "print(sorted(m for m in ('faiss', 'numpy', 'psycopg', 'psycopg_pool', 'awscrt') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_postgresql_errors_join_record_error_when_the_engine_loads() -> None:
    code = ("from anvil.storage import records\n"
            "before = records.RecordError\n"
            "import psycopg, anvil.storage.pg\n"
            "assert psycopg.Error not in before and psycopg.Error in records.RecordError\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "ok"


def test_serving_code_imports_without_warnings() -> None:
    # A warning at import (e.g. pydantic's "field shadows an attribute") lands on every CLI's stderr.
    subprocess.run([sys.executable, "-W", "error", "-c", "import anvil.api.app, anvil.cli.main"],
                   capture_output=True, text=True, check=True)
