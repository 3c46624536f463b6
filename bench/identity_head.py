"""Authenticated HEAD vs development-principal HEAD, same server, same run.

One server runs with `--dev-auth` (development mode): requests without a token are the dev
principal (admin: no tenant lookup, one `*` scope); requests with a tenant application's bearer
token pay the full gate (HS256 verify or LRU hit, bucket tenant lookup, scope matching). Rounds
alternate so drift hits both sides. Prints JSON with ops/s and the retained ratio (target >= 0.8).

    python bench/identity_head.py [--requests 4000] [--connections 16] [--rounds 3] [--lifecycle N]

`--lifecycle N` first disables another application and revokes N (other) token ids, so every
authenticated request also pays the lifecycle check (otherwise skipped while nothing is
disabled, revoked or recently rotated).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from anvil.client import AnvilClient  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _worker(port: int, request: bytes, count: int) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    ok = 0
    try:
        for _ in range(count):
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            if head.startswith(b"HTTP/1.1 200"):
                ok += 1
    finally:
        writer.close()
    return ok


async def _run(port: int, request: bytes, total: int, connections: int) -> tuple[float, int]:
    per = total // connections
    start = time.perf_counter()
    oks = await asyncio.gather(*(_worker(port, request, per) for _ in range(connections)))
    elapsed = time.perf_counter() - start
    return per * connections / elapsed, sum(oks)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--lifecycle", type=int, default=0, help="revoke this many token ids first (and disable an app)")
    args = ap.parse_args()
    load_before = [round(x, 2) for x in os.getloadavg()]  # shared machine: how busy it was

    tmp = Path(tempfile.mkdtemp(prefix="anvil-bench-identity-"))
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "ANVIL_MODE": "development", "ANVIL_ARGON2_FAST": "1"}
    log = open(tmp / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "anvil.cli.main", "serve", "--storage-path", str(tmp / "data"),
                             "--listen", f"127.0.0.1:{port}", "--dev-auth"], stdout=log, stderr=subprocess.STDOUT,
                            env=env)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                if httpx.get(endpoint + "/anvil/health/live", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        cred = json.loads((tmp / "data" / "bootstrap" / "first-admin.json").read_text())
        with AnvilClient(endpoint, client_id=cred["client_id"], client_secret=cred["client_secret"]) as admin:
            admin.create_tenant("bench")
            app = admin.create_app("bench", "head", scopes=["bucket:create|tenant:bench", "object:*|bucket:*"])
            if args.lifecycle:
                other = admin.create_app("bench", "off", scopes=["object:read|bucket:*"])
                admin.disable_app(other["client_id"])
                for _ in range(args.lifecycle):
                    admin.revoke_token(os.urandom(16).hex())
        with AnvilClient(endpoint, client_id=app["client_id"], client_secret=app["client_secret"]) as c:
            c.create_bucket("bench-head")
            c.put_object("bench-head", "k", b"x" * 1024)
            token = c._http.auth.token()  # type: ignore[union-attr]
        path = "/anvil/v1/buckets/bench-head/object?key=k"
        base = f"HEAD {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        dev_req = (base + "\r\n").encode()
        auth_req = (base + f"Authorization: Bearer {token}\r\n\r\n").encode()

        async def bench() -> dict:
            await _run(port, dev_req, 400, 4)  # warm-up both paths
            await _run(port, auth_req, 400, 4)
            dev, auth = [], []
            for _ in range(args.rounds):
                ops, ok = await _run(port, dev_req, args.requests, args.connections)
                assert ok == args.requests // args.connections * args.connections, "dev HEADs failed"
                dev.append(ops)
                ops, ok = await _run(port, auth_req, args.requests, args.connections)
                assert ok == args.requests // args.connections * args.connections, "authenticated HEADs failed"
                auth.append(ops)
            return {"dev": dev, "auth": auth}

        res = asyncio.run(bench())
        dev_best, auth_best = max(res["dev"]), max(res["auth"])
        # Paired rounds run back to back, so their ratio cancels most of a shared machine's drift.
        pair_ratios = sorted(a / d for a, d in zip(res["auth"], res["dev"], strict=True))
        print(json.dumps({
            "bench": "identity_head",
            "requests_per_round": args.requests, "connections": args.connections, "rounds": args.rounds,
            "lifecycle_revocations": args.lifecycle,
            "dev_principal_head_ops_s": round(dev_best, 1),
            "authenticated_head_ops_s": round(auth_best, 1),
            "ratio": round(auth_best / dev_best, 3),
            "median_paired_ratio": round(pair_ratios[len(pair_ratios) // 2], 3),
            "target_ratio": 0.8,
            "rounds_ops_s": {k: [round(x, 1) for x in v] for k, v in res.items()},
            "load_average_before": load_before,
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        }, indent=2))
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
