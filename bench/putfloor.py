"""The small-PUT floor of the stack: how fast can a minimal durable Python server go on this machine?

Issue 20 asks for small durable PUTs (4 KiB, 8 clients) at twice the same-run single-writer fsync
loop. This bench says whether that is within reach of the least server that can be written on Anvil's
stack (Python, uvicorn, uvloop, httptools, SQLite) with the same durability, by running, in the
same run and interleaved over `--reps` repetitions with the order rotating:

- anvil:    a real `anvil serve` of this checkout (bench/objects.py's server and load generator:
            2 client processes x 4 keep-alive connections, raw HTTP/1.1, authenticated);
- durable:  the least a durable PUT server can do here: uvicorn (uvloop, httptools: its fastest
            configuration) with a minimal ASGI app that reads the body, hashes it with SHA-256 and
            hands (key, digest, body) to one writer thread that commits whatever is queued in one
            SQLite transaction (WAL, synchronous=FULL: the same durability as Anvil's group
            commit), then answers 200. No auth, no journal, no metadata, no version, no listing
            index: a lower bound on the CPU of a durable PUT, not a store;
- onloop:   the same with no thread: the event loop commits, at the end of its turn, what that
            turn's requests queued (no hand-off between threads; the loop blocks during each fsync,
            which a real server could not afford, as every other request would wait);
- null:     the same server answering 200 as soon as the body is read (no hash, no disk): the
            protocol's own cost with this load generator, the ceiling of HTTP on this stack;
- the fsync loop: bench/objects.py's reference (a unique 4 KiB file written, fsynced, closed, in one
            thread), whose double is the target.

For each it reports the PUT rate (min, median, every run), the server's CPU per PUT and its busiest
thread's, and the client processes' CPU per PUT; for every server the CPU ceiling on this machine's
cores, cores / (server + client CPU per PUT), which no scheduling can beat. For the durable servers
it also gives the writer's side: PUTs per COMMIT, what a COMMIT took, and the share of the phase the
writer spent committing. Prints one JSON document.

    python bench/putfloor.py [--reps 3] [--seconds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import objects as native_bench  # noqa: E402

CLIENT_PROCESSES, CONNS_PER_PROCESS = 2, 4  # bench/objects.py's small-PUT workload: 8 clients


def serve(mode: str, port: int, directory: str) -> None:
    """A floor server (`--serve MODE PORT DIR`), in its own process until SIGTERM."""
    import asyncio
    import hashlib
    import queue
    import threading

    import apsw
    import uvicorn

    jobs: queue.SimpleQueue = queue.SimpleQueue()
    stats = {"commits": 0, "puts": 0, "commit_s": 0.0}  # the writer's, read by GET /stats
    ok = b'{"ok":true}'
    start = {"type": "http.response.start", "status": 200,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(ok)).encode())]}
    end = {"type": "http.response.body", "body": ok}

    def open_db() -> apsw.Connection:
        conn = apsw.Connection(os.path.join(directory, "floor.db"))
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("CREATE TABLE IF NOT EXISTS bodies (key TEXT PRIMARY KEY, sha256 TEXT, body BLOB)")
        return conn

    def commit(conn: apsw.Connection, batch: list[tuple[str, str, bytes, asyncio.Future]]) -> list[asyncio.Future]:
        """One transaction for the batch (acknowledged after its COMMIT); the batch's futures."""
        t0 = time.perf_counter()
        with conn:
            conn.executemany("INSERT OR REPLACE INTO bodies VALUES (?, ?, ?)", [j[:3] for j in batch])
        stats["commit_s"] += time.perf_counter() - t0
        stats["commits"] += 1
        stats["puts"] += len(batch)
        return [j[3] for j in batch]

    def writer(loop: asyncio.AbstractEventLoop) -> None:
        """`durable`: the writer thread commits whatever is queued (group commit, no waiting at all)."""
        conn = open_db()
        while True:
            batch = [jobs.get()]
            while True:
                try:
                    batch.append(jobs.get_nowait())
                except queue.Empty:
                    break
            loop.call_soon_threadsafe(_resolve, commit(conn, batch))

    pending: list[tuple[str, str, bytes, asyncio.Future]] = []
    conn_on_loop: list[apsw.Connection] = []

    def flush() -> None:
        """`onloop`: the event loop itself commits what the requests of this turn queued (no threads)."""
        if not conn_on_loop:
            conn_on_loop.append(open_db())
        batch = pending[:]
        pending.clear()
        _resolve(commit(conn_on_loop[0], batch))

    def _resolve(futures: list[asyncio.Future]) -> None:
        for f in futures:
            if not f.done():
                f.set_result(None)

    started: list[bool] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        if scope["path"] == "/stats":
            doc = json.dumps(stats).encode()
            head = [(b"content-length", b"%d" % len(doc))]
            await send({"type": "http.response.start", "status": 200, "headers": head})
            await send({"type": "http.response.body", "body": doc})
            return
        if mode == "durable" and scope["method"] == "PUT":
            loop = asyncio.get_running_loop()
            if not started:
                started.append(True)
                threading.Thread(target=writer, args=(loop,), daemon=True).start()
            done = loop.create_future()
            jobs.put((scope["query_string"].decode(), hashlib.sha256(body).hexdigest(), body, done))
            await done
        elif mode == "onloop" and scope["method"] == "PUT":
            loop = asyncio.get_running_loop()
            done = loop.create_future()
            if not pending:
                loop.call_soon(flush)
            pending.append((scope["query_string"].decode(), hashlib.sha256(body).hexdigest(), body, done))
            await done
        await send(start)
        await send(end)

    uvicorn.run(app, host="127.0.0.1", port=port, lifespan="off", loop="uvloop", http="httptools",
                access_log=False, log_level="warning", server_header=False)


class FloorServer:
    def __init__(self, mode: str, directory: Path):
        self.name, self.directory = mode, directory

    def start(self) -> FloorServer:
        import httpx

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.directory.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", self.name, str(self.port),
                                      str(self.directory)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError(f"floor server {self.name} did not start")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _phase(load: Any, pid: int, port: int, rep: int, seconds: float, writer_stats: bool) -> dict[str, Any]:
    import httpx

    clients = CLIENT_PROCESSES * CONNS_PER_PROCESS
    before = httpx.get(f"http://127.0.0.1:{port}/stats").json() if writer_stats else None
    with native_bench.Sampler(pid) as s:
        put = load.run(port, "bench", "put", [[f"floor{rep}/{n}/"] for n in range(clients)], seconds)
    put.pop("written")
    ops = max(put["ops"], 1)
    out = {"ops_per_s": put["ops_per_s"], "errors": put["errors"], "p50_ms": put["latency_ms"]["p50"],
           "server_cpu_ms_per_put": round(1000 * s.cpu_s / ops, 4),
           "busiest_thread_cpu_ms_per_put": round(1000 * s.busiest_thread_cpu_s / ops, 4),
           "client_cpu_ms_per_put": round(1000 * put["client_cpu_s"] / ops, 4)}
    if before is not None:
        # The writer's side: how many PUTs a COMMIT covered, what a COMMIT (WAL write + fsync) took, and
        # how much of the phase the writer spent committing (1.0: the disk sets the rate).
        after = httpx.get(f"http://127.0.0.1:{port}/stats").json()
        commits = max(after["commits"] - before["commits"], 1)
        commit_s = after["commit_s"] - before["commit_s"]
        out.update(mean_batch=round((after["puts"] - before["puts"]) / commits, 2),
                   commit_ms_mean=round(1000 * commit_s / commits, 3),
                   writer_commit_busy=round(commit_s / put["seconds"], 3))
    return out


def _summary(runs: list[dict[str, Any]], cores: int) -> dict[str, Any]:
    rates = [r["ops_per_s"] for r in runs]
    out: dict[str, Any] = {"ops_per_s_runs": rates, "ops_per_s_min": min(rates),
                           "ops_per_s_median": statistics.median(rates)}
    if "server_cpu_ms_per_put" in runs[0]:
        for k in ("server_cpu_ms_per_put", "busiest_thread_cpu_ms_per_put", "client_cpu_ms_per_put", "p50_ms",
                  "mean_batch", "commit_ms_mean", "writer_commit_busy"):
            if k in runs[0]:
                out[k] = statistics.median(r[k] for r in runs)
        out["errors"] = sum(r["errors"] for r in runs)
        per_put = out["server_cpu_ms_per_put"] + out["client_cpu_ms_per_put"]
        out["cpu_ceiling_ops_per_s"] = round(cores * 1000 / per_put) if per_put else None
        # One interpreter's Python runs under one GIL: its busiest thread bounds the rate too.
        out["busiest_thread_ceiling_ops_per_s"] = round(1000 / out["busiest_thread_cpu_ms_per_put"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    from tests.helpers import AnvilServer

    cores = os.cpu_count() or 1
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="anvil-putfloor-") as tmp:
        tmp_path = Path(tmp)
        pythonpath = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
        anvil = AnvilServer(tmp_path / "anvil", env={"PYTHONPATH": pythonpath}).start()
        os.environ[native_bench.TOKEN_ENV] = anvil.auth_headers()["authorization"].removeprefix("Bearer ")
        floors = [FloorServer(m, tmp_path / m).start() for m in ("durable", "onloop", "null")]
        load = native_bench.LoadGenerator(CLIENT_PROCESSES, CONNS_PER_PROCESS)
        try:
            with anvil.client() as c:
                c.create_bucket("bench")
            assert anvil.proc is not None
            servers = {"anvil": (anvil.proc.pid, anvil.port), **{f.name: (f.proc.pid, f.port) for f in floors}}
            for name, (_, port) in servers.items():  # warm-up, not measured
                load.run(port, "bench", "put", [[f"warm/{name}/{n}/"] for n in range(8)], 0.5)
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in [*servers, "fsync_loop"]}
            order = list(runs)
            for rep in range(args.reps):
                for name in order[rep % len(order):] + order[:rep % len(order)]:  # rotate who goes first
                    if name == "fsync_loop":
                        loop = native_bench._fsync_reference(tmp_path / f"loop-{rep}", args.seconds, 1)
                        runs[name].append({"ops_per_s": loop["ops_per_s"]})
                    else:
                        pid, port = servers[name]
                        runs[name].append(_phase(load, pid, port, rep, args.seconds, name in ("durable", "onloop")))
        finally:
            load.close()
            for f in floors:
                f.stop()
            anvil.stop()
    out = {name: _summary(r, cores) for name, r in runs.items()}
    twice = 2 * out["fsync_loop"]["ops_per_s_median"]
    for name in ("anvil", "durable", "onloop", "null"):
        out[name]["vs_fsync_loop"] = round(out[name]["ops_per_s_median"] / out["fsync_loop"]["ops_per_s_median"], 3)
        out[name]["cpu_ceiling_reaches_twice_loop"] = (out[name]["cpu_ceiling_ops_per_s"] or 0) >= twice
    print(json.dumps({
        "benchmark": "small durable PUT: Anvil against the least a durable Python server can do, and the fsync loop",
        "cores": cores, "clients": CLIENT_PROCESSES * CONNS_PER_PROCESS, "body_bytes": native_bench.SMALL_SIZE,
        "reps": args.reps, "seconds": args.seconds, "load_average_before": [round(x, 2) for x in load_before],
        "twice_fsync_loop_ops_per_s": round(twice), **out,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }, indent=2))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--serve":
        serve(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        main()
