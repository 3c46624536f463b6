"""Artefacts benchmark: push and pull of a model directory against `aws s3 sync` of the same
directory to the same server's S3 gateway, in the same run; and single-tensor fetch latency.

Per repetition (interleaved, so load drifts hit both sides alike):
  aws_up     `aws s3 sync DIR s3://BUCKET/PREFIX` (a fresh prefix: everything is uploaded)
  anvil_push `AnvilClient.push_model` into a fresh bucket (nothing is deduplicated by the bucket
             check: every file is hashed locally, uploaded, verified by the server and recorded)
  aws_down   `aws s3 sync s3://BUCKET/PREFIX NEWDIR`
  anvil_pull `AnvilClient.pull_artefact` into NEWDIR (every file's SHA-256 verified)
Then: `get_tensor` of a 4 MiB tensor, N times, p50/p99/max in ms.

Reports JSON: min and median seconds per operation, MB/s, the Anvil/aws ratios (target <= 1.2),
the tensor latencies (target p99 <= 20 ms), and the load average before and after.

    python bench/artefacts.py [--mib 1024] [--reps 3] [--tensor-fetches 300] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

MiB = 1024 * 1024
TENSOR_MIB = 4  # each tensor is 4 MiB (1 Mi float32): the single-tensor fetch target's size


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model(root: Path, mib: int) -> Path:
    """A model directory of about `mib` MiB: safetensors shards of 4 MiB F32 tensors, a config, a tokenizer."""
    from safetensors.numpy import save_file

    d = root / "model"
    d.mkdir(parents=True)
    rng = np.random.default_rng(1)
    shard_mib = 256
    n_tensors = max(1, mib // TENSOR_MIB)
    per_shard = shard_mib // TENSOR_MIB
    shard = 0
    for start in range(0, n_tensors, per_shard):
        tensors = {f"layers.{i}.weight": np.frombuffer(rng.bytes(TENSOR_MIB * MiB), np.float32).reshape(1024, 1024)
                   for i in range(start, min(n_tensors, start + per_shard))}
        save_file(tensors, str(d / f"model-{shard:05d}.safetensors"))
        shard += 1
    (d / "config.json").write_text(json.dumps({"layers": n_tensors, "hidden": 1024}))
    (d / "tokenizer.json").write_text(json.dumps({"vocab": {f"t{i}": i for i in range(5000)}}))
    return d


def dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tensor-fetches", type=int, default=300)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from anvil.client import AnvilClient

    load_before = [round(x, 2) for x in os.getloadavg()]
    work = Path(tempfile.mkdtemp(prefix="anvil-bench-artefacts-"))
    server = None
    try:
        model = make_model(work, args.mib)
        size = dir_bytes(model)
        port = free_port()
        endpoint = f"http://127.0.0.1:{port}"
        env = {**os.environ, "ANVIL_DISK_RESERVE": "1M"}
        log = open(work / "server.log", "wb")
        server = subprocess.Popen([sys.executable, "-m", "anvil.cli.main", "serve", "--storage-path",
                                   str(work / "data"), "--listen", f"127.0.0.1:{port}"], stdout=log,
                                  stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(endpoint + "/anvil/health/live", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("server did not start")
            time.sleep(0.1)
        cred = json.loads((work / "data" / "bootstrap" / "first-admin.json").read_text())
        client = AnvilClient(endpoint, client_id=cred["client_id"], client_secret=cred["client_secret"], timeout=600)
        aws = shutil.which("aws") or str(Path(sys.executable).parent / "aws")
        aws_env = {**os.environ, "AWS_ACCESS_KEY_ID": cred["client_id"], "AWS_SECRET_ACCESS_KEY": cred["client_secret"],
                   "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
        peer_bucket = "bench-aws"
        client.create_bucket(peer_bucket)

        def aws_sync(src: str, dst: str) -> None:
            subprocess.run([aws, "--endpoint-url", endpoint, "s3", "sync", "--only-show-errors", src, dst],
                           env=aws_env, check=True, capture_output=True)

        times: dict[str, list[float]] = {"aws_up": [], "anvil_push": [], "aws_down": [], "anvil_pull": []}
        last_bucket = ""
        for rep in range(args.reps):
            bucket = f"bench-art-{rep}"
            client.create_bucket(bucket)
            prefix = f"s3://{peer_bucket}/rep{rep}"
            times["aws_up"].append(timed(lambda: aws_sync(str(model), prefix)))  # noqa: B023
            times["anvil_push"].append(timed(lambda: client.push_model(bucket, "m", model, tag="v1")))  # noqa: B023
            down = work / f"aws-down-{rep}"
            times["aws_down"].append(timed(lambda: aws_sync(prefix, str(down))))  # noqa: B023
            pulled = work / f"anvil-pull-{rep}"
            times["anvil_pull"].append(timed(lambda: client.pull_artefact(bucket, "m", "v1", pulled)))  # noqa: B023
            assert dir_bytes(pulled) == size and dir_bytes(down) == size
            shutil.rmtree(down)
            shutil.rmtree(pulled)
            last_bucket = bucket
        # Single-tensor fetches: one 4 MiB tensor, the same SDK call a loader would make.
        names = [t["name"] for t in client.list_tensors(last_bucket, "m", "v1")]
        lat = []
        for i in range(args.tensor_fetches):
            name = names[i % len(names)]
            t0 = time.perf_counter()
            data, dtype, shape = client.get_tensor(last_bucket, "m", "v1", name)
            lat.append((time.perf_counter() - t0) * 1000)
            assert len(data) == TENSOR_MIB * MiB and dtype == "F32"
        lat.sort()

        def stats(xs: list[float]) -> dict[str, Any]:
            return {"runs": [round(x, 3) for x in xs], "min_s": round(min(xs), 3),
                    "median_s": round(statistics.median(xs), 3),
                    "mb_per_s_at_min": round(size / MiB / min(xs), 1)}

        res: dict[str, Any] = {
            "bytes": size, "files": sum(1 for p in model.rglob("*") if p.is_file()), "reps": args.reps,
            "cpus": os.cpu_count(), **{k: stats(v) for k, v in times.items()},
        }
        res["ratio_push_vs_aws_up"] = {"min": round(min(times["anvil_push"]) / min(times["aws_up"]), 2),
                                       "median": round(statistics.median(times["anvil_push"])
                                                       / statistics.median(times["aws_up"]), 2)}
        res["ratio_pull_vs_aws_down"] = {"min": round(min(times["anvil_pull"]) / min(times["aws_down"]), 2),
                                         "median": round(statistics.median(times["anvil_pull"])
                                                         / statistics.median(times["aws_down"]), 2)}
        res["tensor_fetch_ms"] = {"tensor_bytes": TENSOR_MIB * MiB, "fetches": len(lat),
                                  "p50": round(lat[len(lat) // 2], 2),
                                  "p99": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 2),
                                  "max": round(lat[-1], 2)}
        res["targets"] = {"push_pull_ratio_max": 1.2, "tensor_p99_ms_max": 20}
        res["load_average_before"] = load_before
        res["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
        client.close()
        out = json.dumps(res, indent=2)
        print(out)
        if args.out:
            Path(args.out).write_text(out)
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(20)
            except subprocess.TimeoutExpired:
                server.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
