"""Watch stream benchmark: delivery rate to 1 and 50 watchers under a writer, and write-to-event latency.

Starts a real server on a temporary STORAGE_PATH. The writer (its own process, raw asyncio
HTTP/1.1 keep-alive connections) PUTs small objects; watchers are raw asyncio SSE readers in
this process, so neither httpx nor the SDK is the bottleneck. Prints one JSON document.

Latency is measured from the event's `time` (taken by the server when the mutation starts,
before its commit) to the moment a watcher reads the event; the peer in the same run is the
writer's own acknowledged-PUT latency over the same period.

    python bench/watch.py [--seconds 4] [--rate 500] [--watchers 50]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

TIME_RE = re.compile(rb'"time":([0-9.e+]+)')
SEQ_RE = re.compile(rb'"seq":(\d+)')
RECORDING = 10  # watchers that parse every event for latency and order; the rest only count


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: Path, port: int) -> subprocess.Popen:
    log = open(root / "server.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "anvil.cli.main", "serve", "--storage-path", str(root / "data"),
                             "--listen", f"127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/anvil/health/live", timeout=1)
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("server did not start")


def auth_header() -> str:
    """Every request is authenticated (a bearer token of the first admin; child processes inherit it)."""
    return f"Authorization: Bearer {os.environ['ANVIL_BENCH_TOKEN']}\r\n"


def login(root: Path, port: int) -> None:
    from anvil.client import exchange_token

    cred = json.loads((root / "data" / "bootstrap" / "first-admin.json").read_text())
    token = exchange_token(f"http://127.0.0.1:{port}", cred["client_id"], cred["client_secret"])["access_token"]
    os.environ["ANVIL_BENCH_TOKEN"] = token


def request(port: int, method: str, path: str, body: bytes = b"") -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body or None, method=method,
                                 headers={"Authorization": f"Bearer {os.environ['ANVIL_BENCH_TOKEN']}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"{}")


# ------------------------------------------------------------------ writer (own process)


async def _writer(port: int, bucket: str, seconds: float, rate: float | None, conns: int) -> dict:
    sent = 0
    acks: list[float] = []
    stop_at = time.monotonic() + seconds
    interval = conns / rate if rate else 0.0

    async def conn_loop(c: int) -> None:
        nonlocal sent
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        next_at = time.monotonic() + (interval * c / conns if rate else 0)
        i = 0
        while time.monotonic() < stop_at:
            if rate:
                delay = next_at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                next_at += interval
            key = f"w{c}-{i}"
            i += 1
            t0 = time.monotonic()
            writer.write(f"PUT /anvil/v1/buckets/{bucket}/object?key={key} HTTP/1.1\r\nHost: b\r\n{auth_header()}"
                         f"Content-Length: 16\r\n\r\n".encode() + b"0123456789abcdef")
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
            await reader.readexactly(length)
            if not head.startswith(b"HTTP/1.1 2"):
                raise RuntimeError(head.decode(errors="replace"))
            acks.append(time.monotonic() - t0)
            sent += 1
        writer.close()

    t0 = time.monotonic()
    await asyncio.gather(*(conn_loop(c) for c in range(conns)))
    elapsed = time.monotonic() - t0
    acks.sort()
    return {"writes": sent, "seconds": elapsed, "ack_p50_ms": 1000 * acks[len(acks) // 2],
            "ack_p99_ms": 1000 * acks[int(len(acks) * 0.99)]}


def writer_process(port: int, bucket: str, seconds: float, rate: float | None, conns: int, out: mp.Queue) -> None:
    out.put(asyncio.run(_writer(port, bucket, seconds, rate, conns)))


# ------------------------------------------------------------------ watchers (this process)


class Watcher:
    def __init__(self) -> None:
        self.events = 0
        self.latencies: list[float] = []
        self.last_seq = 0
        self.ordered = True

    async def run(self, port: int, bucket: str, after: int, ready: asyncio.Event, record: bool) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET /anvil/v1/watch?bucket={bucket}&after={after}&heartbeat=5 HTTP/1.1\r\n"
                     f"Host: b\r\n{auth_header()}Accept: text/event-stream\r\n\r\n".encode())
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")
        ready.set()
        buf = b""
        try:
            while True:
                chunk = await reader.read(1 << 18)
                if not chunk:
                    return
                now = time.time()
                buf += chunk
                *frames, buf = buf.split(b"\n\n")
                for frame in frames:
                    if b"data: " not in frame:
                        continue
                    self.events += 1
                    if record:
                        # chunked transfer framing may precede the frame: read the seq from the JSON
                        seq = int(SEQ_RE.search(frame).group(1))
                        if seq <= self.last_seq:
                            self.ordered = False
                        self.last_seq = seq
                        t = TIME_RE.search(frame)
                        self.latencies.append(now - float(t.group(1)))
        finally:
            writer.close()


async def run_phase(port: int, bucket: str, watchers: int, seconds: float, rate: float | None,
                    conns: int, record: bool) -> dict:
    after = request(port, "GET", "/anvil/health/ready")["journal"]["seq"]
    ws = [Watcher() for _ in range(watchers)]
    readies = [asyncio.Event() for _ in ws]
    tasks = [asyncio.create_task(w.run(port, bucket, after, r, record and i < RECORDING))
             for i, (w, r) in enumerate(zip(ws, readies, strict=True))]
    await asyncio.gather(*(r.wait() for r in readies))
    q: mp.Queue = mp.Queue()
    proc = mp.Process(target=writer_process, args=(port, bucket, seconds, rate, conns, q))
    t0 = time.monotonic()
    proc.start()
    wres = await asyncio.get_running_loop().run_in_executor(None, q.get)
    proc.join()
    # Let the watchers drain what was written, then measure delivery over the whole phase.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and min(w.events for w in ws) < wres["writes"]:
        await asyncio.sleep(0.02)
    elapsed = time.monotonic() - t0
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    delivered = sum(w.events for w in ws)
    out = {
        "watchers": watchers,
        "writes": wres["writes"],
        "write_rate_per_s": round(wres["writes"] / wres["seconds"], 1),
        "delivered_events": delivered,
        "complete": all(w.events == wres["writes"] for w in ws),
        "ordered": all(w.ordered for w in ws) if record else None,
        "delivered_per_s_total": round(delivered / elapsed, 1),
        "delivered_per_s_per_watcher": round(delivered / watchers / elapsed, 1),
        "write_ack_p50_ms": round(wres["ack_p50_ms"], 2),
        "write_ack_p99_ms": round(wres["ack_p99_ms"], 2),
    }
    if record:
        lat = sorted(x for w in ws for x in w.latencies)
        out["latency_p50_ms"] = round(1000 * statistics.median(lat), 2)
        out["latency_p99_ms"] = round(1000 * lat[int(len(lat) * 0.99)], 2)
        out["latency_max_ms"] = round(1000 * lat[-1], 2)
        out["latency_p99_over_write_ack_p99"] = round(out["latency_p99_ms"] / max(out["write_ack_p99_ms"], 1e-9), 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--rate", type=float, default=500.0)
    ap.add_argument("--watchers", type=int, default=50)
    args = ap.parse_args()
    load_before = [round(x, 2) for x in os.getloadavg()]  # shared machine: how busy it was
    root = Path(tempfile.mkdtemp(prefix="anvil-bench-watch-"))
    port = free_port()
    proc = start_server(root, port)
    try:
        login(root, port)
        request(port, "PUT", "/anvil/v1/buckets/bench", b"{}")

        async def all_phases() -> dict:
            one = await run_phase(port, "bench", 1, args.seconds, None, 8, True)
            many = await run_phase(port, "bench", args.watchers, args.seconds, None, 8, True)
            paced = await run_phase(port, "bench", args.watchers, args.seconds, args.rate, 16, True)
            return {"max_rate_1_watcher": one, f"max_rate_{args.watchers}_watchers": many,
                    f"paced_{int(args.rate)}_writes_per_s_{args.watchers}_watchers": paced}

        result = asyncio.run(all_phases())
        one = result["max_rate_1_watcher"]
        many = result[f"max_rate_{args.watchers}_watchers"]
        paced = result[f"paced_{int(args.rate)}_writes_per_s_{args.watchers}_watchers"]
        result["summary"] = {
            "events_per_s_to_1_watcher": one["delivered_per_s_per_watcher"],
            f"events_per_s_to_{args.watchers}_watchers_total": many["delivered_per_s_total"],
            "delivery_over_write_rate_1_watcher": round(one["delivered_per_s_per_watcher"] /
                                                         max(one["write_rate_per_s"], 1e-9), 2),
            f"delivery_over_write_rate_{args.watchers}_watchers": round(many["delivered_per_s_per_watcher"] /
                                                                         max(many["write_rate_per_s"], 1e-9), 2),
            "paced_write_rate_per_s": paced["write_rate_per_s"],
            "latency_p50_ms": paced["latency_p50_ms"],
            "latency_p99_ms": paced["latency_p99_ms"],
            "target_p99_ms": 50,
            "target_met": paced["latency_p99_ms"] < 50 and paced["complete"],
            "cpu_count": os.cpu_count(),
            "load_average_before": load_before,
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        }
        print(json.dumps(result, indent=2))
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
