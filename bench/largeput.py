"""Large-object PUT and GET (256 MiB) against the ceilings of this machine, measured in the same run.

    python bench/largeput.py                 # 3 interleaved repetitions of 256 MiB
    python bench/largeput.py --quick         # smoke: 8 MiB, 1 repetition
    python bench/objects.py --large ...      # the same

Each repetition measures, over the same bytes (a 1 MiB block sent 256 times, its first bytes
unique per PUT so no body deduplicates), in a rotating order:

- `hash`: hashlib SHA-256 and MD5 and the chunk digest (XXH3-128) on one core, wall and CPU.
- `disk`: 256 MiB written with one `os.write` per 1 MiB to a file in the store's own `tmp/`, then
  fsync: the write/flush floor; once with its pages left in the page cache (`page_cache_grows`),
  once as the server writes a large body (`drop_behind`: writeback started every 8 MiB, each
  earlier window waited for and its pages dropped); that file is then read back twice in 1 MiB
  preads as a GET did (`read_from_disk`, `read_cached`), with the sequential advice, and as a cold
  GET does now (`read_from_disk_drop_behind`: 4 MiB preads, dropped behind).
- `memory`: CPU to touch 256 MiB of new anonymous memory (`first`), and again (`again`).
- `transport`: the same client sending 256 MiB to a bare uvloop protocol that discards the body
  (`raw_sink`: the socket ceiling) and to a bare uvicorn + httptools ASGI app that drains
  `request.stream()` (`uvicorn_sink`: what the ASGI server costs before any of our code runs), and
  the same app on the server's own protocol class (`anvil_sink`), with the client's and the sink's CPU.
- `servers`: each server variant (default: `anvil serve` of this checkout), one PUT and two GETs
  of 256 MiB (verify on read; the first GET reads what the PUT left in the page cache, with
  drop-behind nothing; the second what the first left), with the server's CPU per thread group:
  the event loop `MainThread` (the protocol, our body reader), `anvil-io` (SHA-256, chunk digests,
  write, fsync; a GET's reads), `anvil-md5` (the ETag); named with `py-spy dump` when it is installed.

`ceiling` then combines the medians into the best PUT this machine allows: every byte must be
received (client + socket), hashed twice and written, and the MD5 (the slowest, a serial chain)
has one core at most, so best = size / (max(MD5, all that CPU / cores) + the fsync tail).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import json
import mmap
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024
BLOCK = MIB
TOKEN_ENV = "ANVIL_BENCH_TOKEN"
TARGETS = {"put_mb_per_s": 450.0, "get_mb_per_s": 1000.0}


# ----------------------------------------------------------------------------- client


def _head(method: str, path: str, length: int | None = None, token: str | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    if length is not None:
        lines += [f"Content-Length: {length}", "Content-Type: application/octet-stream"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _response(s: socket.socket) -> tuple[int, int, int]:
    """(status, content-length, body bytes received); the body is counted and dropped."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = s.recv(65536)
        if not data:
            raise RuntimeError("connection closed before the response head")
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    received = len(rest)
    sink = bytearray(4 * MIB)
    while received < length:
        n = s.recv_into(sink)
        if not n:
            break
        received += n
    return status, length, received


def put(port: int, path: str, size: int, block: bytes, token: str | None = None) -> dict[str, Any]:
    """Send `size` bytes (the block repeated) in one PUT; wall seconds and this process's CPU."""
    view = memoryview(block)
    with socket.create_connection(("127.0.0.1", port)) as s:
        c0 = time.process_time()
        t0 = time.perf_counter()
        s.sendall(_head("PUT", path, size, token))
        sent = 0
        while sent < size:
            n = min(len(block), size - sent)
            s.sendall(view[:n])
            sent += n
        status, _, _ = _response(s)
        elapsed = time.perf_counter() - t0
        cpu = time.process_time() - c0
    if status != 200:
        raise RuntimeError(f"PUT {path} answered {status}")
    return {"seconds": round(elapsed, 4), "mb_per_s": round(size / 1e6 / elapsed, 1), "client_cpu_s": round(cpu, 3)}


def get(port: int, path: str, size: int, token: str | None = None) -> dict[str, Any]:
    with socket.create_connection(("127.0.0.1", port)) as s:
        c0 = time.process_time()
        t0 = time.perf_counter()
        s.sendall(_head("GET", path, token=token))
        status, length, received = _response(s)
        elapsed = time.perf_counter() - t0
        cpu = time.process_time() - c0
    if status != 200 or received != size:
        raise RuntimeError(f"GET {path}: status {status}, {received} of {size} bytes")
    return {"seconds": round(elapsed, 4), "mb_per_s": round(size / 1e6 / elapsed, 1), "client_cpu_s": round(cpu, 3)}


# ----------------------------------------------------------------------------- sinks (subprocesses)


def _sink_raw(port: int) -> None:
    """A bare uvloop protocol: parses nothing but the head's Content-Length, discards the body."""
    import uvloop

    class Sink(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.t = transport
            self.head = b""
            self.left: int | None = None

        def data_received(self, data: bytes) -> None:
            if self.left is None:
                self.head += data
                i = self.head.find(b"\r\n\r\n")
                if i < 0:
                    return
                m = re.search(rb"(?i)content-length:\s*(\d+)", self.head[:i])
                self.left = int(m.group(1)) if m else 0
                data = self.head[i + 4:]
                self.head = b""
            self.left -= len(data)
            if self.left <= 0:
                self.left = None
                self.t.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Sink, "127.0.0.1", port)
        print("ready", flush=True)
        await server.serve_forever()

    uvloop.run(main())


def _sink_uvicorn(port: int, protocol: str = "httptools") -> None:
    """A bare ASGI app on uvicorn (httptools, uvloop): drains the body through Starlette's
    `request.stream()` as the server's handlers do, and counts the pieces it is handed. `protocol`
    "anvil": on the server's own HTTP protocol class (api.server.AnvilHttpProtocol)."""
    import uvicorn
    from starlette.requests import Request

    http: Any = protocol
    if protocol == "anvil":
        from anvil.api.server import AnvilHttpProtocol

        http = AnvilHttpProtocol

    pieces: collections.Counter[str] = collections.Counter()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        n = 0
        total = 0
        async for piece in Request(scope, receive).stream():
            n += 1
            total += len(piece)
        pieces["pieces"] += n
        pieces["bytes"] += total
        body = json.dumps(dict(pieces)).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    print("ready", flush=True)
    uvicorn.run(app, host="127.0.0.1", port=port, loop="uvloop", http=http, log_level="warning",
                access_log=False, lifespan="off")


class Sink:
    def __init__(self, kind: str):
        self.kind = kind
        self.port = _free_port()
        paths = [str(ROOT / "src"), os.environ.get("PYTHONPATH")]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
        self.proc = subprocess.Popen([sys.executable, __file__, "--sink", kind, "--port", str(self.port)],
                                     stdout=subprocess.PIPE, env=env)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"the {kind} sink did not start")
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port)).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def cpu(self) -> float:
        import psutil

        t = psutil.Process(self.proc.pid).cpu_times()
        return t.user + t.system

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- ceilings in-process


def hash_ceiling(block: bytes, size: int) -> dict[str, Any]:
    """SHA-256, MD5 and XXH3-128 of `size` bytes (the block repeated) on this thread: wall and CPU."""
    import xxhash

    out: dict[str, Any] = {}
    for name, new in (("sha256", hashlib.sha256), ("md5", hashlib.md5), ("xxh3_128", xxhash.xxh3_128)):
        h = new()
        c0 = time.thread_time()
        t0 = time.perf_counter()
        for _ in range(size // len(block)):
            h.update(block)
        h.digest()
        wall = time.perf_counter() - t0
        cpu = time.thread_time() - c0
        out[name] = {"seconds": round(wall, 4), "cpu_s": round(cpu, 4), "mb_per_s": round(size / 1e6 / wall, 1),
                     "mb_per_cpu_s": round(size / 1e6 / max(cpu, 1e-9), 1)}
    return out


def memory_ceiling(size: int) -> dict[str, Any]:
    """CPU to touch `size` bytes of new anonymous memory, twice: `first` may get pages the VM handed
    back to its host (each then costs a host fault), `again` gets the pages `first` just freed."""
    import mmap

    out: dict[str, Any] = {}
    for name in ("first", "again"):
        m = mmap.mmap(-1, size)
        c0 = time.process_time()
        for off in range(0, size, mmap.PAGESIZE):
            m[off] = 1
        out[name] = {"cpu_s": round(time.process_time() - c0, 4)}
        m.close()
    return out


def disk_ceiling(folder: Path, block: bytes, size: int) -> dict[str, Any]:
    """`size` bytes written with one os.write per block to a file in `folder`, then fsync: as a plain
    file whose pages stay cached (`page_cache_grows`, as a PUT before drop-behind: the file is kept
    until the repetition ends), and as the server writes a large blob now (`drop_behind`: writeback
    started every WRITEBACK_EVERY bytes, each earlier window waited for and its pages dropped)."""
    sys.path.insert(0, str(ROOT / "src"))
    from anvil.storage import blobs

    sfr = blobs._SYNC_FILE_RANGE
    out: dict[str, Any] = {}
    kept: list[Path] = []
    try:
        for mode in ("page_cache_grows", "drop_behind"):
            if mode == "drop_behind" and sfr is None:
                continue
            path = folder / f"bench-disk-{os.getpid()}-{mode}"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            kept.append(path)
            try:
                c0 = time.process_time()
                t0 = time.perf_counter()
                written = dropped = unflushed = 0
                lag = getattr(blobs, "DROP_LAG", 0)  # windows on their way to the disk before a wait
                windows: collections.deque[int] = collections.deque(maxlen=lag + 1)
                for _ in range(size // len(block)):
                    written += os.write(fd, block)
                    unflushed += len(block)
                    if sfr is not None and mode == "drop_behind" and unflushed >= blobs.WRITEBACK_EVERY:
                        start = written - unflushed
                        sfr(fd, start, unflushed, blobs._SFR_WRITE)
                        unflushed = 0
                        windows.append(start)
                        if len(windows) > lag and windows[0] > dropped:
                            upto = windows[0]
                            sfr(fd, dropped, upto - dropped,
                                blobs._SFR_WAIT_BEFORE | blobs._SFR_WRITE | blobs._SFR_WAIT_AFTER)
                            os.posix_fadvise(fd, dropped, upto - dropped, os.POSIX_FADV_DONTNEED)
                            dropped = upto
                t1 = time.perf_counter()
                os.fsync(fd)
                t2 = time.perf_counter()
                if mode == "drop_behind":
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                cpu = time.process_time() - c0
            finally:
                os.close(fd)
            out[mode] = {"write_s": round(t1 - t0, 4), "fsync_s": round(t2 - t1, 4), "cpu_s": round(cpu, 4),
                         "mb_per_s": round(size / 1e6 / (t2 - t0), 1)}
            if mode == "drop_behind":
                # Read back in 1 MiB preads, as a GET does: from disk without and with the
                # sequential advice the server gives (`storage.blobs.read_sequentially`), the disk's
                # own ceiling (O_DIRECT, 16 MiB reads: no page cache, no readahead limit), then from
                # the page cache. Before each disk read the file's pages are dropped.
                for name in ("read_from_disk", "read_from_disk_sequential", "read_from_disk_drop_behind",
                             "read_from_disk_direct", "read_cached"):
                    out[name] = read_back(path, name, len(block))
    finally:
        for path in kept:
            path.unlink()
    return out


def read_back(path: Path, name: str, piece: int) -> dict[str, Any]:
    """One read of a 256 MiB file, 1 MiB preads as a GET does (O_DIRECT: 16 MiB). A disk read
    gets a fresh copy of the file written with O_DIRECT, so none of it is in the page cache
    (`POSIX_FADV_DONTNEED` leaves pages behind that sit in other CPUs' LRU batches)."""
    direct_buf = mmap.mmap(-1, 16 * MIB)  # page-aligned, as O_DIRECT needs
    if name != "read_cached":
        fresh = path.with_name(path.name + ".cold")
        src = os.open(path, os.O_RDONLY)
        dst = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        try:
            off = 0
            while n := os.preadv(src, [direct_buf], off):
                os.pwritev(dst, [memoryview(direct_buf)[:n]], off)  # sizes are MiB multiples
                off += n
            os.fsync(dst)
        finally:
            os.close(src)
            os.close(dst)
        path = fresh
    direct = name == "read_from_disk_direct"
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    try:
        if name in ("read_from_disk_sequential", "read_from_disk_drop_behind"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        c0 = time.process_time()
        t0 = time.perf_counter()
        off = 0
        if direct:
            while n := os.preadv(fd, [direct_buf], off):
                off += n
        elif name == "read_from_disk_drop_behind":
            # As a GET reads a cold large blob now (`BlobStore.read_verified`): 4 MiB preads, the pages
            # read more than a window ago dropped behind the read.
            sys.path.insert(0, str(ROOT / "src"))
            from anvil.storage import blobs

            span, window = getattr(blobs, "READ_SPAN", piece), getattr(blobs, "READ_DROP_WINDOW", 8 * MIB)
            dropped = 0
            while True:
                if off - dropped >= 2 * window:
                    os.posix_fadvise(fd, dropped, off - window - dropped, os.POSIX_FADV_DONTNEED)
                    dropped = off - window
                chunk = os.pread(fd, span, off)
                if not chunk:
                    break
                off += len(chunk)
        else:
            while chunk := os.pread(fd, piece, off):
                off += len(chunk)
        return {"cpu_s": round(time.process_time() - c0, 4),
                "mb_per_s": round(off / 1e6 / (time.perf_counter() - t0), 1)}
    finally:
        os.close(fd)
        if path.name.endswith(".cold"):
            path.unlink()


def transport_ceiling(block: bytes, size: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in ("raw", "uvicorn", "anvil"):
        sink = Sink(kind)
        try:
            put(sink.port, "/warm", 4 * MIB, block)
            c0 = sink.cpu()
            fig = put(sink.port, "/sink", size, block)
            fig["sink_cpu_s"] = round(sink.cpu() - c0, 3)
        finally:
            sink.stop()
        out[f"{kind}_sink"] = fig
    return out


# ----------------------------------------------------------------------------- the server


def _thread_cpu(pid: int) -> dict[int, tuple[float, float]]:
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        f = stat[stat.rindex(")") + 2:].split()
        out[int(tid)] = (int(f[11]) / tick, int(f[12]) / tick)
    return out


def _thread_names(pid: int) -> dict[int, str]:
    """OS thread id -> Python thread name (pool suffix dropped), from `py-spy dump` if installed."""
    names = {pid: "MainThread"}
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        return names
    try:
        dump = json.loads(subprocess.run([spy, "dump", "--pid", str(pid), "--json"], capture_output=True,
                                         text=True, timeout=30).stdout)
    except (OSError, ValueError, subprocess.SubprocessError):
        return names
    for t in dump:
        if t.get("os_thread_id"):
            names[t["os_thread_id"]] = re.sub(r"_\d+$", "", t.get("thread_name") or "?")
    return names


def _per_thread(before: dict[int, tuple[float, float]], after: dict[int, tuple[float, float]],
                names: dict[int, str]) -> dict[str, dict[str, float]]:
    groups: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    for tid, (u, s) in after.items():
        u0, s0 = before.get(tid, (0.0, 0.0))
        if u - u0 or s - s0:
            g = groups[names.get(tid, "other")]
            g[0] += u - u0
            g[1] += s - s0
    return {k: {"user_s": round(v[0], 3), "sys_s": round(v[1], 3)}
            for k, v in sorted(groups.items(), key=lambda kv: -sum(kv[1]))}


class Server:
    def __init__(self, folder: Path, src: Path, env: dict[str, str]):
        sys.path.insert(0, str(ROOT))
        from tests.helpers import AnvilServer

        folder.mkdir(parents=True, exist_ok=True)
        pythonpath = os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")]))
        self.srv = AnvilServer(folder / "data", env={**env, "PYTHONPATH": pythonpath}).start()
        self.token = self.srv.auth_headers()["authorization"].removeprefix("Bearer ")
        with self.srv.client() as c:
            c.create_bucket("bench")
        assert self.srv.proc is not None
        self.pid = self.srv.proc.pid
        self.names: dict[int, str] = {}
        self.n = 0

    @staticmethod
    def path(key: str) -> str:
        return f"/anvil/v1/buckets/bench/object?key={key}"

    def put_get(self, block: bytes, size: int) -> dict[str, Any]:
        import psutil

        proc = psutil.Process(self.pid)
        unique = bytearray(block)
        unique[:16] = os.urandom(16)  # a new body every time: nothing deduplicates
        key = f"large-{self.n}"
        self.n += 1
        out: dict[str, Any] = {}
        # The first GET reads what the PUT left (with drop-behind: from disk); the second, what the
        # first left in the page cache.
        for op in ("put", "get", "get_again"):
            th0 = _thread_cpu(self.pid)
            peak = proc.memory_info().rss
            c0 = sum(proc.cpu_times()[:2])
            if op == "put":
                fig = put(self.srv.port, self.path(key), size, bytes(unique), self.token)
            else:
                fig = get(self.srv.port, self.path(key), size, self.token)
            fig["server_cpu_s"] = round(sum(proc.cpu_times()[:2]) - c0, 3)
            th1 = _thread_cpu(self.pid)
            if not self.names or any(tid not in self.names for tid in th1):
                self.names = _thread_names(self.pid)
            fig["server_threads"] = _per_thread(th0, th1, self.names)
            fig["server_rss_mib"] = round(max(peak, proc.memory_info().rss) / MIB, 1)
            out[op] = fig
        return out

    def stop(self) -> None:
        self.srv.stop()


# ----------------------------------------------------------------------------- run


def _stats(values: list[float]) -> dict[str, Any]:
    return {"min": min(values), "median": round(statistics.median(values), 4), "runs": values}


def _pick(reps: list[dict[str, Any]], *path: str) -> list[float]:
    out = []
    for r in reps:
        v: Any = r
        for p in path:
            v = v[p]
        out.append(v)
    return out


def ceiling(reps: list[dict[str, Any]], size: int, cpus: int) -> dict[str, Any]:
    """The best PUT this machine allows, from the medians of the measured stages (see the docstring)."""
    med = {name: statistics.median(_pick(reps, *path)) for name, path in {
        "md5": ("hash", "md5", "cpu_s"), "sha256": ("hash", "sha256", "cpu_s"),
        "xxh3": ("hash", "xxh3_128", "cpu_s"), "write": ("disk", "drop_behind", "cpu_s"),
        "client": ("transport", "raw_sink", "client_cpu_s"), "socket": ("transport", "raw_sink", "sink_cpu_s"),
        "uvicorn": ("transport", "uvicorn_sink", "sink_cpu_s"),
        "anvil_protocol": ("transport", "anvil_sink", "sink_cpu_s"),
    }.items()}
    tail = statistics.median(_pick(reps, "disk", "drop_behind", "fsync_s"))
    needed = med["md5"] + med["sha256"] + med["xxh3"] + med["write"] + med["client"] + med["socket"]
    best = max(med["md5"], needed / cpus) + tail
    # The same through the server's HTTP protocol (uvicorn's body events instead of the bare socket).
    with_uvicorn = max(med["md5"], (needed - med["socket"] + med["anvil_protocol"]) / cpus) + tail
    out: dict[str, Any] = {
        "cpu_s_per_object": {k: round(v, 4) for k, v in med.items()},
        "fsync_tail_s": round(tail, 4),
        "cpu_s_needed": round(needed, 4),
        "best_put_mb_per_s": round(size / 1e6 / best, 1),
        "best_put_through_uvicorn_mb_per_s": round(size / 1e6 / with_uvicorn, 1),
        "servers": {},
    }
    for name in reps[0]["servers"]:
        # What the server's measured CPU allows on idle cores (its threads spread perfectly, the
        # MD5 thread alone on one core), plus the same fsync tail: what a quiet machine would show.
        server_put = statistics.median(_pick(reps, "servers", name, "put", "server_cpu_s"))
        client_put = statistics.median(_pick(reps, "servers", name, "put", "client_cpu_s"))
        bound = max(med["md5"], (server_put + client_put) / cpus) + tail
        out["servers"][name] = {"put_server_cpu_s": round(server_put, 4),
                                "put_cpu_bound_mb_per_s": round(size / 1e6 / bound, 1)}
    return out


def run(*, quick: bool, reps: int | None, variants: dict[str, tuple[Path, dict[str, str]]]) -> dict[str, Any]:
    """Every step of a repetition, each variant's server one step of its own, in a rotating order."""
    reps = reps or (1 if quick else 3)
    size = (8 if quick else 256) * MIB
    cpus = os.cpu_count() or 1
    block = os.urandom(BLOCK)
    load_before = os.getloadavg()
    runs: list[dict[str, Any]] = []
    servers: dict[str, Server] = {}
    with tempfile.TemporaryDirectory(prefix="anvil-bench-large-") as tmp:
        try:
            for name, (src, env) in variants.items():
                servers[name] = Server(Path(tmp) / name, src, env)
                if not quick:
                    servers[name].put_get(block, 8 * MIB)  # warm-up (not measured): imports, thread pools
            first = next(iter(servers.values()))
            ceilings: dict[str, Any] = {
                "hash": lambda: hash_ceiling(block, size),
                "memory": lambda: memory_ceiling(size),
                "disk": lambda: disk_ceiling(first.srv.storage_path / "tmp", block, size),
                "transport": lambda: transport_ceiling(block, size),
            }
            steps = dict(ceilings)
            # Servers alternate with ceiling steps: one variant's PUT right after another's would
            # inherit its page cache state (pages a drop-behind PUT just freed are cheap to reuse).
            order: list[str] = []
            for i, (name, server) in enumerate(servers.items()):
                steps[f"server:{name}"] = lambda server=server: server.put_get(block, size)
                order.append(f"server:{name}")
                if i < len(ceilings):
                    order.append(list(ceilings)[i])
            order += [c for c in ceilings if c not in order]
            for rep in range(reps):
                one: dict[str, Any] = {"load_average": round(os.getloadavg()[0], 2), "servers": {}}
                k = rep % len(order)
                for step in order[k:] + order[:k]:  # rotating, so load changes hit every step alike
                    fig = steps[step]()
                    if step.startswith("server:"):
                        one["servers"][step.partition(":")[2]] = fig
                    else:
                        one[step] = fig
                one["servers"] = {name: one["servers"][name] for name in variants}
                runs.append(one)
        finally:
            for server in servers.values():
                server.stop()
    summary: dict[str, Any] = {"servers": {}}
    for name in variants:
        summary["servers"][name] = {
            f"{op}_{fig}": _stats(_pick(runs, "servers", name, op, fig))
            for op in ("put", "get", "get_again") for fig in ("mb_per_s", "server_cpu_s")
        }
    summary.update({
        "raw_sink_mb_per_s": _stats(_pick(runs, "transport", "raw_sink", "mb_per_s")),
        "uvicorn_sink_mb_per_s": _stats(_pick(runs, "transport", "uvicorn_sink", "mb_per_s")),
        "anvil_sink_mb_per_s": _stats(_pick(runs, "transport", "anvil_sink", "mb_per_s")),
        "disk_page_cache_grows_mb_per_s": _stats(_pick(runs, "disk", "page_cache_grows", "mb_per_s")),
        "disk_drop_behind_mb_per_s": _stats(_pick(runs, "disk", "drop_behind", "mb_per_s")),
        "disk_read_from_disk_mb_per_s": _stats(_pick(runs, "disk", "read_from_disk", "mb_per_s")),
        "disk_read_from_disk_sequential_mb_per_s": _stats(_pick(runs, "disk", "read_from_disk_sequential", "mb_per_s")),
        "disk_read_from_disk_drop_behind_mb_per_s": _stats(_pick(runs, "disk", "read_from_disk_drop_behind",
                                                                 "mb_per_s")),
        "disk_read_from_disk_drop_behind_cpu_s": _stats(_pick(runs, "disk", "read_from_disk_drop_behind",
                                                              "cpu_s")),
        "disk_read_from_disk_direct_mb_per_s": _stats(_pick(runs, "disk", "read_from_disk_direct", "mb_per_s")),
        "disk_read_cached_mb_per_s": _stats(_pick(runs, "disk", "read_cached", "mb_per_s")),
        "memory_first_touch_cpu_s": _stats(_pick(runs, "memory", "first", "cpu_s")),
        "md5_mb_per_s": _stats(_pick(runs, "hash", "md5", "mb_per_s")),
        "sha256_mb_per_s": _stats(_pick(runs, "hash", "sha256", "mb_per_s")),
    })
    ceil = ceiling(runs, size, cpus)
    main_fig = summary["servers"][next(iter(variants))]
    put_med = main_fig["put_mb_per_s"]["median"]
    get_med = main_fig["get_mb_per_s"]["median"]
    get_again_med = main_fig["get_again_mb_per_s"]["median"]
    return {
        "benchmark": "large-put", "quick": quick, "size_bytes": size, "reps": reps,
        "variants": {name: {"src": str(src), "env": env} for name, (src, env) in variants.items()},
        "machine": {"cpus": cpus, "python": platform.python_version(),
                    "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "runs": runs,
        "summary": summary,
        "ceiling": ceil,
        # The first variant's medians.
        "targets": {
            "put_mb_per_s": {"value": put_med, "target": TARGETS["put_mb_per_s"],
                             "met": put_med >= TARGETS["put_mb_per_s"],
                             "best_possible_here": ceil["best_put_mb_per_s"]},
            # The first GET after a drop-behind PUT reads the disk: the disk's own ceiling
            # (O_DIRECT, 16 MiB reads) bounds it whatever the server does.
            "get_mb_per_s": {"value": get_med, "target": TARGETS["get_mb_per_s"],
                             "met": get_med >= TARGETS["get_mb_per_s"],
                             "best_possible_from_disk": summary["disk_read_from_disk_direct_mb_per_s"]["median"]},
            "get_again_mb_per_s": {"value": get_again_med, "target": TARGETS["get_mb_per_s"],
                                   "met": get_again_med >= TARGETS["get_mb_per_s"]},
        },
    }


def parse_variant(text: str) -> tuple[str, tuple[Path, dict[str, str]]]:
    """`NAME=SRC_DIR[,ENV=VALUE...]` -> (name, (src, env))."""
    name, _, rest = text.partition("=")
    src, *settings = rest.split(",")
    if not name or not src:
        raise argparse.ArgumentTypeError(f"expected NAME=SRC_DIR[,ENV=VALUE...], got {text!r}")
    env = dict(kv.split("=", 1) for kv in settings)
    return name, (Path(src).absolute(), env)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 MiB, 1 repetition (smoke)")
    parser.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 3; quick 1)")
    parser.add_argument("--variant", action="append", default=[], type=parse_variant, metavar="NAME=SRC[,ENV=V...]",
                        help="a server to measure (repeat; the first gives the targets): the src folder whose code it "
                        "runs, and environment settings; default: branch=<this checkout>/src")
    parser.add_argument("--sink", choices=("raw", "uvicorn", "anvil"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sink:
        if args.sink == "raw":
            _sink_raw(args.port)
        else:
            _sink_uvicorn(args.port, "anvil" if args.sink == "anvil" else "httptools")
        return
    variants = dict(args.variant) or {"branch": (ROOT / "src", {})}
    print(json.dumps(run(quick=args.quick, reps=args.reps, variants=variants), indent=2))


if __name__ == "__main__":
    main()
