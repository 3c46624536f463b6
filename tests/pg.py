"""A real PostgreSQL server for the tests: Debian's binaries, initdb in a temporary folder, run as
the unprivileged `postgres` user (PostgreSQL refuses root), listening on a unix socket in that
folder and a free loopback port. One per test session (per xdist worker); every Anvil server gets
a database of its own."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest


def pg_bin_dir() -> Path | None:
    """The newest installed PostgreSQL's bin/ (ANVIL_PG_BIN overrides), or None."""
    env = os.environ.get("ANVIL_PG_BIN")
    if env:
        return Path(env) if (Path(env) / "initdb").exists() else None
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


MISSING = ("PostgreSQL binaries not found (looked for /usr/lib/postgresql/*/bin/initdb, ANVIL_PG_BIN, initdb "
           "on PATH): the PostgreSQL record-store tests are SKIPPED. Install them: apt-get install postgresql")


def _as_user(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--", *cmd]


class PostgresServer:
    def __init__(self, bin_dir: Path, port: int):
        self.bin = bin_dir
        self.port = port
        self.dir = Path(tempfile.mkdtemp(prefix="anvil-pg-"))
        self.data = self.dir / "data"
        self.proc: subprocess.Popen | None = None

    def start(self) -> PostgresServer:
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        subprocess.run(_as_user([str(self.bin / "initdb"), "-D", str(self.data), "-U", "anvil", "--auth=trust",
                                 "--locale=C", "--encoding=UTF8", "--no-sync"]),
                       check=True, capture_output=True, timeout=120)
        log = open(self.dir / "postgres.log", "ab")
        # fsync stays on: the tests check durability promises; max_connections covers many nodes' pools.
        self.proc = subprocess.Popen(
            _as_user([str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port), "-k", str(self.dir),
                      "-c", "listen_addresses=127.0.0.1", "-c", "max_connections=300",
                      "-c", "shared_buffers=32MB"]),
            stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited:\n{(self.dir / 'postgres.log').read_text()}")
            if subprocess.run([str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                              capture_output=True).returncode == 0:
                return self
            time.sleep(0.1)
        raise RuntimeError("postgres did not start")

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://anvil@127.0.0.1:{self.port}/{dbname}"

    def new_database(self) -> str:
        """A fresh, empty database; its URL."""
        import psycopg

        name = "anvil_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def migrate(url: str) -> None:
    """`anvil admin migrate --records URL`, as an operator runs it."""
    import sys

    proc = subprocess.run([sys.executable, "-m", "anvil.cli.main", "admin", "migrate", "--records", url],
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise AssertionError(f"anvil admin migrate failed:\n{proc.stdout}\n{proc.stderr}")


def require_postgres() -> None:
    if pg_bin_dir() is None:
        pytest.skip(MISSING)
