"""The small native object PUT answered from the HTTP parser's callbacks (api/fastput.py), against a real
server.

The fast path is proven taken by `anvil_fast_answers_total{path="native_put"}`; its answers are compared
with the general path's, forced by a header the fast path does not know (`x-general: 1`, which the
general path ignores). Every case it declines still gets the general path's answer, and nothing is
stored by a refused request.
"""

from __future__ import annotations

import base64
import hashlib
import json
import signal
import socket
import time
import urllib.parse
import uuid

import httpx
import pytest

from anvil.client import AnvilClient, exchange_token
from tests.helpers import AnvilServer, unique_bucket
from tests.s3_helpers import s3_client
from tests.test_s3_fastput import metric, read_answers

VOLATILE = {"date", "x-request-id", "etag"}  # (etag: only with the version-specific JSON below)
FORCE_GENERAL = {"x-general": "1"}


@pytest.fixture(scope="module")
def admin(server: AnvilServer):
    with server.client() as c:
        yield c


@pytest.fixture(scope="module")
def token(server: AnvilServer) -> str:
    return server.auth_headers()["authorization"].removeprefix("Bearer ")


@pytest.fixture(scope="module")
def bkt(admin: AnvilClient) -> str:
    name = unique_bucket("nfp")
    admin.create_bucket(name)
    return name


@pytest.fixture(scope="module")
def short_token(server: AnvilServer, admin: AnvilClient) -> tuple[str, float]:
    """A token of the admin's application that expires in a second, taken early (the refusal test,
    later in the module, then waits little or not at all) and used once, so it is in the token cache."""
    cred = server.admin_credentials()
    res = exchange_token(server.endpoint, cred["client_id"], cred["client_secret"], expires_in=1)
    r = httpx.get(server.endpoint + "/anvil/v1/buckets", headers={"authorization": f"Bearer {res['access_token']}"})
    assert r.status_code == 200
    return res["access_token"], float(res["expires_at"])


def fast_count(server: AnvilServer) -> float:
    return metric(server, "anvil_fast_answers_total", path="native_put")


def put_bytes(bucket: str, key: str, body: bytes, token: str, *, headers: dict[str, str] | None = None,
              length: int | None = None, raw_key: bool = False) -> bytes:
    """A native PUT as raw bytes (the benchmark's shape: host, bearer token, length, content type)."""
    quoted = key if raw_key else urllib.parse.quote(key, safe="")
    fields = {"host": "127.0.0.1", "authorization": f"Bearer {token}",
              "content-length": str(len(body) if length is None else length), **(headers or {})}
    head = f"PUT /anvil/v1/buckets/{bucket}/object?key={quoted} HTTP/1.1\r\n" + \
        "".join(f"{k}: {v}\r\n" for k, v in fields.items()) + "\r\n"
    return head.encode("latin-1") + body


def exchange(server: AnvilServer, data: bytes, n: int = 1) -> list[tuple[int, list, bytes]]:
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(data)
        return read_answers(sock, n)


def both(server: AnvilServer, bucket: str, key: str, body: bytes, token: str, *, general_key: str | None = None,
         **kw) -> tuple[tuple, tuple]:
    """The same PUT answered by the fast path, then (forced) by the general path (of `general_key`)."""
    fast = exchange(server, put_bytes(bucket, key, body, token, **kw))[0]
    headers = {**(kw.pop("headers", None) or {}), **FORCE_GENERAL}
    general = exchange(server, put_bytes(bucket, general_key or key, body, token, headers=headers, **kw))[0]
    return fast, general


def same(a: tuple[int, list, bytes], b: tuple[int, list, bytes], volatile: frozenset[str] = frozenset()) -> None:
    """Equal answers: status, header names in order, values (but the date and the request id), and the
    JSON body but its request id and the keys in `volatile` (what names one write)."""
    assert a[0] == b[0], (a, b)
    assert [h[0] for h in a[1]] == [h[0] for h in b[1]], (a, b)
    skip = VOLATILE if volatile else VOLATILE - {"etag"}
    assert [h for h in a[1] if h[0] not in skip] == [h for h in b[1] if h[0] not in skip], (a, b)
    ja, jb = json.loads(a[2]), json.loads(b[2])
    if a[0] >= 400:
        ea, eb = ja["error"], jb["error"]
        assert ea.pop("request_id") != eb.pop("request_id") and ea == eb, (a, b)
    else:
        assert {k: v for k, v in ja.items() if k not in volatile} == {k: v for k, v in jb.items() if k not in volatile}
        assert len(a[2]) == len(b[2]) or volatile, (a, b)


def test_sdk_puts_take_the_fast_path_and_read_back(server: AnvilServer, admin: AnvilClient, bkt: str,
                                                    short_token: tuple[str, float]) -> None:
    before = fast_count(server)
    labels = {"api": "native", "operation": "put_object"}
    received = metric(server, "anvil_request_received_bytes_total", **labels)
    ok = metric(server, "anvil_requests_total", code="2xx", **labels)
    bodies = {"a/1": b"x" * 1024, "a/2": b"", "naïve key %+&=": b"y" * 4096, "edge": b"z" * 16384}
    for key, body in bodies.items():
        w = admin.put_object(bkt, key, body, content_type="text/x-test", metadata={"owner": "ann é"},
                             checksum_sha256=hashlib.sha256(body).hexdigest(), content_md5=hashlib.md5(body).digest())
        assert w.etag == hashlib.md5(body).hexdigest() and w.key == key and w.size == len(body)
    assert fast_count(server) - before == len(bodies)
    # Counted as the general path counts a PUT: one 2xx each, the body bytes received.
    assert metric(server, "anvil_requests_total", code="2xx", **labels) - ok == len(bodies)
    assert metric(server, "anvil_request_received_bytes_total", **labels) - received == sum(map(len, bodies.values()))
    for key, body in bodies.items():
        data, info = admin.get_object_with_info(bkt, key)
        assert data == body and info.content_type == "text/x-test" and info.metadata == {"owner": "ann é"}
    admin.put_object(bkt, "a/1", b"again")  # replaces it: the default content type, no metadata
    data, info = admin.get_object_with_info(bkt, "a/1")
    assert (data, info.content_type, info.metadata) == (b"again", "application/octet-stream", {})
    assert fast_count(server) - before == len(bodies) + 1


def test_answers_and_journal_events_are_the_general_paths(server: AnvilServer, admin: AnvilClient,
                                                         token: str) -> None:
    plain, versioned = unique_bucket("nfp"), unique_bucket("nfpv")
    admin.create_bucket(plain)
    admin.create_bucket(versioned)
    admin.set_versioning(versioned, "Enabled")
    body = b"same body"
    extras = {"content-type": "text/plain", "x-anvil-meta-k": "v%20w", "content-md5":
              base64.b64encode(hashlib.md5(body).digest()).decode(),
              "x-anvil-checksum-sha256": hashlib.sha256(body).hexdigest().upper()}
    before = fast_count(server)
    for b in (plain, versioned):
        for n, headers in enumerate(({}, extras)):
            fast, general = both(server, b, f"f{n}", body, token, headers=headers, general_key=f"g{n}")
            same(fast, general, volatile=frozenset({"key", "version_id", "cursor"}))
            assert fast[0] == 200 and json.loads(fast[2])["key"] == f"f{n}"
    assert fast_count(server) - before == 4  # the first of each pair
    # The same key again, replacing a version (plain bucket: its version id is "null" in both answers).
    fast, general = both(server, plain, "f0", body, token, general_key="g0")
    same(fast, general, volatile=frozenset({"key", "cursor"}))
    events = []
    for page_after in range(0, 10**9, 1000):  # the journal, from the start
        page = admin.journal(after=page_after, limit=1000)
        events += [e for e in page if e.kind == "object.put" and e.scope.split("/")[0] in (plain, versioned)]
        if len(page) < 1000:
            break
    assert len(events) == 10
    volatile = {"key", "version_id", "seq", "ts", "request_id", "scope", "hash", "prev_hash"}
    for fast_event, general_event in zip(events[0::2], events[1::2], strict=True):
        f, g = ({k: v for k, v in e.model_dump().items() if k not in volatile} for e in (fast_event, general_event))
        f["payload"], g["payload"] = ({k: v for k, v in e.payload.items() if k not in volatile}
                                      for e in (fast_event, general_event))
        assert f == g and fast_event.request_id and fast_event.payload["key"].startswith("f")


def test_declined_kinds_still_work(server: AnvilServer, admin: AnvilClient, bkt: str, token: str) -> None:
    admin.put_object(bkt, "cond", b"one")
    before = fast_count(server)
    with pytest.raises(Exception) as e:
        admin.put_object(bkt, "cond", b"two", if_none_match="*")
    assert getattr(e.value, "code", None) == "PreconditionFailed"
    admin.put_object(bkt, "cond", b"three", if_match=admin.head_object(bkt, "cond").etag)
    first = admin.put_object(bkt, "idem", b"i", idempotency_key="k-" + uuid.uuid4().hex)
    admin.put_object(bkt, "big", b"b" * (16 * 1024 + 1))  # over the inline-on-the-loop bound
    # A chunked body, a query parameter more, HTTP/1.0, a repeated header, another scheme's token.
    r = httpx.put(server.endpoint + f"/anvil/v1/buckets/{bkt}/object", params={"key": "chunked"},
                  content=iter([b"ch", b"unk"]), headers={"authorization": f"Bearer {token}"})
    assert r.status_code == 200
    for data in (put_bytes(bkt, "q&x=1", b"q", token, raw_key=True),
                 put_bytes(bkt, "h10", b"h", token).replace(b"HTTP/1.1", b"HTTP/1.0", 1),
                 put_bytes(bkt, "rep", b"r", token, headers={"x-anvil-meta-a": "1"}).replace(
                     b"x-anvil-meta-a: 1", b"x-anvil-meta-a: 1\r\nx-anvil-meta-a: 2")):
        assert exchange(server, data)[0][0] == 200
    lower = exchange(server, put_bytes(bkt, "lower", b"l", token).replace(b"Bearer ", b"bearer "))[0]
    assert lower[0] == 200
    # A bucket with a lifecycle rule (set through S3).
    s3 = s3_client(server)
    s3.put_bucket_lifecycle_configuration(Bucket=bkt, LifecycleConfiguration={"Rules": [
        {"ID": "exp", "Filter": {"Prefix": "exp/"}, "Status": "Enabled", "Expiration": {"Days": 3}}]})
    try:
        admin.put_object(bkt, "exp/a", b"e")
    finally:
        s3.delete_bucket_lifecycle(Bucket=bkt)
    assert fast_count(server) == before
    assert admin.get_object(bkt, "cond") == b"three" and admin.get_object(bkt, "idem") == b"i"
    assert admin.get_object(bkt, "q") == b"q" and admin.get_object(bkt, "chunked") == b"chunk"
    assert admin.head_object(bkt, "rep").metadata == {"a": "2"}  # the last one, as the route reads them
    assert admin.get_object(bkt, "exp/a") == b"e" and admin.get_object(bkt, "h10") == b"h"
    assert first.etag == hashlib.md5(b"i").hexdigest()
    admin.put_object(bkt, "after", b"fast again")  # the lifecycle rule gone: fast again
    assert fast_count(server) == before + 1


def test_refusals_answer_as_before_and_store_nothing(server: AnvilServer, admin: AnvilClient, token: str,
                                                     short_token: tuple[str, float]) -> None:
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    admin.create_tenant(tenant)
    bucket = unique_bucket("nfpr")
    app = admin.create_app(tenant, "nfp", scopes=[f"bucket:create|tenant:{tenant}", "object:read|bucket:*"])
    with server.client(client_id=app["client_id"], client_secret=app["client_secret"]) as c:
        c.create_bucket(bucket)
    reader = exchange_token(server.endpoint, app["client_id"], app["client_secret"])["access_token"]
    expired, expires_at = short_token
    time.sleep(max(0.0, expires_at - time.time() + 0.05))
    body = b"refused body"
    before = fast_count(server)
    cases = [
        ("k", "not-a-token", 401, "Unauthenticated"),
        ("k", expired, 401, "Unauthenticated"),
        ("k", reader, 403, "PermissionDenied"),
        ("a\x00b", token, 400, None),
        ("k" * 2000, token, 400, None),
        ("_anvil/x", token, 403, None),
        ("", token, 400, None),
    ]
    for key, tok, status, code in cases:
        fast, general = both(server, bucket, key, body, tok)
        same(fast, general)
        err = json.loads(fast[2])["error"]
        assert fast[0] == status and (code is None or err["code"] == code), fast
    assert json.loads(both(server, bucket, "k", body, expired)[0][2])["error"]["message"] == "token expired"
    fast, general = both(server, "no-such-bucket-nfp", "k", body, token)
    same(fast, general)
    assert fast[0] == 404 and json.loads(fast[2])["error"]["code"] == "NotFound"
    # Declared digests of other bytes: BadDigest, from the general path once the body is in.
    for headers in ({"x-anvil-checksum-sha256": hashlib.sha256(b"other").hexdigest()},
                    {"content-md5": base64.b64encode(hashlib.md5(b"other").digest()).decode()},
                    {"x-anvil-checksum-sha256": "not-hex"}, {"content-md5": "not-base64"},
                    {"x-anvil-meta-bad%": "v"}, {"x-anvil-meta-k": "%ff"}, {"content-type": "a" * 300}):
        fast, general = both(server, bucket, "k", body, token, headers=headers)
        same(fast, general)
        assert fast[0] == 400, fast
    assert fast_count(server) == before
    assert admin.list_objects(bucket).objects == []
    # `../x` is a key like any other (keys name no file): stored by both paths alike.
    fast, general = both(server, bucket, "../x", body, token, general_key="../y")
    same(fast, general, volatile=frozenset({"key", "cursor"}))
    assert fast[0] == 200 and fast_count(server) == before + 1
    assert [o.key for o in admin.list_objects(bucket).objects] == ["../x", "../y"]
    assert admin.get_object(bucket, "../x") == body


def test_pipelined_put_get_put_and_a_longer_body(server: AnvilServer, admin: AnvilClient, bkt: str,
                                                  token: str) -> None:
    get = (f"GET /anvil/v1/buckets/{bkt}/object?key=pipe HTTP/1.1\r\nhost: x\r\n"
           f"authorization: Bearer {token}\r\n\r\n").encode()
    before = fast_count(server)
    answers = exchange(server, put_bytes(bkt, "pipe", b"first", token) + get + put_bytes(bkt, "pipe", b"second", token)
                       + get, 4)
    assert [a[0] for a in answers] == [200, 200, 200, 200]
    assert answers[1][2] == b"first" and answers[3][2] == b"second"
    # The first PUT is answered here; what was parsed while it was in flight waits in the pipeline and
    # takes the general path, in order.
    assert fast_count(server) - before >= 1
    # A body longer than declared: the bytes past the declared length are the next "request" (HTTP's
    # framing), which is no request: 400 and the connection closed, as on the general path; the declared
    # bytes were a whole PUT, stored by both.
    answers = []
    for key, extra in (("long-fast", {}), ("long-general", FORCE_GENERAL)):
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(put_bytes(bkt, key, b"declared" + b"EXTRA", token, length=8, headers=extra))
            answers.append(read_answers(sock, 1)[0])
            assert sock.recv(65536) == b""  # closed after it
    assert answers[0][:1] == answers[1][:1] and answers[0][2] == answers[1][2] == b"Invalid HTTP request received."
    deadline = time.monotonic() + 10
    for key in ("long-fast", "long-general"):
        while True:
            try:
                assert admin.get_object(bkt, key) == b"declared"
                break
            except Exception:
                assert time.monotonic() < deadline
                time.sleep(0.05)


def test_client_gone_mid_body_stores_nothing(server: AnvilServer, admin: AnvilClient, bkt: str, token: str) -> None:
    data = put_bytes(bkt, "gone", b"z" * 4000, token)
    labels = {"api": "native", "operation": "put_object"}
    before = metric(server, "anvil_requests_total", code="4xx", **labels)
    fast = fast_count(server)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(data[:-1000])  # the head and part of the body, then gone
    deadline = time.monotonic() + 10
    while metric(server, "anvil_requests_total", code="4xx", **labels) == before:
        assert time.monotonic() < deadline, "the disconnect was not counted"
        time.sleep(0.05)
    assert fast_count(server) == fast
    assert "client disconnected during upload of PUT" in server.log()
    assert [o.key for o in admin.list_objects(bkt, prefix="gone").objects] == []
    assert exchange(server, put_bytes(bkt, "gone", b"ok", token))[0][0] == 200
    assert fast_count(server) == fast + 1


def test_a_commit_that_fails_is_answered_as_the_general_path_answers_it(server: AnvilServer, admin: AnvilClient,
                                                                         token: str) -> None:
    """The bucket goes away between the head (checked, 100 Continue sent) and the body: the writer refuses
    the version, and the answer is the route's error for it, on a connection that stays usable."""
    answers = []
    bucket = unique_bucket("nfpgone")
    labels = {"api": "native", "operation": "put_object"}
    metric_before = metric(server, "anvil_requests_total", code="4xx", **labels)
    fast_before = fast_count(server)
    for extra in ({}, FORCE_GENERAL):
        admin.create_bucket(bucket)
        data = put_bytes(bucket, "k", b"late body", token, headers={"expect": "100-continue", **extra})
        head, _, body = data.partition(b"\r\n\r\n")
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(head + b"\r\n\r\n")
            assert sock.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
            admin.delete_bucket(bucket)
            sock.sendall(body)
            answers.append(read_answers(sock, 1)[0])
            sock.sendall(put_bytes(bucket, "k2", b"x", token))  # the connection is still good
            assert read_answers(sock, 1)[0][0] == 404
    same(answers[0], answers[1])
    assert metric(server, "anvil_requests_total", code="4xx", **labels) - metric_before == 4
    assert fast_count(server) - fast_before == 1
    status, headers, doc = answers[0]
    assert status == 404 and json.loads(doc)["error"]["code"] == "NotFound" and "connection" not in dict(headers)


@pytest.mark.timeout(180)
def test_put_in_flight_at_shutdown_is_answered_closing_and_kept(tmp_path) -> None:
    """A PUT taken by the fast path whose body is still arriving when the server is asked to stop: it is
    answered with `connection: close` and the connection closed after it (as uvicorn's shutdown has a
    request cycle do: the fast path holds no cycle), and it is stored."""
    srv = AnvilServer(tmp_path / "data").start()
    try:
        with srv.client() as admin:
            name = unique_bucket("shut")
            admin.create_bucket(name)
        token = srv.auth_headers()["authorization"].removeprefix("Bearer ")
        body = b"y" * 2000
        data = put_bytes(name, "late", body, token)
        with socket.create_connection(("127.0.0.1", srv.port), timeout=60) as sock:
            sock.sendall(data[:-500])
            time.sleep(0.5)  # its head parsed: the fast path holds it, waiting for the rest of the body
            assert srv.proc is not None
            srv.proc.send_signal(signal.SIGTERM)
            time.sleep(1.0)  # the server stops listening and asks each connection to close after its answer
            sock.sendall(data[-500:])
            status, headers, _ = read_answers(sock, 1)[0]
            assert status == 200
            assert ("connection", "close") in headers
            assert sock.recv(65536) == b""
        srv.proc.wait(60)
    finally:
        srv.stop()
    srv.start()
    try:
        with srv.client() as admin:
            assert admin.get_object(name, "late") == body
    finally:
        srv.stop()
