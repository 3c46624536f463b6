"""A local cluster for development: one PostgreSQL and N `anvil serve` nodes (`make run-cluster`).

PostgreSQL is Debian's (`apt-get install postgresql`): `initdb` in a temporary folder, run as the
unprivileged `postgres` user when started as root (PostgreSQL refuses root), listening on a unix
socket in that folder and a loopback port. The test suite starts its PostgreSQL with the same
class (tests/pg.py).

    python -m anvil.devcluster [--nodes 2] [--base-port 9100] [--dir DIR]

runs `anvil admin migrate`, starts the nodes on loopback ports with one shared secrets folder (a
token or sealed secret minted by one node is valid on the others), prints their endpoints and the
first admin's credentials, and stops everything on Ctrl-C (or SIGTERM).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from anvil.serveproc import ServeFailed, ServeProcess, free_port

MISSING = ("PostgreSQL binaries not found (looked for /usr/lib/postgresql/*/bin/initdb, ANVIL_PG_BIN, initdb "
           "on PATH). Install them: apt-get install postgresql")


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


def _as_user(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--", *cmd]


class PostgresServer:
    """A throw-away PostgreSQL server: `start()`, `url()`, `new_database()`, `stop()` (removes its folder)."""

    def __init__(self, bin_dir: Path, port: int, *, parent: str | Path | None = None, durable: bool = True):
        self.bin = bin_dir
        self.port = port
        self.durable = durable
        self.dir = Path(tempfile.mkdtemp(prefix="anvil-pg-", dir=parent))
        self.data = self.dir / "data"
        self.proc: subprocess.Popen | None = None

    def start(self) -> PostgresServer:
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        subprocess.run(_as_user([str(self.bin / "initdb"), "-D", str(self.data), "-U", "anvil", "--auth=trust",
                                 "--locale=C", "--encoding=UTF8", "--no-sync"]),
                       check=True, capture_output=True, timeout=120)
        log = open(self.dir / "postgres.log", "ab")
        # fsync stays on: an acknowledged write must survive a crash of the machine. A test suite's server
        # (durable=False) is never crashed, only Anvil's nodes are: it skips the syncs. max_connections
        # covers many nodes' pools.
        speed = [] if self.durable else ["-c", "fsync=off", "-c", "full_page_writes=off",
                                         "-c", "synchronous_commit=off"]
        self.proc = subprocess.Popen(
            _as_user([str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port), "-k", str(self.dir),
                      "-c", "listen_addresses=127.0.0.1", "-c", "max_connections=300",
                      "-c", "shared_buffers=32MB", *speed]),
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
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

    def new_database(self, template: str | None = None) -> str:
        """A fresh database, empty or a copy of database `template`; its URL."""
        import psycopg

        name = "anvil_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
        return self.url(name)

    def pids(self) -> list[int]:
        """The postmaster and its children (backends, checkpointer, ...), for CPU accounting."""
        if self.proc is None:
            return []
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
        return [self.proc.pid, *(int(p) for p in out.split())]

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            # Fast shutdown (SIGINT): ends client sessions and shuts down cleanly. SIGTERM's smart
            # shutdown would wait for every client to disconnect on its own.
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def migrate(url: str) -> None:
    """`anvil admin migrate --records URL`, as an operator runs it."""
    proc = subprocess.run([sys.executable, "-m", "anvil.cli.main", "admin", "migrate", "--records", url],
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"anvil admin migrate failed:\n{proc.stdout}\n{proc.stderr}")


class Node(ServeProcess):
    """One `anvil serve` process of the cluster, in its own session (Ctrl-C reaches the cluster
    runner, which stops the nodes in order)."""

    def __init__(self, storage_path: Path, port: int, url: str, env: dict[str, str] | None = None):
        node_env = {**os.environ, **(env or {})}
        if url:  # else the embedded store (bench/cluster.py compares the two)
            node_env["ANVIL_RECORDS_URL"] = url
        super().__init__(storage_path, storage_path.parent / f"{storage_path.name}.log", port=port,
                         env=node_env, new_session=True)
        self.url = url

    def start(self, timeout: float = 30.0) -> Node:
        try:
            super().start(timeout)
        except ServeFailed as e:
            raise RuntimeError(f"node {e}") from None
        return self


class Cluster:
    """PostgreSQL plus `nodes` Anvil nodes sharing its one database and one secrets folder."""

    def __init__(self, root: Path, *, nodes: int = 2, base_port: int | None = None,
                 env: dict[str, str] | None = None, records: str | None = None):
        self.root = root
        self.records = records
        self.count = nodes
        self.base_port = base_port
        self.env = env or {}
        self.pg: PostgresServer | None = None
        self.nodes: list[Node] = []
        self.url = records or ""

    def start(self) -> Cluster:
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            if not self.url:
                bin_dir = pg_bin_dir()
                if bin_dir is None:
                    raise RuntimeError(MISSING)
                self.pg = PostgresServer(bin_dir, free_port()).start()
                self.url = self.pg.new_database()
            migrate(self.url)
            first: Node | None = None
            for i in range(self.count):
                port = self.base_port + i if self.base_port else free_port()
                path = self.root / f"node-{chr(ord('a') + i)}"
                if first is not None:
                    # One secrets folder for all: tokens and sealed secrets mean the same on every node.
                    path.mkdir(parents=True, exist_ok=True)
                    shutil.copytree(first.storage_path / "secrets", path / "secrets", dirs_exist_ok=True)
                node = Node(path, port, self.url, self.env).start()
                self.nodes.append(node)
                first = first or node
        except BaseException:
            self.stop()
            raise
        return self

    def admin_credentials(self) -> dict[str, Any]:
        return json.loads((self.nodes[0].storage_path / "bootstrap" / "first-admin.json").read_text())

    def stop(self) -> None:
        for node in self.nodes:  # all at once: each takes its grace period to drain
            node.signal_stop()
        for node in reversed(self.nodes):
            node.stop()
        if self.pg is not None:
            self.pg.stop()
            self.pg = None


def redact_url(url: str) -> str:
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m anvil.devcluster", description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=2, help="how many anvil serve nodes (default 2)")
    ap.add_argument("--base-port", type=int, default=0, help="first node's port (default: free ports)")
    ap.add_argument("--dir", default=None, help="where the nodes' storage paths go (default: a temporary folder)")
    ap.add_argument("--records", default=None,
                    help="use this PostgreSQL database (postgresql://...) instead of starting one")
    args = ap.parse_args(argv)
    if not 1 <= args.nodes <= 16:
        print("--nodes must be between 1 and 16", file=sys.stderr)
        return 2
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="anvil-cluster-"))
    cluster = Cluster(root, nodes=args.nodes, base_port=args.base_port or None, records=args.records)
    stopping = False

    def stop(_signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        cluster.start()
        cred = cluster.admin_credentials()
        where = f"  (data in {cluster.pg.dir})" if cluster.pg is not None else ""
        print(f"PostgreSQL: {redact_url(cluster.url)}{where}")
        for node in cluster.nodes:
            assert node.proc is not None
            print(f"node {node.storage_path.name}: {node.endpoint}  (pid {node.proc.pid}, log {node.log_path})")
        print(f"first admin: client_id={cred['client_id']} client_secret={cred['client_secret']}")
        print(f"  ANVIL_ENDPOINT={cluster.nodes[0].endpoint} ANVIL_CLIENT_ID={cred['client_id']} "
              f"ANVIL_CLIENT_SECRET={cred['client_secret']} anvil bucket ls")
        print("Ctrl-C stops the nodes and PostgreSQL.", flush=True)
        reported: set[str] = set()
        while not stopping:
            for node in cluster.nodes:
                # A node that dies is reported, not restarted: the others go on serving (as in production).
                name = node.storage_path.name
                if node.proc is not None and node.proc.poll() is not None and name not in reported:
                    reported.add(name)
                    print(f"node {name} exited ({node.proc.returncode}); the others go on", flush=True)
            time.sleep(0.2)
    except RuntimeError as e:
        print(f"run-cluster: {e}", file=sys.stderr)
        return 1
    finally:
        cluster.stop()
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    print("cluster stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
