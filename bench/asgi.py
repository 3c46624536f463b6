"""Server CPU per operation on the small paths, for several server variants in the same run.

A variant is a source tree and an ASGI server: `NAME=SRC_DIR@SERVER`, SERVER being `uvicorn` (what
`anvil serve` runs) or `granian` (`ANVIL_ASGI_SERVER=granian`, see src/anvil/api/server.py). Every
variant's server runs at the same time, each on its own STORAGE_PATH; the workload goes to one
server after the other, interleaved over `--reps` repetitions with the order rotating, so a change
in the shared machine's load hits every variant alike.

Per repetition and variant:
  put / get          native 4 KiB PUT and GET (bench/objects.py's raw-HTTP load generator,
                     2 processes x 4 keep-alive connections, `--seconds` each)
  s3_put / s3_get    1 KiB PutObject / GetObject with SigV4 header auth (bench/s3.py's boto3 client
                     processes, 8 of them, `--objects` operations each phase)
  s3_list            full ListObjectsV2 paginations (1,000 per page) over the S3 objects, `--lists` times
  list               full native listings (pages of 1,000) over every object of the bucket, `--lists` times
Each reports the rate and the server's CPU per operation (per key for listings), from psutil on the
server pid; the output gives min, median and every run per variant, and the load average.

The floor (`--floor CONFIG`, repeatable): the protocol's own cost, measured in the same run. A floor
server is uvicorn configured as `anvil serve` configures it (Anvil's protocol class, uvloop, no access
log, no server header) serving a minimal ASGI app that answers every GET with a 4 KiB body from
memory and the same nine response headers an Anvil GET carries; the same load generator drives it in
the `get` phase, interleaved with the variants. Its CPU per request is what uvicorn and the socket
system calls cost without any of Anvil's work; a variant's GET minus the floor is the app's share.
CONFIG is `anvil` (that configuration) or a `+`-joined list of changes to it, each measured on its own
server: `httptools` (uvicorn's own httptools protocol: no coalesced writes, no head limits), `h11`,
`asyncio` (the asyncio loop instead of uvloop), `nodate` (`date_header=False`), `noproxy`
(`proxy_headers=False`), `raw` (the response head written by the app in one piece through Anvil's
`anvil.send_raw` extension instead of two ASGI messages).

    python bench/asgi.py                                   # this checkout on uvicorn and on granian
    python bench/asgi.py --variant main=/work/main/src@uvicorn --variant branch=src@uvicorn
    python bench/asgi.py --variant branch=src@uvicorn --floor anvil --floor httptools --phases get
    python bench/asgi.py --quick                           # smoke run
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
import urllib.parse
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import objects as native_bench  # noqa: E402
import s3 as s3_bench  # noqa: E402

BUCKET = "bench"  # the bucket both load generators use
PHASES = ("put", "get", "s3_put", "s3_get", "s3_list", "list")
FLOOR_CHANGES = ("httptools", "h11", "asyncio", "nodate", "noproxy", "raw")


class Variant:
    def __init__(self, spec: str, tmp: Path):
        name, _, rest = spec.partition("=")
        src, _, server = rest.partition("@")
        self.name, self.src, self.server = name, str(Path(src or ROOT / "src").resolve()), server or "uvicorn"
        if self.server not in ("uvicorn", "granian"):
            raise SystemExit(f"unknown server {self.server!r} in {spec!r}")
        from tests.helpers import AnvilServer

        env = {"PYTHONPATH": self.src, "ANVIL_ASGI_SERVER": self.server}
        (tmp / name).mkdir(parents=True)
        self.anvil = AnvilServer(tmp / name / "data", env=env)

    def start(self) -> None:
        self.anvil.start(timeout=120)  # a busy shared machine can take longer than the tests' 20 s
        assert self.anvil.proc is not None
        self.ps = psutil.Process(self.anvil.proc.pid)
        cred = self.anvil.admin_credentials()
        self.key, self.secret = cred["client_id"], cred["client_secret"]
        with self.anvil.client() as c:
            c.create_bucket(BUCKET)
        self.token = self.anvil.auth_headers()["authorization"].removeprefix("Bearer ")
        self.s3_target = s3_bench.Target(self.name, self.anvil.endpoint, self.key, self.secret, self.anvil.proc)
        self.s3 = s3_bench.make_client(self.anvil.endpoint, self.key, self.secret)

    def cpu(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def stop(self) -> None:
        self.anvil.stop()


class Floor:
    """A floor server (see the module docstring): `python bench/asgi.py --serve-floor PORT CONFIG`."""

    def __init__(self, config: str, src: str):
        changes = [] if config == "anvil" else config.split("+")
        for c in changes:
            if c not in FLOOR_CHANGES:
                raise SystemExit(f"unknown floor change {c!r} in {config!r} (known: anvil, {', '.join(FLOOR_CHANGES)})")
        self.name, self.src, self.server = f"floor:{config}", src, "uvicorn"
        self.config = config

    def start(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([self.src, str(ROOT)])}
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--serve-floor", str(self.port),
                                      self.config], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        else:
            raise RuntimeError(f"floor server {self.config} did not start")
        self.ps = psutil.Process(self.proc.pid)
        self.token = "floor"  # sent, never read

    def cpu(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# What an Anvil GET of a 4 KiB object answers (besides the date uvicorn adds): the floor answers the same.
FLOOR_HEADERS = [
    (b"etag", b'"3cc57c5461232cb919d584e5bd6590a3"'), (b"x-anvil-version-id", b"null"),
    (b"last-modified", b"Tue, 01 Dec 2026 21:46:09 GMT"), (b"accept-ranges", b"bytes"),
    (b"content-type", b"application/octet-stream"),
    (b"x-anvil-sha256", b"a4f4a0f3fc10d650d721339a345a2aee07045cf1ac84f75e85ca2c6e729fdb01"),
    (b"content-length", b"4096"), (b"x-request-id", b"df360d863386a38f00000000725f5e7b"),
]


def serve_floor(port: int, config: str) -> None:
    """Run a floor server until SIGTERM (in its own process; PYTHONPATH names the source tree)."""
    import uvicorn

    from anvil.api.server import UVICORN_OPTIONS

    changes = set() if config == "anvil" else set(config.split("+"))
    body = b"x" * native_bench.SMALL_SIZE
    start = {"type": "http.response.start", "status": 200, "headers": FLOOR_HEADERS}
    end = {"type": "http.response.body", "body": body}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        raw = scope.get("anvil.send_raw") if "raw" in changes else None
        if raw is not None:
            raw(200, FLOOR_HEADERS, body)
            return
        await send(start)
        await send(end)

    options = dict(UVICORN_OPTIONS)  # what `anvil serve` runs, then the changes measured
    if "h11" in changes:
        options["http"] = "h11"
    elif "httptools" in changes:
        options["http"] = "httptools"
    if "asyncio" in changes:
        options["loop"] = "asyncio"
    if "nodate" in changes:
        options["date_header"] = False
    if "noproxy" in changes:
        options["proxy_headers"] = False
    uvicorn.run(app, host="127.0.0.1", port=port, lifespan="off", **options)


def _native_list(v: Variant) -> int:
    """Every key of the bucket through the native API, pages of 1,000; returns the key count."""
    n, token = 0, None
    with httpx.Client(base_url=v.anvil.endpoint, headers={"authorization": f"Bearer {v.token}"}) as c:
        while True:
            q = "limit=1000" + (f"&token={urllib.parse.quote(token, safe='')}" if token else "")
            page = c.get(f"/anvil/v1/buckets/{BUCKET}/objects?{q}").json()
            n += len(page["objects"])
            token = page.get("next_token")
            if not page["truncated"]:
                return n


def _timed(v: Variant, fn: Any) -> tuple[float, float, Any]:
    c0, t0 = v.cpu(), time.monotonic()
    out = fn()
    return time.monotonic() - t0, v.cpu() - c0, out


def one_rep(v: Any, load: Any, pool: Any, rep: int, seconds: float, n_s3: int, lists: int,
            phases: tuple[str, ...], get_keys: list[str]) -> dict[str, Any]:
    """One repetition of `phases` on one server. A floor server only has the `get` phase (its app
    answers any path); `get_keys` are what it is asked for, so its requests are as long as a variant's."""
    out: dict[str, Any] = {}
    clients = 8
    floor = isinstance(v, Floor)
    port = v.port if floor else v.anvil.port
    keys = get_keys
    if "put" in phases and not floor:
        c0 = v.cpu()
        put = load.run(port, BUCKET, "put", [[f"small{rep}/{n}/"] for n in range(clients)], seconds)
        put_cpu = v.cpu() - c0
        keys = [k for conn in put.pop("written") for k in conn]
        out["put"] = {"ops_per_s": put["ops_per_s"], "errors": put["errors"],
                      "server_cpu_ms_per_op": round(1000 * put_cpu / max(put["ops"], 1), 4)}
    if "get" in phases:
        c0 = v.cpu()
        get = load.run(port, BUCKET, "get", [keys[n::clients] for n in range(clients)], seconds)
        get_cpu = v.cpu() - c0
        out["get"] = {"ops_per_s": get["ops_per_s"], "errors": get["errors"],
                      "server_cpu_ms_per_op": round(1000 * get_cpu / max(get["ops"], 1), 4)}
    if floor:
        return out
    s3_phases = [(phase, op) for phase, op in (("s3_put", "put"), ("s3_get", "get")) if phase in phases]
    if s3_phases or "s3_list" in phases:
        pool.connect(v.s3_target)
    for phase, op in s3_phases:
        r = pool.run(v.s3_target, op, n_s3)
        out[phase] = {"ops_per_s": r["ops_per_s"], "errors": r["errors"],
                      "server_cpu_ms_per_op": r["server_cpu_ms_per_op"]}
    if "s3_list" in phases:
        # Listings are repeated: one is a few tens of ms of server CPU, near psutil's 10 ms resolution.
        secs, cpu, _ = _timed(v, lambda: [s3_bench.listing(v.s3_target, v.s3, n_s3, rounds=1)
                                          for _ in range(lists)])
        n = n_s3 * lists
        out["s3_list"] = {"keys_per_s": round(n / secs, 1), "server_cpu_ms_per_op": round(1000 * cpu / n, 5)}
    if "list" in phases:
        secs, cpu, n = _timed(v, lambda: sum(_native_list(v) for _ in range(lists)))
        out["list"] = {"keys": n // lists, "keys_per_s": round(n / secs, 1),
                       "server_cpu_ms_per_op": round(1000 * cpu / n, 5)}
    return out


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for phase in runs[0]:
        rate_key = "ops_per_s" if "ops_per_s" in runs[0][phase] else "keys_per_s"
        cpus = [r[phase]["server_cpu_ms_per_op"] for r in runs]
        rates = [r[phase][rate_key] for r in runs]
        out[phase] = {"server_cpu_ms_per_op_min": min(cpus), "server_cpu_ms_per_op_median": statistics.median(cpus),
                      "server_cpu_ms_per_op_runs": cpus, f"{rate_key}_median": statistics.median(rates),
                      f"{rate_key}_runs": rates, "errors": sum(r[phase].get("errors", 0) for r in runs)}
    return out


def _get_keys(v: Variant, load: Any, seconds: float) -> list[str]:
    """Objects for the `get` phase when no `put` phase runs: written once, before any timing."""
    put = load.run(v.anvil.port, BUCKET, "put", [[f"get/{n}/"] for n in range(8)], seconds)
    return [k for conn in put.pop("written") for k in conn]


def app_share(variants: dict[str, Any]) -> dict[str, Any]:
    """Each variant's GET CPU over the first floor's (`anvil`, the configuration `anvil serve` runs, when
    measured): what the application adds to the protocol, medians."""
    floors = {name: r for name, r in variants.items() if name.startswith("floor:") and "get" in r}
    if not floors:
        return {}
    name = "floor:anvil" if "floor:anvil" in floors else next(iter(floors))
    base = floors[name]["get"]["server_cpu_ms_per_op_median"]
    return {"floor": name, "floor_ms": base, "variants": {
        v: {"get_ms": r["get"]["server_cpu_ms_per_op_median"],
            "app_share_ms": round(r["get"]["server_cpu_ms_per_op_median"] - base, 4)}
        for v, r in variants.items() if "get" in r and v != name}}


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--serve-floor":
        serve_floor(int(sys.argv[2]), sys.argv[3])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=SRC_DIR@SERVER")
    ap.add_argument("--floor", action="append", default=[], metavar="CONFIG",
                    help="a floor server (anvil, or changes joined by +: " + ", ".join(FLOOR_CHANGES) + ")")
    ap.add_argument("--floor-src", default=str(ROOT / "src"), help="the source tree whose protocol the floor runs")
    ap.add_argument("--phases", default=",".join(PHASES), help="comma-separated, of " + ", ".join(PHASES))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0, help="native PUT and GET phase length")
    ap.add_argument("--objects", type=int, default=3000, help="S3 PUTs and GETs per phase (also the S3 listing)")
    ap.add_argument("--lists", type=int, default=5, help="full listings per phase (S3 and native)")
    ap.add_argument("--quick", action="store_true", help="1 repetition, short phases")
    args = ap.parse_args()
    if args.quick:
        args.reps, args.seconds, args.objects = 1, 0.5, 200
    phases = tuple(p.strip() for p in args.phases.split(",") if p.strip())
    unknown = set(phases) - set(PHASES)
    if unknown:
        raise SystemExit(f"unknown phases {sorted(unknown)} (known: {', '.join(PHASES)})")
    specs = args.variant or [f"uvicorn={ROOT / 'src'}@uvicorn", f"granian={ROOT / 'src'}@granian"]
    os.environ.setdefault("BOTO_DISABLE_CRT", "true")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="anvil-asgi-") as tmp:
        variants = [Variant(s, Path(tmp)) for s in specs]
        floors = [Floor(c, str(Path(args.floor_src).resolve())) for c in args.floor]
        servers: list[Any] = [*variants, *floors]
        started: list[Any] = []
        loads: dict[str, Any] = {}
        pool = None
        runs: dict[str, list[dict[str, Any]]] = {v.name: [] for v in servers}
        try:
            for v in servers:
                v.start()
                started.append(v)
            # The load generator's processes read the token from the environment when they build a request
            # head; every variant's admin token works only on its own server, so each gets its own pool.
            for v in servers:
                os.environ[native_bench.TOKEN_ENV] = v.token
                loads[v.name] = native_bench.LoadGenerator(2, 4)
            pool = s3_bench.ClientPool(8)
            get_keys: dict[str, list[str]] = {}
            for v in variants:  # warm-up, not measured: imports, pools, SQLite pages
                pool.connect(v.s3_target)
                get_keys[v.name] = _get_keys(v, loads[v.name], 0.3 if "put" in phases else 1.0)
            for f in floors:  # the floor is asked for the same keys as the first variant
                get_keys[f.name] = get_keys[variants[0].name] if variants else [f"get/{n}" for n in range(64)]
                loads[f.name].run(f.port, BUCKET, "get", [get_keys[f.name][n::8] for n in range(8)], 0.3)
            for rep in range(args.reps):
                order = servers[rep % len(servers):] + servers[:rep % len(servers)]
                for v in order:
                    r = one_rep(v, loads[v.name], pool, rep, args.seconds, args.objects, args.lists, phases,
                                get_keys[v.name])
                    runs[v.name].append(r)
                    print(json.dumps({"rep": rep, "variant": v.name, **r}), file=sys.stderr, flush=True)
        finally:
            if pool is not None:
                pool.close()
            for lg in loads.values():
                lg.close()
            for v in started:
                v.stop()
    summary = {v.name: {"src": v.src, "server": v.server, **summarise(runs[v.name])} for v in servers}
    result = {
        "variants": summary,
        "app_share": app_share(summary),
        "machine": {"cpus": os.cpu_count(), "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "reps": args.reps,
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
