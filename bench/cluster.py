"""Scale-out benchmark: the embedded store, one node on PostgreSQL and two nodes on PostgreSQL, in one run.

For each configuration it starts real processes (`anvil serve`; PostgreSQL from Debian's binaries
through anvil.devcluster, the same code as `make run-cluster`) and measures, from outside:

- small PUT throughput (1 KiB unique bodies: inline in the record store, so both nodes serve them);
- small GET throughput over the keys just written;
- listing throughput (first page of 1,000 keys of a 2,000-key bucket, two clients back to back);
- per operation: Anvil server CPU (all nodes, psutil) and PostgreSQL CPU (the postmaster and every
  backend, psutil), in microseconds;
- the watch delay across nodes (two nodes only): p50/p99 from a write acknowledged by node A to
  its event on a watch stream of node B, over 200 writes.

The load generator is bench/objects.py's (client processes speaking raw HTTP/1.1 over keep-alive
sockets). On a 2-core machine every process competes for the same cores: this measures overhead
per operation, not speedup. From the per-operation CPU the report predicts 8 nodes (see
`prediction` in the output and docs/scale-out.md). Prints one JSON document.

    python bench/cluster.py [--reps 3]   # 5 s per phase; each figure as min, median and every run
    python bench/cluster.py --quick      # 2 s per phase
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

import objects as load  # noqa: E402 - bench/objects.py: the load generator
from anvil.client import AnvilClient, exchange_token  # noqa: E402
from anvil.devcluster import Node, PostgresServer, free_port, migrate, pg_bin_dir  # noqa: E402

os.environ.setdefault("ANVIL_BENCH_SMALL_SIZE", "1024")
CONNS = 4  # per client process; two client processes
LIST_KEYS = 2000


def _cpu(pids: list[int]) -> dict[int, float]:
    import psutil

    out: dict[int, float] = {}
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            out[pid] = t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return out


class CpuMeter:
    """CPU seconds of the Anvil nodes and of PostgreSQL (postmaster and backends, re-listed at the end:
    a backend that appeared during the phase counts from zero)."""

    def __init__(self, nodes: list[Node], pg: PostgresServer | None):
        self.nodes = [n.proc.pid for n in nodes if n.proc is not None]
        self.pg = pg

    def __enter__(self) -> CpuMeter:
        self.node0 = _cpu(self.nodes)
        self.pg0 = _cpu(self.pg.pids()) if self.pg else {}
        return self

    def __exit__(self, *exc: object) -> None:
        node1 = _cpu(self.nodes)
        pg1 = _cpu(self.pg.pids()) if self.pg else {}
        self.node_s = sum(t - self.node0.get(p, 0.0) for p, t in node1.items())
        self.pg_s = sum(t - self.pg0.get(p, 0.0) for p, t in pg1.items())


def _phase(gens: list[load.LoadGenerator], ports: list[int], bucket: str, op: str,
           keys: list[list[str]], seconds: float) -> dict[str, Any]:
    """Each generator drives its port (one node: both drive the same one) at once."""
    results: list[dict[str, Any]] = [{} for _ in gens]

    def run(i: int) -> None:
        results[i] = gens[i].run(ports[i % len(ports)], bucket, op, keys[i * CONNS:(i + 1) * CONNS], seconds)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(gens))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ops = sum(r["ops"] for r in results)
    secs = max(r["seconds"] for r in results)
    p99 = max(r["latency_ms"]["p99"] for r in results)
    return {"ops": ops, "errors": sum(r["errors"] for r in results), "ops_per_s": round(ops / secs, 1),
            "latency_p99_ms": p99, "written": [k for r in results for k in r["written"]]}


def _listing(ports: list[int], token: str, bucket: str, seconds: float) -> dict[str, Any]:
    import httpx

    counts = [0, 0]
    deadline = time.monotonic() + seconds

    def run(i: int) -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{ports[i % len(ports)]}",
                          headers={"authorization": f"Bearer {token}"}, timeout=30) as c:
            while time.monotonic() < deadline:
                r = c.get(f"/anvil/v1/buckets/{bucket}/objects", params={"limit": 1000})
                assert r.status_code == 200 and len(r.json()["objects"]) == 1000, r.text[:200]
                counts[i] += 1

    t0 = time.monotonic()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"ops": sum(counts), "ops_per_s": round(sum(counts) / (time.monotonic() - t0), 1)}


def _watch_delay(a: str, b: str, cred: dict[str, str], n: int = 200) -> dict[str, float]:
    ca = AnvilClient(a, client_id=cred["client_id"], client_secret=cred["client_secret"])
    cb = AnvilClient(b, client_id=cred["client_id"], client_secret=cred["client_secret"])
    bucket = f"watch-{os.getpid()}"
    ca.create_bucket(bucket)
    acked: dict[str, float] = {}
    seen: dict[str, float] = {}
    stream = cb.watch(bucket, after=cb.health()["journal"]["seq"], heartbeat=1)
    done = threading.Event()

    def read() -> None:
        for ev in stream:
            if ev.get("kind") == "object.put":
                seen[ev["key"]] = time.monotonic()
                if len(seen) == n:
                    break
        done.set()

    threading.Thread(target=read, daemon=True).start()
    for i in range(n):
        ca.put_object(bucket, f"k{i:04d}", b"x")
        acked[f"k{i:04d}"] = time.monotonic()
    done.wait(60)
    stream.close()
    ca.close()
    cb.close()
    d = sorted(max(0.0, seen[k] - acked[k]) * 1000 for k in seen)
    return {"writes": n, "delivered": len(d), "p50_ms": round(statistics.median(d), 2),
            "p99_ms": round(d[int(0.99 * len(d)) - 1], 2), "max_ms": round(d[-1], 2)}


def run_config(name: str, root: Path, seconds: float, pg: PostgresServer | None, nodes: int) -> dict[str, Any]:
    url = ""
    if pg is not None:
        url = pg.new_database()
        migrate(url)
    started: list[Node] = []
    gens: list[load.LoadGenerator] = []
    try:
        for i in range(nodes):
            path = root / name / f"node-{i}"
            if started:
                path.mkdir(parents=True)
                shutil.copytree(started[0].storage_path / "secrets", path / "secrets")
            started.append(Node(path, free_port(), url).start())
        cred = json.loads((started[0].storage_path / "bootstrap" / "first-admin.json").read_text())
        endpoint = started[0].endpoint
        token = exchange_token(endpoint, cred["client_id"], cred["client_secret"])["access_token"]
        os.environ[load.TOKEN_ENV] = token  # read by the client processes spawned next
        gens = [load.LoadGenerator(1, CONNS) for _ in range(2)]
        ports = [n.port for n in started]
        with AnvilClient(endpoint, client_id=cred["client_id"], client_secret=cred["client_secret"]) as c:
            bucket, listed = f"bench-{name}", f"list-{name}"
            c.create_bucket(bucket)
            c.create_bucket(listed)
        out: dict[str, Any] = {"nodes": nodes, "records": "postgresql" if pg else "embedded"}
        prefixes = [[f"c{i}-"] for i in range(2 * CONNS)]
        with CpuMeter(started, pg) as cpu:
            put = _phase(gens, ports, bucket, "put", prefixes, seconds)
        written = put.pop("written")
        out["put"] = {**put, **_per_op(cpu, put["ops"])}
        keys = [w or ["c0-0"] for w in written]
        with CpuMeter(started, pg) as cpu:
            get = _phase(gens, ports, bucket, "get", keys, seconds)
        get.pop("written")
        out["get"] = {**get, **_per_op(cpu, get["ops"])}
        total, rnd = 0, 0
        while total < LIST_KEYS:  # the listed bucket: at least LIST_KEYS keys
            total += _phase(gens[:1], ports[:1], listed, "put", [[f"r{rnd}c{i}-"] for i in range(CONNS)], 1.0)["ops"]
            rnd += 1
        with CpuMeter(started, pg) as cpu:
            lst = _listing(ports, token, listed, seconds)
        out["list_1000"] = {**lst, **_per_op(cpu, lst["ops"])}
        if nodes >= 2:
            out["watch_across_nodes"] = _watch_delay(started[0].endpoint, started[1].endpoint, cred)
        return out
    finally:
        for g in gens:
            g.close()
        for n in started:
            n.stop()


def _per_op(cpu: CpuMeter, ops: int) -> dict[str, float]:
    if not ops:
        return {"anvil_cpu_us_per_op": 0.0, "postgres_cpu_us_per_op": 0.0}
    return {"anvil_cpu_us_per_op": round(cpu.node_s / ops * 1e6, 1),
            "postgres_cpu_us_per_op": round(cpu.pg_s / ops * 1e6, 1)}


def predict(results: dict[str, Any], pg_cores: int = 8, node_cores: int = 2) -> dict[str, Any]:
    """8 nodes of `node_cores` cores each over one PostgreSQL of `pg_cores` cores, from the CPU each
    operation costs: the ceiling is whichever side saturates first. Writes also serialise on the
    journal lock (one batch at a time across all nodes): group commit keeps that from binding
    while batches fill, which is why the write line names it."""
    two = results.get("postgresql_2_nodes") or results.get("postgresql_1_node")
    if not two:
        return {}
    out: dict[str, Any] = {"assumes": f"8 nodes x {node_cores} cores, PostgreSQL on {pg_cores} cores, "
                                      "CPU-bound (no network or disk limit), per-op CPU as measured here"}
    for op in ("put", "get", "list_1000"):
        r = two[op]
        anvil_us, pg_us = r["anvil_cpu_us_per_op"], r["postgres_cpu_us_per_op"]
        nodes_cap = 8 * node_cores / (anvil_us / 1e6) if anvil_us else float("inf")
        pg_cap = pg_cores / (pg_us / 1e6) if pg_us else float("inf")
        out[op] = {"nodes_ops_per_s": round(nodes_cap), "postgres_ops_per_s": round(pg_cap),
                   "predicted_ops_per_s": round(min(nodes_cap, pg_cap)),
                   "bound_by": "postgres" if pg_cap < nodes_cap else "anvil nodes"}
    return out


def _aggregate(runs: list[Any]) -> tuple[Any, Any]:
    """Figures of repeated runs: every number becomes {min, median, runs}; also the medians alone."""
    first = runs[0]
    if isinstance(first, dict):
        pairs = {k: _aggregate([r[k] for r in runs if k in r]) for k in first}
        return {k: v[0] for k, v in pairs.items()}, {k: v[1] for k, v in pairs.items()}
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        med = statistics.median(runs)
        return {"min": min(runs), "median": med, "runs": runs}, med
    return first, first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 s per phase")
    ap.add_argument("--reps", type=int, default=3, help="repetitions, the configurations interleaved")
    args = ap.parse_args()
    seconds = 2.0 if args.quick else 5.0
    bin_dir = pg_bin_dir()
    if bin_dir is None:
        sys.exit("bench/cluster.py needs PostgreSQL binaries: apt-get install postgresql")
    root = Path(tempfile.mkdtemp(prefix="anvil-bench-cluster-"))
    pg = PostgresServer(bin_dir, free_port()).start()
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                           "load_average_before": list(os.getloadavg())},
                               "seconds_per_phase": seconds, "reps": args.reps,
                               "body_bytes": int(os.environ["ANVIL_BENCH_SMALL_SIZE"])}
    configs = [("embedded", "embedded", None, 1), ("postgresql_1_node", "pg1", pg, 1),
               ("postgresql_2_nodes", "pg2", pg, 2)]
    runs: dict[str, list[Any]] = {key: [] for key, *_ in configs}
    try:
        # Interleaved, the order rotating each repetition, so a change in the shared machine's load
        # hits every configuration alike.
        for rep in range(args.reps):
            for key, name, server, nodes in configs[rep % 3:] + configs[:rep % 3]:
                runs[key].append(run_config(f"{name}-r{rep}", root, seconds, server, nodes))
        medians = {}
        for key, got in runs.items():
            results[key], medians[key] = _aggregate(got)
        results["prediction_8_nodes"] = predict(medians)
    finally:
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)
    results["machine"]["load_average_after"] = list(os.getloadavg())
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
