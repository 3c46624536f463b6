"""S3 gateway benchmark: one boto3 workload against Anvil and against moto's S3 server, same run.

Prints JSON with both results and the Anvil/moto ratios:
  small-object PUT and GET operations/s with 8 concurrent clients (threads, one boto3 client each),
  listing N keys (keys/s through ListObjectsV2 pages of 1,000),
  one large object PUT and GET (MB/s through boto3's transfer manager, as `aws s3 cp` does).
Targets: >= 5x moto on small operations and listing, >= 200 MB/s for large objects each way.
The issue's 1 GiB upload figure: run with --large-mib 1024.

    python bench/s3.py [--quick] [--large-mib 256] [--objects 10000]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import httpx
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

MiB = 1024 * 1024
REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 30) -> None:
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


class Target:
    def __init__(self, name: str, endpoint: str, key: str, secret: str, proc: subprocess.Popen):
        self.name, self.endpoint, self.key, self.secret, self.proc = name, endpoint, key, secret, proc

    def client(self):
        cfg = Config(signature_version="s3v4", s3={"addressing_style": "path"}, max_pool_connections=16,
                     retries={"max_attempts": 1, "mode": "standard"})
        return boto3.session.Session().client("s3", endpoint_url=self.endpoint, region_name=REGION, config=cfg,
                                              aws_access_key_id=self.key, aws_secret_access_key=self.secret)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_anvil(data_dir: Path) -> Target:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "anvil.cli.main", "serve", "--storage-path", str(data_dir),
         "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    wait_http(endpoint + "/anvil/health/live", proc)
    creds = json.loads((data_dir / "secrets" / "s3-dev.json").read_text())
    return Target("anvil", endpoint, creds["access_key_id"], creds["secret_access_key"], proc)


def start_moto() -> Target:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    wait_http(endpoint + "/moto-api/", proc)
    return Target("moto", endpoint, "testing", "testing", proc)


def run_concurrent(target: Target, n_ops: int, workers: int, op) -> float:
    """Run op(client, i) for i in range(n_ops) over `workers` threads; return ops/s."""
    clients = [target.client() for _ in range(workers)]
    for c in clients:  # warm the connection pools outside the timed section
        c.list_buckets()
    barrier = threading.Barrier(workers + 1)

    def worker(w: int) -> None:
        barrier.wait()
        for i in range(w, n_ops, workers):
            op(clients[w], i)

    with ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(worker, w) for w in range(workers)]
        barrier.wait()
        start = time.perf_counter()
        for f in futures:
            f.result()
        elapsed = time.perf_counter() - start
    return n_ops / elapsed


def workload(target: Target, *, objects: int, small_size: int, workers: int, large_mib: int) -> dict:
    bucket = "bench"
    s3 = target.client()
    s3.create_bucket(Bucket=bucket)
    body = os.urandom(small_size)
    result: dict = {}
    result["small_put_ops_s"] = run_concurrent(
        target, objects, workers, lambda c, i: c.put_object(Bucket=bucket, Key=f"small/{i:06d}", Body=body))
    result["small_get_ops_s"] = run_concurrent(
        target, objects, workers, lambda c, i: c.get_object(Bucket=bucket, Key=f"small/{i:06d}")["Body"].read())

    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        count = 0
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="small/"):
            count += len(page.get("Contents", []))
        elapsed = time.perf_counter() - start
        assert count == objects, (target.name, count)
        best = max(best, count / elapsed)
    result["list_keys_s"] = best

    size = large_mib * MiB
    payload = os.urandom(MiB) * large_mib
    xfer = TransferConfig(multipart_threshold=16 * MiB, multipart_chunksize=16 * MiB, max_concurrency=8)
    start = time.perf_counter()
    s3.upload_fileobj(io.BytesIO(payload), bucket, "large", Config=xfer)
    result["large_put_mb_s"] = size / MiB / (time.perf_counter() - start)

    class Sink(io.RawIOBase):
        def __init__(self) -> None:
            self.n = 0

        def writable(self) -> bool:
            return True

        def write(self, b) -> int:
            self.n += len(b)
            return len(b)

        def seek(self, offset: int, whence: int = 0) -> int:
            return offset

    sink = Sink()
    start = time.perf_counter()
    s3.download_fileobj(bucket, "large", sink, Config=xfer)
    result["large_get_mb_s"] = size / MiB / (time.perf_counter() - start)
    assert sink.n == size, (target.name, sink.n)
    return {k: round(v, 1) for k, v in result.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes for a fast smoke run")
    ap.add_argument("--objects", type=int, default=None, help="small objects (also the listing size)")
    ap.add_argument("--large-mib", type=int, default=None)
    ap.add_argument("--workers", type=int, default=8)
    args = ap.parse_args()
    objects = args.objects or (1000 if args.quick else 10_000)
    large = args.large_mib or (32 if args.quick else 256)
    params = {"objects": objects, "small_size": 1024, "workers": args.workers, "large_mib": large,
              "cpus": os.cpu_count()}
    tmp = Path(tempfile.mkdtemp(prefix="anvil-bench-s3-"))
    results = {}
    try:
        for name, start in (("anvil", lambda: start_anvil(tmp / "data")), ("moto", start_moto)):
            target = start()
            try:
                results[name] = workload(target, objects=objects, small_size=1024, workers=args.workers,
                                         large_mib=large)
            finally:
                target.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ratio = {k: round(results["anvil"][k] / results["moto"][k], 2) for k in results["anvil"]}
    targets = {
        "small_ops_5x_moto": ratio["small_put_ops_s"] >= 5 and ratio["small_get_ops_s"] >= 5,
        "listing_5x_moto": ratio["list_keys_s"] >= 5,
        "large_200_mb_s": results["anvil"]["large_put_mb_s"] >= 200 and results["anvil"]["large_get_mb_s"] >= 200,
    }
    print(json.dumps({"benchmark": "s3", "params": params, "anvil": results["anvil"], "moto": results["moto"],
                      "ratio_anvil_over_moto": ratio, "targets_met": targets}, indent=2))


if __name__ == "__main__":
    main()
