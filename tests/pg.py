"""A real PostgreSQL server for the tests: Debian's binaries, initdb in a temporary folder, run as
the unprivileged `postgres` user (PostgreSQL refuses root), listening on a unix socket in that
folder and a free loopback port. One per test session (per xdist worker); every Anvil server gets
a database of its own. The server itself is `anvil.devcluster.PostgresServer` (`make run-cluster`
starts the same)."""

from __future__ import annotations

import pytest

from anvil.devcluster import PostgresServer, pg_bin_dir
from anvil.devcluster import migrate as _migrate

MISSING = ("PostgreSQL binaries not found (looked for /usr/lib/postgresql/*/bin/initdb, ANVIL_PG_BIN, initdb "
           "on PATH): the PostgreSQL record-store tests are SKIPPED. Install them: apt-get install postgresql")

__all__ = ["MISSING", "PostgresServer", "migrate", "pg_bin_dir", "require_postgres"]


def migrate(url: str) -> None:
    """`anvil admin migrate --records URL`, as an operator runs it."""
    try:
        _migrate(url)
    except RuntimeError as e:
        raise AssertionError(str(e)) from None


def require_postgres() -> None:
    if pg_bin_dir() is None:
        pytest.skip(MISSING)
