"""The small GET in process: Anvil's real protocol and app, fed bytes through a fake transport.

No sockets, no load generator: one connection, requests one after another, on the main thread, so its
CPU time (`time.thread_time`) is the server's own work per request without system calls. Reported per
request (best of `--batches` batches of `--n`): native GET, S3 GetObject (SigV4 header auth), and the
floor (the same protocol with a minimal app answering the same headers and body from memory). With
`--profile`, one more batch of each under cProfile: Python calls per request and where the time goes,
grouped by layer (see LAYERS).

    PYTHONPATH=src python bench/inproc.py                       # this checkout
    PYTHONPATH=../main/src python bench/inproc.py --profile     # another checkout, with the profile

Compare checkouts by running it once per source tree, alternately (docs/performance.md).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import json
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SIZE = 4096
BUCKET = "bench"
KEY = "small/0"

# (layer, substrings of "file:function") -> the functions whose own time counts for that layer. The first
# match wins; anything else is "other" (the event loop, asyncio, builtins called from several layers).
LAYERS = [
    ("http parse (httptools callbacks, uvicorn cycle)", ("httptools_impl", "anvil/api/server.py:data_received",
                                                         "anvil/api/server.py:on_", "uvicorn/middleware/proxy",
                                                         "uvicorn/protocols/utils")),
    ("response write (send_raw / ASGI send)", ("anvil/api/server.py:_send_raw", "anvil/api/server.py:write",
                                               "anvil/api/common.py:__call__", "anvil/api/server.py:_flush")),
    ("dispatch (app, routing)", ("anvil/api/app.py", "starlette/applications", "starlette/routing",
                                 "starlette/middleware", "anvil/api/observe.py", "anvil/api/fastdispatch")),
    ("request object, headers, query", ("anvil/api/fastreq.py", "starlette/requests", "starlette/datastructures",
                                        "anvil/api/native.py:_strict_query", "anvil/api/native.py:_key",
                                        "anvil/api/native.py:_conditions", "anvil/objects/validation.py:check_",
                                        "anvil/api/s3/request.py", "urllib/parse")),
    ("auth (token / SigV4)", ("anvil/identity/tokens.py", "anvil/identity/service.py", "anvil/api/s3/auth.py",
                              "anvil/api/common.py:authenticate", "anvil/api/s3/sigv2.py", "hmac", "hashlib")),
    ("authorisation decision", ("anvil/identity/gate.py", "anvil/identity/scopes.py", "anvil/api/access.py",
                                "anvil/authz/", "fnmatch", "anvil/runtime.py:_bucket_access")),
    ("catalog lookup", ("anvil/objects/service.py:head_object", "anvil/objects/service.py:_bucket",
                        "anvil/storage/catalog.py", "anvil/storage/records.py", "from_row", "apsw", "execute",
                        "fetchall", "fetchone", "anvil/objects/service.py:find_bucket")),
    ("body read + verify", ("anvil/objects/service.py:read_body", "anvil/objects/service.py:_segments",
                            "anvil/storage/blobs.py", "anvil/storage/inline", "_hashlib", "sha256")),
    ("response building", ("anvil/api/native.py:_object_headers", "anvil/api/native.py:_http",
                           "anvil/api/common.py:body_response", "anvil/api/common.py:verified_body",
                           "anvil/api/common.py:raw_headers", "anvil/api/common.py:__init__",
                           "anvil/api/s3/objects.py", "anvil/api/native.py:_get_or_head",
                           "anvil/api/native.py:get_object", "anvil/api/common.py:run",
                           "anvil/api/record.py", "anvil/api/s3/gateway.py", "anvil/api/s3/dispatch.py")),
]


class FakeTransport:
    """What the protocol writes goes to `out`; `waiter` is set at the first write of a response."""

    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.waiter: asyncio.Future | None = None
        self.closed = False

    def _wrote(self, data: bytes) -> None:
        self.out.append(data)
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def write(self, data: bytes) -> None:
        self._wrote(bytes(data))

    def writelines(self, lines: list[bytes]) -> None:
        self._wrote(b"".join(lines))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 9000)}.get(name, default)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def can_write_eof(self) -> bool:
        return False

    def set_protocol(self, protocol: Any) -> None:
        pass


def _split(resp: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    head, _, body = resp.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = {}
    for line in lines[1:]:
        n, _, val = line.partition(b":")
        headers[n.strip().lower()] = val.strip()
    return int(lines[0][9:12]), headers, body


def _layer(func: tuple[str, int, str]) -> str:
    name = f"{func[0]}:{func[2]}"
    for layer, needles in LAYERS:
        if any(n in name for n in needles):
            return layer
    return "other"


def run(n: int, batches: int, profile: bool) -> dict[str, Any]:
    import uvicorn
    import uvloop
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials
    from uvicorn.server import ServerState

    from anvil.api.app import create_app
    from anvil.api.server import UVICORN_OPTIONS, AnvilHttpProtocol
    from anvil.runtime import Anvil

    sys.setswitchinterval(0.001)  # as `anvil serve`
    tmp = tempfile.mkdtemp(prefix="anvil-inproc-")
    anvil = Anvil(Path(tmp) / "data", endpoint="http://127.0.0.1:9000")
    app = create_app(anvil)
    cred = json.loads((anvil.storage.layout.bootstrap / "first-admin.json").read_text())
    token = anvil.identity.exchange(cred["client_id"], cred["client_secret"])["access_token"]
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)

    def protocol(asgi: Any) -> tuple[Any, FakeTransport]:
        config = uvicorn.Config(asgi, **UVICORN_OPTIONS)
        config.load()
        state = ServerState()
        state.default_headers = [(b"date", b"Wed, 02 Dec 2026 00:00:00 GMT"), *config.encoded_headers]
        proto = AnvilHttpProtocol(config=config, server_state=state, app_state={}, _loop=loop)
        tr = FakeTransport()
        proto.connection_made(tr)  # type: ignore[arg-type]
        return proto, tr

    async def ask(proto: Any, tr: FakeTransport, req: bytes) -> bytes:
        tr.out.clear()
        tr.waiter = loop.create_future()
        proto.data_received(req)
        await tr.waiter
        for _ in range(3):  # a response written in two writes (the ASGI path) completes within a step or two
            if proto.cycle is None or proto.cycle.response_complete:
                break
            await asyncio.sleep(0)
        return b"".join(tr.out)

    auth = f"Authorization: Bearer {token}\r\n".encode()
    body = bytes(range(256)) * (SIZE // 256)
    proto, tr = protocol(app)
    if getattr(app, "fast_reads", None) is not None:  # as `anvil serve` sets it (on this connection only:
        proto.fast_reads = app.fast_reads             # the floor's protocol must not answer with Anvil)
    setup = [
        b"PUT /anvil/v1/buckets/" + BUCKET.encode() + b" HTTP/1.1\r\nHost: x\r\n" + auth + b"content-length: 0\r\n\r\n",
        (f"PUT /anvil/v1/buckets/{BUCKET}/object?key={KEY} HTTP/1.1\r\nHost: x\r\n".encode() + auth
         + f"content-length: {SIZE}\r\ncontent-type: application/octet-stream\r\n\r\n".encode() + body),
    ]
    for req in setup:
        status, _, out = _split(loop.run_until_complete(ask(proto, tr, req)))
        if status not in (200, 201):
            raise SystemExit(f"setup failed: {status} {out[:200]!r}")
    native_get = f"GET /anvil/v1/buckets/{BUCKET}/object?key={KEY} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode() + auth \
        + b"\r\n"

    aws = AWSRequest(method="GET", url=f"http://127.0.0.1:9000/{BUCKET}/{KEY}")
    aws.headers["x-amz-content-sha256"] = "UNSIGNED-PAYLOAD"
    S3SigV4Auth(Credentials(cred["client_id"], cred["client_secret"]), "s3", "us-east-1").add_auth(aws)
    s3_get = (f"GET /{BUCKET}/{KEY} HTTP/1.1\r\nHost: 127.0.0.1:9000\r\n"
              + "".join(f"{k}: {v}\r\n" for k, v in aws.headers.items()) + "\r\n").encode()

    floor_headers = [
        (b"etag", b'"3cc57c5461232cb919d584e5bd6590a3"'), (b"x-anvil-version-id", b"null"),
        (b"last-modified", b"Tue, 01 Dec 2026 21:46:09 GMT"), (b"accept-ranges", b"bytes"),
        (b"content-type", b"application/octet-stream"),
        (b"x-anvil-sha256", b"a4f4a0f3fc10d650d721339a345a2aee07045cf1ac84f75e85ca2c6e729fdb01"),
        (b"content-length", b"4096"), (b"x-request-id", b"df360d863386a38f00000000725f5e7b"),
    ]

    async def floor_app(scope: Any, receive: Any, send: Any) -> None:
        raw = scope.get("anvil.send_raw")
        if raw is not None and raw(200, floor_headers, body):
            return
        await send({"type": "http.response.start", "status": 200, "headers": floor_headers})
        await send({"type": "http.response.body", "body": body})

    fproto, ftr = protocol(floor_app)
    cases = {"native_get": (proto, tr, native_get), "s3_get": (proto, tr, s3_get), "floor": (fproto, ftr, native_get)}
    for name, (p, t, req) in cases.items():
        status, _, out = _split(loop.run_until_complete(ask(p, t, req)))
        if status != 200 or out != body:
            raise SystemExit(f"{name}: {status} {out[:300]!r}")

    async def batch(p: Any, t: FakeTransport, req: bytes) -> float:
        t0 = time.thread_time()
        for _ in range(n):
            await ask(p, t, req)
        return time.thread_time() - t0

    gc.collect()
    gc.freeze()  # as `anvil serve` does once the server is built
    result: dict[str, Any] = {"n": n, "batches": batches}
    for p, t, req in cases.values():
        loop.run_until_complete(batch(p, t, req))  # warm
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(batches):  # interleaved, so a change in load hits every case alike
        for name, (p, t, req) in cases.items():
            times[name].append(loop.run_until_complete(batch(p, t, req)) / n * 1e6)
    for name in cases:
        result[name] = {"us_best": round(min(times[name]), 1),
                        "us_median": round(sorted(times[name])[len(times[name]) // 2], 1)}
    if profile:
        for name, (p, t, req) in cases.items():
            prof = cProfile.Profile()
            prof.enable()
            loop.run_until_complete(batch(p, t, req))
            prof.disable()
            st = pstats.Stats(prof)
            calls = sum(v[1] for v in st.stats.values())  # type: ignore[attr-defined]
            layers: dict[str, float] = {}
            funcs = []
            for func, (_cc, nc, tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
                layers[_layer(func)] = layers.get(_layer(func), 0.0) + tt
                funcs.append((tt, nc, ct, func))
            total = sum(layers.values())
            result[name]["calls_per_request"] = round(calls / n, 1)
            result[name]["profile_share"] = {k: round(v / total, 3) for k, v in
                                             sorted(layers.items(), key=lambda kv: -kv[1])}
            funcs.sort(reverse=True)
            result[name]["top"] = [
                f"{tt / n * 1e6:6.2f}us {nc / n:4.1f}x cum {ct / n * 1e6:6.2f}us "
                f"{Path(f[0]).name}:{f[1]}:{f[2]}" for tt, nc, ct, f in funcs[:30]]
    anvil.close()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="requests per batch")
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--profile", action="store_true", help="one more batch of each under cProfile")
    args = ap.parse_args()
    load_before = os.getloadavg()
    result = run(args.n, args.batches, args.profile)
    result["load_average"] = {"before": [round(x, 2) for x in load_before],
                              "after": [round(x, 2) for x in os.getloadavg()]}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
