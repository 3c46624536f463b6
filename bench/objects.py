"""Object store benchmark: small PUT/GET throughput, large streaming, server RSS, physical reference.

Starts a real `anvil serve` on a temporary STORAGE_PATH and a free loopback port, then drives it
with a load generator that is not the bottleneck: several client processes, each speaking raw
HTTP/1.1 over keep-alive sockets from an asyncio loop (httpx's async client tops out near
1.2k req/s on this kind of machine). Beside the server figures it times the same small-write
workload done by a plain Python loop writing files with fsync (the physical reference), so the
ratio means something on whatever disk runs it. Prints one JSON document.

    python bench/objects.py            # full run (well under 2 minutes)
    python bench/objects.py --quick    # smoke run (a few seconds of load)
    python bench/objects.py --large    # 256 MiB PUT/GET and the machine's ceilings (bench/largeput.py)
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import multiprocessing as mp
import os
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# bench/inline.py varies it (read again by each spawned client process).
SMALL_SIZE = int(os.environ.get("ANVIL_BENCH_SMALL_SIZE", "4096"))
MIB = 1024 * 1024

TARGETS = {"put_ops_per_s": 1000.0, "get_ops_per_s": 3000.0, "large_put_mb_per_s": 200.0,
           "large_get_mb_per_s": 200.0}
# "Flat in object size": going from the probe object to the large one (8x bigger) may not grow the
# server's peak RSS by more than this.
RSS_FLAT_TOLERANCE_MIB = 32.0
TOKEN_ENV = "ANVIL_BENCH_TOKEN"


# ----------------------------------------------------------------------------- raw HTTP/1.1


def _request_head(method: str, path: str, length: int | None = None) -> bytes:
    # Every request is authenticated like a real client's: a bearer token obtained once by the
    # parent (client processes inherit it through the environment).
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Authorization: Bearer {os.environ[TOKEN_ENV]}"]
    if length is not None:
        lines += [f"Content-Length: {length}", "Content-Type: application/octet-stream"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _parse_head(head: bytes) -> tuple[int, int]:
    """(status, content-length) from a response head; the server always sends a length here."""
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return status, length


def _object_path(bucket: str, key: str) -> str:
    return f"/anvil/v1/buckets/{bucket}/object?key={urllib.parse.quote(key, safe='')}"


async def _connection(port: int, bucket: str, op: str, keys: list[str], start_at: float, deadline: float,
                      seed: bytes) -> dict[str, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.transport.set_write_buffer_limits(high=1 << 20)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    now = time.monotonic()
    if start_at > now:
        await asyncio.sleep(start_at - now)
    done = errors = 0
    latencies: list[float] = []
    written: list[str] = []
    i = 0
    last = time.monotonic()
    while last < deadline:
        if op == "put":
            key = f"{keys[0]}{i}"
            # Unique bytes per object: identical bodies would dedup in the content-addressed store.
            body = hashlib.sha256(seed + i.to_bytes(8, "big")).digest() * (SMALL_SIZE // 32)
            payload = _request_head("PUT", _object_path(bucket, key), len(body)) + body
        else:
            key = keys[i % len(keys)]
            payload = _request_head("GET", _object_path(bucket, key))
        i += 1
        t0 = time.perf_counter()
        writer.write(payload)
        head = await reader.readuntil(b"\r\n\r\n")
        status, length = _parse_head(head)
        body_in = await reader.readexactly(length) if length else b""
        latencies.append(time.perf_counter() - t0)
        last = time.monotonic()
        if status == 200 and (op == "put" or len(body_in) == SMALL_SIZE):
            done += 1
            if op == "put":
                written.append(key)
        else:
            errors += 1
    writer.close()
    return {"done": done, "errors": errors, "latencies": latencies, "end": last, "written": written}


def _worker(inq: mp.Queue, outq: mp.Queue) -> None:
    """One client process: runs each phase it is sent on a few keep-alive connections."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    while True:
        cmd = inq.get()
        if cmd is None:
            return
        t_cpu = time.process_time()

        async def phase(cmd: dict[str, Any] = cmd) -> list[dict[str, Any]]:
            tasks = [
                _connection(cmd["port"], cmd["bucket"], cmd["op"], conn_keys, cmd["start_at"], cmd["deadline"],
                            os.urandom(16))
                for conn_keys in cmd["keys"]
            ]
            return await asyncio.gather(*tasks)

        results = asyncio.run(phase())
        outq.put({"conns": results, "cpu_s": time.process_time() - t_cpu})


class LoadGenerator:
    def __init__(self, processes: int, conns_per_process: int):
        ctx = mp.get_context("spawn")
        self.conns_per_process = conns_per_process
        self.started = False
        self.outq: mp.Queue = ctx.Queue()
        self.inqs: list[mp.Queue] = [ctx.Queue() for _ in range(processes)]
        self.procs = [ctx.Process(target=_worker, args=(q, self.outq), daemon=True) for q in self.inqs]
        for p in self.procs:
            p.start()

    def run(self, port: int, bucket: str, op: str, keys_per_conn: list[list[str]], seconds: float) -> dict[str, Any]:
        # The first phase waits for the spawned workers' imports; later ones only for a queue message
        # and a connect (a second per phase was idle time, most of a quick run's).
        start_at = time.monotonic() + (1.0 if not self.started else 0.3)
        self.started = True
        deadline = start_at + seconds
        n = self.conns_per_process
        for w, q in enumerate(self.inqs):
            q.put({"port": port, "bucket": bucket, "op": op, "keys": keys_per_conn[w * n:(w + 1) * n],
                   "start_at": start_at, "deadline": deadline})
        outs = [self.outq.get(timeout=seconds + 60) for _ in self.inqs]
        conns = [c for o in outs for c in o["conns"]]
        done = sum(c["done"] for c in conns)
        errors = sum(c["errors"] for c in conns)
        elapsed = max(c["end"] for c in conns) - start_at
        lat = sorted(x for c in conns for x in c["latencies"])

        def pct(p: float) -> float:
            return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 3) if lat else 0.0

        return {
            "ops": done, "errors": errors, "seconds": round(elapsed, 3),
            "ops_per_s": round(done / elapsed, 1) if elapsed > 0 else 0.0,
            "latency_ms": {"p50": pct(0.50), "p99": pct(0.99), "max": pct(1.0)},
            "client_cpu_s": round(sum(o["cpu_s"] for o in outs), 3),
            "written": [c["written"] for c in conns],
        }

    def close(self) -> None:
        for q in self.inqs:
            q.put(None)
        for p in self.procs:
            p.join(10)


# ----------------------------------------------------------------------------- server sampling


class Sampler:
    """Samples the server's RSS and CPU time while a workload runs (psutil on the server pid)."""

    def __init__(self, pid: int, interval: float = 0.01):
        import psutil

        self.proc = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    def rss(self) -> int:
        return self.proc.memory_info().rss

    def __enter__(self) -> Sampler:
        self.peak = self.rss()
        cpu = self.proc.cpu_times()
        self._cpu0 = cpu.user + cpu.system
        self._threads0 = self._thread_cpu()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())
        cpu = self.proc.cpu_times()
        self.cpu_s = cpu.user + cpu.system - self._cpu0
        after = self._thread_cpu()
        # The busiest thread's share: the server's Python runs under one GIL, mostly on the event
        # loop's thread, so that thread's CPU per request bounds the rate whatever the cores.
        self.busiest_thread_cpu_s = max((t - self._threads0.get(tid, 0.0) for tid, t in after.items()), default=0.0)

    def _thread_cpu(self) -> dict[int, float]:
        return {t.id: t.user_time + t.system_time for t in self.proc.threads()}

    def figures(self) -> dict[str, float]:
        return {"server_peak_rss_mib": round(self.peak / MIB, 1), "server_cpu_s": round(self.cpu_s, 3),
                "server_busiest_thread_cpu_s": round(self.busiest_thread_cpu_s, 3)}


# ----------------------------------------------------------------------------- large objects


def _large_put(port: int, bucket: str, key: str, size: int) -> float:
    block = os.urandom(MIB)
    with socket.create_connection(("127.0.0.1", port)) as s:
        t0 = time.perf_counter()
        s.sendall(_request_head("PUT", _object_path(bucket, key), size))
        sent = 0
        while sent < size:
            n = min(MIB, size - sent)
            s.sendall(memoryview(block)[:n])
            sent += n
        status, length, _ = _read_response(s, keep=True)
        elapsed = time.perf_counter() - t0
    if status != 200:
        raise RuntimeError(f"large PUT failed with {status}")
    return elapsed


def _large_get(port: int, bucket: str, key: str, size: int) -> float:
    with socket.create_connection(("127.0.0.1", port)) as s:
        t0 = time.perf_counter()
        s.sendall(_request_head("GET", _object_path(bucket, key)))
        status, length, received = _read_response(s, keep=False)
        elapsed = time.perf_counter() - t0
    if status != 200 or length != size or received != size:
        raise RuntimeError(f"large GET failed: status {status}, {received} of {size} bytes")
    return elapsed


def _read_response(s: socket.socket, *, keep: bool) -> tuple[int, int, int]:
    """Read one response; the body is counted and dropped unless `keep` (small bodies only)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = s.recv(65536)
        if not data:
            raise RuntimeError("connection closed before the response head")
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    status, length = _parse_head(head + b"\r\n")
    received = len(rest)
    sink = bytearray(4 * MIB)
    while received < length:
        n = s.recv_into(sink)
        if not n:
            break
        received += n
    return status, length, received


# ----------------------------------------------------------------------------- physical reference


def _fsync_reference(directory: Path, seconds: float, threads: int) -> dict[str, Any]:
    """The same small writes with no server: write a unique 4 KiB file, fsync it, close."""
    directory.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + seconds
    counts = [0] * threads

    def loop(t: int) -> None:
        seed = os.urandom(16)
        i = 0
        while time.monotonic() < deadline:
            body = hashlib.sha256(seed + i.to_bytes(8, "big")).digest() * (SMALL_SIZE // 32)
            fd = os.open(directory / f"{t}-{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, body)
                os.fsync(fd)
            finally:
                os.close(fd)
            i += 1
        counts[t] = i

    t0 = time.monotonic()
    if threads == 1:
        loop(0)
    else:
        workers = [threading.Thread(target=loop, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    elapsed = time.monotonic() - t0
    return {"ops": sum(counts), "seconds": round(elapsed, 3), "ops_per_s": round(sum(counts) / elapsed, 1),
            "threads": threads}


# ----------------------------------------------------------------------------- main


def _cpu_bound(put: dict[str, Any], ref_loop: dict[str, Any]) -> dict[str, Any]:
    """What the CPU a small PUT costs (server and load generator, this run) allows on this machine's
    cores with no waiting at all, against twice the fsync loop (the issue's target): when the
    ceiling is below it, the target needs less CPU per PUT, not a faster disk."""
    cores = os.cpu_count() or 1
    ops = max(put["ops"], 1)
    server_ms, client_ms = 1000 * put["server_cpu_s"] / ops, 1000 * put["client_cpu_s"] / ops
    ceiling = cores * 1000 / (server_ms + client_ms)
    thread_ms = 1000 * put["server_busiest_thread_cpu_s"] / ops
    twice_loop = 2 * ref_loop["ops_per_s_median"]
    return {"server_cpu_ms_per_put": round(server_ms, 3), "client_cpu_ms_per_put": round(client_ms, 3),
            "cores": cores, "ceiling_ops_per_s": round(ceiling),
            # one thread (the event loop's) cannot run faster than one core: its own ceiling
            "busiest_thread_cpu_ms_per_put": round(thread_ms, 3),
            "busiest_thread_ceiling_ops_per_s": round(1000 / thread_ms) if thread_ms else None,
            "twice_fsync_loop_ops_per_s": round(twice_loop),
            "server_cpu_ms_needed_for_twice_loop": round(cores * 1000 / twice_loop - client_ms, 3)}


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median ops/s, with the min, median and every run's ops/s beside it."""
    rates = [r["ops_per_s"] for r in runs]
    mid = sorted(runs, key=lambda r: r["ops_per_s"])[(len(runs) - 1) // 2]
    return {**mid, "ops_per_s_min": min(rates), "ops_per_s_median": round(statistics.median(rates), 1),
            "ops_per_s_runs": rates}


def run(quick: bool, reps: int | None = None) -> dict[str, Any]:
    """Small PUT/GET on the server and the fsync references are interleaved over `reps` repetitions
    (default 3, quick 1), the order alternating (server first, then references first), so a change
    in the shared machine's load hits both; each figure is the median run, with min and median."""
    sys.path.insert(0, str(ROOT))
    reps = reps or (1 if quick else 3)
    from tests.helpers import AnvilServer

    processes, conns_per_process = 2, 4
    seconds = 0.3 if quick else 5.0
    warmup = 0.2 if quick else 0.5
    load_before = os.getloadavg()
    large = (16 if quick else 256) * MIB
    probe = large // 8

    with tempfile.TemporaryDirectory(prefix="anvil-bench-") as tmp:
        tmp_path = Path(tmp)
        # The server runs the code of this checkout, whatever is installed in the venv.
        pythonpath = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
        server = AnvilServer(tmp_path / "data", env={"PYTHONPATH": pythonpath}).start()
        os.environ[TOKEN_ENV] = server.auth_headers()["authorization"].removeprefix("Bearer ")
        load = LoadGenerator(processes, conns_per_process)
        try:
            with server.client() as c:
                c.create_bucket("bench")
            port = server.port
            assert server.proc is not None
            pid = server.proc.pid
            clients = processes * conns_per_process
            baseline_rss = Sampler(pid).rss()

            # Warm-up (not measured): imports, thread pools, SQLite pages.
            load.run(port, "bench", "put", [[f"warm/{n}/"] for n in range(clients)], warmup)

            def small(rep: int) -> tuple[dict[str, Any], dict[str, Any]]:
                with Sampler(pid) as s_put:
                    put = load.run(port, "bench", "put", [[f"small{rep}/{n}/"] for n in range(clients)], seconds)
                put.update(s_put.figures(), server_cpu_ms_per_op=round(1000 * s_put.cpu_s / max(put["ops"], 1), 3))
                keys = [k for conn in put.pop("written") for k in conn]
                per_conn = [keys[n::clients] for n in range(clients)]
                with Sampler(pid) as s_get:
                    get = load.run(port, "bench", "get", per_conn, seconds)
                get.pop("written")
                get.update(s_get.figures(), server_cpu_ms_per_op=round(1000 * s_get.cpu_s / max(get["ops"], 1), 3))
                return put, get

            def references(rep: int) -> tuple[dict[str, Any], dict[str, Any]]:
                return (_fsync_reference(tmp_path / f"ref-loop-{rep}", seconds, 1),
                        _fsync_reference(tmp_path / f"ref-threads-{rep}", seconds, clients))

            puts, gets, loops, threads = [], [], [], []
            for rep in range(reps):
                if rep % 2:
                    (a, b), (p, g) = references(rep), small(rep)
                else:
                    (p, g), (a, b) = small(rep), references(rep)
                puts.append(p)
                gets.append(g)
                loops.append(a)
                threads.append(b)
            put, get = _median_run(puts), _median_run(gets)
            ref_loop, ref_threads = _median_run(loops), _median_run(threads)

            large_fig: dict[str, Any] = {"size_bytes": large, "probe_size_bytes": probe}
            for label, size in (("probe", probe), ("large", large)):
                with Sampler(pid) as s_lput:
                    t_put = _large_put(port, "bench", f"{label}-object", size)
                with Sampler(pid) as s_lget:
                    t_get = _large_get(port, "bench", f"{label}-object", size)
                large_fig[label] = {
                    "put": {"seconds": round(t_put, 3), "mb_per_s": round(size / 1e6 / t_put, 1), **s_lput.figures()},
                    "get": {"seconds": round(t_get, 3), "mb_per_s": round(size / 1e6 / t_get, 1), **s_lget.figures()},
                }
        finally:
            load.close()
            server.stop()

    peak_probe = max(large_fig["probe"]["put"]["server_peak_rss_mib"], large_fig["probe"]["get"]["server_peak_rss_mib"])
    peak_large = max(large_fig["large"]["put"]["server_peak_rss_mib"], large_fig["large"]["get"]["server_peak_rss_mib"])
    rss = {
        "baseline_mib": round(baseline_rss / MIB, 1),
        "peak_small_put_mib": put["server_peak_rss_mib"],
        "peak_small_get_mib": get["server_peak_rss_mib"],
        "peak_probe_object_mib": peak_probe,
        "peak_large_object_mib": peak_large,
        "growth_probe_to_large_mib": round(peak_large - peak_probe, 1),
    }
    lput = large_fig["large"]["put"]["mb_per_s"]
    lget = large_fig["large"]["get"]["mb_per_s"]

    def target(value: float, goal: float) -> dict[str, Any]:
        return {"value": value, "target": goal, "met": value >= goal}

    targets = {
        "put_ops_per_s": target(put["ops_per_s"], TARGETS["put_ops_per_s"]),
        "get_ops_per_s": target(get["ops_per_s"], TARGETS["get_ops_per_s"]),
        "large_put_mb_per_s": target(lput, TARGETS["large_put_mb_per_s"]),
        "large_get_mb_per_s": target(lget, TARGETS["large_get_mb_per_s"]),
        "rss_flat_in_object_size": {
            "value": rss["growth_probe_to_large_mib"], "target": f"< {RSS_FLAT_TOLERANCE_MIB} MiB growth from "
            f"{probe // MIB} MiB to {large // MIB} MiB object", "met": rss["growth_probe_to_large_mib"]
            < RSS_FLAT_TOLERANCE_MIB,
        },
        "no_errors": {"value": put["errors"] + get["errors"], "target": 0, "met": put["errors"] + get["errors"] == 0},
    }
    targets["all_met"] = all(t["met"] for t in targets.values())
    return {
        "benchmark": "objects",
        "quick": quick,
        "machine": {
            "cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            # A busy shared machine moves every absolute figure; the same-run ratios move less.
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        },
        "config": {
            "clients": clients, "client_processes": processes, "small_object_bytes": SMALL_SIZE, "reps": reps,
            "seconds_per_small_workload": seconds, "durability": "blob fsync + directory fsync, then SQLite "
            "WAL commit with synchronous=FULL (group commit), all before the response",
        },
        "small": {"put": put, "get": get},
        "large": large_fig,
        "rss": rss,
        "reference": {"fsync_loop": ref_loop, "fsync_threads": ref_threads},
        "ratios": {
            # Medians over the interleaved repetitions.
            "put_vs_fsync_loop": round(put["ops_per_s_median"] / ref_loop["ops_per_s_median"], 3),
            "put_vs_fsync_threads": round(put["ops_per_s_median"] / ref_threads["ops_per_s_median"], 3),
        },
        "put_cpu_bound": _cpu_bound(put, ref_loop),
        "targets": targets,
    }


def compare_large_get(variants: dict[str, str], *, size_mib: int, rounds: int, gets: int) -> dict[str, Any]:
    """Large-GET MB/s of several checkouts side by side (e.g. main vs this branch).

    One server per variant (`NAME=SRC_DIR`: the `src` folder whose code it runs), all running at
    once on their own STORAGE_PATH, each holding the same object. Every round does `gets` GETs on
    each server in turn, interleaved, so a busy shared machine slows every variant alike; a
    round's figure is its median GET. Reported: each round, and the min and median of rounds.
    """
    sys.path.insert(0, str(ROOT))
    from tests.helpers import AnvilServer

    size = size_mib * MIB
    load_before = os.getloadavg()
    servers: dict[str, Any] = {}
    tokens: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="anvil-bench-cmp-") as tmp:
        try:
            for name, src in variants.items():
                (Path(tmp) / name).mkdir()
                srv = AnvilServer(Path(tmp) / name / "data", env={"PYTHONPATH": str(Path(src).absolute())}).start()
                servers[name] = srv
                tokens[name] = srv.auth_headers()["authorization"].removeprefix("Bearer ")
                with srv.client() as c:
                    c.create_bucket("bench")
                os.environ[TOKEN_ENV] = tokens[name]
                _large_put(srv.port, "bench", "large-object", size)
                _large_get(srv.port, "bench", "large-object", size)  # warm the page cache
            per_round: dict[str, list[float]] = {name: [] for name in variants}
            # Server CPU per GiB served: on a busy machine it moves far less than wall-clock MB/s.
            import psutil

            cpu: dict[str, list[float]] = {name: [] for name in variants}
            procs = {name: psutil.Process(srv.proc.pid) for name, srv in servers.items()}
            for _ in range(rounds):
                times: dict[str, list[float]] = {name: [] for name in variants}
                for _ in range(gets):
                    for name, srv in servers.items():
                        os.environ[TOKEN_ENV] = tokens[name]
                        c0 = sum(procs[name].cpu_times()[:2])
                        times[name].append(_large_get(srv.port, "bench", "large-object", size))
                        cpu[name].append(sum(procs[name].cpu_times()[:2]) - c0)
                for name, ts in times.items():
                    per_round[name].append(round(size / 1e6 / sorted(ts)[len(ts) // 2], 1))
        finally:
            for srv in servers.values():
                srv.stop()
    out: dict[str, Any] = {
        "benchmark": "large-get-compare", "size_bytes": size, "rounds": rounds, "gets_per_round": gets,
        "machine": {"cpus": os.cpu_count(), "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "variants": {},
    }
    for name, figs in per_round.items():
        srt = sorted(figs)
        out["variants"][name] = {"src": variants[name], "rounds_mb_per_s": figs, "min_mb_per_s": srt[0],
                                 "median_mb_per_s": srt[len(srt) // 2],
                                 # Summed over every GET: the 10 ms tick of CPU accounting averages out.
                                 "server_cpu_s_per_gib": round(sum(cpu[name]) / (len(cpu[name]) * size / 2**30), 3)}
    first = next(iter(per_round))
    base = out["variants"][first]["median_mb_per_s"]
    for name in per_round:
        out["variants"][name]["median_vs_" + first] = round(out["variants"][name]["median_mb_per_s"] / base, 3)
    return out


def main() -> None:
    if "--large" in sys.argv[1:]:
        # The 256 MiB PUT/GET against this machine's ceilings, measured in the same run (bench/largeput.py).
        import largeput

        largeput.main([a for a in sys.argv[1:] if a != "--large"])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 0.3 s workloads, 16 MiB large object")
    parser.add_argument("--compare-large", metavar="NAME=SRC_DIR", action="append", default=[],
                        help="only compare large-GET MB/s of these checkouts' src folders (repeat; the first "
                        "is the baseline), e.g. --compare-large main=../main/src --compare-large branch=src")
    parser.add_argument("--rounds", type=int, default=3, help="rounds for --compare-large")
    parser.add_argument("--gets", type=int, default=5, help="GETs per server per round for --compare-large")
    parser.add_argument("--size-mib", type=int, default=256, help="object size for --compare-large")
    parser.add_argument("--reps", type=int, default=None,
                        help="interleaved repetitions of small PUT/GET and the fsync references (default 3; quick 1)")
    args = parser.parse_args()
    if args.compare_large:
        variants = dict(v.split("=", 1) for v in args.compare_large)
        print(json.dumps(compare_large_get(variants, size_mib=args.size_mib, rounds=args.rounds, gets=args.gets),
                         indent=2))
        return
    print(json.dumps(run(args.quick, args.reps), indent=2))


if __name__ == "__main__":
    main()
