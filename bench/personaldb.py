"""PersonalDB benchmark: commits/s on one group and across 100 groups, catch-up of 10,000 commits,
and the snapshot build of a ~100 MB database. Prints one JSON document.

A real server runs on a temporary STORAGE_PATH. Changesets are real SQLite session changesets,
built before timing starts (one inserted row each). Commits go over raw `http.client` keep-alive
connections (the SDK's httpx would be the bottleneck); a group's commits are sequential by nature
(each must name the head as its base), so one group is one connection committing in a loop, and
100 groups are 100 such loops (threads spread over client processes).

Every figure has a same-run peer, interleaved with it, repeated (min and median reported):
- commits: a native object PUT of the same bytes, sequential, on the same server (one durable
  catalog commit per request, like a commit); the same commits are also sent `--batch` per request
  (`commits/batch`, what a replica's sync does with many pending changesets);
- catch-up: the same entries fetched without certificate checks or applying (the wire and the
  server alone), next to a full `Replica` bootstrap (fetch, verify every certificate, apply);
- snapshot: the floor of the same work done locally (SQLite backup copy of the materialised
  database + its state hash + zstd level 3), next to the server's build.

    python bench/personaldb.py [--repeat 3] [--commits 1000] [--batch 100] [--catchup 10000] [--snapshot-mb 100]
                               [--only-one-group] [--quick]
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import multiprocessing as mp
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

SCHEMA = "CREATE TABLE items(id INTEGER PRIMARY KEY, body TEXT NOT NULL)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: Path, port: int) -> subprocess.Popen:
    log = open(root / "server.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "anvil.cli.main", "serve", "--storage-path", str(root / "data"),
                             "--listen", f"127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "ANVIL_PDB_SNAPSHOT_EVERY": "1000000"})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/anvil/health/live", timeout=1)
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("server did not start")


def changesets(n: int, size: int = 100, start: int = 0) -> list[bytes]:
    """n real session changesets, each inserting one row of `size` characters."""
    from anvil.storage import sqlitefile as sf

    with tempfile.TemporaryDirectory() as d:
        db = sf.Database(Path(d) / "c.sqlite")
        db.set_synchronous("OFF")  # a scratch file: building the inputs must not cost an fsync each
        db.script(SCHEMA)
        out = []
        for i in range(start, start + n):
            db.start_session()
            db.execute("INSERT INTO items(id, body) VALUES (?, ?)", (i, (f"{i:08d}" * (size // 8 + 1))[:size]))
            out.append(db.take_changeset())
            db.stop_session()
        db.close()
    return out


class Conn:
    """One keep-alive HTTP/1.1 connection with the bench token."""

    def __init__(self, port: int, token: str):
        self.c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        self.auth = f"Bearer {token}"

    def call(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes]:
        h = {"Authorization": self.auth, **(headers or {})}
        if body is not None:
            h["Content-Length"] = str(len(body))
        for attempt in (1, 2):
            try:
                self.c.request(method, path, body=body, headers=h)
                r = self.c.getresponse()
                return r.status, r.read()
            except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
                # The server closed an idle keep-alive connection; commits carry an idempotency key,
                # so sending again is safe.
                self.c.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def json(self, method: str, path: str, obj: dict | None = None) -> dict:
        body = json.dumps(obj).encode() if obj is not None else None
        status, data = self.call(method, path, body, {"Content-Type": "application/json"} if body else None)
        if status >= 300:
            raise RuntimeError(f"{method} {path}: {status} {data[:300]!r}")
        return json.loads(data)


def create_group(conn: Conn, name: str) -> tuple[int, str]:
    g = conn.json("POST", "/anvil/v1/pdb/groups", {"name": name, "schema": SCHEMA})
    return 0, g["genesis"]


def commit_loop(conn: Conn, group: str, sets: list[bytes], head: tuple[int, str]) -> tuple[int, str]:
    for cs in sets:
        status, data = conn.call("POST", f"/anvil/v1/pdb/groups/{group}/commits", cs, {
            "Content-Type": "application/octet-stream", "x-anvil-pdb-base-index": str(head[0]),
            "x-anvil-pdb-base-hash": head[1], "Idempotency-Key": f"{group}-{head[0]}"})
        if status not in (200, 201):
            raise RuntimeError(f"commit refused: {status} {data[:300]!r}")
        e = json.loads(data)
        head = (e["index"], e["hash"])
    return head


def batch_loop(conn: Conn, group: str, sets: list[bytes], head: tuple[int, str], size: int) -> tuple[int, str]:
    """The same commits, `size` per request (`commits/batch`): each still its own certified entry, but one
    round trip and one server transaction (one fsync) per batch, as a replica's sync sends its pending
    changesets."""
    for start in range(0, len(sets), size):
        chunk = sets[start:start + size]
        body = json.dumps({"base_index": head[0], "base_hash": head[1], "changesets": [
            {"changeset": base64.b64encode(cs).decode(), "idempotency_key": f"{group}-{head[0] + i}"}
            for i, cs in enumerate(chunk)]}).encode()
        status, data = conn.call("POST", f"/anvil/v1/pdb/groups/{group}/commits/batch", body,
                                 {"Content-Type": "application/json"})
        if status not in (200, 201):
            raise RuntimeError(f"batch refused: {status} {data[:300]!r}")
        last = json.loads(data)["entries"][-1]
        assert last["index"] == head[0] + len(chunk)
        head = (last["index"], last["hash"])
    return head


def put_loop(conn: Conn, bucket: str, bodies: list[bytes]) -> None:
    for i, b in enumerate(bodies):
        status, data = conn.call("PUT", f"/anvil/v1/buckets/{bucket}/object?key=k{i}", b,
                                 {"Content-Type": "application/octet-stream"})
        if status >= 300:
            raise RuntimeError(f"put refused: {status} {data[:200]!r}")


def _many_groups_worker(args: tuple) -> None:
    port, token, groups, per_group, barrier_path = args
    sets = changesets(per_group)
    conns = [Conn(port, token) for _ in groups]
    heads = [create_group(c, g) for c, g in zip(conns, groups, strict=True)]
    Path(barrier_path + f".{os.getpid()}").touch()
    while not Path(barrier_path).exists():
        time.sleep(0.001)
    threads = [threading.Thread(target=commit_loop, args=(c, g, sets, h))
               for c, g, h in zip(conns, groups, heads, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def many_groups(port: int, token: str, n_groups: int, per_group: int, procs: int) -> float:
    """Commits/s over n_groups groups committing at once (threads in `procs` client processes)."""
    tag = uuid.uuid4().hex[:6]
    names = [f"m{tag}-{i}" for i in range(n_groups)]
    chunks = [names[i::procs] for i in range(procs)]
    with tempfile.TemporaryDirectory() as d:
        barrier = str(Path(d) / "go")
        ctx = mp.get_context("spawn")
        ps = [ctx.Process(target=_many_groups_worker, args=((port, token, ch, per_group, barrier),)) for ch in chunks]
        for p in ps:
            p.start()
        while len(list(Path(d).glob("go.*"))) < procs:
            time.sleep(0.01)
        t0 = time.perf_counter()
        Path(barrier).touch()
        for p in ps:
            p.join()
        elapsed = time.perf_counter() - t0
        if any(p.exitcode for p in ps):
            raise RuntimeError("a client process failed")
    return n_groups * per_group / elapsed


def stats(xs: list[float]) -> dict:
    return {"min": round(min(xs), 3), "median": round(statistics.median(xs), 3), "runs": [round(x, 3) for x in xs]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--commits", type=int, default=1000)
    ap.add_argument("--groups", type=int, default=100)
    ap.add_argument("--per-group", type=int, default=50)
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--catchup", type=int, default=10000)
    ap.add_argument("--snapshot-mb", type=int, default=100)
    ap.add_argument("--batch", type=int, default=100, help="changesets per request in the batched one-group run")
    ap.add_argument("--only-one-group", action="store_true", help="stop after the one-group figures")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    a = ap.parse_args()
    if a.quick:
        a.repeat, a.commits, a.groups, a.per_group, a.procs, a.catchup, a.snapshot_mb = 3, 50, 4, 10, 2, 200, 2

    from anvil.client import AnvilClient, exchange_token
    from anvil.personaldb import Replica
    from anvil.storage import sqlitefile as sf

    root = Path(tempfile.mkdtemp(prefix="anvil-bench-pdb-"))
    port = free_port()
    proc = start_server(root, port)
    out: dict = {"benchmark": "personaldb", "repeat": a.repeat, "load_avg_before": list(os.getloadavg()),
                 "cpus": os.cpu_count()}
    try:
        cred = json.loads((root / "data" / "bootstrap" / "first-admin.json").read_text())
        endpoint = f"http://127.0.0.1:{port}"
        token = exchange_token(endpoint, cred["client_id"], cred["client_secret"])["access_token"]
        conn = Conn(port, token)
        conn.json("PUT", "/anvil/v1/buckets/bench-peer", {})

        # -- commits/s, one group, interleaved with the PUT peer ---------------------------------
        sets = changesets(a.commits)
        one, batched, peer = [], [], []
        for r in range(a.repeat):
            group = f"one{r}{uuid.uuid4().hex[:6]}"
            head = create_group(conn, group)
            t0 = time.perf_counter()
            commit_loop(conn, group, sets, head)
            one.append(a.commits / (time.perf_counter() - t0))
            group = f"bat{r}{uuid.uuid4().hex[:6]}"
            head = create_group(conn, group)
            t0 = time.perf_counter()
            batch_loop(conn, group, sets, head, a.batch)
            batched.append(a.commits / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            put_loop(conn, "bench-peer", sets)
            peer.append(a.commits / (time.perf_counter() - t0))
        out["one_group"] = {"commits": a.commits, "changeset_bytes": len(sets[0]), "commits_per_s": stats(one),
                            "batched": {"changesets_per_request": a.batch, "commits_per_s": stats(batched)},
                            "peer_put_per_s": stats(peer), "target_commits_per_s": 500}
        if a.only_one_group:
            out["load_avg_after"] = list(os.getloadavg())
            return

        # -- commits/s across 100 groups ---------------------------------------------------------
        many, many_peer = [], []
        for _ in range(a.repeat):
            many.append(many_groups(port, token, a.groups, a.per_group, a.procs))
            t0 = time.perf_counter()
            put_loop(conn, "bench-peer", sets[: a.per_group * 2])
            many_peer.append(a.per_group * 2 / (time.perf_counter() - t0))
        out["many_groups"] = {"groups": a.groups, "commits_per_group": a.per_group, "client_processes": a.procs,
                              "commits_per_s": stats(many), "peer_sequential_put_per_s": stats(many_peer)}

        # -- catch-up of N commits ---------------------------------------------------------------
        group = f"cu{uuid.uuid4().hex[:6]}"
        head = create_group(conn, group)
        fill_sets = changesets(a.catchup)
        t0 = time.perf_counter()
        commit_loop(conn, group, fill_sets, head)
        fill = time.perf_counter() - t0
        genesis = conn.json("GET", f"/anvil/v1/pdb/groups/{group}")["genesis"]
        replica_s, wire_s = [], []
        with AnvilClient(endpoint, token=token) as client:
            for r in range(a.repeat):
                d = root / f"replica-{r}"
                d.mkdir()
                t0 = time.perf_counter()
                rep = Replica(d / "r.sqlite", client, group, page=2000)
                replica_s.append(time.perf_counter() - t0)
                assert rep.head[0] == a.catchup
                rep.close()
                t0 = time.perf_counter()
                idx, h, n = 0, genesis, 0
                while True:
                    page = client.pdb_catch_up(group, idx, h, limit=2000)
                    n += sum(len(base64.b64decode(e["changeset"])) > 0 for e in page["entries"])
                    if not page["more"]:
                        break
                    idx, h = page["entries"][-1]["index"], page["entries"][-1]["hash"]
                wire_s.append(time.perf_counter() - t0)
                assert n == a.catchup
        out["catch_up"] = {"commits": a.catchup, "fill_commits_per_s": round(a.catchup / fill, 1),
                           "replica_bootstrap_seconds": stats(replica_s), "peer_fetch_only_seconds": stats(wire_s),
                           "target_seconds": 5}

        # -- snapshot build of a ~N MB database --------------------------------------------------
        row = 256 * 1024
        rows_per_commit = 4
        n_commits = max(1, a.snapshot_mb * 1024 * 1024 // (row * rows_per_commit))
        build_s, floor_s = [], []
        sizes = {}
        for r in range(a.repeat):
            group = f"sn{r}{uuid.uuid4().hex[:6]}"
            head = create_group(conn, group)
            with tempfile.TemporaryDirectory() as d:
                db = sf.Database(Path(d) / "s.sqlite")
                db.set_synchronous("OFF")
                db.script(SCHEMA)
                big = []
                for c in range(n_commits):
                    db.start_session()
                    for k in range(rows_per_commit):
                        # Text that compresses about as well as typical app data (~3x), not all-zero pages.
                        body = base64.b64encode(os.urandom(row * 3 // 8)).decode() + "a" * (row // 2)
                        db.execute("INSERT INTO items(id, body) VALUES (?, ?)", (c * rows_per_commit + k, body))
                    big.append(db.take_changeset())
                    db.stop_session()
                db.close()
            commit_loop(conn, group, big, head)
            t0 = time.perf_counter()
            snap = conn.json("POST", f"/anvil/v1/pdb/groups/{group}/snapshots")
            build_s.append(time.perf_counter() - t0)
            sizes = {"raw_bytes": snap["raw_size"], "compressed_bytes": snap["size"]}
            # The floor: the same database rebuilt locally, copied, hashed and compressed.
            import zstandard

            with tempfile.TemporaryDirectory() as d:
                db = sf.Database(Path(d) / "m.sqlite")
                db.script(SCHEMA)
                db.begin()
                for cs in big:
                    db.apply(cs)
                db.commit()
                t0 = time.perf_counter()
                db.backup_to(Path(d) / "copy.sqlite")
                db.state_hash()
                zstandard.ZstdCompressor(level=3, threads=2).compress((Path(d) / "copy.sqlite").read_bytes())
                floor_s.append(time.perf_counter() - t0)
                db.close()
        out["snapshot"] = {**sizes, "build_seconds": stats(build_s), "peer_local_copy_hash_compress_seconds":
                           stats(floor_s)}
        out["load_avg_after"] = list(os.getloadavg())
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(root, ignore_errors=True)
        print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
