"""S3 gateway benchmark: one boto3 workload against Anvil and against moto's S3 server, same run.

The load generator must not be the bottleneck: a boto3 call costs ~1.5 ms of client CPU, so 8
threads in one process (one GIL) cap out long before either server does. Instead the 8 clients
are separate processes (multiprocessing, spawn), each with its own boto3 client created and
warmed before timing. A phase is timed by wall clock from a shared start barrier to the last
client's finish, and reports client CPU seconds (all client processes) next to server CPU
seconds (psutil on the server pid) so a reader can see who was saturated. The same harness and
the same client processes drive both servers.

Figures (per server, then Anvil/moto ratios):
  small_put / small_get   ops/s of 1 KiB PutObject / GetObject, 8 concurrent client processes
  list                    keys/s of a full ListObjectsV2 pagination (1,000 per page) over the
                          small objects (populated identically on both servers by the PUT phase)
  large_put / large_get   MB/s of one object through boto3's transfer manager
                          (upload_fileobj from a file on disk, download_fileobj to /dev/null;
                          multipart, 32 MiB parts, max_concurrency 8) -- what `aws s3 cp` does
Targets: >= 5x moto on small operations and listing, >= 200 MB/s for large objects each way.

The two servers run side by side and the workload is interleaved over --reps repetitions (default
3; the order alternates, anvil-moto then moto-anvil), so a change in the shared machine's load hits
both alike. Per phase the output gives the run with the median rate, plus `rate_min`,
`rate_median` and `rate_runs` over the repetitions; ratios are of medians. `machine` carries the
load average before and after.

Optional: --aws-cli-gib N uploads N GiB through `aws s3 cp` (multipart) to Anvil only and reports
the server's peak RSS growth over its idle baseline (the issue's "RSS stays flat" check).

    python bench/s3.py [--quick] [--objects 10000] [--large-mib 256] [--workers 8] [--reps 3] [--aws-cli-gib 1]
"""

from __future__ import annotations

import argparse
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
from pathlib import Path
from typing import Any

import httpx
import psutil

# awscrt (an Anvil dependency, for CRC64NVME) makes botocore sign with the CRT signer, which costs the
# client ~0.1 ms more per call here than botocore's own; spawned client processes inherit this.
os.environ.setdefault("BOTO_DISABLE_CRT", "true")

MiB = 1024 * 1024
REGION = "us-east-1"
BUCKET = "bench"
SMALL_SIZE = 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def make_client(endpoint: str, key: str, secret: str) -> Any:
    import boto3
    from botocore.config import Config

    # Client-side work that measures nothing about the server is switched off, for both peers alike:
    # parameter validation, and the CRC32 boto3 otherwise computes on every body (and verifies on
    # every GET). That is ~0.3-0.6 ms of client CPU per call on the same two cores as the server.
    cfg = Config(signature_version="s3v4", s3={"addressing_style": "path"}, max_pool_connections=16,
                 retries={"max_attempts": 1, "mode": "standard"}, parameter_validation=False,
                 request_checksum_calculation="when_required", response_checksum_validation="when_required")
    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=REGION, config=cfg,
                                          aws_access_key_id=key, aws_secret_access_key=secret)


class Target:
    def __init__(self, name: str, endpoint: str, key: str, secret: str, proc: subprocess.Popen):
        self.name, self.endpoint, self.key, self.secret, self.proc = name, endpoint, key, secret, proc
        self.ps = psutil.Process(proc.pid)

    def creds(self) -> tuple[str, str, str]:
        return self.endpoint, self.key, self.secret

    def cpu_s(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system + t.children_user + t.children_system

    def rss(self) -> int:
        return self.ps.memory_info().rss

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _pinned(cpus: set[int] | None) -> Any:
    """A preexec_fn pinning the server process, and so every thread it starts, to `cpus`."""
    return (lambda: os.sched_setaffinity(0, cpus)) if cpus else None


def start_anvil(data_dir: Path, cpus: set[int] | None = None) -> Target:
    port = free_port()
    env = {**os.environ, "ANVIL_MODE": "development"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "anvil.cli.main", "serve", "--storage-path", str(data_dir),
         "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, preexec_fn=_pinned(cpus),
    )
    endpoint = f"http://127.0.0.1:{port}"
    wait_http(endpoint + "/anvil/health/live", proc)
    cred_file = data_dir / "bootstrap" / "dev-app.json"
    deadline = time.monotonic() + 30
    while not cred_file.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    creds = json.loads(cred_file.read_text())  # the development application: an ordinary tenant app
    return Target("anvil", endpoint, creds["client_id"], creds["client_secret"], proc)


def start_moto(cpus: set[int] | None = None) -> Target:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_pinned(cpus))
    endpoint = f"http://127.0.0.1:{port}"
    wait_http(endpoint + "/moto-api/", proc)
    return Target("moto", endpoint, "testing", "testing", proc)


# ---------------------------------------------------------------- client processes


def parse_cpus(spec: str | None) -> set[int] | None:
    """`0-3,6` -> {0, 1, 2, 3, 6}; None keeps the default (every core)."""
    if not spec:
        return None
    cpus: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def _worker(w: int, workers: int, commands: Any, results: Any, barrier: Any, cpus: set[int] | None) -> None:
    """One client process: its own boto3 client per target, created and warmed before any timed phase."""
    if cpus:
        os.sched_setaffinity(0, cpus)
    client = None
    body = os.urandom(SMALL_SIZE)
    while True:
        cmd = commands.get()
        if cmd[0] == "exit":
            return
        if cmd[0] == "connect":
            client = make_client(*cmd[1])
            client.head_bucket(Bucket=BUCKET)  # opens the connection, loads every model outside timing
            results.put((w, "ready", 0.0, 0.0, 0))
            continue
        op, n_ops = cmd
        errors = 0
        barrier.wait()
        cpu0 = time.process_time()
        for i in range(w, n_ops, workers):
            key = f"small/{i:06d}"
            try:
                if op == "put":
                    client.put_object(Bucket=BUCKET, Key=key, Body=body)
                else:
                    client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
            except Exception:  # counted, reported; a benchmark with errors is not a result
                errors += 1
        results.put((w, "done", time.monotonic(), time.process_time() - cpu0, errors))


class ClientPool:
    def __init__(self, workers: int, cpus: set[int] | None = None):
        ctx = mp.get_context("spawn")
        self.workers = workers
        self.barrier = ctx.Barrier(workers + 1)
        self.results = ctx.Queue()
        self.queues = [ctx.Queue() for _ in range(workers)]
        self.procs = [ctx.Process(target=_worker, args=(w, workers, self.queues[w], self.results, self.barrier, cpus),
                                  daemon=True) for w in range(workers)]
        for p in self.procs:
            p.start()

    def _collect(self) -> list[tuple]:
        out = [self.results.get(timeout=600) for _ in range(self.workers)]
        return out

    def connect(self, target: Target) -> None:
        for q in self.queues:
            q.put(("connect", target.creds()))
        self._collect()

    def run(self, target: Target, op: str, n_ops: int) -> dict[str, Any]:
        for q in self.queues:
            q.put((op, n_ops))
        self.barrier.wait()
        start = time.monotonic()
        server_cpu0 = target.cpu_s()
        done = self._collect()
        server_cpu = target.cpu_s() - server_cpu0
        elapsed = max(d[2] for d in done) - start
        return {"ops": n_ops, "ops_per_s": round(n_ops / elapsed, 1), "seconds": round(elapsed, 3),
                "errors": sum(d[4] for d in done), "client_cpu_s": round(sum(d[3] for d in done), 2),
                "server_cpu_s": round(server_cpu, 2),
                "client_cpu_ms_per_op": round(1000 * sum(d[3] for d in done) / n_ops, 3),
                "server_cpu_ms_per_op": round(1000 * server_cpu / n_ops, 3)}

    def close(self) -> None:
        for q in self.queues:
            q.put(("exit",))
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()


# ---------------------------------------------------------------- phases


def _timed(target: Target, fn: Any) -> tuple[float, float, float]:
    """(seconds, client CPU s of this process, server CPU s) around fn()."""
    s0, c0, t0 = target.cpu_s(), time.process_time(), time.monotonic()
    fn()
    return time.monotonic() - t0, time.process_time() - c0, target.cpu_s() - s0


def listing(target: Target, s3: Any, expected: int, rounds: int = 3) -> dict[str, Any]:
    best: dict[str, Any] = {}
    for _ in range(rounds):
        count = 0

        def page_through() -> None:
            nonlocal count
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="small/",
                                                                     PaginationConfig={"PageSize": 1000}):
                count += len(page.get("Contents", []))

        secs, ccpu, scpu = _timed(target, page_through)
        if count != expected:
            raise RuntimeError(f"{target.name}: listed {count} keys, expected {expected}")
        rate = count / secs
        if rate > best.get("keys_per_s", 0):
            best = {"keys": count, "keys_per_s": round(rate, 1), "seconds": round(secs, 3),
                    "client_cpu_s": round(ccpu, 2), "server_cpu_s": round(scpu, 2)}
    return best


def large(target: Target, s3: Any, src: Path, size: int) -> dict[str, Any]:
    from boto3.s3.transfer import TransferConfig

    xfer = TransferConfig(multipart_threshold=16 * MiB, multipart_chunksize=32 * MiB, max_concurrency=8)
    out: dict[str, Any] = {}

    def up() -> None:
        with open(src, "rb") as f:
            s3.upload_fileobj(f, BUCKET, "large", Config=xfer)

    def down() -> None:
        with open(os.devnull, "wb") as f:
            s3.download_fileobj(BUCKET, "large", f, Config=xfer)

    for name, fn in (("put", up), ("get", down)):
        secs, ccpu, scpu = _timed(target, fn)
        out[name] = {"mb_per_s": round(size / MiB / secs, 1), "seconds": round(secs, 3),
                     "client_cpu_s": round(ccpu, 2), "server_cpu_s": round(scpu, 2)}
    head = s3.head_object(Bucket=BUCKET, Key="large")
    if head["ContentLength"] != size:
        raise RuntimeError(f"{target.name}: large object is {head['ContentLength']} bytes, expected {size}")
    return out


RATE = {"small_put": "ops_per_s", "small_get": "ops_per_s", "list": "keys_per_s",
        "large_put": "mb_per_s", "large_get": "mb_per_s"}


def workload(pool: ClientPool, target: Target, *, objects: int, large_src: Path, large_size: int) -> dict[str, Any]:
    """One repetition (the bucket exists; a later repetition overwrites the same keys)."""
    s3 = make_client(*target.creds())
    pool.connect(target)
    result: dict[str, Any] = {}
    result["small_put"] = pool.run(target, "put", objects)
    result["small_get"] = pool.run(target, "get", objects)
    result["list"] = listing(target, s3, objects)
    lg = large(target, s3, large_src, large_size)
    result["large_put"], result["large_get"] = lg["put"], lg["get"]
    return result


def aws_cli_upload(target: Target, src: Path, key: str = "aws-cli-upload") -> dict[str, Any]:
    """`aws s3 cp` of src (multipart) while sampling the server's RSS every 20 ms."""
    aws = shutil.which("aws") or str(Path(sys.executable).parent / "aws")
    env = {**os.environ, "AWS_ACCESS_KEY_ID": target.key, "AWS_SECRET_ACCESS_KEY": target.secret,
           "AWS_DEFAULT_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true"}
    baseline = target.rss()
    peak = baseline
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, target.rss())
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.monotonic()
    proc = subprocess.run([aws, "--endpoint-url", target.endpoint, "s3", "cp", "--only-show-errors", str(src),
                           f"s3://{BUCKET}/{key}"], env=env, capture_output=True, text=True)
    secs = time.monotonic() - t0
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"aws s3 cp failed: {proc.stderr.strip()}")
    size = src.stat().st_size
    return {"bytes": size, "seconds": round(secs, 2), "mb_per_s": round(size / MiB / secs, 1),
            "server_rss_baseline_mib": round(baseline / MiB, 1), "server_rss_peak_mib": round(peak / MiB, 1),
            "server_rss_growth_mib": round((peak - baseline) / MiB, 1)}


def aws_cli_rss(target: Target, tmp: Path, mib: int) -> dict[str, Any]:
    """A 64 MiB probe, then the big upload: RSS growth over the idle baseline should not scale with size."""
    baseline = target.rss()
    out: dict[str, Any] = {"server_rss_idle_mib": round(baseline / MiB, 1)}
    for label, size in (("probe", 64), ("large", mib)):
        src = tmp / f"aws-cli-{label}.bin"
        write_random(src, size)
        fig = aws_cli_upload(target, src, key=f"aws-cli-{label}")
        fig["server_rss_growth_over_idle_mib"] = round(fig["server_rss_peak_mib"] - baseline / MiB, 1)
        out[label] = fig
        src.unlink()
    out["rss_flat"] = out["large"]["server_rss_growth_over_idle_mib"] <= \
        out["probe"]["server_rss_growth_over_idle_mib"] + 64
    return out


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per phase: the repetition with the median rate, with min, median and every rate."""
    out: dict[str, Any] = {}
    for phase, field in RATE.items():
        figs = sorted((r[phase] for r in runs), key=lambda f: f[field])
        rates = [r[phase][field] for r in runs]
        out[phase] = {**figs[(len(figs) - 1) // 2], "rate_min": min(rates),
                      "rate_median": round(statistics.median(rates), 1), "rate_runs": rates}
        if "errors" in out[phase]:
            out[phase]["errors"] = sum(r[phase]["errors"] for r in runs)
    return out


def write_random(path: Path, mib: int) -> None:
    block = os.urandom(MiB)
    with open(path, "wb") as f:
        for i in range(mib):
            f.write(block[i % 251:] + block[:i % 251])  # distinct blocks, so no layer can dedupe them


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes for a fast smoke run")
    ap.add_argument("--objects", type=int, default=None, help="small objects (also the listing size)")
    ap.add_argument("--large-mib", type=int, default=None)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 3; quick 1)")
    ap.add_argument("--aws-cli-gib", type=float, default=0, help="also upload N GiB with `aws s3 cp` to Anvil "
                    "and report peak server RSS growth")
    ap.add_argument("--only", choices=("anvil", "moto"), default=None, help="run one server (no ratios)")
    # On a machine with more cores, keep the load generator off the servers' cores (e.g. --server-cpus
    # 0-1 --client-cpus 2-9): the wall-clock ratio then measures the servers, not the shared CPU.
    ap.add_argument("--server-cpus", default=None, help="cores for the server processes, e.g. 0-1")
    ap.add_argument("--client-cpus", default=None, help="cores for the client processes, e.g. 2-9")
    args = ap.parse_args()
    objects = args.objects or (300 if args.quick else 10_000)
    reps = args.reps or (1 if args.quick else 3)
    load_before = os.getloadavg()
    large_mib = args.large_mib or (16 if args.quick else 256)
    server_cpus, client_cpus = parse_cpus(args.server_cpus), parse_cpus(args.client_cpus)
    params = {"objects": objects, "small_size": SMALL_SIZE, "workers": args.workers, "large_mib": large_mib,
              "cpus": os.cpu_count(), "client": "separate processes (spawn), one boto3 client each",
              "server_cpus": sorted(server_cpus) if server_cpus else "all",
              "client_cpus": sorted(client_cpus) if client_cpus else "all", "reps": reps}
    tmp = Path(tempfile.mkdtemp(prefix="anvil-bench-s3-"))
    results: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    pool = ClientPool(args.workers, client_cpus)
    try:
        src = tmp / "large.bin"
        write_random(src, large_mib)
        starters = {"anvil": lambda: start_anvil(tmp / "data", server_cpus), "moto": lambda: start_moto(server_cpus)}
        names = [args.only] if args.only else ["anvil", "moto"]
        targets: dict[str, Target] = {}
        try:
            for name in names:
                targets[name] = starters[name]()
                make_client(*targets[name].creds()).create_bucket(Bucket=BUCKET)
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
            for rep in range(reps):
                for name in names if rep % 2 == 0 else names[::-1]:
                    runs[name].append(workload(pool, targets[name], objects=objects, large_src=src,
                                               large_size=large_mib * MiB))
            results = {name: summarise(runs[name]) for name in names}
            if "anvil" in targets and args.aws_cli_gib:
                extra["aws_cli_upload"] = aws_cli_rss(targets["anvil"], tmp, int(args.aws_cli_gib * 1024))
        finally:
            for target in targets.values():
                target.stop()
    finally:
        pool.close()
        shutil.rmtree(tmp, ignore_errors=True)
    machine = {"load_average_before": [round(x, 2) for x in load_before],
               "load_average_after": [round(x, 2) for x in os.getloadavg()]}
    doc: dict[str, Any] = {"benchmark": "s3", "quick": args.quick, "params": params, "machine": machine,
                           **results, **extra}
    if "anvil" in results and "moto" in results:
        a, m = results["anvil"], results["moto"]
        rate = RATE
        ratio = {k: round(a[k]["rate_median"] / m[k]["rate_median"], 2) for k in rate}
        doc["ratio_anvil_over_moto"] = ratio
        # The same work on both servers: moto's server CPU seconds over Anvil's says how much cheaper Anvil
        # serves it, whatever share of the (shared) cores the client processes took.
        doc["server_cpu_moto_over_anvil"] = {k: round(m[k]["server_cpu_s"] / max(a[k]["server_cpu_s"], 0.01), 2)
                                             for k in rate}
        # The most any server could score on these cores against this client: Anvil's server cost set to
        # zero, leaving only the boto3 clients' own CPU (their cores for the 8 concurrent clients; the
        # listing is one client paging serially). A ceiling under 5 means the ratio is client-bound here.
        cpus = len(client_cpus) if client_cpus else (os.cpu_count() or 1)
        doc["client_bound_ceiling"] = {
            k: round(cpus * 1000 / a[k]["client_cpu_ms_per_op"] / m[k]["ops_per_s"], 2)
            for k in ("small_put", "small_get")}
        doc["client_bound_ceiling"]["list"] = round(m["list"]["seconds"] / max(a["list"]["client_cpu_s"], 0.01), 2)
        doc["targets_met"] = {
            "small_ops_5x_moto": ratio["small_put"] >= 5 and ratio["small_get"] >= 5,
            "listing_5x_moto": ratio["list"] >= 5,
            "large_200_mb_s": a["large_put"]["mb_per_s"] >= 200 and a["large_get"]["mb_per_s"] >= 200,
            "no_errors": a["small_put"]["errors"] == a["small_get"]["errors"] == 0,
        }
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
