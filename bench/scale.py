"""Scale benchmark: does any per-operation cost grow with the number of objects in a bucket?

Starts a real `anvil serve` (the code of this checkout) on a temporary STORAGE_PATH, then loads one
bucket in steps (default 20k, 50k, 100k, 200k objects, small unique bodies, keys spread over 1,000
prefixes `pNNNN/`) with several client processes speaking raw HTTP/1.1 over keep-alive sockets
(as bench/objects.py does: the load generator is not the bottleneck). After each step it measures,
from outside the server:

- the PUT rate of the step;
- GET latency (p50/p99) alone, and while listings run (two clients listing back to back);
- first-page, middle-page and delimiter (1,000 common prefixes) listing times, median of 5;
- full listing throughput (every key, pages of 1,000, native API);
- server RSS at rest, and its peak during the step;
- `GET /anvil/v1/admin/watch/status` time;
- fsck time (online, not deep);
- no-change incremental backup time (`anvil backup create --incremental --endpoint`), after an
  incremental that takes the step's new objects, with the server's RSS peak during the backups
  and its RSS afterwards.

Each figure is also given as growth over the previous step (ratio). Prints one JSON document.

    python bench/scale.py                 # 200,000 objects (several minutes)
    python bench/scale.py --steps 20000,100000,400000
    python bench/scale.py --quick         # smoke run: 2 small steps
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import multiprocessing as mp
import os
import platform
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024
BODY_BYTES = 128
PREFIXES = 1000
TOKEN_ENV = "ANVIL_BENCH_TOKEN"
PASS = "bench passphrase"
# The targets (issue 20), checked at the last step.
TARGETS = {"delimiter_listing_ms": 50.0, "get_p99_while_listing_ms": 5.0, "rss_mib": 200.0,
           "full_listing_keys_per_s": 100_000.0}


def key_of(i: int) -> str:
    return f"p{i % PREFIXES:04d}/k{i:08d}"


def body_of(i: int) -> bytes:
    # Unique bytes per object: identical bodies would be deduplicated into one blob.
    return hashlib.sha256(b"scale" + i.to_bytes(8, "big")).digest() * (BODY_BYTES // 32)


# ----------------------------------------------------------------------------- raw HTTP/1.1 clients


def _head(method: str, path: str, length: int | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Authorization: Bearer {os.environ[TOKEN_ENV]}"]
    if length is not None:
        lines += [f"Content-Length: {length}", "Content-Type: application/octet-stream"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _status_length(head: bytes) -> tuple[int, int]:
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return int(head[9:12]), length


def _path(bucket: str, key: str) -> str:
    return f"/anvil/v1/buckets/{bucket}/object?key={urllib.parse.quote(key, safe='')}"


async def _open(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return reader, writer


async def _conn(cmd: dict[str, Any], indexes: list[int]) -> dict[str, Any]:
    reader, writer = await _open(cmd["port"])
    done = errors = reconnects = 0
    lat: list[float] = []
    rng = random.Random(os.urandom(8))
    put = cmd["op"] == "put"
    deadline = cmd.get("deadline")
    n = 0
    while True:
        if put:
            if n == len(indexes):
                break
            i = indexes[n]
            body = body_of(i)
            payload = _head("PUT", _path(cmd["bucket"], key_of(i)), len(body)) + body
        else:
            if time.monotonic() >= deadline:
                break
            payload = _head("GET", _path(cmd["bucket"], key_of(rng.randrange(cmd["loaded"]))))
        n += 1
        t0 = time.perf_counter()
        try:
            writer.write(payload)
            status, length = _status_length(await reader.readuntil(b"\r\n\r\n"))
            got = await reader.readexactly(length) if length else b""
        except (asyncio.IncompleteReadError, ConnectionError):
            # The server closes a keep-alive connection idle for 5 s; a client process starved that
            # long on a loaded machine finds it closed. Reconnect and send the request again (a PUT
            # of the same key and body, or a GET: both may be repeated).
            reconnects += 1
            writer.close()
            reader, writer = await _open(cmd["port"])
            writer.write(payload)
            status, length = _status_length(await reader.readuntil(b"\r\n\r\n"))
            got = await reader.readexactly(length) if length else b""
        lat.append(time.perf_counter() - t0)
        if status == 200 and (put or len(got) == BODY_BYTES):
            done += 1
        else:
            errors += 1
    writer.close()
    return {"done": done, "errors": errors, "lat": lat, "reconnects": reconnects}


def _worker(inq: mp.Queue, outq: mp.Queue) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    while (cmd := inq.get()) is not None:
        os.environ[TOKEN_ENV] = cmd["token"]  # fresh for every phase: a long run outlives a token

        async def phase(cmd: dict[str, Any] = cmd) -> list[dict[str, Any]]:
            return await asyncio.gather(*(_conn(cmd, ix) for ix in cmd["indexes"]))

        outq.put(asyncio.run(phase()))


class Clients:
    """Client processes, each driving `conns` keep-alive connections."""

    def __init__(self, processes: int, conns: int):
        ctx = mp.get_context("spawn")
        self.conns = conns
        self.outq: mp.Queue = ctx.Queue()
        self.inqs = [ctx.Queue() for _ in range(processes)]
        self.procs = [ctx.Process(target=_worker, args=(q, self.outq), daemon=True) for q in self.inqs]
        for p in self.procs:
            p.start()

    def _run(self, cmds: list[dict[str, Any]], timeout: float) -> list[dict[str, Any]]:
        for q, cmd in zip(self.inqs, cmds, strict=True):
            q.put({**cmd, "token": os.environ[TOKEN_ENV]})
        return [c for _ in cmds for c in self.outq.get(timeout=timeout)]

    def put(self, port: int, bucket: str, start: int, stop: int) -> dict[str, Any]:
        total = len(self.inqs) * self.conns
        idx = list(range(start, stop))
        per = [idx[c::total] for c in range(total)]
        t0 = time.perf_counter()
        res = self._run([{"op": "put", "port": port, "bucket": bucket,
                          "indexes": per[w * self.conns:(w + 1) * self.conns]} for w in range(len(self.inqs))],
                        timeout=3600)
        took = time.perf_counter() - t0
        done, errors = sum(r["done"] for r in res), sum(r["errors"] for r in res)
        return {"objects": done, "errors": errors, "seconds": round(took, 2), "ops_per_s": round(done / took, 1),
                "reconnects": sum(r["reconnects"] for r in res)}

    def get(self, port: int, bucket: str, loaded: int, seconds: float) -> dict[str, Any]:
        deadline = time.monotonic() + seconds
        res = self._run([{"op": "get", "port": port, "bucket": bucket, "loaded": loaded, "deadline": deadline,
                          "indexes": [[]] * self.conns} for _ in self.inqs], timeout=seconds + 120)
        lat = sorted(x for r in res for x in r["lat"])
        return {"ops": sum(r["done"] for r in res), "errors": sum(r["errors"] for r in res),
                "ops_per_s": round(sum(r["done"] for r in res) / seconds, 1),
                "p50_ms": _pct(lat, 0.5), "p99_ms": _pct(lat, 0.99), "max_ms": _pct(lat, 1.0),
                "reconnects": sum(r["reconnects"] for r in res)}

    def close(self) -> None:
        for q in self.inqs:
            q.put(None)
        for p in self.procs:
            p.join(10)


def _pct(sorted_s: list[float], p: float) -> float:
    if not sorted_s:
        return 0.0
    return round(sorted_s[min(len(sorted_s) - 1, int(p * len(sorted_s)))] * 1000, 2)


# ----------------------------------------------------------------------------- measurements


class RssPeak:
    """The server's peak RSS while a block runs (psutil on the server pid, every 20 ms)."""

    def __init__(self, pid: int):
        import psutil

        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()

    def rss(self) -> int:
        return self.proc.memory_info().rss

    def memory(self) -> dict[str, float]:
        """RSS, its anonymous part (heap, stacks: what the process itself holds, not page cache
        mapped from files) and USS (pages of this process alone), in MiB, and the thread count."""
        full = self.proc.memory_full_info()
        anon = None
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    anon = int(line.split()[1]) * 1024
        except OSError:
            pass
        return {"rss_mib": round(full.rss / MIB, 1), "anon_mib": round((anon or 0) / MIB, 1),
                "uss_mib": round(full.uss / MIB, 1), "threads": self.proc.num_threads()}

    def __enter__(self) -> RssPeak:
        self.peak = self.rss()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.rss())


def _timed_get(http: Any, url: str, params: dict[str, Any] | None = None) -> tuple[float, Any]:
    t0 = time.perf_counter()
    r = http.get(url, params=params)
    took = time.perf_counter() - t0
    r.raise_for_status()
    return took, r


def _median_ms(xs: list[float]) -> float:
    return round(statistics.median(xs) * 1000, 2)


def listing_times(http: Any, base: str, loaded: int, reps: int) -> dict[str, Any]:
    url = base + "/objects"
    first, middle, delim = [], [], []
    mid = key_of(loaded // 2)
    for _ in range(reps):
        t, r = _timed_get(http, url, {"limit": 1000})
        first.append(t)
        t, r = _timed_get(http, url, {"limit": 1000, "start_after": mid})
        middle.append(t)
        t, r = _timed_get(http, url, {"limit": 1000, "delimiter": "/"})
        delim.append(t)
        prefixes = len(r.json()["common_prefixes"])
    return {"first_page_ms": _median_ms(first), "middle_page_ms": _median_ms(middle),
            "delimiter_ms": _median_ms(delim), "delimiter_prefixes": prefixes}


def full_listing(http: Any, base: str) -> dict[str, Any]:
    """Every key, pages of 1,000, with the httpx client decoding each page's JSON (a typical client)."""
    keys = 0
    token = None
    c0 = time.thread_time()
    t0 = time.perf_counter()
    while True:
        params: dict[str, Any] = {"limit": 1000}
        if token:
            params["token"] = token
        page = http.get(base + "/objects", params=params).json()
        keys += len(page["objects"])
        if not page["truncated"]:
            break
        token = page["next_token"]
    took = time.perf_counter() - t0
    return {"keys": keys, "seconds": round(took, 3), "keys_per_s": round(keys / took, 1),
            "client_cpu_us_per_key": round((time.thread_time() - c0) / max(keys, 1) * 1e6, 2)}


_NEXT_TOKEN = re.compile(rb'"next_token":"([^"]*)"')
_S3_NEXT = re.compile(rb"<NextContinuationToken>([^<]*)</NextContinuationToken>")


def _raw_get(conn: Any, path: str, headers: dict[str, str]) -> bytes:
    conn.request("GET", path, headers=headers)
    r = conn.getresponse()
    body = r.read()
    if r.status != 200:
        raise RuntimeError(f"GET {path}: {r.status} {body[:300]!r}")
    return body


def lean_full_listing(port: int, bucket: str, headers: dict[str, str]) -> dict[str, Any]:
    """Every key through the native API with a lean client: one http.client keep-alive connection,
    keys counted and the next token found in the raw bytes (no JSON decoding): the server's rate,
    not the client's."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port)
    keys = 0
    token = None
    c0 = time.thread_time()
    t0 = time.perf_counter()
    while True:
        path = f"/anvil/v1/buckets/{bucket}/objects?limit=1000"
        if token:
            path += "&token=" + urllib.parse.quote(token)
        body = _raw_get(conn, path, headers)
        keys += body.count(b'"key":')
        m = _NEXT_TOKEN.search(body, max(0, len(body) - 4096))
        if m is None:
            break
        token = m.group(1).decode()
    took = time.perf_counter() - t0
    conn.close()
    return {"keys": keys, "seconds": round(took, 3), "keys_per_s": round(keys / took, 1),
            "client_cpu_us_per_key": round((time.thread_time() - c0) / max(keys, 1) * 1e6, 2)}


def s3_full_listing(server: Any, bucket: str, *, lean: bool) -> dict[str, Any]:
    """Every key through S3 ListObjectsV2 (pages of 1,000): boto3's paginator (it parses the XML),
    or (`lean`) SigV4-signed raw requests on one keep-alive connection with <Contents> counted."""
    from tests.s3_helpers import REGION, dev_credentials, s3_client

    keys = 0
    c0 = time.thread_time()
    t0 = time.perf_counter()
    if not lean:
        for page in s3_client(server).get_paginator("list_objects_v2").paginate(Bucket=bucket):
            keys += page.get("KeyCount", 0)
    else:
        import http.client

        from botocore.auth import S3SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials

        cred = dev_credentials(server)
        signer = S3SigV4Auth(Credentials(cred["access_key_id"], cred["secret_access_key"]), "s3", REGION)
        conn = http.client.HTTPConnection("127.0.0.1", server.port)
        token = None
        while True:
            query = "list-type=2&max-keys=1000"
            if token:
                query += "&continuation-token=" + urllib.parse.quote(token, safe="")
            req = AWSRequest(method="GET", url=f"{server.endpoint}/{bucket}?{query}")
            signer.add_auth(req)
            body = _raw_get(conn, f"/{bucket}?{query}", dict(req.headers.items()))
            keys += body.count(b"<Contents>")
            m = _S3_NEXT.search(body)
            if m is None:
                break
            token = m.group(1).decode()
        conn.close()
    took = time.perf_counter() - t0
    return {"keys": keys, "seconds": round(took, 3), "keys_per_s": round(keys / took, 1),
            "client_cpu_us_per_key": round((time.thread_time() - c0) / max(keys, 1) * 1e6, 2)}


def get_while_listing(clients: Clients, port: int, bucket: str, loaded: int, seconds: float,
                      headers: dict[str, str], listers: int) -> dict[str, Any]:
    """GET latency while `listers` clients list back to back (delimiter pages and 1,000-key pages from a
    random place, alternating). The listers are lean raw-HTTP clients that read each page whole without
    decoding it, so what slows the GETs is the server, not the listers' JSON parsing on the same cores."""
    import http.client

    stop = threading.Event()
    counts = [0] * listers
    listing_s: list[float] = []

    def lister(n: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        rng = random.Random(n)
        while not stop.is_set():
            query = "limit=1000&delimiter=/" if counts[n] % 2 == 0 else (
                "limit=1000&start_after=" + urllib.parse.quote(key_of(rng.randrange(loaded)), safe=""))
            t0 = time.perf_counter()
            _raw_get(conn, f"/anvil/v1/buckets/{bucket}/objects?{query}", headers)
            listing_s.append(time.perf_counter() - t0)
            counts[n] += 1
        conn.close()

    threads = [threading.Thread(target=lister, args=(n,), daemon=True) for n in range(listers)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.3)
        fig = clients.get(port, bucket, loaded, seconds)
    finally:
        stop.set()
        for t in threads:
            t.join()
    fig["listers"] = listers
    fig["listings"] = sum(counts)
    fig["listing_p50_ms"] = _median_ms(listing_s) if listing_s else None
    return fig


def _cli(args: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "anvil.cli.main", *args], env=env, capture_output=True, text=True)
    took = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"anvil {' '.join(args[:3])} failed: {proc.stderr[-2000:]}")
    return round(took, 3)


def growth(steps: list[dict[str, Any]]) -> None:
    """Add `growth` to every step after the first: each numeric figure over the previous step's."""
    def flat(d: dict[str, Any], pre: str = "") -> dict[str, float]:
        out: dict[str, float] = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{pre}{k}."))
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                out[pre + k] = float(v)
        return out

    for prev, cur in zip(steps, steps[1:], strict=False):
        a, b = flat(prev), flat(cur)
        cur["growth"] = {k: round(b[k] / a[k], 2) for k in b if k in a and a[k] and k != "objects"
                         and not k.endswith("errors")}


# ----------------------------------------------------------------------------- main


def run(steps: list[int], *, quick: bool, processes: int, conns: int, listers: list[int],
        backups: bool = True) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    import httpx
    from tests.helpers import AnvilServer

    load_before = os.getloadavg()
    get_seconds = 0.3 if quick else 3.0
    # Pauses before the at-rest memory figures: a smoke run only checks they are there.
    settle, settle_backup = (0.2, 0.2) if quick else (0.5, 1.0)
    reps = 3 if quick else 5
    with tempfile.TemporaryDirectory(prefix="anvil-bench-scale-") as tmp:
        work = Path(tmp)
        pythonpath = os.pathsep.join(p for p in (str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH")) if p)
        server = AnvilServer(work / "data", env={"PYTHONPATH": pythonpath,
                                                 "ANVIL_BACKUP_PASSPHRASE": PASS}).start(timeout=60)
        headers = server.auth_headers()
        os.environ[TOKEN_ENV] = headers["authorization"].removeprefix("Bearer ")
        creds = server.admin_credentials()
        env = {**os.environ, "PYTHONPATH": pythonpath, "ANVIL_BACKUP_PASSPHRASE": PASS,
               "ANVIL_CLIENT_ID": creds["client_id"], "ANVIL_CLIENT_SECRET": creds["client_secret"],
               "ANVIL_BACKUP_CACHE_DIR": str(work / "backup-cache")}
        repo = f"file://{work / 'repo'}"
        clients = Clients(processes, conns)
        out_steps: list[dict[str, Any]] = []
        assert server.proc is not None
        pid = server.proc.pid
        try:
            with httpx.Client(headers=headers, timeout=600) as http:
                http.put(server.endpoint + "/anvil/v1/buckets/scale").raise_for_status()
                base = server.endpoint + "/anvil/v1/buckets/scale"
                _cli(["backup", "init", "--repo", repo], env)
                with RssPeak(pid) as idle_peak:
                    pass
                loaded = 0
                backed_up = False
                for target in steps:
                    # Tokens expire: a long run takes a fresh one for every step (clients and listers).
                    headers = server.auth_headers()
                    os.environ[TOKEN_ENV] = headers["authorization"].removeprefix("Bearer ")
                    http.headers.update(headers)
                    step: dict[str, Any] = {"objects": target}
                    with RssPeak(pid) as during:
                        step["put"] = clients.put(server.port, "scale", loaded, target)
                        loaded = target
                        # Again after the PUTs: loading 300k objects on a busy machine outlasts a token
                        # (a 100k -> 400k run failed there with 401s).
                        headers = server.auth_headers()
                        os.environ[TOKEN_ENV] = headers["authorization"].removeprefix("Bearer ")
                        http.headers.update(headers)
                        step["get_alone"] = clients.get(server.port, "scale", loaded, get_seconds)
                        step["listing"] = listing_times(http, base, loaded, reps)
                        for i, n in enumerate([1] if quick else listers):
                            # The first count is the headline figure; the others follow under their count.
                            step["get_while_listing" if i == 0 else f"get_while_listing_{n}"] = get_while_listing(
                                clients, server.port, "scale", loaded, get_seconds, headers, n)
                        for name, listing in (
                                ("full_listing", lambda: full_listing(http, base)),
                                ("full_listing_lean", lambda h=headers: lean_full_listing(server.port, "scale", h)),
                                ("full_listing_s3", lambda: s3_full_listing(server, "scale", lean=False)),
                                ("full_listing_s3_lean", lambda: s3_full_listing(server, "scale", lean=True))):
                            cpu0 = sum(during.proc.cpu_times()[:2])
                            fig = listing()
                            fig["server_cpu_us_per_key"] = round(
                                (sum(during.proc.cpu_times()[:2]) - cpu0) / max(fig["keys"], 1) * 1e6, 2)
                            step[name] = fig
                        status_s = [_timed_get(http, server.endpoint + "/anvil/v1/admin/watch/status")[0]
                                    for _ in range(reps)]
                        step["watch_status_ms"] = _median_ms(status_s)
                    # At rest after the step's loading, GETs and listings: what serving holds.
                    time.sleep(settle)
                    step["memory_at_rest"] = RssPeak(pid).memory()
                    rss_rest = RssPeak(pid).rss()
                    if not backups:
                        step["rss"] = {"at_rest_mib": round(rss_rest / MIB, 1),
                                       "peak_during_step_mib": round(during.peak / MIB, 1)}
                        out_steps.append(step)
                        print(json.dumps(step), file=sys.stderr, flush=True)
                        continue
                    t0 = time.perf_counter()
                    http.post(server.endpoint + "/anvil/v1/admin/fsck", json={}).raise_for_status()
                    step["fsck_seconds"] = round(time.perf_counter() - t0, 3)
                    create = ["backup", "create", "--repo", repo, "--endpoint", server.endpoint, "--json"]
                    with RssPeak(pid) as bk:
                        # The first one is a full snapshot, later ones take the step's new objects;
                        # the timed one follows with no change.
                        step_backup = _cli(create + (["--incremental"] if backed_up else []), env)
                        backed_up = True
                        no_change = _cli(create + ["--incremental"], env)
                    time.sleep(settle_backup)
                    step["backup"] = {"with_new_objects_seconds": step_backup, "no_change_incremental_seconds":
                                      no_change, "server_peak_rss_mib": round(bk.peak / MIB, 1),
                                      "server_rss_after_mib": round(RssPeak(pid).rss() / MIB, 1),
                                      "server_memory_after": RssPeak(pid).memory()}
                    step["rss"] = {"at_rest_mib": round(rss_rest / MIB, 1),
                                   "peak_during_step_mib": round(during.peak / MIB, 1)}
                    out_steps.append(step)
                    print(json.dumps(step), file=sys.stderr, flush=True)
        finally:
            clients.close()
            server.stop()
    growth(out_steps)
    last = out_steps[-1]

    def target(value: float, goal: float, *, at_most: bool) -> dict[str, Any]:
        return {"value": value, "target": goal, "met": value <= goal if at_most else value >= goal}

    rss_values = [s["rss"]["at_rest_mib"] for s in out_steps]
    lean = last["full_listing_lean"]["keys_per_s"]
    targets = {
        "delimiter_listing_ms": target(last["listing"]["delimiter_ms"], TARGETS["delimiter_listing_ms"], at_most=True),
        "get_p99_while_listing_ms": target(last["get_while_listing"]["p99_ms"], TARGETS["get_p99_while_listing_ms"],
                                           at_most=True),
        "rss_mib": target(max(rss_values), TARGETS["rss_mib"], at_most=True),
        # The lean client's rate: the httpx client decoding JSON is the bound of its own figure
        # (`client_cpu_us_per_key` in `full_listing`).
        "full_listing_keys_per_s": target(lean, TARGETS["full_listing_keys_per_s"], at_most=False),
        "full_listing_s3_keys_per_s": target(last["full_listing_s3_lean"]["keys_per_s"],
                                             TARGETS["full_listing_keys_per_s"], at_most=False),
        "no_errors": {"met": all(s["put"]["errors"] + s["get_alone"]["errors"] + s["get_while_listing"]["errors"]
                                 == 0 for s in out_steps)},
    }
    targets["all_met"] = all(t["met"] for t in targets.values())
    return {
        "benchmark": "scale",
        "quick": quick,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "config": {"steps": steps, "body_bytes": BODY_BYTES, "prefixes": PREFIXES, "client_processes": processes,
                   "connections_per_process": conns, "get_seconds": get_seconds, "listing_reps": reps,
                   "listers": [1] if quick else listers, "backups": backups,
                   "idle_rss_mib": round(idle_peak.peak / MIB, 1)},
        "steps": out_steps,
        "targets": targets,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: two small steps")
    ap.add_argument("--steps", default=None, help="comma-separated object counts (default 20000,50000,100000,200000)")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--conns", type=int, default=4, help="connections per client process")
    ap.add_argument("--listers", default="2,4", help="comma-separated counts of clients listing during GETs")
    ap.add_argument("--no-backup", action="store_true", help="skip fsck and the backups (faster)")
    args = ap.parse_args()
    if args.steps:
        steps = [int(s) for s in args.steps.split(",")]
    else:
        steps = [1000, 2000] if args.quick else [20_000, 50_000, 100_000, 200_000]
    if steps != sorted(steps) or steps[0] <= 0:
        ap.error("--steps must be increasing positive counts")
    listers = [int(n) for n in args.listers.split(",")]
    print(json.dumps(run(steps, quick=args.quick, processes=args.processes, conns=args.conns, listers=listers,
                         backups=not args.no_backup), indent=2))


if __name__ == "__main__":
    main()
