"""The small S3 PutObject answered from the HTTP parser's callbacks (api/fastput.py), against a real server.

The fast path is proven taken by `anvil_fast_answers_total{path="s3_put"}`; its answers are compared
with the general path's, forced by a header the fast path does not know (`x-general: 1`, unsigned and
not `x-amz-*`, so the general path ignores it). Every case it declines still gets the general path's
answer, and nothing is stored by a refused request.
"""

from __future__ import annotations

import base64
import hashlib
import socket
import time

import httpx
import pytest
from botocore.exceptions import ClientError
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import AnvilServer, unique_bucket
from tests.s3_helpers import dev_credentials, s3_client
from tests.s3_sign import sign

# What differs between two answers to the same request.
VOLATILE = {"date", "x-amz-request-id", "x-amz-id-2", "x-anvil-cursor", "x-amz-version-id"}
FORCE_GENERAL = {"x-general": "1"}


@pytest.fixture(scope="module")
def s3p(server: AnvilServer):
    """boto3 as the benchmarks configure it: no client-side checksums (a plain PUT)."""
    return s3_client(server, request_checksum_calculation="when_required",
                     response_checksum_validation="when_required")


@pytest.fixture(scope="module")
def bkt(s3p) -> str:
    name = unique_bucket("fp")
    s3p.create_bucket(Bucket=name)
    return name


def metric(server: AnvilServer, name: str, **labels: str) -> float:
    text = httpx.get(server.endpoint + "/anvil/metrics", headers=server.auth_headers(), timeout=30).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def fast_count(server: AnvilServer) -> float:
    return metric(server, "anvil_fast_answers_total", path="s3_put")


def request_bytes(server: AnvilServer, path: str, body: bytes, *, extra: dict[str, str] | None = None,
                  signed: dict[str, str] | None = None, payload_hash: str | None = None,
                  secret: str | None = None, length: int | None = None) -> bytes:
    """A signed PUT as raw bytes: `signed` headers are covered by the signature, `extra` ones are not."""
    creds = dev_credentials(server)
    if secret is not None:
        creds = {**creds, "secret_access_key": secret}
    host = server.endpoint.removeprefix("http://")
    headers, _ = sign("PUT", f"{server.endpoint}{path}", creds, body=body, payload_hash=payload_hash,
                      headers={"host": host, **(signed or {})})
    headers = {**headers, **(extra or {}), "content-length": str(len(body) if length is None else length)}
    head = f"PUT {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    return head.encode("latin-1") + body


def read_answers(sock: socket.socket, n: int, heads: tuple[bool, ...] = ()) -> list[tuple[int, list, bytes]]:
    """`n` answers from a raw socket: (status, [(name, value)] in order, body)."""
    buf, out = b"", []
    while len(out) < n:
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed after {len(out)} answers"
            buf += chunk
        head, _, buf = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = [(k.lower(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:])]
        length = int(dict(headers).get("content-length", "0"))
        while len(buf) < length:
            chunk = sock.recv(65536)
            assert chunk
            buf += chunk
        out.append((int(lines[0][9:12]), headers, buf[:length]))
        buf = buf[length:]
    return out


def exchange(server: AnvilServer, data: bytes, n: int = 1) -> list[tuple[int, list, bytes]]:
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(data)
        return read_answers(sock, n)


def same(a: tuple[int, list, bytes], b: tuple[int, list, bytes]) -> None:
    assert a[0] == b[0], (a, b)
    assert [h[0] for h in a[1]] == [h[0] for h in b[1]], (a, b)  # the same headers in the same order
    assert [h for h in a[1] if h[0] not in VOLATILE] == [h for h in b[1] if h[0] not in VOLATILE], (a, b)
    if a[0] >= 300:  # an error document names its request
        assert a[2].split(b"<RequestId>")[0] == b[2].split(b"<RequestId>")[0] and a[2], (a, b)
    else:
        assert a[2] == b[2]


def test_boto3_puts_take_the_fast_path_and_read_back(server: AnvilServer, s3p, bkt: str) -> None:
    before = fast_count(server)
    received = metric(server, "anvil_request_received_bytes_total", api="s3", operation="put_object")
    ok = metric(server, "anvil_requests_total", api="s3", operation="put_object", code="2xx")
    bodies = {"a/1": b"x" * 1024, "a/2": b"", "naïve key %+": b"y" * 4096}
    for key, body in bodies.items():
        r = s3p.put_object(Bucket=bkt, Key=key, Body=body, ContentType="text/x-test", Metadata={"owner": "ann"})
        assert r["ETag"] == f'"{hashlib.md5(body).hexdigest()}"'
    assert fast_count(server) - before == len(bodies)
    # Counted as the general path counts a PUT: one 2xx each, the body bytes received.
    assert metric(server, "anvil_requests_total", api="s3", operation="put_object", code="2xx") - ok == len(bodies)
    assert metric(server, "anvil_request_received_bytes_total", api="s3", operation="put_object") - received == \
        sum(map(len, bodies.values()))
    for key, body in bodies.items():
        got = s3p.get_object(Bucket=bkt, Key=key)
        assert got["Body"].read() == body
        assert got["ContentType"] == "text/x-test" and got["Metadata"] == {"owner": "ann"}
    # A second PUT replaces the first (unversioned bucket: no version header).
    r = s3p.put_object(Bucket=bkt, Key="a/1", Body=b"again")
    assert "x-amz-version-id" not in r["ResponseMetadata"]["HTTPHeaders"]
    assert s3p.get_object(Bucket=bkt, Key="a/1")["Body"].read() == b"again"
    assert s3p.get_object(Bucket=bkt, Key="a/1")["ContentType"] == "binary/octet-stream"


def test_answers_and_journal_events_are_the_general_paths(server: AnvilServer, s3p) -> None:
    bucket = unique_bucket("fp")
    s3p.create_bucket(Bucket=bucket)
    versioned = unique_bucket("fpv")
    s3p.create_bucket(Bucket=versioned)
    s3p.put_bucket_versioning(Bucket=versioned, VersioningConfiguration={"Status": "Enabled"})
    body = b"same body"
    md5 = base64.b64encode(hashlib.md5(body).digest()).decode()
    before = fast_count(server)
    for b in (bucket, versioned):
        for signed in ({}, {"content-md5": md5, "content-type": "text/plain", "x-amz-meta-k": "v"}):
            for payload in (None, "UNSIGNED-PAYLOAD"):
                fast = exchange(server, request_bytes(server, f"/{b}/fast", body, signed=signed,
                                                      payload_hash=payload))[0]
                general = exchange(server, request_bytes(server, f"/{b}/general", body, signed=signed,
                                                         payload_hash=payload, extra=FORCE_GENERAL))[0]
                same(fast, general)
                assert fast[0] == 200 and ("x-amz-version-id" in dict(fast[1])) == (b == versioned)
    assert fast_count(server) - before == 8  # the "fast" PUTs, none of the forced ones
    # The journal: the same events but for the key and what names the write.
    events, after = [], 0
    while True:
        page = httpx.get(server.endpoint + "/anvil/v1/admin/journal", params={"after": after, "limit": 1000},
                         headers=server.auth_headers(), timeout=30).json()["events"]
        if not page:
            break
        after = page[-1]["seq"]
        events += [e for e in page if e["kind"] == "object.put" and e["scope"].split("/")[0] in (bucket, versioned)]
    assert len(events) == 16
    volatile = {"key", "version_id", "seq", "ts", "request_id", "scope", "hash", "prev_hash"}
    for fast_event, general_event in zip(events[0::2], events[1::2], strict=True):
        f, g = ({k: v for k, v in e.items() if k not in volatile} for e in (fast_event, general_event))
        f["payload"], g["payload"] = ({k: v for k, v in e["payload"].items() if k not in volatile}
                                      for e in (fast_event, general_event))
        assert f == g and fast_event["request_id"] and fast_event["payload"]["key"] == "fast"


def test_refused_requests_get_the_general_answer_and_store_nothing(server: AnvilServer, s3p, bkt: str) -> None:
    body = b"refused body"
    before = fast_count(server)
    cases = [
        # A wrong signature: 403 SignatureDoesNotMatch.
        (request_bytes(server, f"/{bkt}/r1", body, secret="wrong-secret"), 403, b"SignatureDoesNotMatch"),
        # A Content-MD5 of other bytes: 400 BadDigest.
        (request_bytes(server, f"/{bkt}/r2", body,
                       signed={"content-md5": base64.b64encode(hashlib.md5(b"other").digest()).decode()}),
         400, b"BadDigest"),
        # A declared payload hash of other bytes: 400 XAmzContentSHA256Mismatch.
        (request_bytes(server, f"/{bkt}/r3", body, payload_hash=hashlib.sha256(b"other").hexdigest()),
         400, b"XAmzContentSHA256Mismatch"),
        # No such bucket: 404 NoSuchBucket.
        (request_bytes(server, "/no-such-bucket-fp/r4", body), 404, b"NoSuchBucket"),
        # An unsigned x-amz-* header: 403 (HeadersNotSigned).
        (request_bytes(server, f"/{bkt}/r5", body, extra={"x-amz-meta-late": "1"}), 403, b"AccessDenied"),
    ]
    for data, status, code in cases:
        answer = exchange(server, data)[0]
        assert answer[0] == status and code in answer[2], answer
        forced = exchange(server, data.replace(b"\r\n\r\n", b"\r\nx-general: 1\r\n\r\n", 1))[0]
        same(answer, forced)
    assert fast_count(server) == before
    listed = s3p.list_objects_v2(Bucket=bkt, Prefix="r").get("Contents", [])
    assert listed == []


def test_conditional_and_other_puts_are_declined(server: AnvilServer, s3p, bkt: str) -> None:
    s3p.put_object(Bucket=bkt, Key="cond", Body=b"one")
    before = fast_count(server)
    with pytest.raises(ClientError) as e:
        s3p.put_object(Bucket=bkt, Key="cond", Body=b"two", IfNoneMatch="*")
    assert e.value.response["Error"]["Code"] == "PreconditionFailed"
    s3p.put_object(Bucket=bkt, Key="cond-new", Body=b"two", IfNoneMatch="*")
    s3p.put_object(Bucket=bkt, Key="tagged", Body=b"t", Tagging="a=b")
    s3p.put_object(Bucket=bkt, Key="sys", Body=b"s", CacheControl="no-cache")
    assert s3p.get_object(Bucket=bkt, Key="sys")["CacheControl"] == "no-cache"
    s3_client(server).put_object(Bucket=bkt, Key="crc", Body=b"c")  # boto3's default: a CRC32 checksum
    # boto3's refusals: a wrong secret, a Content-MD5 of other bytes (declined once the body is in).
    with pytest.raises(ClientError) as e:
        s3_client(server, secret="not-the-secret", request_checksum_calculation="when_required").put_object(
            Bucket=bkt, Key="bad-secret", Body=b"b")
    assert e.value.response["Error"]["Code"] == "SignatureDoesNotMatch"
    with pytest.raises(ClientError) as e:
        s3p.put_object(Bucket=bkt, Key="bad-md5", Body=b"b",
                       ContentMD5=base64.b64encode(hashlib.md5(b"other").digest()).decode())
    assert e.value.response["Error"]["Code"] == "BadDigest"
    # A bucket with a lifecycle rule: its PUT answers carry x-amz-expiration (the general path's).
    s3p.put_bucket_lifecycle_configuration(Bucket=bkt, LifecycleConfiguration={"Rules": [
        {"ID": "exp", "Filter": {"Prefix": "exp/"}, "Status": "Enabled", "Expiration": {"Days": 3}}]})
    try:
        r = s3p.put_object(Bucket=bkt, Key="exp/a", Body=b"e")
        assert 'rule-id="exp"' in r["Expiration"]
    finally:
        s3p.delete_bucket_lifecycle(Bucket=bkt)
    assert fast_count(server) == before
    assert s3p.get_object(Bucket=bkt, Key="cond")["Body"].read() == b"one"
    assert [o["Key"] for o in s3p.list_objects_v2(Bucket=bkt, Prefix="bad-").get("Contents", [])] == []
    s3p.put_object(Bucket=bkt, Key="after", Body=b"fast again")  # the lifecycle rule gone: fast again
    assert fast_count(server) == before + 1


def test_pipelined_put_then_get_and_a_longer_body(server: AnvilServer, s3p, bkt: str) -> None:
    body = b"pipelined body"
    put = request_bytes(server, f"/{bkt}/pipe", body)
    creds = dev_credentials(server)
    host = server.endpoint.removeprefix("http://")
    headers, _ = sign("GET", f"{server.endpoint}/{bkt}/pipe", creds, headers={"host": host})
    get = (f"GET /{bkt}/pipe HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
           + "\r\n").encode("latin-1")
    before = fast_count(server)
    answers = exchange(server, put + get + request_bytes(server, f"/{bkt}/pipe2", body), 3)
    assert [a[0] for a in answers] == [200, 200, 200]
    assert answers[1][2] == body
    # The first PUT is answered here; the GET and the PUT behind it, parsed while it was in flight, wait
    # in the pipeline and take the general path, in order.
    assert fast_count(server) - before == 1
    # A body longer than declared: the bytes past the declared length are the next "request" (HTTP's
    # framing), which is no request: 400 and the connection closed, as on the general path. The declared
    # bytes were a whole PUT: refused when they do not match the signed hash, stored when unsigned.
    for key, payload in (("long-signed", None), ("long-unsigned", "UNSIGNED-PAYLOAD")):
        answers = []
        for extra in ({}, FORCE_GENERAL):
            data = request_bytes(server, f"/{bkt}/{key}", body + b"EXTRA", payload_hash=payload, length=len(body),
                                 extra=extra)
            with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
                sock.sendall(data)
                answers.append(read_answers(sock, 1)[0])
                assert sock.recv(65536) == b""  # closed after it
        same(answers[0], answers[1])
        assert answers[0][0] == 400 and answers[0][2] == b"Invalid HTTP request received."
    with pytest.raises(ClientError):
        s3p.head_object(Bucket=bkt, Key="long-signed")
    deadline = time.monotonic() + 10
    while True:
        try:
            assert s3p.get_object(Bucket=bkt, Key="long-unsigned")["Body"].read() == body
            break
        except ClientError:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_client_gone_mid_body_stores_nothing(server: AnvilServer, s3p, bkt: str) -> None:
    body = b"z" * 4000
    data = request_bytes(server, f"/{bkt}/gone", body)
    before = metric(server, "anvil_requests_total", api="s3", operation="put_object", code="4xx")
    fast = fast_count(server)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(data[:-1000])  # the head and part of the body, then gone
    deadline = time.monotonic() + 10
    while metric(server, "anvil_requests_total", api="s3", operation="put_object", code="4xx") == before:
        assert time.monotonic() < deadline, "the disconnect was not counted"
        time.sleep(0.05)
    assert fast_count(server) == fast
    assert "client disconnected during upload of PUT" in server.log()
    with pytest.raises(ClientError):
        s3p.head_object(Bucket=bkt, Key="gone")
    # The connection's server side is healthy: the next PUT is answered (fast) as usual.
    assert exchange(server, request_bytes(server, f"/{bkt}/gone", b"ok"))[0][0] == 200
    assert fast_count(server) == fast + 1


def test_a_commit_that_fails_is_answered_as_the_general_path_answers_it(server: AnvilServer, s3p) -> None:
    """The bucket goes away between the head (checked, 100 Continue sent) and the body: the writer refuses
    the version, and the answer is the gateway's error for it, on a connection that stays usable."""
    answers = []
    bucket = unique_bucket("fpgone")
    metric_before = metric(server, "anvil_requests_total", api="s3", operation="put_object", code="4xx")
    fast_before = fast_count(server)
    for extra in ({}, FORCE_GENERAL):
        s3p.create_bucket(Bucket=bucket)
        data = request_bytes(server, f"/{bucket}/k", b"late body", signed={"expect": "100-continue"}, extra=extra)
        head, _, body = data.partition(b"\r\n\r\n")
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(head + b"\r\n\r\n")
            assert sock.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
            s3p.delete_bucket(Bucket=bucket)
            sock.sendall(body)
            answers.append(read_answers(sock, 1)[0])
            # The connection is still good for the next request.
            sock.sendall(request_bytes(server, f"/{bucket}/k2", b"x"))
            assert read_answers(sock, 1)[0][0] == 404
    same(answers[0], answers[1])
    # Counted as the general path counts it: a 4xx PUT each (and the two 404s after them).
    assert metric(server, "anvil_requests_total", api="s3", operation="put_object", code="4xx") - metric_before == 4
    assert fast_count(server) - fast_before == 1  # the first one was answered by the fast path
    status, headers, doc = answers[0]
    assert status == 404 and b"<Code>NoSuchBucket</Code>" in doc and b"<Resource>/" in doc
    assert "connection" not in dict(headers)
