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

    python bench/asgi.py                                   # this checkout on uvicorn and on granian
    python bench/asgi.py --variant main=/work/main/src@uvicorn --variant branch=src@uvicorn
    python bench/asgi.py --quick                           # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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
        self.anvil.start()
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


def one_rep(v: Variant, load: Any, pool: Any, rep: int, seconds: float, n_s3: int, lists: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    clients = 8
    c0 = v.cpu()
    put = load.run(v.anvil.port, BUCKET, "put", [[f"small{rep}/{n}/"] for n in range(clients)], seconds)
    put_cpu = v.cpu() - c0
    keys = [k for conn in put.pop("written") for k in conn]
    out["put"] = {"ops_per_s": put["ops_per_s"], "errors": put["errors"],
                  "server_cpu_ms_per_op": round(1000 * put_cpu / max(put["ops"], 1), 4)}
    c0 = v.cpu()
    get = load.run(v.anvil.port, BUCKET, "get", [keys[n::clients] for n in range(clients)], seconds)
    get_cpu = v.cpu() - c0
    out["get"] = {"ops_per_s": get["ops_per_s"], "errors": get["errors"],
                  "server_cpu_ms_per_op": round(1000 * get_cpu / max(get["ops"], 1), 4)}
    pool.connect(v.s3_target)
    for phase, op in (("s3_put", "put"), ("s3_get", "get")):
        r = pool.run(v.s3_target, op, n_s3)
        out[phase] = {"ops_per_s": r["ops_per_s"], "errors": r["errors"],
                      "server_cpu_ms_per_op": r["server_cpu_ms_per_op"]}
    # Listings are repeated: one is a few tens of ms of server CPU, near psutil's 10 ms resolution.
    secs, cpu, _ = _timed(v, lambda: [s3_bench.listing(v.s3_target, v.s3, n_s3, rounds=1) for _ in range(lists)])
    n = n_s3 * lists
    out["s3_list"] = {"keys_per_s": round(n / secs, 1), "server_cpu_ms_per_op": round(1000 * cpu / n, 5)}
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=SRC_DIR@SERVER")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0, help="native PUT and GET phase length")
    ap.add_argument("--objects", type=int, default=3000, help="S3 PUTs and GETs per phase (also the S3 listing)")
    ap.add_argument("--lists", type=int, default=5, help="full listings per phase (S3 and native)")
    ap.add_argument("--quick", action="store_true", help="1 repetition, short phases")
    args = ap.parse_args()
    if args.quick:
        args.reps, args.seconds, args.objects = 1, 0.5, 200
    specs = args.variant or [f"uvicorn={ROOT / 'src'}@uvicorn", f"granian={ROOT / 'src'}@granian"]
    os.environ.setdefault("BOTO_DISABLE_CRT", "true")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="anvil-asgi-") as tmp:
        variants = [Variant(s, Path(tmp)) for s in specs]
        for v in variants:
            v.start()
        # The load generator's processes read the token from the environment when they build a request
        # head; every variant's admin token works only on its own server, so each gets its own pool.
        loads = {}
        for v in variants:
            os.environ[native_bench.TOKEN_ENV] = v.token
            loads[v.name] = native_bench.LoadGenerator(2, 4)
        pool = s3_bench.ClientPool(8)
        runs: dict[str, list[dict[str, Any]]] = {v.name: [] for v in variants}
        try:
            for v in variants:  # warm-up, not measured: imports, pools, SQLite pages
                pool.connect(v.s3_target)
                loads[v.name].run(v.anvil.port, BUCKET, "put", [[f"warm/{n}/"] for n in range(8)], 0.3)
            for rep in range(args.reps):
                order = variants[rep % len(variants):] + variants[:rep % len(variants)]
                for v in order:
                    r = one_rep(v, loads[v.name], pool, rep, args.seconds, args.objects, args.lists)
                    runs[v.name].append(r)
                    print(json.dumps({"rep": rep, "variant": v.name, **r}), file=sys.stderr, flush=True)
        finally:
            pool.close()
            for lg in loads.values():
                lg.close()
            for v in variants:
                v.stop()
    result = {
        "variants": {v.name: {"src": v.src, "server": v.server, **summarise(runs[v.name])} for v in variants},
        "machine": {"cpus": os.cpu_count(), "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "reps": args.reps,
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
