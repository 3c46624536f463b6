"""Instructions per small S3 (or native) PUT or GET in the server, counted by callgrind: a figure the machine's
load does not move.

CPU time per operation could not separate a 10 % change on the shared 2-core machine (docs/performance.md,
"S3 small PUT: Python work per request"). This runs a real `anvil serve` under
`valgrind --tool=callgrind --instr-atstart=no --separate-threads=yes`, makes `--warmup` boto3 PutObject
calls of `--size` bytes uninstrumented, switches instrumentation on (`callgrind_control -i on`), makes
`--puts` more one after the other, dumps the counters and prints one JSON line: instructions per PUT in
the whole server and per thread (thread 1 is the event loop; the catalog writer is the busiest other).
Repeatable to well under 1 % whatever the load; valgrind runs OpenSSL's generic code, so hashing weighs
more here than on the CPU.

    python bench/s3put_instructions.py [--puts 200] [--warmup 50] [--size 1024] [--src DIR] [--keep DIR]
                                       [--api native] [--op get]

`--src`: the `src` folder of another checkout to measure (a base to compare against). `--api native`: the
native API's `PUT /anvil/v1/buckets/{bucket}/object?key=K` with a Bearer token (httpx, one keep-alive
connection) instead of boto3's PutObject. `--op get`: GETs instead of PUTs (`--puts` of them, after
`--warmup` uninstrumented ones), of `--objects` objects of `--size` bytes PUT first and read in turn; the
native GET is sent on one keep-alive socket with exactly the request head of `bench/objects.py` (Host and
a Bearer token), the S3 one by boto3's GetObject.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("BOTO_DISABLE_CRT", "true")  # as bench/s3.py: botocore's own signer

HERE = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _client(endpoint: str, key: str, secret: str):  # noqa: ANN202
    import boto3
    from botocore.config import Config

    cfg = Config(signature_version="s3v4", s3={"addressing_style": "path"}, retries={"max_attempts": 1},
                 parameter_validation=False, request_checksum_calculation="when_required",
                 response_checksum_validation="when_required", read_timeout=300, connect_timeout=60)
    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name="us-east-1", config=cfg,
                                          aws_access_key_id=key, aws_secret_access_key=secret)


def _totals(files: list[Path]) -> dict[int, int]:
    """Instructions by thread number, from callgrind's dumps (`summary:` or `totals:` lines)."""
    out: dict[int, int] = {}
    for f in files:
        m = re.search(r"-(\d+)$", f.name)
        thread = int(m.group(1)) if m else 1
        for line in f.read_text(errors="replace").splitlines():
            if line.startswith(("summary:", "totals:")):
                out[thread] = out.get(thread, 0) + int(line.split()[1])
                break
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--puts", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--src", help="the src folder of the checkout to measure (default: this one)")
    ap.add_argument("--keep", help="copy callgrind's dumps to this folder (for callgrind_annotate)")
    ap.add_argument("--api", choices=("s3", "native"), default="s3")
    ap.add_argument("--op", choices=("put", "get"), default="put")
    ap.add_argument("--objects", type=int, default=100, help="objects read in turn by --op get")
    args = ap.parse_args()
    load_before = os.getloadavg()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        sys.exit("valgrind (with callgrind_control) is needed")
    src = Path(args.src).resolve() if args.src else HERE / "src"
    work = Path(tempfile.mkdtemp(prefix="anvil-cg-"))
    port = _free_port()
    env = {**os.environ, "ANVIL_MODE": "development", "PYTHONPATH": str(src), "ANVIL_ACCESS_LOG": "off"}
    out = work / "cg.out"
    cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes",
           f"--callgrind-out-file={out}", sys.executable, "-m", "anvil.cli.main", "serve",
           "--storage-path", str(work / "store"), "--listen", f"127.0.0.1:{port}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        import httpx

        deadline = time.monotonic() + 600
        cred_file = work / "store" / "bootstrap" / "dev-app.json"
        while True:
            if proc.poll() is not None:
                sys.exit(f"the server exited with {proc.returncode}")
            try:
                if httpx.get(endpoint + "/anvil/health/live", timeout=5).status_code == 200 and cred_file.exists():
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                sys.exit("the server did not come up")
            time.sleep(0.5)
        creds = json.loads(cred_file.read_text())
        body = os.urandom(args.size)
        if args.api == "native":
            from anvil.client import exchange_token

            token = exchange_token(endpoint, creds["client_id"], creds["client_secret"])["access_token"]
            http = httpx.Client(base_url=endpoint, timeout=300, headers={"authorization": f"Bearer {token}"})
            created = http.put("/anvil/v1/buckets/cgbench", json={})
            assert created.is_success, created.text

            def put(key: str) -> None:
                r = http.put("/anvil/v1/buckets/cgbench/object", params={"key": key}, content=body)
                assert r.status_code == 200, r.text

            raw = socket.create_connection(("127.0.0.1", port))
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            reader = raw.makefile("rb")

            def get(key: str) -> None:  # bench/objects.py's request, answer read whole
                raw.sendall(f"GET /anvil/v1/buckets/cgbench/object?key={key} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                            f"Authorization: Bearer {token}\r\n\r\n".encode())
                status = reader.readline()
                length = 0
                while (line := reader.readline()) != b"\r\n":
                    name, _, value = line.partition(b":")
                    if name.lower() == b"content-length":
                        length = int(value)
                assert status.startswith(b"HTTP/1.1 200 ") and reader.read(length) == body, status
        else:
            s3 = _client(endpoint, creds["client_id"], creds["client_secret"])
            s3.create_bucket(Bucket="cgbench")

            def put(key: str) -> None:
                s3.put_object(Bucket="cgbench", Key=key, Body=body)

            def get(key: str) -> None:
                assert s3.get_object(Bucket="cgbench", Key=key)["Body"].read() == body

        if args.op == "get":
            keys = [f"r/{i:05d}" for i in range(args.objects)]
            for key in keys:
                put(key)
            op = get
            warm = [keys[i % len(keys)] for i in range(args.warmup)]
            measured = [keys[i % len(keys)] for i in range(args.puts)]
        else:
            op = put
            warm = [f"warm/{i}" for i in range(args.warmup)]
            measured = [f"k/{i:05d}" for i in range(args.puts)]
        for key in warm:
            op(key)
        subprocess.run(["callgrind_control", "-i", "on", str(proc.pid)], check=True, capture_output=True)
        for key in measured:
            op(key)
        subprocess.run(["callgrind_control", "-d", str(proc.pid)], check=True, capture_output=True)
        subprocess.run(["callgrind_control", "-i", "off", str(proc.pid)], check=True, capture_output=True)
        files = [f for f in work.glob("cg.out*") if f.is_file()]
        by_thread = _totals(files)
        if args.keep:
            Path(args.keep).mkdir(parents=True, exist_ok=True)
            for f in files:
                shutil.copy(f, Path(args.keep) / f.name)
    finally:
        proc.terminate()
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    total = sum(by_thread.values())
    others = sorted((n for t, n in by_thread.items() if t != 1), reverse=True)
    print(json.dumps({
        "bench": "s3put_instructions", "api": args.api, "op": args.op, "src": str(src), "ops": args.puts,
        "size": args.size,
        "per_op": round(total / args.puts), "event_loop_per_op": round(by_thread.get(1, 0) / args.puts),
        "busiest_other_thread_per_op": round(others[0] / args.puts) if others else 0,
        "threads": {str(t): round(n / args.puts) for t, n in sorted(by_thread.items())},
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
