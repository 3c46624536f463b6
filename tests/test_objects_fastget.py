"""The small native GET/HEAD answered before the general path (api/fastget.py), against a real server:
the same answer as the general path, and nothing it caches outlives a change (a revoked token, a
disabled application, a deleted or replaced object, a key outside the token's scopes).

Requests carry a fixed bearer token (raw httpx): the first request with a token verifies it (general
path), every later one is a candidate for the fast path. Each answer is compared with the general
path's, forced by a condition header that matches (`If-None-Match` of another ETag).
"""

from __future__ import annotations

import os
import socket
import urllib.parse
import uuid

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from anvil.client import AnvilClient, exchange_token
from tests.helpers import AnvilServer, unique_bucket
from tests.test_s3_fastput import metric

# What differs between any two answers to the same request.
VOLATILE = {"date", "x-request-id"}
GENERAL = {"if-none-match": '"not-this-one"'}  # a condition that passes: the general path answers


@pytest.fixture(scope="module")
def admin(server: AnvilServer):
    with server.client() as c:
        yield c


@pytest.fixture(scope="module")
def token(server: AnvilServer) -> str:
    return server.auth_headers()["authorization"].removeprefix("Bearer ")


_CLIENTS: dict[str, httpx.Client] = {}


@pytest.fixture(scope="module", autouse=True)
def _keep_alive():
    """One keep-alive connection per server for the whole module (cheaper than one per request)."""
    yield
    for c in _CLIENTS.values():
        c.close()
    _CLIENTS.clear()


def get(server: AnvilServer, token: str, bucket: str, key: str, method: str = "GET",
        headers: dict[str, str] | None = None) -> httpx.Response:
    client = _CLIENTS.get(server.endpoint)
    if client is None:
        client = _CLIENTS[server.endpoint] = httpx.Client(base_url=server.endpoint, timeout=30)
    url = f"/anvil/v1/buckets/{bucket}/object?key={urllib.parse.quote(key, safe='')}"
    return client.request(method, url, headers={"authorization": f"Bearer {token}", **(headers or {})})


def same_answer(a: httpx.Response, b: httpx.Response) -> None:
    assert a.status_code == b.status_code, (a.status_code, b.status_code, a.text, b.text)
    if a.status_code >= 400 and a.content:  # an error names its request: the rest must be the same
        ea, eb = a.json()["error"], b.json()["error"]
        assert ea.pop("request_id") != eb.pop("request_id") and ea == eb
    else:
        assert a.content == b.content
    assert [(k, v) for k, v in a.headers.items() if k not in VOLATILE] == \
        [(k, v) for k, v in b.headers.items() if k not in VOLATILE]


def test_answers_as_the_general_path(server: AnvilServer, admin: AnvilClient, token: str) -> None:
    bucket = unique_bucket("fg")
    admin.create_bucket(bucket)
    cases = {
        "small/plain": os.urandom(4096),
        "small/meta": os.urandom(100),
        "naïve key+space %": os.urandom(10),  # percent-encoded UTF-8, '+' and '%' in the key
        "file-stored": os.urandom(80 * 1024),  # over the inline threshold (64 KiB): a blob file
        "empty": b"",
    }
    for key, body in cases.items():
        meta = {"owner": "ann é"} if key == "small/meta" else None
        admin.put_object(bucket, key, body, metadata=meta, content_type="text/x-test")
    get(server, token, bucket, "small/plain")  # the token is verified (and cached) once
    for key, body in cases.items():
        for method in ("GET", "HEAD"):
            fast = get(server, token, bucket, key, method)
            general = get(server, token, bucket, key, method, GENERAL)
            same_answer(fast, general)
            assert fast.status_code == 200 and int(fast.headers["content-length"]) == len(body)
            if method == "GET":
                assert fast.content == body
    assert get(server, token, bucket, "small/meta").headers["x-anvil-meta-owner"] == "ann%20%C3%A9"
    # Ranges and the other conditions still have their own answers.
    assert get(server, token, bucket, "small/plain", headers={"range": "bytes=0-9"}).content == \
        cases["small/plain"][:10]
    etag = get(server, token, bucket, "small/plain").headers["etag"]
    assert get(server, token, bucket, "small/plain", headers={"if-none-match": etag}).status_code == 304
    # Missing keys, buckets, malformed keys: the general path's errors.
    for b, k in ((bucket, "nope"), ("no-such-bucket-fg", "k"), (bucket, ".anvil/x")):
        fast, general = get(server, token, b, k), get(server, token, b, k, headers=GENERAL)
        same_answer(fast, general)
        assert fast.status_code in (400, 403, 404), fast.text


def test_changes_are_seen_at_the_next_request(server: AnvilServer, admin: AnvilClient, token: str) -> None:
    bucket = unique_bucket("fg")
    admin.create_bucket(bucket)
    admin.put_object(bucket, "k", b"one")
    assert get(server, token, bucket, "k").content == b"one"
    admin.put_object(bucket, "k", b"two")
    assert get(server, token, bucket, "k").content == b"two"
    admin.delete_object(bucket, "k")
    r = get(server, token, bucket, "k")
    assert r.status_code == 404 and r.json()["error"]["code"] == "NotFound"
    admin.put_object(bucket, "k", b"three")
    assert get(server, token, bucket, "k").content == b"three"


def test_revoked_token_and_disabled_app_are_refused_at_the_next_request(server: AnvilServer,
                                                                        admin: AnvilClient) -> None:
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    admin.create_tenant(tenant)
    app = admin.create_app(tenant, "fg", scopes=[f"bucket:create|tenant:{tenant}", "object:*|bucket:*"])
    cid, secret = app["client_id"], app["client_secret"]
    bucket = unique_bucket("fg")
    with server.client(client_id=cid, client_secret=secret) as c:
        c.create_bucket(bucket)
        c.put_object(bucket, "k", b"hello")
    first = exchange_token(server.endpoint, cid, secret)
    second = exchange_token(server.endpoint, cid, secret)["access_token"]
    for tok in (first["access_token"], second):
        for _ in range(2):  # verified, then from the cache
            assert get(server, tok, bucket, "k").content == b"hello"
    admin.revoke_token(first["jti"], client_id=cid)
    r = get(server, first["access_token"], bucket, "k")
    assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]
    assert get(server, second, bucket, "k").content == b"hello"
    admin.disable_app(cid)
    r = get(server, second, bucket, "k")
    assert r.status_code == 401 and "disabled" in r.json()["error"]["message"]
    admin.enable_app(cid)
    assert get(server, second, bucket, "k").content == b"hello"


def test_scopes_and_tenants_decide_per_key(server: AnvilServer, admin: AnvilClient, token: str) -> None:
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    admin.create_tenant(tenant)
    bucket = unique_bucket("fg")
    app = admin.create_app(tenant, "fg", scopes=[f"bucket:create|tenant:{tenant}", "object:write|bucket:*",
                                                 f"object:read|bucket:{bucket}/pub/*"])
    with server.client(client_id=app["client_id"], client_secret=app["client_secret"]) as c:
        c.create_bucket(bucket)
        c.put_object(bucket, "pub/a", b"public part")
        c.put_object(bucket, "priv/a", b"private part")
    narrow = exchange_token(server.endpoint, app["client_id"], app["client_secret"])["access_token"]
    for _ in range(2):
        assert get(server, narrow, bucket, "pub/a").content == b"public part"
        assert get(server, narrow, bucket, "priv/a").status_code == 403
    # Another tenant's application does not see the bucket at all (as if it did not exist).
    other = f"t-{uuid.uuid4().hex[:8]}"
    admin.create_tenant(other)
    app2 = admin.create_app(other, "fg", scopes=["object:*|bucket:*"])
    foreign = exchange_token(server.endpoint, app2["client_id"], app2["client_secret"])["access_token"]
    for _ in range(2):
        r = get(server, foreign, bucket, "pub/a")
        assert r.status_code == 404 and r.json()["error"]["message"] == "bucket not found"
    assert get(server, token, bucket, "priv/a").content == b"private part"  # an admin of the system tenant


def test_metrics_count_every_answer(server: AnvilServer, admin: AnvilClient, token: str) -> None:
    bucket = unique_bucket("fg")
    admin.create_bucket(bucket)
    body = os.urandom(1000)
    admin.put_object(bucket, "k", body)
    get(server, token, bucket, "k")

    def sample(name: str, **labels: str) -> float:
        text = httpx.get(server.endpoint + "/anvil/metrics", headers={"authorization": f"Bearer {token}"},
                         timeout=30).text
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return s.value
        return 0.0

    labels = {"api": "native", "operation": "get_object"}
    before = (sample("anvil_requests_total", code="2xx", **labels),
              sample("anvil_response_sent_bytes_total", **labels))
    for _ in range(7):
        assert get(server, token, bucket, "k").content == body
    get(server, token, bucket, "k", "HEAD")
    after = (sample("anvil_requests_total", code="2xx", **labels),
             sample("anvil_response_sent_bytes_total", **labels))
    assert after[0] - before[0] == 8
    assert after[1] - before[1] == 7 * len(body)


def _read_answers(sock, methods: list[str]) -> list[tuple[int, dict[str, str], bytes]]:
    """The answers to requests of `methods`, read from a raw socket (each with a content-length)."""
    buf, out = b"", []
    while len(out) < len(methods):
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed after {len(out)} answers"
            buf += chunk
        head, _, buf = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): val.strip() for k, _, val in (line.partition(":") for line in lines[1:])}
        length = 0 if methods[len(out)] == "HEAD" else int(headers.get("content-length", "0"))
        while len(buf) < length:
            chunk = sock.recv(65536)
            assert chunk
            buf += chunk
        out.append((int(lines[0][9:12]), headers, buf[:length]))
        buf = buf[length:]
    return out


def test_pipelined_requests_bodies_and_closing_keep_their_order(server: AnvilServer, admin: AnvilClient,
                                                                  token: str) -> None:
    """The protocol answers a small GET from its parser callback: pipelined requests (answered there or
    not), a GET that carries a body, and `Connection: close` keep HTTP's framing and order."""
    import socket

    bucket = unique_bucket("fg")
    admin.create_bucket(bucket)
    admin.put_object(bucket, "a", b"first")
    admin.put_object(bucket, "b", b"second")
    get(server, token, bucket, "a")
    auth = f"authorization: Bearer {token}\r\n"

    def req(method: str, key: str, extra: str = "", body: bytes = b"") -> bytes:
        return (f"{method} /anvil/v1/buckets/{bucket}/object?key={key} HTTP/1.1\r\nhost: x\r\n{auth}{extra}"
                f"content-length: {len(body)}\r\n\r\n").encode() + body

    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(req("GET", "a") + req("PUT", "c", body=b"third") + req("GET", "b") + req("HEAD", "a")
                  + req("GET", "c") + req("GET", "a", body=b"a body nobody reads") + req("GET", "b"))
        answers = _read_answers(s, ["GET", "PUT", "GET", "HEAD", "GET", "GET", "GET"])
        assert [(st, b) for st, _, b in answers] == [
            (200, b"first"), (200, answers[1][2]), (200, b"second"), (200, b""), (200, b"third"), (200, b"first"),
            (200, b"second")]
        assert answers[3][1]["content-length"] == "5"  # HEAD: the length of the body not sent
        s.sendall(req("GET", "b", "connection: close\r\n"))
        (status, headers, body), = _read_answers(s, ["GET"])
        assert (status, body, headers.get("connection")) == (200, b"second", "close")
        assert s.recv(10) == b""  # closed after it


def test_what_it_does_not_send_as_is_goes_to_the_general_path(server: AnvilServer, admin: AnvilClient,
                                                              token: str) -> None:
    """A stored value that is not printable ASCII (a Content-Type with a Latin-1 letter: the fast path checks
    stored values with `isascii`/`isprintable`, not uvicorn's regular expressions) is answered by the general
    path, with its answer; a request target with a fragment (not split by the protocol's fast path) gets
    the object of the key before it."""
    bucket = unique_bucket("fg")
    admin.create_bucket(bucket)
    body = os.urandom(300)
    admin.put_object(bucket, "plain", body, content_type="text/plain")
    latin = httpx.put(f"{server.endpoint}/anvil/v1/buckets/{bucket}/object?key=latin", content=body,
                      headers={"authorization": f"Bearer {token}", "content-type": b"text/x-caf\xe9"}, timeout=30)
    assert latin.status_code == 200, latin.text
    get(server, token, bucket, "plain")  # the token is verified (and cached) once

    def fast() -> float:
        return metric(server, "anvil_fast_answers_total", path="native_get")

    before = fast()
    assert get(server, token, bucket, "plain").content == body
    assert fast() - before == 1  # (the check below can fail: this one shows the path is taken)

    before = fast()
    answer = get(server, token, bucket, "latin")
    assert fast() == before
    assert answer.status_code == 200 and answer.content == body
    assert answer.headers.raw[[k.lower() for k, _ in answer.headers.raw].index(b"content-type")][1] == \
        b"text/x-caf\xe9"
    same_answer(answer, get(server, token, bucket, "latin", headers=GENERAL))

    # A fragment is not part of the key (uvicorn's URL parse drops it; the app-level hook may then answer).
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(f"GET /anvil/v1/buckets/{bucket}/object?key=plain#part HTTP/1.1\r\nhost: x\r\n"
                     f"authorization: Bearer {token}\r\n\r\n".encode())
        [(status, _, got)] = _read_answers(sock, ["GET"])
    assert (status, got) == (200, body)
